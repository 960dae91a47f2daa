"""Jitted group sampling: each prompt is prefilled once and its G samples decode against
one shared copy of its KV cache.

Shapes: B prompts, G samples per prompt, P (bucketed) prompt length, R = max_new_tokens,
V vocab, L layers, K kv heads, D head dim.

* ``prefill``: one causal pass over the left-padded prompts -> prompt cache [L, B, P, K, D]
  and the last prompt position's logits [B, V].
* ``decode``: a ``lax.while_loop`` over response positions. Each step samples G tokens per
  prompt, writes their keys/values into the response cache [L, B, G, R, K, D] and runs the
  decoder on them. The response cache is created inside the jitted decode and lives only in
  the loop carry, which XLA updates in place (no buffer crosses the jit boundary to donate).
  Attention joins the shared prompt cache and the sample's own response cache in one softmax
  (see ``models.attention``).
  The loop ends when every sample has emitted an EOS id or R tokens.

``shared_prompt=False`` is the reference path most samplers use: the prompt repeated G times,
prefilled G times, G copies of its cache. Both paths draw the same random numbers (keys are
folded from (step, row, sample) in the [B, G] layout), so they produce identical tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from reczero_jax.mesh import batch_sharding, constrain
from reczero_jax.models.decoder import (
    Decoder,
    KVCache,
    Prefix,
    causal_mask,
    positions_from_mask,
)
from reczero_jax.models.hf import stop_token_ids

PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


class SampleOutput(NamedTuple):
    """tokens, logprobs: [B, G, R] (pad id / 0.0 after a sample ends); lengths: [B, G]
    generated tokens including the EOS; finished_by_eos: [B, G] (False: hit max_new_tokens)."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finished_by_eos: jax.Array


def bucket_length(length: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    """Smallest bucket >= length; beyond the largest, the next multiple of it."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    return -(-length // buckets[-1]) * buckets[-1]


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Mask (to -inf) tokens outside the top-k and outside the top-p nucleus. logits: [..., V].

    top-k keeps tokens whose logit is >= the k-th largest (ties at the boundary kept).
    top-p keeps, in order of decreasing probability, every token whose preceding cumulative
    probability is < p (so the smallest set reaching p, and always the most likely token).
    """
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return logits


def sample_keys(rng: jax.Array, step: jax.Array, rows: int, samples: int) -> jax.Array:
    """Keys [rows, samples]: fold_in(fold_in(fold_in(rng, step), row), sample)."""
    step_key = jax.random.fold_in(rng, step)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(jnp.arange(rows))
    return jax.vmap(lambda k: jax.vmap(lambda s: jax.random.fold_in(k, s))(jnp.arange(samples)))(
        row_keys)


def choose_tokens(logits: jax.Array, keys: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row from logits [B, G, V]; returns tokens [B, G] and their log-probs.

    The log-prob is under the distribution the token was drawn from: softmax(logits / T)
    restricted to the top-k / top-p set. temperature == 0 is greedy (argmax) and reports the
    log-prob under softmax(logits).
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        logp = jax.nn.log_softmax(filter_logits(logits / temperature, top_k, top_p), axis=-1)
        gumbel = jax.vmap(jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:])))(keys)
        tokens = jnp.argmax(logp + gumbel, axis=-1)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]


# ----------------------------------------------------------------------------- jitted parts


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef, state, prompt_ids, prompt_mask):
    """Prompt cache [L, B, P, K, D] (as a Prefix) and last-position logits [B, V]."""
    model: Decoder = nnx.merge(graphdef, state)
    hidden, kv = model.forward(prompt_ids[:, None], positions_from_mask(prompt_mask)[:, None],
                               causal_mask(prompt_mask)[:, None], return_kv=True)
    cache_axes = ("layers", "batch", None, "kv_heads", "head_dim")
    prefix = Prefix(KVCache(*(constrain(c[:, :, 0], model.mesh, cache_axes) for c in kv)),
                    prompt_mask.astype(bool))
    return prefix, model.logits(hidden[:, 0, -1])


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "num_samples", "max_new_tokens", "temperature", "top_k",
                     "top_p", "eos_ids", "pad_id", "shared_prompt"),
)
def _decode(graphdef, state, prefix, last_logits, prompt_lengths, rng, *, num_samples,
            max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id, shared_prompt):
    model: Decoder = nnx.merge(graphdef, state)
    config = model.config
    batch = prompt_lengths.shape[0]
    g, r = num_samples, max_new_tokens
    # The shared path keeps [B, G] rows against a [B]-row prompt cache; the naive path has
    # B*G prompt rows, each decoding one sample.
    rows, per_row = (batch, g) if shared_prompt else (batch * g, 1)
    cache_shape = (config.num_layers, rows, per_row, r, config.num_kv_heads, config.head_dim)
    cache_axes = ("layers", "batch", None, None, "kv_heads", "head_dim")
    cache = KVCache(*(constrain(jnp.zeros(cache_shape, model.dtype), model.mesh, cache_axes)
                      for _ in range(2)))
    first_logits = last_logits.reshape(batch, -1, last_logits.shape[-1])
    first_logits = jnp.broadcast_to(first_logits, (batch, g, last_logits.shape[-1]))
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def cond(carry):
        step, _, _, _, _, _, done = carry
        return (step < r) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, tokens, logprobs, lengths, done = carry
        token, logp = choose_tokens(logits, sample_keys(rng, step, batch, g), temperature,
                                    top_k, top_p)
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, :, step].set(token)
        logprobs = logprobs.at[:, :, step].set(jnp.where(done, 0.0, logp))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, eos)
        positions = jnp.broadcast_to(prompt_lengths[:, None] + step, (batch, g))
        cache_mask = jnp.broadcast_to(jnp.arange(r) <= step, (rows, per_row, r))
        logits, cache = model.decode_step(token.reshape(rows, per_row),
                                          positions.reshape(rows, per_row), prefix, cache, step,
                                          cache_mask)
        return step + 1, logits.reshape(batch, g, -1), cache, tokens, logprobs, lengths, done

    init = (jnp.int32(0), first_logits, cache, jnp.full((batch, g, r), pad_id, jnp.int32),
            jnp.zeros((batch, g, r), jnp.float32), jnp.zeros((batch, g), jnp.int32),
            jnp.zeros((batch, g), bool))
    _, _, _, tokens, logprobs, lengths, done = jax.lax.while_loop(cond, body, init)
    finished_by_eos = jnp.any(jnp.isin(tokens, eos), axis=-1) & (len(eos_ids) > 0)
    out = SampleOutput(tokens, logprobs, lengths, finished_by_eos)
    return SampleOutput(*(constrain(x, model.mesh, ("batch",) + (None,) * (x.ndim - 1))
                          for x in out))


# ----------------------------------------------------------------------------- public API


def generate(model: Decoder, prompt_ids, prompt_mask, *, num_samples: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_ids: Sequence[int] | None = None, pad_id: int = 0, rng: jax.Array,
             shared_prompt: bool = True, buckets: Sequence[int] = PROMPT_BUCKETS
             ) -> SampleOutput:
    """Sample ``num_samples`` responses for each left-padded prompt.

    prompt_ids, prompt_mask: [B, P] (left padding; positions come from the mask): host arrays
    of the whole batch, or global ``jax.Array`` s (several processes: ``distributed.global_batch``
    of each one's rows). The prompt length is padded up to a bucket so few shapes compile.
    ``eos_ids`` defaults to the model's own (``models.stop_token_ids(model.config)``: config.json's
    and generation_config.json's; callers with a tokenizer pass ``stop_token_ids(model.config,
    tokenizer)``); pass ``()`` to always generate ``max_new_tokens`` tokens.
    ``temperature=0`` is greedy decoding. Returns a SampleOutput of [B, G, R] arrays.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    eos_ids = tuple(stop_token_ids(model.config) if eos_ids is None else eos_ids)
    prompt_ids, prompt_mask = _place_batch(model, prompt_ids, prompt_mask)
    prompt_ids, prompt_mask, prompt_lengths = _prepare_prompts(
        prompt_ids, prompt_mask, length=bucket_length(prompt_ids.shape[1], buckets),
        pad_id=int(pad_id), copies=1 if shared_prompt else num_samples, mesh=model.mesh)
    graphdef, state = nnx.split(model)
    prefix, last_logits = _prefill(graphdef, state, prompt_ids, prompt_mask)
    return _decode(graphdef, state, prefix, last_logits, prompt_lengths, rng,
                   num_samples=num_samples, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   eos_ids=eos_ids, pad_id=int(pad_id), shared_prompt=shared_prompt)


def _place_batch(model: Decoder, *arrays):
    """Put [B, ...] host arrays (or reshard arrays) on the model's mesh, the batch over
    (data, fsdp)."""
    if model.mesh is None:
        return tuple(jnp.asarray(a) for a in arrays)
    return jax.device_put(arrays, batch_sharding(model.mesh, arrays))


@functools.partial(jax.jit, static_argnames=("length", "pad_id", "copies", "mesh"))
def _prepare_prompts(prompt_ids, prompt_mask, *, length, pad_id, copies, mesh):
    """[B, P] -> left-padded to [B * copies, length] (each row repeated ``copies`` times, for the
    unshared path), and the prompt lengths [B]. On device, so that global arrays whose rows
    live in other processes are padded where they are."""
    extra = length - prompt_ids.shape[1]
    prompt_lengths = prompt_mask.sum(axis=1)
    prompt_ids = jnp.pad(prompt_ids, ((0, 0), (extra, 0)), constant_values=pad_id)
    prompt_mask = jnp.pad(prompt_mask, ((0, 0), (extra, 0)))
    if copies > 1:
        prompt_ids, prompt_mask = (jnp.repeat(x, copies, axis=0) for x in (prompt_ids, prompt_mask))
    rows = ("batch", None)
    return (constrain(prompt_ids, mesh, rows), constrain(prompt_mask, mesh, rows),
            constrain(prompt_lengths, mesh, ("batch",)))
