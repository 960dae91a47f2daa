"""GRPO / SFT update steps: shared vs naive forward, mesh vs one device, accumulation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reczero_jax import grpo
from reczero_jax import mesh as meshlib
from reczero_jax.config import GRPOConfig, OptimConfig
from reczero_jax.models import Decoder
from reczero_jax.policy import response_logits
from reczero_jax.sampling import generate
from reczero_jax.train import step
from reczero_jax.train.step import Trainer, rollout
from tests.helpers import (
    TINY,
    B,
    G,
    R,
    assert_same_loss_and_grads,
    assert_trees_close,
    fake_rollout,
    tiny_model,
)


def loss_and_grads(mesh, optim=None, grpo_config=None, gradients_only=False):
    trainer = Trainer(tiny_model(mesh=mesh), mesh, optim or OptimConfig(), grpo_config,
                      gradients_only=gradients_only)
    return trainer, trainer.grpo_loss_and_grads(fake_rollout())


@pytest.fixture(scope="module")
def single():
    return loss_and_grads(meshlib.make_mesh(1, 1, 1))


def test_shared_prompt_forward_matches_naive_in_loss_and_gradients(single):
    # Also: a gradients-only trainer (no optimizer state) gives the full trainer's gradients.
    _, naive = loss_and_grads(meshlib.make_mesh(1, 1, 1),
                              grpo_config=GRPOConfig(shared_prompt=False), gradients_only=True)
    assert_same_loss_and_grads(naive, single[1])


def test_gradients_only_trainer_holds_no_optimizer_state_and_refuses_to_update():
    trainer = Trainer(tiny_model(), meshlib.make_mesh(1, 1, 1), OptimConfig(),
                      gradients_only=True)
    assert trainer.opt_state is None
    ids = np.ones((B, 8), np.int32)
    for update in (lambda: trainer.grpo_step(fake_rollout()),
                   lambda: trainer.sft_step(ids, ids, ids),
                   lambda: trainer.memory_report(fake_rollout())):
        with pytest.raises(ValueError, match="built with gradients_only=True"):
            update()


def test_mesh_step_matches_one_device(single):
    mesh = meshlib.make_mesh(data=2, fsdp=2, tensor=2)
    sharded, result = loss_and_grads(mesh)
    assert_same_loss_and_grads(result, single[1])
    reference = single[0]
    for trainer in (sharded, reference):
        trainer.grpo_step(fake_rollout())
    assert_trees_close(sharded.params, reference.params, atol=1e-5)
    wq = sharded.params["layers"]["wq"][...]
    assert wq.sharding.spec == meshlib.logical_to_spec(("layers", "embed", "heads", "head_dim"))
    mu = sharded.opt_state[1][0].mu["layers"]["wq"][...]
    assert mu.sharding.spec == wq.sharding.spec


def even_token_reward(tokens, lengths, truths):
    """A jittable stand-in reward: the share of even token ids in each response."""
    mask = jnp.arange(tokens.shape[1]) < lengths[:, None]
    even = jnp.where(mask, tokens % 2 == 0, False).sum(1) / jnp.maximum(lengths, 1)
    return even.astype(jnp.float32), jnp.ones_like(lengths, bool), truths


def test_sampled_rollout_updates_on_a_data_parallel_mesh():
    """The sampler's outputs (prompts come back replicated) feed the update on a mesh with
    data > 1, where the update takes the batch split over data x fsdp."""
    mesh = meshlib.make_mesh(data=2, fsdp=2, tensor=2)
    trainer = Trainer(tiny_model(mesh=mesh), mesh, OptimConfig(learning_rate=1e-2),
                      GRPOConfig(group_size=G, max_new_tokens=R))
    prompts = fake_rollout()
    scored = rollout(trainer.model, even_token_reward, np.asarray(prompts.prompt_ids),
                     np.asarray(prompts.prompt_mask), np.full((B,), 3.0, np.float32),
                     jax.random.key(0), trainer.grpo_config)
    before = np.asarray(trainer.params["layers"]["wq"][...])
    metrics = trainer.grpo_step(scored)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert not np.array_equal(np.asarray(trainer.params["layers"]["wq"][...]), before)


def test_micro_batches_accumulate_exactly():
    for agg in ("token-mean", "seq-mean-token-mean"):
        config = GRPOConfig(loss_agg=agg)
        _, whole = loss_and_grads(meshlib.make_mesh(1, 1, 1), grpo_config=config,
                                  gradients_only=True)
        _, split = loss_and_grads(meshlib.make_mesh(1, 1, 1), optim=OptimConfig(micro_batches=2),
                                  grpo_config=config, gradients_only=True)
        assert_same_loss_and_grads(split, whole, atol=1e-6)


def test_batch_that_does_not_divide_the_mesh_is_a_readable_error():
    trainer = Trainer(tiny_model(), meshlib.make_mesh(data=2, fsdp=2, tensor=1),
                      OptimConfig(micro_batches=2))
    with pytest.raises(ValueError, match="does not divide the data x fsdp mesh axes"):
        trainer.check_batch(4)
    with pytest.raises(ValueError, match="not a multiple of optim.micro_batches"):
        trainer.check_batch(3)
    expected = "dimension 1 .'kv_heads', size 2. does not divide mesh axis 'tensor'"
    with pytest.raises(ValueError, match=expected):
        Trainer(Decoder(TINY, rngs=nnx.Rngs(0)), meshlib.make_mesh(1, 1, 8), OptimConfig())


def test_sft_step_lowers_the_response_loss():
    trainer = Trainer(tiny_model(), meshlib.make_mesh(1, 1, 1), OptimConfig(learning_rate=3e-3))
    rng = np.random.RandomState(0)
    ids = rng.randint(4, TINY.vocab_size, (4, 16))
    loss_mask = np.zeros((4, 16), np.int32)
    loss_mask[:, 10:] = 1
    losses = [trainer.sft_step(ids, np.ones_like(ids), loss_mask)["loss"] for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0]


def memory_trainer(budget_gib=0.0, micro_batches=1, remat=False, fsdp=1):
    mesh = meshlib.make_mesh(1, fsdp, 1)
    model = tiny_model(mesh=mesh)
    model.remat = remat
    return Trainer(model, mesh, OptimConfig(micro_batches=micro_batches,
                                            memory_budget_gib=budget_gib))


@pytest.fixture(scope="module")
def baseline_memory():
    """A one-device trainer and its compiled GRPO update's memory report (compiled once)."""
    trainer = memory_trainer()
    return trainer, trainer.memory_report(fake_rollout())


def test_memory_report_counts_at_least_the_parameters_and_moments(baseline_memory):
    trainer, report = baseline_memory
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.params))
    # Arguments hold the parameters and AdamW's two moments (plus the rollout batch).
    assert report["argument_size_in_bytes"] >= 3 * param_bytes
    assert report["temp_size_in_bytes"] > 0
    expected = (report["argument_size_in_bytes"] + report["output_size_in_bytes"]
                - report["alias_size_in_bytes"] + report["temp_size_in_bytes"])
    assert report["peak_bytes"] == expected


def test_memory_check_passes_under_budget_and_raises_over_it_naming_the_knobs(
        baseline_memory, monkeypatch):
    trainer, report = baseline_memory
    # The budget logic on the real report; recompiling for every budget would add nothing.
    monkeypatch.setattr(trainer, "memory_report", lambda batch: dict(report))
    peak_gib = report["peak_bytes"] / 2**30
    for budget in (0.0, 1.01 * peak_gib):  # 0: no check
        monkeypatch.setattr(trainer.optim, "memory_budget_gib", budget)
        assert trainer.check_memory(fake_rollout()) == report
    monkeypatch.setattr(trainer.optim, "memory_budget_gib", 0.99 * peak_gib)
    with pytest.raises(ValueError) as error:
        trainer.check_memory(fake_rollout())
    message = str(error.value)
    assert f"{peak_gib:.3f} GiB per device" in message
    assert f"optim.memory_budget_gib={0.99 * peak_gib:g}" in message
    for knob in ("optim.micro_batches (now 1", "model.remat=true (now false", "mesh.fsdp (now 1"):
        assert knob in message


@pytest.mark.slow  # three more compilations of the step
def test_each_knob_the_memory_error_names_lowers_the_estimate(baseline_memory):
    baseline = baseline_memory[1]["peak_bytes"]
    for knobs in (dict(micro_batches=2), dict(remat=True), dict(fsdp=2)):
        peak = memory_trainer(**knobs).memory_report(fake_rollout())["peak_bytes"]
        assert peak < 0.9 * baseline, knobs


def test_place_shards_every_field_on_the_batch_axes_by_its_rank():
    mesh = meshlib.make_mesh(data=2, fsdp=2, tensor=2)
    placed = Trainer(tiny_model(mesh=mesh), mesh, OptimConfig()).place(fake_rollout())
    for name, array in placed._asdict().items():
        assert array.sharding.spec == meshlib.logical_to_spec(
            ("batch",) + (None,) * (array.ndim - 1)), name
        assert array.sharding.shard_shape(array.shape)[0] == B // 4, name


def test_kl_reference_is_a_frozen_copy_of_the_initial_policy():
    """The update donates the policy's arrays; the reference (the same model here, as in the
    loop) must survive in buffers of its own and stay the initial weights."""
    mesh = meshlib.make_mesh(1, 1, 1)
    model = tiny_model(mesh=mesh)
    initial = [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(model))]
    trainer = Trainer(model, mesh, OptimConfig(learning_rate=1e-2),
                      GRPOConfig(kl_coef=0.1), reference=model)
    for _ in range(2):
        metrics = trainer.grpo_step(fake_rollout())
    assert np.isfinite(metrics["kl"]) and metrics["kl"] > 0  # the policy moved off the reference
    for reference, policy, start in zip(jax.tree.leaves(trainer.ref_params),
                                        jax.tree.leaves(trainer.params), initial, strict=True):
        np.testing.assert_array_equal(np.asarray(reference), start)
        assert not np.array_equal(np.asarray(policy), start)
    with pytest.raises(ValueError, match="pass the reference policy"):
        Trainer(tiny_model(mesh=mesh), mesh, OptimConfig(), GRPOConfig(kl_coef=0.1))


def test_several_updates_per_rollout_recompute_the_old_logprobs_with_the_policy():
    """The sampler's log-probs (here zeros, as a truncated top-k sampler's would differ too)
    are replaced by the policy's before the first update: with the parameters held fixed
    (learning rate 0) every update's ratio is exactly 1, and the gap is logged."""
    mesh = meshlib.make_mesh(1, 1, 1)
    config = GRPOConfig(updates_per_rollout=2, top_k=3, temperature=0.7)
    trainer = Trainer(tiny_model(mesh=mesh), mesh, OptimConfig(learning_rate=0.0), config)
    batch = fake_rollout()
    logits = response_logits(trainer.model, batch.prompt_ids, batch.prompt_mask, batch.responses)
    expected = np.asarray(grpo.token_logprobs(logits, batch.responses, 0.7))
    recomputed, gap = trainer.with_policy_logprobs(batch)
    np.testing.assert_allclose(np.asarray(recomputed.old_logp), expected, atol=1e-5)
    tokens = np.asarray(batch.response_mask) != 0
    assert gap["sampler_logp_gap_max"] == pytest.approx(np.abs(expected[tokens]).max(), rel=1e-5)
    assert gap["sampler_logp_gap_mean"] == pytest.approx(np.abs(expected[tokens]).mean(),
                                                         rel=1e-5)
    metrics = trainer.grpo_updates(batch)
    assert metrics["sampler_logp_gap_max"] == pytest.approx(gap["sampler_logp_gap_max"])
    for name in ("ratio_min", "ratio_mean", "ratio_max"):
        assert metrics[name] == pytest.approx(1.0, abs=1e-5), name
    # One update per rollout is on-policy by construction: nothing to recompute or log. (The
    # update itself is not what this checks, so it is not compiled a second time.)
    single = Trainer(tiny_model(mesh=mesh), mesh, OptimConfig(learning_rate=0.0))
    single.with_policy_logprobs = lambda batch: pytest.fail("recomputed on-policy log-probs")
    single.grpo_step = lambda batch: {"loss": 0.5}
    assert single.grpo_updates(batch) == {"loss": 0.5}


def test_logged_entropy_is_at_the_sampling_temperature():
    mesh = meshlib.make_mesh(1, 1, 1)
    trainer = Trainer(tiny_model(mesh=mesh), mesh, OptimConfig(learning_rate=0.0),
                      GRPOConfig(temperature=0.5))
    batch = fake_rollout()
    logits = response_logits(trainer.model, batch.prompt_ids, batch.prompt_mask, batch.responses)
    flat = lambda x: x.reshape(B * G, *x.shape[2:])  # noqa: E731
    expected = grpo.entropy_from_logits(flat(logits), flat(batch.response_mask), 0.5)
    assert trainer.grpo_step(batch)["entropy"] == pytest.approx(float(expected), rel=1e-5)
    # At temperature 1 it would differ: the test tells the two apart.
    assert float(expected) != pytest.approx(
        float(grpo.entropy_from_logits(flat(logits), flat(batch.response_mask))), rel=1e-3)


def test_shared_prompt_setting_reaches_the_sampler(monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["shared_prompt"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(step, "generate", spy)
    batch = fake_rollout()
    for shared in (True, False):
        rollout(tiny_model(), even_token_reward, np.asarray(batch.prompt_ids),
                np.asarray(batch.prompt_mask), np.full((B,), 3.0, np.float32), jax.random.key(0),
                GRPOConfig(group_size=G, max_new_tokens=R, shared_prompt=shared))
    assert seen == [True, False]
