"""The rollout layout: rules and their fallbacks, the decode loop's collectives, and sampling
that equals the training-layout sampler's on the 8-device CPU mesh."""

import dataclasses
import logging

import jax
import numpy as np
import pytest
from flax import nnx

from reczero_jax import mesh as meshlib
from reczero_jax import sampling
from reczero_jax.collectives import collective_bytes
from reczero_jax.models import Decoder, ModelConfig
from reczero_jax.sampling import compile_rollout, generate
from tests.helpers import TINY, left_padded_prompts, tiny_model

NEW_TOKENS = 6
# 8 query and 4 kv heads: both divide the 4 chips of fsdp x tensor in (2, 4, 1) and (2, 2, 2);
# TINY's 2 kv heads do not (the fallback).
DIVIDING = dataclasses.replace(TINY, num_heads=8, num_kv_heads=4, head_dim=4)


def test_rollout_rules_shard_weights_tensor_parallel_and_batch_over_data():
    rules = meshlib.rollout_rules(meshlib.make_mesh(2, 2, 2), DIVIDING)
    assert rules["embed"] is None and rules["batch"] == "data"
    for axis in ("heads", "kv_heads", "mlp", "vocab"):
        assert rules[axis] == ("fsdp", "tensor")
    assert rules.notes == ()


def test_rollout_rules_fall_back_in_the_stated_order_and_say_so(caplog):
    qwen_like = ModelConfig(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                            intermediate_size=18944, num_layers=1, num_heads=28, num_kv_heads=4,
                            head_dim=128)
    with caplog.at_level(logging.WARNING, logger="reczero_jax.mesh"):
        # 8 chips: 4 kv heads do not divide 8; of fsdp (4) and tensor (2) fsdp is larger.
        rules = meshlib.rollout_rules(meshlib.make_mesh(1, 4, 2), qwen_like)
    assert rules["heads"] == rules["kv_heads"] == "fsdp"
    assert rules["mlp"] == rules["vocab"] == ("fsdp", "tensor")
    assert len(rules.notes) == 1 and "replicated over the remaining factor 2" in rules.notes[0]
    assert rules.notes[0] in caplog.text
    # No tensor axis: 28 heads do not divide 8, nothing smaller is left: replicated.
    rules = meshlib.rollout_rules(meshlib.make_mesh(1, 8, 1), qwen_like)
    assert rules["heads"] is None and rules["mlp"] == "fsdp"


def _abstract(mesh, config=TINY):
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), mesh=mesh))


@pytest.mark.parametrize("layout", [(2, 4, 1), (2, 2, 2)])
def test_decode_loop_gathers_no_weights_in_the_rollout_layout(layout):
    mesh = meshlib.make_mesh(*layout)
    model = _abstract(mesh, DIVIDING)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    per_step = {}
    for rollout_layout in (False, True):
        programs = compile_rollout(model, batch=8, prompt_length=64, num_samples=2,
                                   max_new_tokens=NEW_TOKENS, rollout_layout=rollout_layout)
        decode = collective_bytes(programs["decode"].as_text())
        assert decode.unknown_trip_counts == 0
        per_step[rollout_layout] = decode.by_kind["all-gather"] / NEW_TOKENS
    # The training layout gathers the fsdp-sharded weights at every step (what the rollout
    # layout exists to avoid), the rollout layout under 5 % of the parameter bytes.
    assert per_step[False] > 0.3 * param_bytes
    assert per_step[True] < 0.05 * param_bytes


@pytest.mark.parametrize(("layout", "config", "temperatures"), [
    ((2, 4, 1), DIVIDING, (1.0,)), ((2, 2, 2), DIVIDING, (0.0, 1.0)), ((1, 4, 2), TINY, (1.0,))])
def test_rollout_layout_samples_what_the_training_layout_samples(layout, config, temperatures):
    """Sampled (and on (2, 2, 2) greedy) tokens equal, log-probs within 1e-5 (float32).
    (1, 4, 2) with TINY: 2 kv heads do not divide 8 chips; attention falls back to tensor."""
    mesh = meshlib.make_mesh(*layout)
    model = meshlib.shard_model(tiny_model(mesh=mesh, config=config), mesh)
    ids, mask = left_padded_prompts(batch=8)
    for temperature in temperatures:
        kwargs = dict(num_samples=2, max_new_tokens=NEW_TOKENS, temperature=temperature,
                      rng=jax.random.key(3), eos_ids=())
        reference = generate(model, ids, mask, rollout_layout=False, **kwargs)
        rollout = generate(model, ids, mask, **kwargs)  # the default on fsdp > 1
        np.testing.assert_array_equal(reference.tokens, rollout.tokens)
        np.testing.assert_allclose(reference.logprobs, rollout.logprobs, atol=1e-5, rtol=0)
        assert rollout.tokens.sharding.is_equivalent_to(reference.tokens.sharding, 3)
    # A second rollout reuses the compiled programs (the copy's graph and rules are static).
    compiled = sampling._decode._cache_size(), sampling._prefill._cache_size()
    generate(model, ids, mask, **kwargs)
    assert (sampling._decode._cache_size(), sampling._prefill._cache_size()) == compiled
    # The training parameters keep their layout; the rollout copy has its own.
    assert model.layers.wq[...].sharding.spec == meshlib.logical_to_spec(
        ("layers", "embed", "heads", "head_dim"))
    copy = sampling.rollout_model(model)
    rules = meshlib.rollout_rules(mesh, config)
    assert bool(rules.notes) == (config is TINY)
    assert copy.layers.wq[...].sharding.spec == meshlib.logical_to_spec(
        ("layers", "embed", "heads", "head_dim"), rules)
    assert copy.axis_rules is rules and model.axis_rules is meshlib.TRAINING_RULES


def test_rollout_copy_casts_weights_to_the_compute_dtype_but_not_norms():
    import jax.numpy as jnp

    mesh = meshlib.make_mesh(1, 4, 1)
    model = meshlib.shard_model(Decoder(TINY, rngs=nnx.Rngs(0), mesh=mesh, dtype=jnp.bfloat16),
                                mesh)
    copy = sampling.rollout_model(model)
    assert copy.layers.w_up[...].dtype == jnp.bfloat16
    assert copy.layers.attn_norm[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(copy.layers.w_up[...]),
                                  np.asarray(model.layers.w_up[...].astype(jnp.bfloat16)))


def test_rollout_layout_is_off_without_fsdp_and_needs_a_mesh():
    assert not sampling.use_rollout_layout(tiny_model(), None)
    mesh = meshlib.make_mesh(2, 1, 4)
    assert not sampling.use_rollout_layout(tiny_model(mesh=mesh), None)
    with pytest.raises(ValueError, match="needs a model on a mesh"):
        sampling.use_rollout_layout(tiny_model(), True)
