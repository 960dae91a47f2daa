"""Dynamic sampling (grpo.dynamic_sampling): which groups are informative, which are kept and in
what order, rounds until enough are, prompts of several rounds re-padded to the longest, the
same selection gathered from global arrays across two processes, and the settings' checks. The
loop-level tests: tests/test_loop.py and tests/test_resume.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reczero_jax import distributed, grpo
from reczero_jax import mesh as meshlib
from reczero_jax.config import GRPOConfig, load_config
from reczero_jax.policy import response_hidden, token_stats
from reczero_jax.train.dynamic import left_padded_prompts, sample_informative
from reczero_jax.train.step import Rollout
from tests.helpers import G, P, R, fake_rollout, free_port, tiny_model, wait_for

PAD = 0


def test_a_group_is_informative_when_its_values_are_not_all_equal():
    rewards = np.array([[-1.0, -1.0], [0.5, -1.0], [0.25, 0.25], [1.0, 1.0 + 1e-6]], np.float32)
    np.testing.assert_array_equal(grpo.informative_groups(rewards), [False, True, False, True])
    flags = np.array([[True, True, True], [False, True, False], [False, False, False]])
    np.testing.assert_array_equal(grpo.informative_groups(flags), [False, True, False])
    with pytest.raises(ValueError, match=r"must be \[B, G\]"):
        grpo.informative_groups(rewards.reshape(-1))


def test_selection_takes_informative_groups_in_order_then_fills_with_dropped_ones():
    informative = np.array([False, True, False, True, True, False])
    np.testing.assert_array_equal(grpo.filled_selection(informative, 2), [1, 3])
    np.testing.assert_array_equal(grpo.filled_selection(informative, 3), [1, 3, 4])
    # Fewer informative than asked for: the dropped ones fill up, in the order drawn.
    np.testing.assert_array_equal(grpo.filled_selection(informative, 5), [1, 3, 4, 0, 2])
    np.testing.assert_array_equal(grpo.filled_selection(np.zeros(4, bool), 4), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="cannot select 7 groups"):
        grpo.filled_selection(informative, 7)


def scripted_round(seed, informative, prompt_length=P):
    """A fake scored rollout of len(informative) groups, group b's rewards spread iff
    informative[b] (else all -1), advantages from them; prompts left-padded to
    ``prompt_length``; true ratings 1..B (+ 10 seed)."""
    scored = fake_rollout(seed)
    batch = len(informative)
    rewards = np.where(np.asarray(informative)[:, None], np.linspace(-1, 1, G), -1.0)
    scored = jax.tree.map(lambda x: x[:batch], scored)._replace(
        rewards=jnp.asarray(rewards, jnp.float32),
        advantages=grpo.group_advantages(jnp.asarray(rewards.ravel()), G).reshape(batch, G))
    truths = jnp.arange(1, batch + 1, dtype=jnp.float32) + 10 * seed
    return left_padded_prompts(scored, prompt_length, PAD), truths


def run_rounds(rounds, prompts, **config):
    calls = []

    def sample_round(round_index):
        calls.append(round_index)
        return rounds[round_index]

    sampled = sample_informative(sample_round, prompts, GRPOConfig(dynamic_sampling=True,
                                                                   **config), PAD)
    return sampled, calls


def test_rounds_run_until_enough_groups_are_informative_and_keep_their_order():
    rounds = [scripted_round(0, [False, True, False, False]),
              scripted_round(1, [True, False, True, True], prompt_length=P + 4),
              scripted_round(2, [True, True, True, True])]
    sampled, calls = run_rounds(rounds, 3, max_sampling_rounds=3)

    assert calls == [0, 1]  # two rounds held 4 informative groups: the third is not drawn
    assert sampled.counts == {"groups_kept": 3, "groups_dropped": 5, "sampling_rounds": 2,
                              "prompts_consumed": 8}
    picked = [(0, 1), (1, 0), (1, 2)]  # (round, row): informative, in the order drawn
    scored = sampled.scored
    assert scored.prompt_ids.shape == (3, P + 4) and scored.responses.shape[:2] == (3, G)
    for name in ("responses", "response_mask", "old_logp", "rewards", "advantages",
                 "format_ok", "ratings", "lengths"):
        expected = np.stack([np.asarray(getattr(rounds[k][0], name))[b] for k, b in picked])
        np.testing.assert_array_equal(np.asarray(getattr(scored, name)), expected, err_msg=name)
    np.testing.assert_array_equal(sampled.truths, [2.0, 11.0, 13.0])
    assert grpo.informative_groups(scored.rewards).all()
    # Round 0's prompt (P tokens) left-padded to round 1's P + 4: pads then the same tokens.
    ids, mask = np.asarray(scored.prompt_ids[0]), np.asarray(scored.prompt_mask[0])
    np.testing.assert_array_equal(ids[:4], PAD)
    np.testing.assert_array_equal(mask[:4], 0)
    np.testing.assert_array_equal(ids[4:], np.asarray(rounds[0][0].prompt_ids[1]))
    np.testing.assert_array_equal(mask[4:], np.asarray(rounds[0][0].prompt_mask[1]))
    np.testing.assert_array_equal(scored.prompt_ids[1:], np.asarray(rounds[1][0].prompt_ids)[[0, 2]])


def test_when_rounds_run_out_dropped_groups_fill_the_batch_with_zero_advantage():
    rounds = [scripted_round(0, [False, False, True, False]),
              scripted_round(1, [False, False, False, False]),
              scripted_round(2, [True, True, True, True])]
    sampled, calls = run_rounds(rounds, 4, max_sampling_rounds=2)

    assert calls == [0, 1]
    assert sampled.counts == {"groups_kept": 1, "groups_dropped": 7, "sampling_rounds": 2,
                              "prompts_consumed": 8}
    np.testing.assert_array_equal(sampled.truths, [3.0, 1.0, 2.0, 4.0])  # kept, then dropped
    advantages = np.asarray(sampled.scored.advantages)
    assert np.abs(advantages[0]).min() > 0.5 and not advantages[1:].any()


def test_the_filter_metric_may_be_the_format_flag():
    scored, truths = scripted_round(0, [True, True])
    scored = scored._replace(format_ok=jnp.asarray([[True, True], [False, True]]))
    sampled, _ = run_rounds([(scored, truths)], 2, max_sampling_rounds=1,
                            dynamic_sampling_metric="format")
    assert sampled.counts["groups_kept"] == 1  # both rewards spread; one format spread
    np.testing.assert_array_equal(sampled.truths, [2.0, 1.0])


def test_rounds_sharded_over_a_mesh_are_gathered_on_device():
    mesh = meshlib.make_mesh(data=4)
    rounds = [scripted_round(0, [False, True, False, True]),
              scripted_round(1, [True, False, False, False], P + 4)]
    rounds = [jax.device_put(part, meshlib.batch_sharding(mesh, part)) for part in rounds]
    assert len(rounds[0][0].responses.sharding.device_set) == 4
    sampled, _ = run_rounds(rounds, 4, max_sampling_rounds=2)
    np.testing.assert_array_equal(sampled.truths, [2.0, 4.0, 11.0, 1.0])
    assert sampled.scored.prompt_ids.shape == (4, P + 4)


# --- several processes: the same selection everywhere, gathered from global arrays ----------

MESH = {"data": 2, "fsdp": 2, "tensor": 2}
GROUPS = 8


def synthetic_rollout(step: int, vocab: int) -> Rollout:
    """The whole global rollout of ``step`` (GROUPS prompts) as numpy arrays, the same in
    every process."""
    rng = np.random.RandomState(step)
    prompt_mask = np.ones((GROUPS, P), np.int32)
    prompt_mask[1::2, : 2 + step] = 0  # left padding, different per step
    lengths = rng.randint(1, R + 1, (GROUPS, G)).astype(np.int32)
    rewards = rng.randn(GROUPS, G).astype(np.float32)
    return Rollout(
        prompt_ids=rng.randint(4, vocab, (GROUPS, P)).astype(np.int32), prompt_mask=prompt_mask,
        responses=rng.randint(4, vocab, (GROUPS, G, R)).astype(np.int32),
        response_mask=(np.arange(R) < lengths[..., None]).astype(np.float32),
        old_logp=np.zeros((GROUPS, G, R), np.float32), rewards=rewards,
        advantages=rewards - rewards.mean(1, keepdims=True), format_ok=np.ones((GROUPS, G), bool),
        ratings=np.full((GROUPS, G), 3.0, np.float32), lengths=lengths)


def global_rounds(mesh):
    """``sample_round`` for this process: round k's rollout (8 groups: those k, k+3, k+6 of
    equal rewards; round 1's prompts 4 tokens longer) and ratings, each process feeding its
    block of the global arrays."""
    index, count = distributed.process_batch_share(mesh)
    rows = slice(index * GROUPS // count, (index + 1) * GROUPS // count)

    def sample_round(k):
        scored = synthetic_rollout(k, 96)
        rewards = scored.rewards.copy()
        rewards[k::3] = -1.0
        scored = scored._replace(rewards=rewards)
        if k:
            pad = ((0, 0), (4, 0))
            scored = scored._replace(prompt_ids=np.pad(scored.prompt_ids, pad, constant_values=PAD),
                                     prompt_mask=np.pad(scored.prompt_mask, pad))
        truths = np.arange(GROUPS, dtype=np.float32) + 100 * k
        return distributed.global_batch(jax.tree.map(lambda x: x[rows], (scored, truths)), mesh)

    return sample_round


def selected(mesh) -> dict:
    """The selection of 8 groups out of two rounds of ``global_rounds``, as host lists."""
    sampled = sample_informative(global_rounds(mesh), 8, GRPOConfig(
        dynamic_sampling=True, max_sampling_rounds=2), PAD)
    truths, ids, advantages = distributed.to_host((sampled.truths, sampled.scored.prompt_ids,
                                                   sampled.scored.advantages))
    return {"counts": sampled.counts, "truths": truths.tolist(), "prompt_ids": ids.tolist(),
            "advantages": advantages.tolist()}


@pytest.mark.slow
def test_two_processes_select_and_gather_the_groups_like_one():
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    for name in distributed.ENV.values():
        env.pop(name, None)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.test_dynamic", f"localhost:{port}", str(index)],
        cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for index in range(2)]
    expected = selected(meshlib.make_mesh(**MESH))  # this process's 8 devices
    assert expected["counts"] == {"groups_kept": 8, "groups_dropped": 8, "sampling_rounds": 2,
                                  "prompts_consumed": 16}
    assert expected["truths"] == [1, 2, 4, 5, 7, 100, 102, 103]
    for output in wait_for(procs, timeout=300):
        result = json.loads(output.strip().splitlines()[-1])
        assert result == expected


def test_extra_left_padding_of_the_prompts_leaves_the_policy_log_probs_unchanged():
    """What re-padding a round's prompts to a longer round's relies on: the update's
    log-probs of the responses (positions come from the mask)."""
    model = tiny_model()
    scored = fake_rollout()
    padded = left_padded_prompts(scored, P + 5, pad_id=7)
    assert padded.prompt_ids.shape == (scored.prompt_ids.shape[0], P + 5)

    @nnx.jit
    def logp(model, prompt_ids, prompt_mask, responses):
        hidden = response_hidden(model, prompt_ids, prompt_mask, responses)
        return token_stats(model, hidden, responses).logp

    def response_logp(rollout):
        return np.asarray(logp(model, rollout.prompt_ids, rollout.prompt_mask,
                               rollout.responses))[np.asarray(rollout.response_mask) > 0]

    np.testing.assert_allclose(response_logp(padded), response_logp(scored), atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["grpo.max_sampling_rounds=0"], "grpo.max_sampling_rounds=0 must be >= 1"),
    (["grpo.dynamic_sampling_metric=spread"],
     "grpo.dynamic_sampling_metric='spread' is not a known value"),
])
def test_dynamic_sampling_settings_are_checked_when_the_config_loads(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)
    config = load_config(None, ["grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=2",
                                "grpo.dynamic_sampling_metric=format"])
    assert (config.grpo.dynamic_sampling, config.grpo.max_sampling_rounds,
            config.grpo.dynamic_sampling_metric) == (True, 2, "format")


if __name__ == "__main__":  # one process of test_two_processes_select_and_gather_the_groups_like_one
    distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
    print(json.dumps(selected(meshlib.make_mesh(**MESH))))
