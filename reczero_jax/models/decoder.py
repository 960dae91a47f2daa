"""The Llama / Qwen2 decoder as one Flax NNX module, with grouped (shared-prompt) attention.

Shapes: B prompts, G samples per prompt, T query tokens, S self keys, P prompt keys,
L layers, d model width, H query heads, K key/value heads, D head dim, I MLP width, V vocab.

Every forward works on the grouped layout ``tokens [B, G, T]``. A group's G sequences may
attend to a shared *prefix* (the prompt's keys and values, ``[L, B, P, K, D]``, stored once)
and to their own keys (``[.., B, G, S, K, D]``). The softmax over the two key sets is taken
jointly (one max, one denominator), which is exactly attention over their concatenation, so

* the plain forward is G = 1 with no prefix,
* sampling prefills the prompt once and decodes G samples against that one prefix,
* training runs the prompt once per group and the G responses against its keys and values,

all with one module, so sampler and trainer log-probs agree by construction.
Layer weights are stacked on a leading L axis and the layers run under ``jax.lax.scan``
(one compiled block, whatever the depth).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from reczero_jax.mesh import TRAINING_RULES, constrain
from reczero_jax.models import attention as attention_lib
from reczero_jax.models.config import ModelConfig


class KVCache(NamedTuple):
    """Keys and values of every layer: ``[L, B, P, K, D]`` (a prompt), ``[L, B, G, S, K, D]``
    (a segment's own), or a decoding cache in its own layouts (``prompt_cache``,
    ``response_cache``)."""

    k: jax.Array
    v: jax.Array


# The response cache's layouts: keys [L, B, G, K, R, D], values [L, B, G, K, D, R]. A layer's
# slice is then laid out as the decode step's two attention dots take their right-hand
# operands on XLA's CPU backend (batched over B, G, K; the contracted dimension minor: D for
# the scores, R for the weighted values). With [.., R, K, D] buffers it copied every layer's
# cache transposed at every step (47 MB, 5% of a SmolLM2 step at R = 128, growing with R;
# benchmarks/PROFILE.md).
RESPONSE_CACHE_AXES = KVCache(("layers", "batch", None, "kv_heads", None, "head_dim"),
                              ("layers", "batch", None, "kv_heads", "head_dim", None))


def response_cache(config: ModelConfig, rows: int, samples: int, length: int, dtype) -> KVCache:
    """Zeroed response keys/values for ``decode_step``: ``rows`` x ``samples`` sequences of
    ``length`` positions, in the layouts of ``RESPONSE_CACHE_AXES``."""
    n, kv, d = config.num_layers, config.num_kv_heads, config.head_dim
    return KVCache(jnp.zeros((n, rows, samples, kv, length, d), dtype),
                   jnp.zeros((n, rows, samples, kv, d, length), dtype))


# The prompt cache as ``decode_step`` reads it (``prompt_cache``): keys [L, B, K, P, D], values
# [L, B, K, D, P], the contracted dimension minor for the same two dots as the response cache.
# In forward's [L, B, P, K, D] every step copied every layer's prompt keys and values
# transposed: 31% of the op time of a decode step at 50 prompts of 512 tokens
# (benchmarks/PROFILE.md).
PROMPT_CACHE_AXES = KVCache(("layers", "batch", "kv_heads", None, "head_dim"),
                            ("layers", "batch", "kv_heads", "head_dim", None))


def prompt_cache(kv: KVCache) -> KVCache:
    """A prompt's keys/values from ``forward(..., return_kv=True)``, ``[L, B, P, K, D]``, in
    the layouts of ``PROMPT_CACHE_AXES`` (one copy per generation instead of one per step)."""
    return KVCache(jnp.moveaxis(kv.k, 2, 3), jnp.moveaxis(kv.v, 2, 4))


class Prefix(NamedTuple):
    """A shared prompt: per-layer keys/values and validity mask ``[B, P]``. The keys/values
    are ``[L, B, P, K, D]`` for ``forward`` and ``prompt_cache``'s layouts for
    ``decode_step``."""

    kv: KVCache
    mask: jax.Array


# ----------------------------------------------------------------------------- maths


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y).astype(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> jax.Array:
    """inv_freq[j] = theta^(-2j/D), j < D/2, with llama3 frequency scaling when configured.

    llama3: wavelengths longer than ``original_max / low_freq_factor`` are divided by
    ``factor``, shorter than ``original_max / high_freq_factor`` kept, and the band between
    interpolated linearly in ``original_max / wavelength``.

    Computed on the host in numpy float32, the way transformers computes it: XLA's float32
    ``pow`` rounds some frequencies differently, and a one-ulp difference in a frequency
    grows with the position (1.7e-5 in the logits at position 520 with theta = 500,000).
    """
    f32 = np.float32
    dim = config.head_dim
    inv_freq = f32(1.0) / (f32(config.rope_theta) ** (np.arange(0, dim, 2).astype(f32) / f32(dim)))
    scaling = config.rope_scaling_dict
    if scaling is not None:
        factor, low, high, original = (f32(scaling[k]) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
        wavelength = f32(2 * math.pi) / inv_freq
        scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        interpolated = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelength >= original / high) & (wavelength <= original / low)
        inv_freq = np.where(in_band, interpolated, scaled).astype(f32)
    return jnp.asarray(inv_freq)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, half-split convention: x*cos + rotate_half(x)*sin.

    x: [..., T, N, D]; positions: [..., T] int.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, D/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], axis=-1))[..., None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], axis=-1))[..., None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def causal_mask(mask: jax.Array) -> jax.Array:
    """[..., T] validity -> [..., T, T] mask: query i sees valid keys j <= i."""
    t = mask.shape[-1]
    lower = jnp.tril(jnp.ones((t, t), dtype=bool))
    return lower & mask.astype(bool)[..., None, :]


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Left-padded [..., T] mask -> positions counting valid tokens from 0 (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


# ----------------------------------------------------------------------------- module


def _param(rngs: nnx.Rngs, shape, axes, dtype, std=0.02):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


class DecoderLayers(nnx.Module):
    """All L transformer blocks, each weight stacked on a leading ``layers`` axis."""

    def __init__(self, config: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        n, d, i = config.num_layers, config.hidden_size, config.intermediate_size
        h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim
        self.attn_norm = nnx.Param(jnp.ones((n, d), param_dtype), logical_axes=("layers", "norm"))
        self.wq = _param(rngs, (n, d, h, hd), ("layers", "embed", "heads", "head_dim"), param_dtype)
        self.wk = _param(rngs, (n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"),
                         param_dtype)
        self.wv = _param(rngs, (n, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim"),
                         param_dtype)
        if config.attention_bias:
            self.bq = _param(rngs, (n, h, hd), ("layers", "heads", "head_dim"), param_dtype)
            self.bk = _param(rngs, (n, kv, hd), ("layers", "kv_heads", "head_dim"), param_dtype)
            self.bv = _param(rngs, (n, kv, hd), ("layers", "kv_heads", "head_dim"), param_dtype)
        self.wo = _param(rngs, (n, h, hd, d), ("layers", "heads", "head_dim", "embed"), param_dtype)
        self.mlp_norm = nnx.Param(jnp.ones((n, d), param_dtype), logical_axes=("layers", "norm"))
        self.w_gate = _param(rngs, (n, d, i), ("layers", "embed", "mlp"), param_dtype)
        self.w_up = _param(rngs, (n, d, i), ("layers", "embed", "mlp"), param_dtype)
        self.w_down = _param(rngs, (n, i, d), ("layers", "mlp", "embed"), param_dtype)

    def stacked(self) -> dict[str, jax.Array]:
        """The raw stacked weight arrays, keyed by name (the scan's ``xs``), and under
        ``"lora"`` the factors ``{target: (A, s * B)}`` of enabled LoRA adapters, which
        ``reczero_jax.lora.add_lora`` attaches as ``self.adapters`` (with the LM head's,
        when targeted: ``Decoder.logits`` applies those)."""
        weights = {name: var[...] for name, var in vars(self).items()
                   if isinstance(var, nnx.Param)}
        adapters = getattr(self, "adapters", None)
        if adapters is not None and adapters.enabled:
            weights["lora"] = adapters.factors()
        return weights


class Decoder(nnx.Module):
    """Llama / Qwen2 decoder. ``dtype`` is the compute dtype; parameters keep ``param_dtype``.

    ``mesh`` (optional, static) turns on activation sharding constraints: the batch by the
    ``axis_rules`` table (``mesh.TRAINING_RULES``: over ``("data", "fsdp")``; the sampler's
    rollout copy carries ``mesh.rollout_rules``). ``remat`` recomputes each block in the
    backward pass. ``attention`` names the implementation of the training forward and the
    prefill (one of ``models.attention.IMPLEMENTATIONS``; ``auto``: the best for the backend);
    decoding steps (one query against the cache) always use ``materialized``.
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs, mesh: Mesh | None = None, remat: bool = False,
                 attention: str = "auto"):
        attention_lib.resolve(attention)  # a readable error for an unknown name, now
        self.config = config
        self.dtype = dtype
        self.mesh = mesh
        self.axis_rules = TRAINING_RULES
        self.remat = remat
        self.attention = attention
        self.embed = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"),
                            param_dtype)
        self.layers = DecoderLayers(config, param_dtype=param_dtype, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((config.hidden_size,), param_dtype),
                                    logical_axes=("norm",))
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size),
                                  ("embed", "vocab"), param_dtype)

    # -- public entry points --------------------------------------------------------

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Plain causal forward. input_ids, attention_mask: [B, T] (left padding) -> logits [B, T, V]."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        hidden, _ = self.forward(input_ids[:, None], positions[:, None],
                                 causal_mask(attention_mask)[:, None])
        return self.logits(hidden[:, 0])

    def forward(self, tokens: jax.Array, positions: jax.Array, self_mask: jax.Array, *,
                prefix: Prefix | None = None, return_kv: bool = False
                ) -> tuple[jax.Array, KVCache | None]:
        """Grouped forward over whole segments (training, prefill).

        tokens, positions: [B, G, T]; self_mask: [B, G, T, T]; prefix: shared prompt or None.
        Returns the final-normed hidden states [B, G, T, d] and, if ``return_kv``, this
        segment's keys/values [L, B, G, T, K, D].
        """
        x = self._constrain(self.embed[...][tokens].astype(self.dtype))
        positions = positions.astype(jnp.int32)

        def block(x, xs):
            weights, prefix_kv = xs
            layer_prefix = None if prefix is None else (*prefix_kv, prefix.mask)
            x, kv = self._block(weights, x, positions, self_mask, layer_prefix)
            return x, (kv if return_kv else None)

        prefix_kv = None if prefix is None else (prefix.kv.k, prefix.kv.v)
        x, kv = jax.lax.scan(self._maybe_remat(block), x, (self.layers.stacked(), prefix_kv))
        hidden = rms_norm(x, self.final_norm[...], self.config.rms_norm_eps)
        return hidden, (KVCache(*kv) if return_kv else None)

    def decode_step(self, tokens: jax.Array, positions: jax.Array, prefix: Prefix,
                    cache: KVCache, index: jax.Array, cache_mask: jax.Array
                    ) -> tuple[jax.Array, KVCache]:
        """One decoding step of G samples per prompt against their shared prompt.

        tokens, positions: [B, G]; prefix: the prompt, its keys/values in ``prompt_cache``'s
        layouts; cache: response keys/values (``response_cache``: R positions), written at
        ``index``; cache_mask: [B, G, R] valid response keys (including ``index``).
        Returns logits [B, G, V] (float32) and the updated cache.
        """
        x = self._constrain(self.embed[...][tokens[:, :, None]].astype(self.dtype))
        positions = positions[:, :, None].astype(jnp.int32)
        self_mask = cache_mask[:, :, None, :].astype(bool)

        def block(carry, xs):
            x, cache_k, cache_v = carry
            weights, layer, prefix_k, prefix_v = xs
            layer_cache = (cache_k, cache_v, layer, index)
            # [B, P, K, D] views of the layer's [B, K, P, D] keys and [B, K, D, P] values.
            layer_prefix = (jnp.moveaxis(prefix_k, 1, 2), jnp.moveaxis(prefix_v, -1, 1),
                            prefix.mask)
            x, (cache_k, cache_v) = self._block(weights, x, positions, self_mask,
                                                layer_prefix, layer_cache)
            return (x, cache_k, cache_v), None

        xs = (self.layers.stacked(), jnp.arange(self.config.num_layers), *prefix.kv)
        (x, cache_k, cache_v), _ = jax.lax.scan(block, (x, cache.k, cache.v), xs)
        hidden = rms_norm(x, self.final_norm[...], self.config.rms_norm_eps)
        return self.logits(hidden[:, :, 0]), KVCache(cache_k, cache_v)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden h [..., d] -> float32 logits [..., V]: h @ W_head (W_head =
        embed^T when tied), plus (h @ A) @ (s * B) when enabled LoRA adapters
        (``reczero_jax.lora``) target the head (A [d, r], B [r, V])."""
        head = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        logits = jnp.einsum("...d,dv->...v", hidden, head.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        adapters = getattr(self.layers, "adapters", None)
        factors = adapters.head_factors() if adapters is not None and adapters.enabled else None
        if factors is not None:
            a, b = factors
            low_rank = jnp.einsum("...d,dr->...r", hidden, a.astype(self.dtype))
            logits = logits + jnp.einsum("...r,rv->...v", low_rank, b.astype(self.dtype),
                                         preferred_element_type=jnp.float32)
        return logits

    # -- internals ------------------------------------------------------------------

    def _block(self, w, x, positions, self_mask, prefix, cache=None):
        """One pre-norm transformer block on x [B, G, T, d].

        Without ``cache`` the block attends to its own T keys and returns them.
        With ``cache = (k_all, v_all, layer, index)`` (``response_cache`` buffers) it writes
        its keys at ``index`` of layer ``layer`` in place and attends to that layer's buffer.
        """
        config, dtype = self.config, self.dtype
        inv_freq = rope_inverse_frequencies(config)
        h = rms_norm(x, w["attn_norm"], config.rms_norm_eps)
        q = self._project(w, "wq", "bgtd,dhk->bgthk", h)
        k = self._project(w, "wk", "bgtd,dhk->bgthk", h)
        v = self._project(w, "wv", "bgtd,dhk->bgthk", h)
        if config.attention_bias:
            q, k, v = q + w["bq"].astype(dtype), k + w["bk"].astype(dtype), v + w["bv"].astype(dtype)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is None:
            keys, values, new_kv = k, v, (k, v)
        else:
            cache_k, cache_v, layer, index = cache
            # k, v [B, G, 1, K, D] into keys [.., K, R, D] and values [.., K, D, R] (see
            # RESPONSE_CACHE_AXES); attention reads them as [B, G, R, K, D] views.
            new_k = jnp.moveaxis(k, 2, -2)[None].astype(cache_k.dtype)
            new_v = jnp.moveaxis(v, 2, -1)[None].astype(cache_v.dtype)
            cache_k = jax.lax.dynamic_update_slice(cache_k, new_k, (layer, 0, 0, 0, index, 0))
            cache_v = jax.lax.dynamic_update_slice(cache_v, new_v, (layer, 0, 0, 0, 0, index))
            keys = jnp.moveaxis(cache_k[layer], -2, 2)
            values = jnp.moveaxis(cache_v[layer], -1, 2)
            new_kv = (cache_k, cache_v)
        if cache is None:
            attend = attention_lib.implementation(self.attention, self.mesh, dtype)
        else:  # one query: its [1, P + S] scores are small
            attend = attention_lib.materialized
        attended = attend(q, keys, values, self_mask, prefix)
        x = x + self._project(w, "wo", "bgthk,hkd->bgtd", attended)
        h = rms_norm(x, w["mlp_norm"], config.rms_norm_eps)
        gate = self._project(w, "w_gate", "bgtd,di->bgti", h)
        up = self._project(w, "w_up", "bgtd,di->bgti", h)
        x = x + self._project(w, "w_down", "bgti,id->bgtd", jax.nn.silu(gate) * up)
        return self._constrain(x), new_kv

    def _project(self, w, name: str, equation: str, x: jax.Array) -> jax.Array:
        """x @ W for weight ``name`` (the einsum ``equation``), plus a LoRA adapter's low-rank
        delta (x @ A) @ (s * B) when ``w["lora"]`` has one for it (A: [in..., r], contracted
        with x's trailing input dims; B: [r, out...])."""
        y = jnp.einsum(equation, x, w[name].astype(self.dtype))
        if name in w.get("lora", {}):
            a, b = w["lora"][name]
            low_rank = jnp.tensordot(x, a.astype(self.dtype), axes=a.ndim - 1)
            y = y + jnp.tensordot(low_rank, b.astype(self.dtype), axes=1)
        return y

    def _maybe_remat(self, fn):
        return jax.checkpoint(fn, prevent_cse=False) if self.remat else fn

    def _constrain(self, x: jax.Array) -> jax.Array:
        """Shard activations [B, G, T, d] over the batch when a mesh is configured."""
        return constrain(x, self.mesh, ("batch", None, None, None), self.axis_rules)
