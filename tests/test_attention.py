"""Attention implementations against the materialised reference: outputs and gradients on
odd lengths (not block multiples), left padding, GQA, with and without a shared prefix, on
one device and on the (2, 2, 2) mesh; the decoder's choice by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from reczero_jax import mesh as meshlib
from reczero_jax.models import Decoder, attention, from_pretrained, save_pretrained
from reczero_jax.models.decoder import causal_mask
from reczero_jax.train.step import OptimConfig, Trainer
from tests.helpers import (
    TINY,
    assert_same_loss_and_grads,
    fake_rollout,
    left_padded_prompts,
    tiny_model,
)

B, G, T, H, K, D, PREFIX = 4, 3, 13, 4, 2, 8, 11  # GQA: 2 query heads per kv head
SMALL_BLOCKS = dict(block_q=4, block_k=5)  # 13 queries, 13 and 11 keys: ragged last blocks


def case(with_prefix: bool):
    """Inputs (q, k, v, prefix_k, prefix_v), the causal self mask with left padding (row 1 has
    3 padding positions: fully masked queries when there is no prefix), the prefix mask
    (row 2 has 4 padding keys) and the valid query rows."""
    rng = np.random.default_rng(0)
    shapes = ((B, G, T, H, D), (B, G, T, K, D), (B, G, T, K, D), (B, PREFIX, K, D),
              (B, PREFIX, K, D))
    arrays = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
    valid = np.ones((B, G, T), bool)
    valid[1, :, :3] = False
    prefix_mask = jnp.asarray(np.arange(PREFIX) >= np.array([0, 0, 4, 0])[:, None])
    return arrays, causal_mask(jnp.asarray(valid)), prefix_mask if with_prefix else None, valid


def outputs_and_grads(fn, arrays, self_mask, prefix_mask, rows=None):
    """fn's output and the gradients of sum(out * w) (over ``rows`` if given) w.r.t. q, k, v,
    prefix k and prefix v (zeros without a prefix)."""
    weights = jnp.cos(jnp.arange(B * G * T * H * D, dtype=jnp.float32)).reshape(B, G, T, H, D)

    def loss(q, k, v, prefix_k, prefix_v):
        prefix = None if prefix_mask is None else (prefix_k, prefix_v, prefix_mask)
        out = fn(q, k, v, self_mask, prefix)
        kept = out if rows is None else jnp.where(rows[..., None, None], out, 0.0)
        return (kept * weights).sum(), out

    grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(5)), has_aux=True))(*arrays)
    return out, grads


def assert_matches_reference(fn, with_prefix, *, rows=None, place=lambda arrays: arrays):
    arrays, self_mask, prefix_mask, _ = case(with_prefix)
    ref_out, ref_grads = outputs_and_grads(attention.materialized, arrays, self_mask, prefix_mask,
                                           rows)
    out, grads = outputs_and_grads(fn, place(arrays), self_mask, prefix_mask, rows)
    out, ref_out = np.asarray(out), np.asarray(ref_out)
    assert np.isfinite(out).all()
    if rows is not None:
        out, ref_out = out[rows], ref_out[rows]
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert np.isfinite(np.asarray(grad)).all()
        np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), atol=1e-4)
    assert float(jnp.abs(ref_grads[0]).max()) > 1e-2  # the gradients are not trivially zero


def on_mesh(arrays):
    """The inputs laid out on the (2, 2, 2) mesh: batch over data x fsdp, heads over tensor."""
    mesh = meshlib.make_mesh(data=2, fsdp=2, tensor=2)
    specs = (P(("data", "fsdp"), None, None, "tensor"),) * 3 + (P(("data", "fsdp"), None,
                                                                  "tensor"),) * 2
    return tuple(jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(
        arrays, specs, strict=True))


@pytest.mark.parametrize("with_prefix", [False, True])
def test_blockwise_equals_materialized_on_every_row(with_prefix):
    """Every row, including fully masked padding queries (uniform weights, as the reference),
    and their gradients: finite and equal."""
    blockwise = lambda *args: attention.blockwise(*args, **SMALL_BLOCKS)
    assert_matches_reference(blockwise, with_prefix)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_blockwise_equals_materialized_on_the_mesh(with_prefix):
    blockwise = lambda *args: attention.blockwise(*args, **SMALL_BLOCKS)
    assert_matches_reference(blockwise, with_prefix, place=on_mesh)


def test_blockwise_never_materialises_all_scores():
    """The compiled forward + backward's temporaries stay far below one [T, S] score matrix
    per head (what materialized keeps), at a length where that matrix dominates."""
    t, s = 512, 512
    q = jax.ShapeDtypeStruct((1, 1, t, 8, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 1, s, 1, 16), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 1, t, s), bool)

    def temporaries(fn):
        grad = jax.grad(lambda q, k, v, m: fn(q, k, v, m, None).sum(), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, kv, kv, mask).compile().memory_analysis().temp_size_in_bytes

    scores = 8 * t * s * 4  # float32 scores of the 8 heads (the bool mask is 1 byte a pair)
    assert temporaries(attention.materialized) >= scores
    blocked = temporaries(lambda *args: attention.blockwise(*args, block_q=64, block_k=64))
    assert blocked < scores / 4


@pytest.mark.parametrize("with_prefix", [False, True])
def test_splash_kernel_in_interpret_mode_equals_materialized(with_prefix):
    """The Pallas splash kernel, run by Pallas's interpreter on CPU, on valid query rows
    (its padding rows attend to padding keys instead: finite, unread)."""
    _, _, _, valid = case(with_prefix)
    splash = lambda *args: attention.splash(*args, interpret=True)
    assert_matches_reference(splash, with_prefix, rows=jnp.asarray(valid))


def test_splash_under_shard_map_on_the_mesh():
    mesh = meshlib.make_mesh(data=2, fsdp=2, tensor=2)
    _, _, _, valid = case(True)
    splash = lambda *args: attention.splash(*args, mesh=mesh, interpret=True)
    assert_matches_reference(splash, True, rows=jnp.asarray(valid), place=on_mesh)


def test_choice_by_name_and_backend(monkeypatch):
    assert attention.resolve("auto") == "auto"  # on CPU: by length, never splash
    assert attention.implementation("materialized") is attention.materialized
    assert attention.implementation("blockwise") is attention.blockwise
    with pytest.raises(ValueError, match="model.attention must be one of"):
        attention.resolve("flash")
    with pytest.raises(ValueError, match="model.attention must be one of"):
        Decoder(TINY, rngs=nnx.Rngs(0), attention="flash")
    arrays, self_mask, _, _ = case(False)
    chosen = []
    for name in ("materialized", "blockwise"):  # record which one CPU's auto calls
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, name=name, real=real: (
            chosen.append(name), real(*a))[1])
    for most, expected in ((T, "materialized"), (T - 1, "blockwise")):
        monkeypatch.setattr(attention, "CPU_MATERIALIZED_MAX_KEYS", most)
        attention.implementation("auto")(*arrays[:3], self_mask, None)
        assert chosen.pop() == expected
    with pytest.raises(ValueError, match="needs a GPU"):
        attention.cudnn(*arrays[:3], self_mask, None)


def test_from_pretrained_passes_the_choice_to_the_decoder(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    assert from_pretrained(tmp_path, attention="blockwise").attention == "blockwise"
    assert from_pretrained(tmp_path).attention == "auto"


def with_attention(model: Decoder, name: str) -> Decoder:
    model.attention = name
    return model


def test_decoder_logits_and_grpo_gradients_blockwise_equal_materialized(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_Q", 4)
    monkeypatch.setattr(attention, "BLOCK_K", 5)
    ids, mask = left_padded_prompts(batch=3, length=21)
    logits = {name: np.asarray(with_attention(tiny_model(), name)(
        jnp.asarray(ids), attention_mask=jnp.asarray(mask))) for name in ("materialized",
                                                                         "blockwise")}
    np.testing.assert_allclose(logits["blockwise"], logits["materialized"], atol=1e-5)
    mesh = meshlib.make_mesh(1, 1, 1)
    results = [Trainer(with_attention(tiny_model(mesh=mesh), name), mesh,
                       OptimConfig()).grpo_loss_and_grads(fake_rollout())
               for name in ("materialized", "blockwise")]
    assert_same_loss_and_grads(results[1], results[0], atol=1e-5)

