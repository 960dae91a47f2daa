"""Jitted group sampling: each prompt is prefilled once and its G samples decode against
one shared copy of its KV cache.

Shapes: B prompts, G samples per prompt, P (bucketed) prompt length, R = max_new_tokens,
V vocab, L layers, K kv heads, D head dim.

* ``prefill``: one causal pass over the left-padded prompts -> prompt cache (keys
  [L, B, K, P, D], values [L, B, K, D, P]: ``models.decoder.prompt_cache``) and the last prompt
  position's logits [B, V].
* ``decode``: a ``lax.while_loop`` over response positions. Each step samples G tokens per
  prompt, writes their keys/values into the response cache (R positions per sample, laid out
  as ``models.decoder.response_cache`` says) and runs the decoder on them. The response cache
  is created inside the jitted decode and lives only in the loop carry, which XLA updates in
  place (no buffer crosses the jit boundary to donate).
  Attention joins the shared prompt cache and the sample's own response cache in one softmax
  (see ``models.attention``).
  The loop ends when every sample has emitted an EOS id or R tokens.

Rollout layout: a model whose weights are ZeRO-3 sharded over ``fsdp`` (the training layout)
would gather every weight at every decode step. ``generate`` therefore samples, by default for
such a model, from a *rollout copy* (``rollout_model``): the parameters cast to the compute
dtype and resharded by ``mesh.rollout_rules`` (tensor-parallel over fsdp x tensor, the batch
over data) in one jitted transfer, device to device, dropped when ``generate`` returns. Its
outputs come back in the model's own batch layout. ``rollout_layout=False`` samples in the
training layout (the reference: same tokens, log-probs equal to rounding).

``shared_prompt=False`` is the reference path most samplers use: the prompt repeated G times,
prefilled G times, G copies of its cache. Both paths draw the same random numbers (keys are
folded from (step, row, sample) in the [B, G] layout), so they produce identical tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from reczero_jax.data.padding import PROMPT_BUCKETS, bucket_length
from reczero_jax.mesh import (
    batch_sharding,
    batch_spec,
    constrain,
    param_shardings,
    rollout_rules,
)
from reczero_jax.models.decoder import (
    PROMPT_CACHE_AXES,
    RESPONSE_CACHE_AXES,
    Decoder,
    KVCache,
    Prefix,
    causal_mask,
    positions_from_mask,
    prompt_cache,
    response_cache,
)
from reczero_jax.models.hf import stop_token_ids


class SampleOutput(NamedTuple):
    """tokens, logprobs: [B, G, R] (pad id / 0.0 after a sample ends); lengths: [B, G]
    generated tokens including the EOS; finished_by_eos: [B, G] (False: hit max_new_tokens)."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finished_by_eos: jax.Array


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


def first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)``, computed as two single-output reductions: the maximum, then
    the smallest index holding it (a NaN counts as the maximum, as in ``jnp.argmax``), so the
    same index on ties and NaNs.

    Why not ``jnp.argmax``: XLA's CPU backend fuses the producer of ``x`` into argmax's one
    (value, index) reduction, which it runs without vectorising. In the sampler that producer
    is the Gumbel noise (two logs per vocabulary entry): over 8 x 49,152 logits the fused
    argmax took 19.3 ms of a SmolLM2 decode step on a busy 2-core CPU, split like this the
    noise and the two reductions 4.6 ms (``benchmarks/PROFILE.md``). Elsewhere it reads the
    [.., V] scores once more, which is small beside the LM head that made them.
    """
    peak = x.max(axis=-1, keepdims=True)
    hit = (x == peak) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, jnp.arange(x.shape[-1]), x.shape[-1]), axis=-1)


def choose_tokens(logits: jax.Array, keys: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row from logits [B, G, V]; returns tokens [B, G] and their log-probs.

    The log-prob is under the distribution the token was drawn from: softmax(logits / T)
    restricted to the top-k / top-p set. temperature == 0 is greedy (argmax) and reports the
    log-prob under softmax(logits).
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        tokens = first_argmax(logits)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        logp = jax.nn.log_softmax(filter_logits(logits / temperature, top_k, top_p), axis=-1)
        gumbel = jax.vmap(jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[-1:])))(keys)
        tokens = first_argmax(logp + gumbel)
    return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]


# ----------------------------------------------------------------------------- jitted parts


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefill(graphdef, state, prompt_ids, prompt_mask):
    """The prompt cache (a Prefix, in ``prompt_cache``'s layouts) and last-position logits
    [B, V]."""
    model: Decoder = nnx.merge(graphdef, state)
    hidden, kv = model.forward(prompt_ids[:, None], positions_from_mask(prompt_mask)[:, None],
                               causal_mask(prompt_mask)[:, None], return_kv=True)
    cache = prompt_cache(KVCache(kv.k[:, :, 0], kv.v[:, :, 0]))
    prefix = Prefix(KVCache(*(constrain(c, model.mesh, axes, model.axis_rules)
                              for c, axes in zip(cache, PROMPT_CACHE_AXES, strict=True))),
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
    cache = KVCache(*(constrain(c, model.mesh, axes, model.axis_rules) for c, axes in zip(
        response_cache(config, rows, per_row, r, model.dtype), RESPONSE_CACHE_AXES, strict=True)))
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
    return SampleOutput(*(constrain(x, model.mesh, ("batch",) + (None,) * (x.ndim - 1),
                                    model.axis_rules) for x in out))


# ----------------------------------------------------------------------------- public API


def generate(model: Decoder, prompt_ids, prompt_mask, *, num_samples: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_ids: Sequence[int] | None = None, pad_id: int = 0, rng: jax.Array,
             shared_prompt: bool = True, buckets: Sequence[int] = PROMPT_BUCKETS,
             rollout_layout: bool | None = None) -> SampleOutput:
    """Sample ``num_samples`` responses for each left-padded prompt.

    prompt_ids, prompt_mask: [B, P] (left padding; positions come from the mask): host arrays
    of the whole batch, or global ``jax.Array`` s (several processes: ``distributed.global_batch``
    of each one's rows). The prompt length is padded up to a bucket so few shapes compile.
    ``eos_ids`` defaults to the model's own (``models.stop_token_ids(model.config)``: config.json's
    and generation_config.json's; callers with a tokenizer pass ``stop_token_ids(model.config,
    tokenizer)``); pass ``()`` to always generate ``max_new_tokens`` tokens.
    ``temperature=0`` is greedy decoding. Returns a SampleOutput of [B, G, R] arrays, the batch
    sharded as the model's own layout shards it.
    ``rollout_layout``: sample from the rollout copy (``rollout_model``); ``None`` (default)
    does so when the model's weights are sharded over ``fsdp``, ``False`` keeps the layout the
    model has (the reference).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    eos_ids = tuple(stop_token_ids(model.config) if eos_ids is None else eos_ids)
    sampler = rollout_model(model) if use_rollout_layout(model, rollout_layout) else model
    prompt_ids, prompt_mask = _place_batch(sampler, prompt_ids, prompt_mask)
    prompt_ids, prompt_mask, prompt_lengths = _prepare_prompts(
        prompt_ids, prompt_mask, length=bucket_length(prompt_ids.shape[1], buckets),
        pad_id=int(pad_id), copies=1 if shared_prompt else num_samples, mesh=sampler.mesh,
        rules=sampler.axis_rules)
    graphdef, state = nnx.split(sampler)
    prefix, last_logits = _prefill(graphdef, state, prompt_ids, prompt_mask)
    out = _decode(graphdef, state, prefix, last_logits, prompt_lengths, rng,
                  num_samples=num_samples, max_new_tokens=max_new_tokens,
                  temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                  eos_ids=eos_ids, pad_id=int(pad_id), shared_prompt=shared_prompt)
    return SampleOutput(*_place_batch(model, *out)) if sampler is not model else out


def use_rollout_layout(model: Decoder, rollout_layout: bool | None) -> bool:
    """Whether ``generate`` samples from the rollout copy: ``rollout_layout`` when given, else
    exactly when the model's weights are sharded over ``fsdp`` (a mesh with fsdp > 1)."""
    if rollout_layout is None:
        return model.mesh is not None and model.mesh.shape["fsdp"] > 1
    if rollout_layout and model.mesh is None:
        raise ValueError("rollout_layout=True needs a model on a mesh (Decoder(mesh=...))")
    return bool(rollout_layout)


def rollout_model(model: Decoder) -> Decoder:
    """The model's rollout copy: the same module with its parameters cast to the compute dtype
    (norm scales keep theirs: ``rms_norm`` reads them in float32) and placed by
    ``mesh.rollout_rules``, in one jitted device-to-device transfer (``_resharder``), and its
    activation constraints following those rules. The training parameters are untouched; the
    copy is freed when the caller drops it."""
    graphdef, state = nnx.split(model)
    shardings, dtypes = _rollout_placement(model, state)
    arrays = _resharder(shardings, dtypes)(jax.tree.leaves(state))
    return _with_rollout_rules(model, graphdef, state, arrays)


def _rollout_placement(model: Decoder, state) -> tuple[tuple, tuple]:
    """Per leaf of ``state`` (in ``jax.tree.leaves`` order): its rollout sharding and dtype."""
    rules = rollout_rules(model.mesh, model.config)
    shardings = tuple(jax.tree.leaves(param_shardings(state, model.mesh, rules)))
    dtypes = tuple(jnp.dtype(variable.get_value().dtype if "norm" in axes else model.dtype)
                   for _, variable in nnx.to_flat_state(state)
                   for axes in [variable.get_metadata()["logical_axes"]])
    return shardings, dtypes


def _with_rollout_rules(model: Decoder, graphdef, state, leaves) -> Decoder:
    copy = nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(state), leaves))
    copy.axis_rules = rollout_rules(model.mesh, model.config)
    return copy


@functools.lru_cache(maxsize=8)
def _resharder(shardings: tuple, dtypes: tuple):
    """One jitted program per (layout, dtypes): cast every leaf, place it by ``shardings``
    (``out_shardings``: XLA moves the shards between devices; nothing goes through the host)."""
    return jax.jit(lambda leaves: [x.astype(d) for x, d in zip(leaves, dtypes, strict=True)],
                   out_shardings=list(shardings))


def compile_rollout(model: Decoder, *, batch: int, prompt_length: int, num_samples: int,
                    max_new_tokens: int, rollout_layout: bool | None = None,
                    shared_prompt: bool = True, temperature: float = 1.0,
                    eos_ids: Sequence[int] = (), pad_id: int = 0) -> dict[str, Any]:
    """The compiled programs ``generate`` runs for one batch shape: ``{"reshard"`` (rollout
    layout only), ``"prefill"``, ``"decode"}`` -> ``jax.stages.Compiled``, for reading their
    collectives (``collectives.collective_bytes(c.as_text())``) and memory
    (``c.memory_analysis()``). ``model`` may be abstract (``nnx.eval_shape``, on a mesh of
    simulated devices): every argument is a ``jax.ShapeDtypeStruct``, nothing is allocated.
    ``prompt_length`` is the bucketed length (``bucket_length``).
    """
    def abstract(leaves, shardings, dtypes=None):
        dtypes = dtypes or [leaf.dtype for leaf in leaves]
        return [jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding)
                for leaf, sharding, dtype in zip(leaves, shardings, dtypes, strict=True)]

    def like(shapes, shardings):  # eval_shape's shapes with a compiled program's shardings
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            shapes, shardings)

    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    training = abstract(leaves, jax.tree.leaves(param_shardings(state, model.mesh,
                                                                model.axis_rules)))
    programs = {}
    sampler_leaves = training
    if use_rollout_layout(model, rollout_layout):
        shardings, dtypes = _rollout_placement(model, state)
        programs["reshard"] = _resharder(shardings, dtypes).lower(training).compile()
        sampler_leaves = abstract(leaves, shardings, dtypes)
        model = _with_rollout_rules(model, graphdef, state, sampler_leaves)
        graphdef, state = nnx.split(model)
    state = jax.tree.unflatten(jax.tree.structure(state), sampler_leaves)
    rows = batch * (1 if shared_prompt else num_samples)
    prompts = jax.ShapeDtypeStruct((rows, prompt_length), jnp.int32, sharding=NamedSharding(
        model.mesh, batch_spec(2, model.axis_rules)))
    prefill = _prefill.lower(graphdef, state, prompts, prompts).compile()
    prefill_out = like(jax.eval_shape(_prefill, graphdef, state, prompts, prompts),
                       prefill.output_shardings)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(
        model.mesh, batch_spec(1, model.axis_rules)))
    programs["prefill"] = prefill
    programs["decode"] = _decode.lower(
        graphdef, state, *prefill_out, lengths, jax.random.key(0), num_samples=num_samples,
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=0, top_p=1.0,
        eos_ids=tuple(eos_ids), pad_id=pad_id, shared_prompt=shared_prompt).compile()
    return programs


def _place_batch(model: Decoder, *arrays):
    """Put [B, ...] host arrays (or reshard arrays) on the model's mesh, the batch as the
    model's rules shard it (training: over data x fsdp; rollout: over data)."""
    if model.mesh is None:
        return tuple(jnp.asarray(a) for a in arrays)
    return jax.device_put(arrays, batch_sharding(model.mesh, arrays, model.axis_rules))


@functools.partial(jax.jit, static_argnames=("length", "pad_id", "copies", "mesh", "rules"))
def _prepare_prompts(prompt_ids, prompt_mask, *, length, pad_id, copies, mesh, rules):
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
    return (constrain(prompt_ids, mesh, rows, rules), constrain(prompt_mask, mesh, rows, rules),
            constrain(prompt_lengths, mesh, ("batch",), rules))
