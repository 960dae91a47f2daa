"""LoRA: zero adapters leave the logits unchanged, merging equals the forward, only adapters
train, the reference is the base, sampler and trainer agree, the PEFT export loads in peft."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from reczero_jax import grpo, lora, sampling
from reczero_jax import mesh as meshlib
from reczero_jax.config import GRPOConfig, OptimConfig, load_config
from reczero_jax.models import from_pretrained
from reczero_jax.models.decoder import causal_mask, positions_from_mask
from reczero_jax.policy import response_logprobs
from reczero_jax.train.checkpoint import Checkpointer
from reczero_jax.train.step import Trainer
from tests.helpers import TINY, fake_rollout, left_padded_prompts, run_train_group, tiny_model

WITH_HEAD = (*lora.TARGETS, "lm_head")  # the seven projections and the LM head


def with_adapters(model, seed=1, rank=4, targets=lora.TARGETS):
    """``model`` with LoRA on ``targets`` whose B factors are non-zero (as after training)."""
    lora.add_lora(model, rank=rank, alpha=2.0 * rank, targets=targets)
    adapters = model.layers.adapters
    for k, name in enumerate(adapters.targets):
        b = getattr(adapters, f"{name}_b")
        b[...] = 0.3 * jax.random.normal(jax.random.key(seed + k), b.shape, b.dtype)
    return model


def logits_of(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def test_zero_adapters_give_the_base_logits_and_merging_equals_the_forward():
    ids, mask = left_padded_prompts(batch=2, length=16)
    model = tiny_model()
    base = logits_of(model, ids, mask)
    lora.add_lora(model, rank=4, alpha=8.0)
    np.testing.assert_array_equal(logits_of(model, ids, mask), base)  # B = 0: exactly the base
    a = model.layers.adapters.wo_a
    assert a.shape == (2, 4, 8, 4) and model.layers.adapters.wo_b.shape == (2, 4, 32)
    assert a.get_metadata()["logical_axes"] == ("layers", "heads", "head_dim", "lora_rank")
    model = with_adapters(tiny_model())
    adapted = logits_of(model, ids, mask)
    assert np.abs(adapted - base).max() > 0.1
    merged = lora.merge_lora(model)
    assert not lora.has_lora(merged) and lora.has_lora(model)
    np.testing.assert_allclose(logits_of(merged, ids, mask), adapted, atol=1e-5)
    np.testing.assert_array_equal(logits_of(lora.adapters_off(model), ids, mask), base)


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_adapter_adds_its_low_rank_logits_and_merges_into_an_untied_head(tied):
    """logits = h @ W_head + s (h @ A) @ B (W_head = embed^T when tied); zero B changes
    nothing; merging a tied head unties it (embed^T + s A B) and leaves the embedding."""
    ids, mask = left_padded_prompts(batch=2, length=16)
    model = tiny_model(config=dataclasses.replace(TINY, tie_word_embeddings=tied))
    base = logits_of(model, ids, mask)
    lora.add_lora(model, rank=4, alpha=8.0, targets=["wq", "lm_head"])
    np.testing.assert_array_equal(logits_of(model, ids, mask), base)
    adapters = model.layers.adapters
    assert adapters.lm_head_a.shape == (32, 4) and adapters.lm_head_b.shape == (4, 96)
    assert adapters.lm_head_a.get_metadata()["logical_axes"] == ("embed", "lora_rank")
    assert adapters.lm_head_b.get_metadata()["logical_axes"] == ("lora_rank", "vocab")
    assert lora.adapter_count(model.config, 4, adapters.targets) == sum(
        x.size for x in jax.tree.leaves(nnx.state(model, lora.LoRAParam))) == 4 * (
        2 * (32 + 32) + 32 + 96)
    adapters.lm_head_b[...] = 0.3 * jax.random.normal(jax.random.key(3), (4, 96))
    adapted = logits_of(model, ids, mask)
    hidden, _ = model.forward(jnp.asarray(ids)[:, None], positions_from_mask(mask)[:, None],
                              causal_mask(jnp.asarray(mask))[:, None])  # wq's B is zero
    expected = base + 2.0 * np.asarray(hidden[:, 0] @ adapters.lm_head_a[...]
                                       @ adapters.lm_head_b[...])
    assert np.abs(adapted - base).max() > 0.1
    np.testing.assert_allclose(adapted, expected, atol=1e-5)
    np.testing.assert_array_equal(logits_of(lora.adapters_off(nnx.clone(model)), ids, mask), base)

    merged = lora.merge_lora(model)
    assert not merged.config.tie_word_embeddings and model.config.tie_word_embeddings == tied
    head = model.embed[...].T if tied else model.lm_head[...]
    np.testing.assert_allclose(merged.lm_head[...], head + 2.0 * adapters.lm_head_a[...]
                               @ adapters.lm_head_b[...], atol=1e-6)
    np.testing.assert_array_equal(merged.embed[...], model.embed[...])
    np.testing.assert_allclose(logits_of(merged, ids, mask), adapted, atol=1e-5)


def test_lora_config_is_validated_at_load():
    config = load_config(None, ["model.lora.rank=8", "model.lora.targets=[wq,w_down]"])
    assert config.model.lora.targets == ["wq", "w_down"]
    assert load_config(None, ["model.lora.rank=8", "model.lora.targets=[wq,lm_head]"]
                       ).model.lora.targets == ["wq", "lm_head"]
    with pytest.raises(ValueError, match=r"model.lora.targets=\['q_proj'\]: unknown q_proj "
                                         r"\(use some of: wq, wk, .*, w_down, lm_head\)"):
        load_config(None, ["model.lora.rank=8", "model.lora.targets=[q_proj]"])
    with pytest.raises(ValueError, match="model.lora.rank=-1 must be >= 0"):
        load_config(None, ["model.lora.rank=-1"])
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(lora.add_lora(tiny_model(), rank=2, alpha=2), rank=2, alpha=2)


def test_only_adapters_train_and_the_kl_reference_is_the_base():
    """Parameters, moments and gradients are the adapters alone (the LM head's included); the
    frozen base stays bit-equal; no reference copy exists, and the KL term is the one against
    the base's log-probs (the same weights, every adapter off, the head's too)."""
    mesh = meshlib.make_mesh(1, 2, 1)
    base_model = meshlib.shard_model(tiny_model(mesh=mesh), mesh)
    base_state = [np.array(x) for x in jax.tree.leaves(nnx.state(base_model, nnx.Param))]
    model = with_adapters(base_model, targets=WITH_HEAD)
    config = GRPOConfig(kl_coef=0.1, group_size=2)
    trainer = Trainer(model, mesh, OptimConfig(learning_rate=1e-2), config, reference=model)
    assert trainer.ref_params is None
    assert {type(v) for v in jax.tree.leaves(trainer.params, is_leaf=lambda x: isinstance(
        x, nnx.Variable))} == {lora.LoRAParam}
    param_count = sum(x.size for x in jax.tree.leaves(trainer.params))
    assert param_count == lora.adapter_count(model.config, 4, WITH_HEAD)
    moments = trainer.opt_state[1][0].mu
    assert jax.tree.structure(moments) == jax.tree.structure(trainer.params)

    batch = fake_rollout()
    policy = trainer.model
    logp = response_logprobs(policy, batch.prompt_ids, batch.prompt_mask, batch.responses)
    base_logp = response_logprobs(lora.adapters_off(trainer.model), batch.prompt_ids,
                                  batch.prompt_mask, batch.responses)
    mask = batch.response_mask.reshape(-1, batch.responses.shape[-1])
    expected_kl = grpo.masked_aggregate(
        grpo.kl_penalty(logp.reshape(mask.shape), base_logp.reshape(mask.shape), "k3"), mask,
        "token-mean", config.max_new_tokens).value
    before = [np.array(x) for x in jax.tree.leaves(trainer.params)]
    metrics = trainer.grpo_step(batch)
    assert float(expected_kl) > 1e-3
    assert metrics["kl"] == pytest.approx(float(expected_kl), rel=1e-4)
    for start, after in zip(base_state, jax.tree.leaves(trainer.frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(after), start)
    for after, start in zip(jax.tree.leaves(trainer.params), before, strict=True):
        assert not np.array_equal(np.asarray(after), start)  # every factor trained


def test_frozen_base_may_be_bfloat16_while_adapters_stay_float32():
    mesh = meshlib.make_mesh(1, 1, 1)
    model = lora.add_lora(tiny_model(mesh=mesh), rank=2, alpha=4)
    model = nnx.merge(*nnx.split(model, lora.LoRAParam, ...)[:2], jax.tree.map(
        lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
    trainer = Trainer(model, mesh, OptimConfig(), GRPOConfig(group_size=2))
    assert {x.dtype for x in jax.tree.leaves(trainer.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(trainer.params)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(trainer.grpo_step(fake_rollout())["loss"])


@pytest.mark.parametrize("layout", [(1, 2, 2), (1, 1, 1)])
def test_sampler_and_trainer_logprobs_agree_with_adapters(layout):
    """fp32: the sampler (the rollout copy with merged adapters on an fsdp mesh; the forward
    with adapters on one device) and the trainer's forward give the same log-probs, with
    adapters on the seven projections and the LM head; the rollout copy places the head's
    factors like the head (A's d like its rows, B's vocab like its columns)."""
    mesh = meshlib.make_mesh(*layout)
    model = with_adapters(meshlib.shard_model(tiny_model(mesh=mesh), mesh), targets=WITH_HEAD)
    assert sampling.use_rollout_layout(model, None) == (layout[1] > 1)
    copy = sampling.rollout_model(model)
    head = copy.lm_head[...].sharding.spec
    a, b = (getattr(copy.layers.adapters, f"lm_head_{f}")[...] for f in "ab")
    assert (a.sharding.spec[0], b.sharding.spec[1]) == (head[0], head[1])
    assert a.dtype == b.dtype == copy.dtype
    del copy
    ids, mask = left_padded_prompts(batch=2, length=12)
    sample = sampling.generate(model, ids, mask, num_samples=2, max_new_tokens=6,
                               rng=jax.random.key(0), eos_ids=())
    trainer = Trainer(model, mesh, OptimConfig(), GRPOConfig(group_size=2))
    length = sample.tokens.shape[-1]
    batch = fake_rollout()._replace(
        prompt_ids=jnp.asarray(ids), prompt_mask=jnp.asarray(mask), responses=sample.tokens,
        old_logp=sample.logprobs, lengths=sample.lengths,
        response_mask=(jnp.arange(length) < sample.lengths[..., None]).astype(jnp.float32),
        rewards=jnp.zeros((2, 2)), advantages=jnp.zeros((2, 2)),
        format_ok=jnp.ones((2, 2), bool), ratings=jnp.zeros((2, 2)))
    _, gap = trainer.with_policy_logprobs(batch)
    assert gap["sampler_logp_gap_max"] < 1e-5


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir):
    """A LoRA run directory whose step-1 checkpoint holds adapters alone (B non-zero), on the
    seven projections and the (tied) LM head."""
    run = tmp_path_factory.mktemp("lora_run")
    config = load_config(None, [f"model.path={tiny_model_dir}", f"run_dir={run}",
                                "model.lora.rank=4", "model.lora.alpha=8",
                                "model.lora.targets=[wq,wk,wv,wo,w_gate,w_up,w_down,lm_head]"])
    model = with_adapters(from_pretrained(tiny_model_dir), seed=5, targets=WITH_HEAD)
    trainer = Trainer(model, meshlib.single_device_mesh(), OptimConfig())
    with Checkpointer(run / "checkpoints") as ckpt:
        ckpt.save(1, params=trainer.params, opt_state=trainer.opt_state, rng_keys={},
                  data_state=None, config=dataclasses.asdict(config), metrics={}, force=True)
    return run, trainer.model


IDS = np.random.default_rng(0).integers(0, 49152, (2, 24)).astype(np.int32)


def test_export_merged_and_peft_adapter_load_with_the_adapted_logits(lora_run, tiny_model_dir,
                                                                     tmp_path, capsys):
    import peft

    run, model = lora_run
    ours = logits_of(model, IDS, np.ones_like(IDS))
    base = logits_of(lora.adapters_off(nnx.clone(model)), IDS, np.ones_like(IDS))
    assert np.abs(ours - base).max() > 1e-2  # the adapters reach the logits

    assert model.config.tie_word_embeddings  # the adapted head is the embedding's transpose
    assert run_train_group("export", "--run", run, "--out", tmp_path / "full") == 0
    # The merge unties the head: lm_head.weight written, the embedding left as the base's.
    assert not json.loads((tmp_path / "full" / "config.json").read_text())["tie_word_embeddings"]
    with safe_open(tmp_path / "full" / "model.safetensors", "np") as written:
        assert "lm_head.weight" in written.keys()
        with safe_open(tiny_model_dir / "model.safetensors", "np") as original:
            np.testing.assert_array_equal(written.get_tensor("model.embed_tokens.weight"),
                                          original.get_tensor("model.embed_tokens.weight"))
    full = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "full", dtype=torch.float32, attn_implementation="eager").eval()
    assert run_train_group("export", "--run", run, "--out", tmp_path / "adapter", "--adapter") == 0
    assert "merge_and_unload would add it to the embedding too" in capsys.readouterr().out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and {"q_proj", "lm_head"} <= set(config["target_modules"])
    vocab, width = model.config.vocab_size, model.config.hidden_size
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "np") as written:
        assert written.get_slice("base_model.model.lm_head.lora_A.weight").get_shape() == [4, width]
        assert written.get_slice("base_model.model.lm_head.lora_B.weight").get_shape() == [vocab, 4]
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    # peft adapts the tied lm_head's own forward (warning that it cannot tie adapters): the
    # embedding stays the base's, as ours.
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):
        adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = adapted(input_ids=torch.as_tensor(IDS)).logits.numpy()
        merged = full(input_ids=torch.as_tensor(IDS)).logits.numpy()
    print(f"\nmax |ours - peft| {np.max(np.abs(ours - theirs)):.2e}, max |ours - merged "
          f"export| {np.max(np.abs(ours - merged)):.2e}, logits spread {ours.std():.3f}")
    assert np.max(np.abs(ours - theirs)) < 1e-4
    assert np.max(np.abs(ours - merged)) < 1e-4
    with pytest.raises(ValueError, match="no LoRA adapters to export"):
        lora.save_peft_adapter(tiny_model(), tmp_path / "none")
