"""Attention for the grouped layout: every implementation, one signature.

    attention(q, k, v, self_mask, prefix) -> out

q: [B, G, T, H, D]; k, v: [B, G, S, K, D] (each sequence's own keys); self_mask: [B, G, T, S]
bool; prefix: (k [B, P, K, D], v [B, P, K, D], mask [B, P] bool) shared by the G sequences of
a group, or None. H query heads share K key/value heads (GQA, H = K h). The softmax is joint
over prefix + self keys, which is attention over their concatenation:

    s = q.k / sqrt(D) (masked keys: the finite _MASKED), out = softmax(s) v.

A query whose keys are all masked (a left-padding position) gets uniform weights over all
P + S keys in ``materialized`` and ``blockwise``: a finite average of values, never NaN.

Implementations and what each keeps for the backward pass (per layer, beyond q, k, v; the
numbers ``reczero plan`` needs; N = B G T H query rows):

* ``materialized`` (the reference): scores and weights for all keys at once,
  [B, G, T, H, P + S] float32; autodiff keeps at least the weights: 4 N (P + S) bytes.
* ``blockwise``: flash-style online softmax in plain JAX. Queries in chunks of ``block_q``,
  keys in blocks of ``block_k`` (``lax.scan``; odd lengths padded with keys that never
  count), a running max m and denominator per query. A ``custom_vjp`` keeps only the
  output, m and the denominator: 4 N (D + 2) bytes; its backward recomputes each
  [block_q, block_k] tile (dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)),
  dQ = dS K, dK = dS^T Q). Peak temporaries: a few tiles, 4 B G block_q H block_k bytes
  each, plus the boolean masks re-laid out in blocks (1 byte per (query, key) pair).
* ``splash`` (TPU): the Pallas splash-attention kernel, under ``shard_map`` over the mesh's
  batch and head axes, per sequence over [prefix; self] keys (the prefix broadcast over G:
  the kernel cannot differentiate through its log-sum-exp in this JAX, so a log-sum-exp merge
  of two calls would lose the gradient). Static mask: prefix visible, self causal; padding by
  segment ids. Keeps the kernel's residuals (output, log-sum-exp) plus the concatenated keys
  and values, 2 B G (P + S) K D elements.
* ``cudnn`` (GPU, bf16/fp16): ``jax.nn.dot_product_attention(implementation="cudnn")`` over
  the same [prefix; self] keys with a boolean mask; keeps output and log-sum-exp plus the
  concatenated keys and values.

``splash`` and ``cudnn`` need ``self_mask = causal & key validity`` (what the decoder
builds for training and prefill): they read key validity off the mask's last query row and
query validity off its diagonal. Their fully masked rows (padding queries) may differ from
the reference's (they stay finite; nothing reads them).

``decode_step`` (one query against the cache: [1, P + S] scores) always uses
``materialized``.

``auto``: TPU -> splash; GPU -> cudnn for bf16/fp16 compute, else blockwise; CPU ->
materialized up to ``CPU_MATERIALIZED_MAX_KEYS`` keys per query (P + S), blockwise beyond.
Measured on CPU (``python -m benchmarks.attention``, the GRPO update of a 4-layer width-256
decoder; times from a 2-core machine shared with other jobs, so only roughly):

    (P, R, G)        peak GiB/device            warm s/step
                     materialized  blockwise    materialized  blockwise
    (256, 64, 8)     0.250         0.222        8.69          9.12  (1.05x)
    (1024, 128, 8)   0.692         0.417        16.38, 37.05  16.25, 22.48 (0.99x, 0.61x;
                                                                          two runs)
    (4096, 1024, 8)  10.564        2.254        not timed

and on SmolLM2-135M (30 layers, remat), ``make demo``'s SFT step (2 sequences of up to 704
tokens) on a quiet 2-core Xeon: 38-48 s materialized, 51-60 s blockwise (its 512-key blocks
pad 704 keys to 1024). Since the scores are laid out in their dots' order (session 13),
SmolLM2's GRPO update (``benchmarks.train_step``'s ``materialized`` arm against ``shared``,
whose ``auto`` was then blockwise past 1024 keys, interleaved, two rounds per process; two
processes at 1280 keys, one at 2176; the keys of the responses' pass, P + R):

    (P, R, G)        keys    peak GiB                   warm s/step
                             materialized  blockwise    materialized  blockwise
    (1024, 256, 8)   1280    12.31         9.67         40.8-43.5     46.9-50.5
    (2048, 128, 8)   2176    14.61         8.12         60.9, 62.7    63.2, 63.5

(at 2176 keys the materialized arm also attends the 2048-token prompt pass materialized,
most of its extra memory). The 4-layer decoder above at (1024, 128, 8), 1152 keys, re-timed
the same way in one run: 1.189 s materialized, 1.351 s blockwise (benchmarks/PROFILE.md).
On CPU the scores live in host memory, which a short sequence does not strain, so blockwise
starts where it saves memory at little cost in time: past ``CPU_MATERIALIZED_MAX_KEYS`` =
1536 keys (three 512-key blocks). Materialized also compiles faster (tiny test model's GRPO
gradients: 16 vs 20 CPU-seconds).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from reczero_jax.config import ATTENTIONS
from reczero_jax.mesh import LOGICAL_AXIS_RULES

_MASKED = float(jnp.finfo(jnp.float32).min)

IMPLEMENTATIONS = ATTENTIONS  # config.py holds the names; this module the code behind them
BLOCK_Q = 512
BLOCK_K = 512
CPU_MATERIALIZED_MAX_KEYS = 1536  # CPU's auto: materialized up to here (module docstring)

Prefix = tuple[jax.Array, jax.Array, jax.Array]


def _grouped_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [B, G, T, H, D] -> float32 [B, G, T, K, H/K, D], scaled by 1/sqrt(D)."""
    b, g, t, h, d = q.shape
    return q.reshape(b, g, t, kv_heads, h // kv_heads, d).astype(jnp.float32) / math.sqrt(d)


# ----------------------------------------------------------------------------- materialized


def materialized(q: jax.Array, k: jax.Array, v: jax.Array, self_mask: jax.Array,
                 prefix: Prefix | None) -> jax.Array:
    """The reference: all scores at once.

    With s1 = q.k_prefix / sqrt(D), s2 = q.k_self / sqrt(D), m = max(s1, s2):
    out = (exp(s1 - m) v_prefix + exp(s2 - m) v_self) / (sum exp(s1 - m) + sum exp(s2 - m)),
    which is softmax attention over the concatenated keys, without copying the prefix G times.

    Scores and weights are laid out as their dots produce them, batch dimensions first:
    [B, G, K, T, h, S] against own keys, [B, K, G, T, h, P] against the prefix (batched over
    B and K only). XLA's CPU dots read and write that order, so no [.., T, h, S] tensor is
    copied transposed, forward or backward; only the per-query max and denominator
    ([.., 1]) and the [.., D] outputs change order (benchmarks/PROFILE.md).
    """
    b, g, t, h, d = q.shape
    q = _grouped_queries(q, k.shape[-2])
    scores = jnp.einsum("bgtkhd,bgskd->bgkths", q, k.astype(jnp.float32))
    scores = jnp.where(self_mask[:, :, None, :, None, :], scores, _MASKED)
    peak = scores.max(axis=-1, keepdims=True)
    if prefix is not None:
        prefix_k, prefix_v, prefix_mask = prefix
        prefix_scores = jnp.einsum("bgtkhd,bpkd->bkgthp", q, prefix_k.astype(jnp.float32))
        prefix_scores = jnp.where(prefix_mask[:, None, None, None, None, :], prefix_scores, _MASKED)
        peak = jnp.maximum(peak, jnp.swapaxes(prefix_scores.max(axis=-1, keepdims=True), 1, 2))
    # Softmax is shift-invariant, so out does not depend on m and its gradient through m is
    # exactly 0; autodiff would still spend the max's backward (a compare, select and sum
    # over every score) computing a value that cancels to rounding.
    peak = jax.lax.stop_gradient(peak)
    weights = jnp.exp(scores - peak)
    denominator = weights.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bgkths,bgskd->bgkthd", weights, v.astype(jnp.float32))
    if prefix is not None:
        prefix_weights = jnp.exp(prefix_scores - jnp.swapaxes(peak, 1, 2))
        denominator = denominator + jnp.swapaxes(prefix_weights.sum(axis=-1, keepdims=True), 1, 2)
        out = out + jnp.swapaxes(
            jnp.einsum("bkgthp,bpkd->bkgthd", prefix_weights, prefix_v.astype(jnp.float32)), 1, 2)
    out = jnp.moveaxis(out / denominator, 2, 3)  # [B, G, T, K, h, D]
    return out.reshape(b, g, t, h, d).astype(v.dtype)


# ----------------------------------------------------------------------------- blockwise


class _KeySet(NamedTuple):
    """Static description of one key set: the shared prefix ([B, P, ..]) or own keys
    ([B, G, S, ..]), its real length and the block it is cut into (padding never counts)."""

    shared: bool
    length: int
    block: int

    @property
    def spec(self) -> str:
        return "bskd" if self.shared else "bgskd"

    @property
    def tile(self) -> str:
        """A score tile's layout: its dots' batch dimensions first (B, K against the prefix;
        B, G, K against own keys), as XLA's CPU dots produce and consume it (see
        ``materialized``)."""
        return "bkgths" if self.shared else "bgkths"

    def per_query(self, x: jax.Array) -> jax.Array:
        """Per-query values between the queries' [B, G, K, t, h, ..] and the tile's order."""
        return jnp.swapaxes(x, 1, 2) if self.shared else x


def _block_scores(keys: _KeySet, q, k, keep, index):
    """Scores (``keys.tile``) of scaled q [B, G, K, t, h, D] against key block ``index``:
    masked keys _MASKED (as the reference), padding keys -inf (weight 0 even in a fully
    masked row). Also returns the broadcast keep mask."""
    scores = jnp.einsum(f"bgkthd,{keys.spec}->{keys.tile}", q, k)
    keep = keep[:, None, None, None, None, :] if keys.shared else keep[:, :, None, :, None, :]
    real = index * keys.block + jnp.arange(keys.block) < keys.length
    return jnp.where(real, jnp.where(keep, scores, _MASKED), -jnp.inf), keep


def _chunk_forward(key_sets, q, blocks):
    """Online softmax of one query chunk over every key block: (out, m, denom), in the
    queries' layout."""
    m = jnp.full(q.shape[:-1], _MASKED, jnp.float32)  # finite: no inf - inf in the rescale
    denom = jnp.zeros(q.shape[:-1], jnp.float32)
    acc = jnp.zeros_like(q)
    for keys, (k, v, keep) in zip(key_sets, blocks, strict=True):
        def step(carry, xs, keys=keys):
            m, denom, acc = carry
            index, k, v, keep = xs
            scores, _ = _block_scores(keys, q, k, keep, index)
            m_new = jnp.maximum(m, keys.per_query(scores.max(axis=-1)))
            rescale = jnp.exp(m - m_new)
            p = jnp.exp(scores - keys.per_query(m_new)[..., None])
            acc = rescale[..., None] * acc + jnp.einsum(f"{keys.tile},{keys.spec}->bgkthd", p, v)
            return (m_new, rescale * denom + keys.per_query(p.sum(axis=-1)), acc), None

        (m, denom, acc), _ = jax.lax.scan(step, (m, denom, acc), (jnp.arange(k.shape[0]), k, v, keep))
    return acc / denom[..., None], m, denom


def _chunk_backward(key_sets, q, blocks, m, denom, d_out, d_lse, delta):
    """Gradients of one query chunk, recomputing each tile: (dq, [(dk, dv) per key set])."""
    dq = jnp.zeros_like(q)
    grads = []
    for keys, (k, v, keep) in zip(key_sets, blocks, strict=True):
        def step(dq, xs, keys=keys):
            index, k, v, keep = xs
            scores, keep = _block_scores(keys, q, k, keep, index)
            tile = lambda x: keys.per_query(x)[..., None]
            p = jnp.exp(scores - tile(m)) / tile(denom)
            # The [.., D] operand first: the dot then reads the tile as it lies (XLA:CPU).
            dv = jnp.einsum(f"bgkthd,{keys.tile}->{keys.spec}", d_out, p)
            dp = jnp.einsum(f"bgkthd,{keys.spec}->{keys.tile}", d_out, v)
            # d out / d s_j = p_j (v_j - out); d lse / d s_j = p_j; masked scores are constants.
            ds = jnp.where(keep, p * (dp - tile(delta) + tile(d_lse)), 0.0)
            dk = jnp.einsum(f"bgkthd,{keys.tile}->{keys.spec}", q, ds)
            return dq + jnp.einsum(f"{keys.tile},{keys.spec}->bgkthd", ds, k), (dk, dv)

        dq, (dk, dv) = jax.lax.scan(step, dq, (jnp.arange(k.shape[0]), k, v, keep))
        grads.append((dk, dv))
    return dq, grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(key_sets, q, kv, keeps):
    """q [nq, B, G, K, bq, h, D] (scaled); kv: per key set (k, v) [nb, B, (G,) bk, K, D];
    keeps: per key set [nq, nb, B, (G, bq,) bk] bool. Returns (out, lse) per query chunk."""
    return _flash_forward(key_sets, q, kv, keeps)[0]


def _flash_forward(key_sets, q, kv, keeps):
    def chunk(xs):
        q, keeps = xs
        blocks = [(k, v, keep) for (k, v), keep in zip(kv, keeps, strict=True)]
        return _chunk_forward(key_sets, q, blocks)

    out, m, denom = jax.lax.map(chunk, (q, keeps))
    return (out, m + jnp.log(denom)), (q, kv, keeps, out, m, denom)


def _flash_backward(key_sets, residuals, cotangents):
    q, kv, keeps, out, m, denom = residuals
    d_out, d_lse = cotangents

    def chunk(total, xs):
        q, keeps, out, m, denom, d_out, d_lse = xs
        blocks = [(k, v, keep) for (k, v), keep in zip(kv, keeps, strict=True)]
        delta = (d_out * out).sum(axis=-1)
        dq, grads = _chunk_backward(key_sets, q, blocks, m, denom, d_out, d_lse, delta)
        return jax.tree.map(jnp.add, total, grads), dq

    zeros = [(jnp.zeros_like(k), jnp.zeros_like(v)) for k, v in kv]
    dkv, dq = jax.lax.scan(chunk, zeros, (q, keeps, out, m, denom, d_out, d_lse))
    return dq, dkv, None


_flash.defvjp(_flash_forward, _flash_backward)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _split_blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
    """Pad ``axis`` to whole blocks and split it: [.., n, ..] -> [n // block, .., block, ..]."""
    count = -(-x.shape[axis] // block)
    x = _pad_to(x, axis, count * block)
    x = x.reshape(*x.shape[:axis], count, block, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def blockwise(q: jax.Array, k: jax.Array, v: jax.Array, self_mask: jax.Array,
              prefix: Prefix | None, *, block_q: int | None = None, block_k: int | None = None
              ) -> jax.Array:
    """Online-softmax attention: never more than a [block_q, block_k] tile of scores per
    (sequence, head) at once, forward or backward. Same result as ``materialized``.
    Blocks default to the module's ``BLOCK_Q`` and ``BLOCK_K``."""
    block_q, block_k = block_q or BLOCK_Q, block_k or BLOCK_K
    b, g, t, h, d = q.shape
    queries = _grouped_queries(q, k.shape[-2])
    bq = min(block_q, t)
    nq = -(-t // bq)
    key_sets, kv, keeps = [], [], []
    if prefix is not None:
        prefix_k, prefix_v, prefix_mask = prefix
        keys = _KeySet(True, prefix_k.shape[1], min(block_k, prefix_k.shape[1]))
        key_sets.append(keys)
        kv.append(tuple(_split_blocks(x.astype(jnp.float32), 1, keys.block)
                        for x in (prefix_k, prefix_v)))
        keep = _split_blocks(prefix_mask.astype(bool), 1, keys.block)  # [nb, B, bk]
        keeps.append(jnp.broadcast_to(keep, (nq, *keep.shape)))
    keys = _KeySet(False, k.shape[2], min(block_k, k.shape[2]))
    key_sets.append(keys)
    kv.append(tuple(_split_blocks(x.astype(jnp.float32), 2, keys.block) for x in (k, v)))
    keep = _split_blocks(self_mask.astype(bool), 2, bq)  # [nq, B, G, bq, S]
    keeps.append(_split_blocks(keep, 4, keys.block).swapaxes(0, 1))  # [nq, nb, B, G, bq, bk]
    queries = _split_blocks(jnp.moveaxis(queries, 3, 2), 3, bq)  # [nq, B, G, K, bq, h, D]
    out, _ = _flash(tuple(key_sets), queries, kv, keeps)
    out = out.transpose(1, 2, 0, 4, 3, 5, 6).reshape(b, g, nq * bq, h, d)[:, :, :t]
    return out.astype(v.dtype)


# ----------------------------------------------------------------------------- kernels


def _joined_keys(k, v, prefix):
    """Each sequence's [prefix; self] keys and values [B, G, P + S, K, D] (the prefix
    broadcast over G)."""
    if prefix is None:
        return k, v
    prefix_k, prefix_v, _ = prefix
    shape = (k.shape[0], k.shape[1], *prefix_k.shape[1:])
    join = lambda own, shared: jnp.concatenate(
        [jnp.broadcast_to(shared[:, None], shape).astype(own.dtype), own], axis=2)
    return join(k, prefix_k), join(v, prefix_v)


def _splash_local(q, k, v, self_mask, prefix_mask=None, *, block: int, interpret: bool):
    """Splash attention on this device's shard: q [B, G, T, K, h, D] (scaled), k, v
    [B, G, P + S, K, D] joined, self_mask [B, G, T, S], prefix_mask [B, P] or None."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, g, t, kv_heads, group, d = q.shape
    prefix_len = 0 if prefix_mask is None else prefix_mask.shape[1]
    lanes = 128  # the kernel's blocks are whole multiples of the TPU's 128 lanes
    block = min(block, -(-max(t, k.shape[2] - prefix_len) // lanes) * lanes)
    q_len = -(-t // block) * block
    self_len = -(-(k.shape[2] - prefix_len) // block) * block
    p_len = -(-prefix_len // block) * block
    # Static structure: every query sees the whole prefix, and self keys j <= i.
    allowed = np.concatenate([np.ones((q_len, p_len), bool),
                              np.tril(np.ones((q_len, self_len), bool))], axis=1)
    mask = sm.MultiHeadMask([sm.NumpyMask(allowed)] * group)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    # Padding by segment ids: valid queries (1) see valid keys (1) only.
    key_valid = self_mask[:, :, -1, :]
    query_valid = jnp.diagonal(self_mask, axis1=2, axis2=3)
    segment = lambda x, size: _pad_to(x.astype(jnp.int32), 2, size)
    kv_segments = segment(key_valid, self_len)
    if prefix_mask is not None:
        shared = jnp.broadcast_to(prefix_mask[:, None], (b, g, prefix_len))
        kv_segments = jnp.concatenate([segment(shared, p_len), kv_segments], axis=2)
    q_segments = segment(query_valid, q_len)
    self_k, prefix_k = k[:, :, prefix_len:], k[:, :, :prefix_len]
    self_v, prefix_v = v[:, :, prefix_len:], v[:, :, :prefix_len]
    keys = jnp.concatenate([_pad_to(prefix_k, 2, p_len), _pad_to(self_k, 2, self_len)], 2)
    values = jnp.concatenate([_pad_to(prefix_v, 2, p_len), _pad_to(self_v, 2, self_len)], 2)
    heads_first = lambda x: jnp.moveaxis(x, 2, -2)  # [B, G, L, .., D] -> [B, G, .., L, D]
    queries = jnp.moveaxis(_pad_to(q, 2, q_len), 2, 4)  # [B, G, K, h, T, D]

    def one(q, k, v, q_seg, kv_seg):  # q [h, T, D]; k, v [S, D]
        return kernel(q, k, v, segment_ids=sk.SegmentIds(q=q_seg, kv=kv_seg))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))  # over kv heads
    out = jax.vmap(jax.vmap(per_head))(queries, heads_first(keys), heads_first(values),
                                       q_segments, kv_segments)  # over B, G
    return out.transpose(0, 1, 4, 2, 3, 5)[:, :, :t]  # [B, G, T, K, h, D]


def splash(q: jax.Array, k: jax.Array, v: jax.Array, self_mask: jax.Array,
           prefix: Prefix | None, *, mesh: Mesh | None = None, block: int = 512,
           interpret: bool | None = None) -> jax.Array:
    """Splash attention (TPU; ``interpret=True`` runs the kernel in Pallas's interpreter, any
    backend) over each sequence's [prefix; self] keys, under ``shard_map`` on ``mesh``'s
    batch and kv-head axes."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    b, g, t, h, d = q.shape
    if k.shape[2] != t:
        raise ValueError(f"splash attends each query to its own causal keys: it needs as many "
                         f"self keys as queries, got {k.shape[2]} keys for {t} queries")
    queries = _grouped_queries(q, k.shape[-2]).astype(q.dtype)
    keys, values = _joined_keys(k, v, prefix)
    prefix_mask = None if prefix is None else prefix[2].astype(bool)
    local = functools.partial(_splash_local, block=block, interpret=interpret)
    if mesh is None:
        out = local(queries, keys, values, self_mask, prefix_mask)
    else:  # the kernel is per device: run it on each shard of the batch and the kv heads
        batch, heads = LOGICAL_AXIS_RULES["batch"], LOGICAL_AXIS_RULES["kv_heads"]
        spec = lambda *axes: PartitionSpec(batch, *axes)
        per_head = spec(None, None, heads)
        args = (queries, keys, values, self_mask)
        specs = (per_head, per_head, per_head, spec())
        if prefix_mask is not None:
            args, specs = (*args, prefix_mask), (*specs, spec())
        out = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=per_head,
                            check_vma=False)(*args)
    return out.reshape(b, g, t, h, d).astype(v.dtype)


def cudnn(q: jax.Array, k: jax.Array, v: jax.Array, self_mask: jax.Array,
          prefix: Prefix | None) -> jax.Array:
    """cuDNN flash attention (GPU, bf16/fp16) over each sequence's [prefix; self] keys."""
    if jax.default_backend() != "gpu":
        raise ValueError(f"model.attention=cudnn needs a GPU (the backend is "
                         f"{jax.default_backend()}); use blockwise or auto")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.attention=cudnn needs bf16/fp16 compute (model.dtype), got "
                         f"{q.dtype}; use blockwise for float32")
    b, g, t, h, d = q.shape
    keys, values = _joined_keys(k, v, prefix)
    mask = self_mask.astype(bool)
    if prefix is not None:
        shared = jnp.broadcast_to(prefix[2].astype(bool)[:, None, None], (b, g, t, prefix[2].shape[1]))
        mask = jnp.concatenate([shared, mask], axis=-1)
    flat = lambda x: x.reshape(b * g, *x.shape[2:])
    out = jax.nn.dot_product_attention(flat(q), flat(keys).astype(q.dtype),
                                       flat(values).astype(q.dtype), mask=flat(mask)[:, None],
                                       implementation="cudnn")
    return out.reshape(b, g, t, h, d).astype(v.dtype)


# ----------------------------------------------------------------------------- selection


def resolve(name: str, dtype=jnp.float32) -> str:
    """The implementation ``name`` stands for on this backend (``auto`` -> a concrete one,
    except on CPU, where ``auto`` stays: it chooses per call by length)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention must be one of {IMPLEMENTATIONS}, got {name!r}")
    if name != "auto":
        return name
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu":
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "blockwise"
    return "auto"  # CPU: decided per call by the key count (_by_length)


def _by_length(q: jax.Array, k: jax.Array, v: jax.Array, self_mask: jax.Array,
               prefix: Prefix | None) -> jax.Array:
    """CPU's ``auto``: materialized up to ``CPU_MATERIALIZED_MAX_KEYS`` keys, else blockwise."""
    keys = k.shape[2] + (0 if prefix is None else prefix[0].shape[1])
    fn = blockwise if keys > CPU_MATERIALIZED_MAX_KEYS else materialized
    return fn(q, k, v, self_mask, prefix)


def implementation(name: str, mesh: Mesh | None = None, dtype=jnp.float32
                   ) -> Callable[..., jax.Array]:
    """The attention function for ``name`` (see ``IMPLEMENTATIONS``), with the one signature
    ``(q, k, v, self_mask, prefix) -> out``; ``mesh`` is for splash's ``shard_map``."""
    name = resolve(name, dtype)
    if name == "splash":
        return functools.partial(splash, mesh=mesh)
    return {"materialized": materialized, "blockwise": blockwise, "cudnn": cudnn,
            "auto": _by_length}[name]
