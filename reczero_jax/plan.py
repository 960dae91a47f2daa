"""``reczero plan CONFIG --slice v5p-8``: per-chip memory of a training config on a TPU slice.

Everything is bytes on ONE chip (one JAX device), computed from the model's shapes, the
config's batch and lengths, and the mesh through the same logical-axis rules the trainer uses
(``mesh.LOGICAL_AXIS_RULES``: weights over fsdp on ``embed`` and over tensor on heads / mlp /
vocab; the batch over data x fsdp). Symbols:

    L layers, d width, H heads, K kv heads, D head dim, I MLP width, V vocab
    B prompts per step, G samples per prompt, P prompt tokens (the largest bucket), R new tokens
    M micro-batches, t tensor size, n = data x fsdp (the batch shards)
    b = B / (M n) prompts per chip in one micro-batch;  c = compute dtype bytes (bf16: 2)

Resident in every phase
    params      = sum over weights of (its shard's elements) x param dtype bytes
    optimizer   = 2 x params (AdamW's first and second moments, in the parameters' dtype)
    reference   = params, only when grpo.kl_coef > 0

With LoRA (``model.lora.rank`` r > 0) the parameters above are the frozen base, in
``model.param_dtype``; only the adapters (float32, ``reczero_jax.lora``) train:
    adapters    = sum over adapter factors of (its shard's elements) x 4
                  (L r (IN + OUT) per layer projection targeted, r (d + V) for the LM head;
                  A shards like its weight's inputs, B like its outputs, the rank never)
    optimizer   = 2 x adapters;  gradients = adapters (x 2 with micro-batches)
    reference   = none: the KL reference is the base with the adapters off
The activations are counted as without LoRA (the low-rank intermediates, b T r per target
and layer, are under 1 % of them at r = 16); the rollout copy's adapters likewise.

Update phase (``Trainer.grpo_update``: forward, backward, AdamW)
    gradients   = params x (1 if M == 1 else 2: the micro-batch gradient and the running sum)
    activations, per layer and token (the residuals the backward pass reads):
        a   = c (4d + HD/t + 3I/t) + 4 (2d + (H + 2K) D/t)     norms' inputs and outputs, q k v
              (float32 in the attention), its output, the MLP's gate, up and their product
        plus what the attention implementation keeps (``attention_bytes``, model.attention;
              ``auto`` on a TPU slice is splash), for n queries that each see S keys:
              materialized  4 (H/t) n S: the float32 softmax weights (the max they subtract
                            takes no gradient, so the scores are not kept)
              blockwise     4 (H/t) n (D + 2): float32 output, running max and denominator
              splash        (H/t) n (c D + 4) + the [prefix; self] keys and values,
                            2 (sequences) S (K/t) D c
        one layer:  A = b P a + attn(b, P queries, P keys)
                      + b G (R-1) a + attn(b G, R-1 queries, P + R - 1 keys)
              (the prompt once, then the responses over prompt + own keys; ``policy.py``)
        without remat:  (L + 1) A             every layer's residuals + one layer's cotangents
        with remat:     L b (P + G (R-1)) d c + 2 A
              (each layer keeps only its input; the backward recomputes one layer at a time)
        + the prompt's keys and values for the responses: 2 L b P (K/t) D c
        + one layer's transient attention buffers (blockwise: a few 512 x 512 float32 tiles
              and the self mask in blocks, 1 byte per (query, own key))
        P here is the prompt bucket: the pipeline pads prompts to the sampler's buckets.
    logits      = 2 x b G R (V/t) x 4 bytes: float32 logits and their cotangent (XLA fuses the
                  softmax into both; measured, see tests/test_plan.py). With V = 152,064 this
                  is the largest term unless chunked.
                  With grpo.logprob_chunk = C (``policy.token_stats``): R -> C, plus the
                  hidden states the chunks are recomputed from, b G R d c.

Rollout phase (``sampling.generate``; no micro-batches; the prompt padded to the sampler's
bucket P_s). With fsdp > 1 the sampler works in the rollout layout (``mesh.rollout_rules``):
b_r = B / data prompts per chip, heads and kv heads split a ways and the vocabulary v ways over
fsdp x tensor (the rules' fallbacks included); with fsdp = 1, b_r = B / n and a = v = t.
    reshard     = rollout weights W_r + the transfer's transient 2 W_r: the training shards
                  cast to c and the all-to-all's receive buffers (XLA's memory analysis of the
                  reshard on CPU, Qwen2.5-7B on 4 chips: 8.4 GiB of temporaries for W_r = 3.55)
    W_r         = sum over weights of (its rollout shard's elements) x c, in every rollout
                  phase (norm scales, a few kB, counted at c too)
    prefill     = prompt cache + one layer's attention: materialized 8 b_r (H/a) P_s^2 (scores
                  and softmax); blockwise its tiles and mask; splash its residuals
    decode      = prompt cache 2 L b_r P_s (K/a) D c + response caches 2 L b_r G R (K/a) D c
                  + the step's float32 logits 3 b_r G (V/v) 4
Evaluation is the rollout formula with G = 1, B = train.eval_batch_size and
R = train.eval_max_new_tokens.

Collectives and time (``--compile``): the sampler's programs (reshard, prefill, decode) are
compiled for the config's shapes on a simulated CPU mesh of the slice's chips (abstract
arrays, nothing allocated) and their collective bytes per chip read from the HLO
(``collectives.collective_bytes``: the decode loop's body times its trip count R, shown per
token). The update's traffic is a ZeRO-3 formula, per micro-batch: every fsdp-sharded weight
is all-gathered for the forward and again for the backward (2 W_g, W_g = the weights gathered
over fsdp, param dtype) and its gradient reduce-scattered (W_g), plus an all-reduce of the
gradient shard over data when data > 1 (``tests/test_plan.py``: the total within 25 % of the
compiled update's on a CPU mesh with fsdp = 4; XLA on CPU reduces with all-reduce where this
says reduce-scatter). Bytes become time at the chip's ICI bandwidth in one
direction (``INTERCONNECT``: half the published bidirectional figure; a lower bound: links
are shared and collectives rarely reach peak); a decode token also reads each chip's rollout
weights and KV caches from HBM, the floor of its time. XLA's own memory analysis of each
program is printed next to the formulas.

The peak is the largest phase. The verdict compares it with 90 % of the chip's HBM: the
runtime keeps part of HBM for itself and XLA's buffer packing is not perfect.
``tests/test_plan.py`` checks the formula against XLA's ``compiled.memory_analysis()`` of the
real update step on small CPU meshes: parameters + optimizer state within 10 %, the update
phase's total within a factor of 2, and with long sequences per attention implementation
(materialized; blockwise with chunked log-probs) within a factor of 1.5 (XLA fuses and
reuses buffers in ways a closed formula does not follow, in both directions).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
from pathlib import Path

from reczero_jax.config import DTYPE_BYTES, check_batch_split

GIB = 2**30
USABLE_FRACTION = 0.9

# HBM per chip, as Google's Cloud TPU pages give it (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
# /v6e: "32 GiB", "16 GB", "95 GB", "32 GB"), read here as GiB. Were the "GB" decimal, the
# usable budget (90 %) would still be below them: 85.5 GiB < 95e9 bytes = 88.5 GiB.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Per chip, bytes/s: (HBM bandwidth, bidirectional inter-chip interconnect bandwidth), as the
# Cloud TPU pages give them (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
# v4 "1200 GBps" HBM (the page gives no ICI figure); v5e "819 GBps", ICI "400 GBps";
# v5p "2765 GBps", ICI "1200 GBps"; v6e "1638 GBps", ICI "800 GBps".
BANDWIDTH = {"v4": (1200e9, None), "v5e": (819e9, 400e9), "v5p": (2765e9, 1200e9),
             "v6e": (1638e9, 800e9)}
# The number in an accelerator type counts TensorCores on v4 and v5p (two per chip, one JAX
# device per chip) and chips on v5e and v6e (one TensorCore each).
CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}
SLICE_PATTERN = re.compile(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$")

# Hugging Face config.json values, for planning without the checkpoint at hand.
PRESETS = {
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
        "vocab_size": 152064, "tie_word_embeddings": False, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    },
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    name: str
    generation: str
    chips: int
    hosts: int
    hbm_bytes: int


def parse_slice(name: str) -> TpuSlice:
    """``v5p-8`` -> 4 chips of 95 GiB on 1 host; ``v5e-16`` (or ``v5litepod-16``) -> 16 x 16 GiB
    on 4 hosts."""
    match = SLICE_PATTERN.match(name.strip().lower())
    if not match:
        raise ValueError(f"unknown slice {name!r}: use an accelerator type like v4-8, v5p-8, "
                         f"v5e-16 (v5litepod-16) or v6e-8")
    generation = "v5e" if match[1] == "v5litepod" else match[1]
    count = int(match[2])
    if count % CORES_PER_CHIP[generation] or count == 0:
        raise ValueError(f"{name}: {generation} types count TensorCores, "
                         f"{CORES_PER_CHIP[generation]} per chip")
    chips = count // CORES_PER_CHIP[generation]
    # Chips per host VM: 4 on v4 and v5p; on v5e and v6e up to 8 on one host, 4 per host beyond.
    per_host = 8 if generation in ("v5e", "v6e") and chips <= 8 else 4
    return TpuSlice(name, generation, chips, max(1, chips // per_host), HBM_GIB[generation] * GIB)


def _sampler_bucket(prompt_tokens: int) -> int:
    """The length ``sampling.generate`` pads prompts of ``prompt_tokens`` to."""
    from reczero_jax.data.padding import bucket_length

    return bucket_length(prompt_tokens)


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What the memory depends on, besides the model: taken from an ExperimentConfig."""

    prompts_per_step: int
    group_size: int
    prompt_tokens: int
    sample_prompt_tokens: int
    new_tokens: int
    micro_batches: int
    remat: bool
    compute_bytes: int
    param_bytes: int
    reference_model: bool
    eval_batch_size: int
    eval_new_tokens: int
    data: int
    fsdp: int
    tensor: int
    attention: str = "materialized"  # a concrete implementation (``planned_attention``)
    logprob_chunk: int = 0  # grpo.logprob_chunk (0: the whole [B, G, R, V] logits)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_targets: tuple[str, ...] = ()

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    @classmethod
    def from_config(cls, config) -> RunShape:
        return cls(
            prompts_per_step=config.train.prompts_per_step, group_size=config.grpo.group_size,
            prompt_tokens=config.data.max_prompt_tokens,
            sample_prompt_tokens=_sampler_bucket(config.data.max_prompt_tokens),
            new_tokens=config.grpo.max_new_tokens, micro_batches=config.optim.micro_batches,
            remat=config.model.remat, compute_bytes=DTYPE_BYTES[config.model.dtype],
            param_bytes=DTYPE_BYTES[config.model.param_dtype],
            # LoRA: the reference is the frozen base itself, no copy.
            reference_model=bool(config.grpo.kl_coef) and not config.model.lora.rank,
            eval_batch_size=config.train.eval_batch_size,
            eval_new_tokens=config.train.eval_max_new_tokens,
            data=config.mesh.data, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor,
            attention=planned_attention(config.model.attention),
            logprob_chunk=config.grpo.logprob_chunk,
            lora_rank=config.model.lora.rank,
            lora_targets=tuple(config.model.lora.targets) if config.model.lora.rank else ())


def planned_attention(name: str) -> str:
    """The implementation ``model.attention`` runs on a TPU slice (``auto`` -> splash,
    ``models.attention.resolve`` on TPU)."""
    return "splash" if name == "auto" else name


ATTENTION_BLOCK = 512  # models.attention.BLOCK_Q = BLOCK_K (blockwise's tiles)


def attention_bytes(attention: str, sequences: float, queries: int, keys: int,
                    self_keys: int, heads: float, kv_heads: float, head_dim: int, c: int
                    ) -> tuple[float, float]:
    """(kept for the backward per layer, transient in one layer) bytes of one attention call:
    ``sequences`` sequences of ``queries`` queries, each seeing ``keys`` keys of which
    ``self_keys`` its own (the rest a shared prefix); n = sequences x queries query rows.

        materialized: kept 4 H n keys (the float32 softmax weights)
        blockwise:    kept 4 H n (D + 2) (float32 output, running max, denominator);
                      transient: 8 float32 tiles of 512 x 512 per head and sequence (the
                      backward's scores, weights and their cotangents), and the
                      self mask re-laid out in blocks, 1 byte per (query, self key)
        splash/cudnn: kept H n (c D + 4) (output, float32 log-sum-exp) and the concatenated
                      [prefix; self] keys and values, 2 sequences keys K D c
    """
    rows = sequences * queries
    if attention == "materialized":
        return 4 * heads * rows * keys, 0.0
    if attention == "blockwise":
        tiles = 8 * 4 * sequences * min(queries, ATTENTION_BLOCK) * heads * min(
            keys, ATTENTION_BLOCK)
        return 4 * heads * (head_dim + 2) * rows, tiles + rows * self_keys
    return (heads * (head_dim * c + 4) * rows + 2 * sequences * keys * kv_heads * head_dim * c,
            0.0)


PHASES = ("update", "reshard", "prefill", "decode", "eval prefill", "eval decode")
ROLLOUT_PHASES = PHASES[1:]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per chip: ``terms[name][phase]``, absent where the term is not live in a phase."""

    terms: dict[str, dict[str, float]]

    def total(self, phase: str) -> float:
        return sum(by_phase.get(phase, 0.0) for by_phase in self.terms.values())

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.total)

    @property
    def peak(self) -> float:
        return self.total(self.peak_phase)


def _abstract_mesh(data: int, fsdp: int, tensor: int):
    from jax.sharding import AbstractMesh, AxisType

    from reczero_jax.mesh import MESH_AXES

    return AbstractMesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@functools.lru_cache(maxsize=32)
def param_shard_elements(model_config, data: int, fsdp: int, tensor: int,
                         rollout: bool = False, lora_rank: int = 0,
                         lora_targets: tuple[str, ...] = ()) -> int:
    """Parameter elements on one chip: each weight's shard under ``mesh.param_shardings``
    (which also raises, naming the weight, when a dimension does not divide its mesh axis);
    ``rollout``: under ``mesh.rollout_rules`` (the sampler's copy). With ``lora_rank``: the
    elements of the LoRA adapters on ``lora_targets`` alone."""
    import jax
    from flax import nnx

    from reczero_jax.lora import LoRAParam, add_lora
    from reczero_jax.mesh import TRAINING_RULES, param_shardings, rollout_rules
    from reczero_jax.models.decoder import Decoder

    def build():
        model = Decoder(model_config, rngs=nnx.Rngs(0))
        return add_lora(model, rank=lora_rank, alpha=1.0, targets=lora_targets) if lora_rank \
            else model

    abstract = nnx.state(nnx.eval_shape(build), LoRAParam if lora_rank else nnx.Param)
    mesh = _abstract_mesh(data, fsdp, tensor)
    rules = rollout_rules(mesh, model_config) if rollout else TRAINING_RULES
    shardings = param_shardings(abstract, mesh, rules)
    return sum(math.prod(sharding.shard_shape(leaf.shape)) for leaf, sharding in
               zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True))


@dataclasses.dataclass(frozen=True)
class SamplingLayout:
    """How ``generate`` splits the rollout over the chips: ``rollout`` (the rollout layout, used
    when fsdp > 1), the shards of the batch, of the (kv) heads and of the vocabulary, the
    rollout copy's elements per chip (0 without one) and the rules' fallback notes."""

    rollout: bool
    batch_shards: int
    attention_shards: int
    vocab_shards: int
    copy_elements: int
    notes: tuple[str, ...]


@functools.lru_cache(maxsize=32)
def sampling_layout(model_config, data: int, fsdp: int, tensor: int) -> SamplingLayout:
    if fsdp == 1:
        return SamplingLayout(False, data, tensor, tensor, 0, ())
    from reczero_jax.mesh import mesh_axis_size, rollout_rules

    mesh = _abstract_mesh(data, fsdp, tensor)
    rules = rollout_rules(mesh, model_config)
    return SamplingLayout(True, mesh_axis_size(mesh, rules["batch"]),
                          mesh_axis_size(mesh, rules["kv_heads"]),
                          mesh_axis_size(mesh, rules["vocab"]),
                          param_shard_elements(model_config, data, fsdp, tensor, rollout=True),
                          rules.notes)


def check_batch(shape: RunShape) -> None:
    """The errors the trainer would raise, before estimating anything."""
    shards = shape.data * shape.fsdp
    check_batch_split(shape.prompts_per_step, shape.micro_batches, shards,
                      "train.prompts_per_step")
    if shape.eval_batch_size % shards:
        raise ValueError(f"train.eval_batch_size={shape.eval_batch_size} must divide over "
                         f"data x fsdp = {shards} chips")


def estimate(model_config, shape: RunShape) -> Estimate:
    """Per-chip bytes of every term in every phase (the formulas: module docstring)."""
    check_batch(shape)
    cfg, t, c = model_config, shape.tensor, shape.compute_bytes
    d, layers, vocab = cfg.hidden_size, cfg.num_layers, cfg.vocab_size / t
    heads, kv_heads, mlp = cfg.num_heads / t, cfg.num_kv_heads / t, cfg.intermediate_size / t
    head_dim, group, shards = cfg.head_dim, shape.group_size, shape.data * shape.fsdp
    params = param_shard_elements(cfg, shape.data, shape.fsdp, shape.tensor) * shape.param_bytes
    everywhere = dict.fromkeys(PHASES, 1.0)
    terms = {"parameters": everywhere, "optimizer state (AdamW mu, nu)": everywhere}
    scale = {"parameters": params, "optimizer state (AdamW mu, nu)": 2 * params}
    if shape.reference_model:
        terms["reference parameters (KL)"] = everywhere
        scale["reference parameters (KL)"] = params
    trained = params
    if shape.lora_rank:  # the base is frozen: adapters (float32) take the moments, gradients
        trained = 4 * param_shard_elements(cfg, shape.data, shape.fsdp, shape.tensor,
                                           lora_rank=shape.lora_rank,
                                           lora_targets=shape.lora_targets)
        terms = {"frozen base parameters": everywhere, f"LoRA adapters (rank {shape.lora_rank},"
                 " float32)": everywhere, "optimizer state (AdamW mu, nu)": everywhere}
        scale = {"frozen base parameters": params,
                 f"LoRA adapters (rank {shape.lora_rank}, float32)": trained,
                 "optimizer state (AdamW mu, nu)": 2 * trained}

    # Update phase: b prompts per chip per micro-batch, the prompt once, G responses of R-1
    # tokens (the first response token is predicted from the prompt's last position).
    b = shape.prompts_per_step / (shape.micro_batches * shards)
    # The pipeline pads prompts to the sampler's bucket (data.padding.PROMPT_BUCKETS).
    prompt, responses = shape.sample_prompt_tokens, shape.new_tokens - 1
    per_token = c * (4 * d + heads * head_dim + 3 * mlp) + 4 * (
        2 * d + (heads + 2 * kv_heads) * head_dim)
    attend = functools.partial(attention_bytes, shape.attention, heads=heads,
                               kv_heads=kv_heads, head_dim=head_dim, c=c)
    prompt_kept, prompt_transient = attend(b, prompt, prompt, prompt)
    response_kept, response_transient = attend(b * group, responses, prompt + responses,
                                               responses)
    one_layer = (b * prompt * per_token + prompt_kept
                 + b * group * responses * per_token + response_kept)
    if shape.remat:
        activations = layers * b * (prompt + group * responses) * d * c + 2 * one_layer
    else:
        activations = (layers + 1) * one_layer
    activations += 2 * layers * b * prompt * kv_heads * head_dim * c
    activations += prompt_transient + response_transient
    terms["gradients"] = {"update": trained * (1 if shape.micro_batches == 1 else 2)}
    terms[f"activations ({'remat' if shape.remat else 'no remat'}, {shape.attention})"] = {
        "update": activations}
    # The LM head's logits: all R positions, or one chunk of them at a time plus the hidden
    # states the chunks' backward recomputes them from (policy.token_stats).
    positions = shape.new_tokens
    logits = 2 * b * group * positions * vocab * 4
    if 0 < shape.logprob_chunk < positions:
        logits = (2 * b * group * shape.logprob_chunk * vocab * 4
                  + b * group * positions * d * c)
    terms["logits, float32 x 2"] = {"update": logits}

    # Sampling: no micro-batches; the sampler pads prompts to its own bucket and, with fsdp > 1,
    # works on its rollout copy of the weights.
    sampler = sampling_layout(cfg, shape.data, shape.fsdp, shape.tensor)
    if sampler.rollout:
        copy = sampler.copy_elements * c
        terms["rollout weights (compute dtype)"] = dict.fromkeys(ROLLOUT_PHASES, copy)
        terms["reshard transient"] = {"reshard": 2 * copy}
    heads = cfg.num_heads / sampler.attention_shards
    cache_per_token = 2 * layers * cfg.num_kv_heads / sampler.attention_shards * head_dim * c
    prompt_cache, scores, response_cache, step_logits = {}, {}, {}, {}
    for prefix, prompts, samples, new_tokens in (
            ("", shape.prompts_per_step, group, shape.new_tokens),
            ("eval ", shape.eval_batch_size, 1, shape.eval_new_tokens)):
        rows, length = prompts / sampler.batch_shards, shape.sample_prompt_tokens
        prompt_cache.update({prefix + "prefill": cache_per_token * rows * length,
                             prefix + "decode": cache_per_token * rows * length})
        scores[prefix + "prefill"] = sum(attention_bytes(
            shape.attention, rows, length, length, length, heads, cfg.num_kv_heads
            / sampler.attention_shards, head_dim, c))
        response_cache[prefix + "decode"] = cache_per_token * rows * samples * new_tokens
        step_logits[prefix + "decode"] = (3 * rows * samples * cfg.vocab_size
                                          / sampler.vocab_shards * 4)
    terms["prompt KV cache"] = prompt_cache
    terms["prefill attention (one layer)"] = scores
    terms["response KV caches"] = response_cache
    terms["decode step logits"] = step_logits
    return Estimate({name: {phase: value * scale.get(name, 1.0) for phase, value in
                            by_phase.items()} for name, by_phase in terms.items()})


# ----------------------------------------------------------------------------- verdict


def knob_changes(shape: RunShape) -> list[tuple[str, dict]]:
    """Single-knob changes to try when a config does not fit, as (override, RunShape fields);
    each knob's values from mild to strong, a larger slice last."""
    changes = []
    micro = shape.micro_batches * 2
    while (shape.prompts_per_step % micro == 0
           and (shape.prompts_per_step // micro) % (shape.data * shape.fsdp) == 0):
        changes.append((f"optim.micro_batches={micro}", {"micro_batches": micro}))
        micro *= 2
    if not shape.remat:
        changes.append(("model.remat=true", {"remat": True}))
    if shape.attention == "materialized":
        changes.append(("model.attention=splash", {"attention": "splash"}))
    if not 0 < shape.logprob_chunk <= 64:
        changes.append(("grpo.logprob_chunk=64", {"logprob_chunk": 64}))
    for tokens in (shape.new_tokens // 2, shape.new_tokens // 4):
        if tokens >= 64:
            changes.append((f"grpo.max_new_tokens={tokens}", {"new_tokens": tokens}))
    for tokens in (shape.prompt_tokens // 2, shape.prompt_tokens // 4):
        if tokens >= 256:
            changes.append((f"data.max_prompt_tokens={tokens}", {
                "prompt_tokens": tokens, "sample_prompt_tokens": _sampler_bucket(tokens)}))
    more = shape.fsdp * 2
    if shape.prompts_per_step % (shape.data * more * shape.micro_batches) == 0:
        changes.append((f"mesh.fsdp={more} (a slice with twice the chips)", {"fsdp": more}))
    return changes


def verdict(model_config, shape: RunShape, tpu: TpuSlice) -> list[str]:
    """Lines: fits or not (with the headroom); when not, what each knob alone would give, and
    all the knobs that keep this slice together."""
    budget = USABLE_FRACTION * tpu.hbm_bytes
    result = estimate(model_config, shape)
    if result.peak <= budget:
        return [f"verdict: FITS: peak {result.peak / GIB:.1f} GiB ({result.peak_phase}) of "
                f"{budget / GIB:.1f} GiB usable, {(budget - result.peak) / GIB:.1f} GiB headroom"]
    lines = [f"verdict: DOES NOT FIT: peak {result.peak / GIB:.1f} GiB ({result.peak_phase}) > "
             f"{budget / GIB:.1f} GiB usable ({USABLE_FRACTION:.0%} of "
             f"{tpu.hbm_bytes / GIB:.0f} GiB)",
             "knobs (key=value overrides):"]

    def outcome(label: str, fields: dict) -> str:
        changed = estimate(model_config, dataclasses.replace(shape, **fields))
        fits = "fits" if changed.peak <= budget else "still too large"
        return (f"  {label:<50} peak {changed.peak / GIB:7.1f} GiB "
                f"({changed.peak_phase}): {fits}")

    changes = knob_changes(shape)
    lines.extend(outcome(label, fields) for label, fields in changes)
    on_this_slice = [(label, fields) for label, fields in changes if "fsdp" not in fields]
    if len(on_this_slice) > 1:
        strongest = {}  # later values of a knob are stronger
        for label, fields in on_this_slice:
            strongest[next(iter(fields))] = (label, fields)
        combined = {k: v for _, fields in strongest.values() for k, v in fields.items()}
        labels = " ".join(label for label, _ in strongest.values())
        lines.append(outcome(f"together: {labels}", combined))
    return lines


def format_plan(model_config, model_source: str, shape: RunShape, tpu: TpuSlice) -> str:
    """The plan as text: slice, model, mesh, a table of terms x phases, the verdict."""
    result = estimate(model_config, shape)
    total = param_shard_elements(model_config, 1, 1, 1)
    lines = [
        f"slice {tpu.name}: {tpu.chips} chips of {tpu.hbm_bytes / GIB:.0f} GiB HBM, "
        f"{tpu.hosts} host(s), one JAX process per host",
        f"model {model_source}: {total / 1e9:.2f} B parameters, {model_config.num_layers} "
        f"layers, d={model_config.hidden_size}, vocab {model_config.vocab_size}",
        f"mesh data={shape.data} fsdp={shape.fsdp} tensor={shape.tensor}; "
        f"{shape.prompts_per_step} prompts x {shape.group_size} samples per step in "
        f"{shape.micro_batches} micro-batch(es); prompts {shape.prompt_tokens} tokens (sampler "
        f"bucket {shape.sample_prompt_tokens}), responses {shape.new_tokens}; remat "
        f"{'on' if shape.remat else 'off'}",
    ]
    if shape.lora_rank:
        adapters = param_shard_elements(model_config, 1, 1, 1, lora_rank=shape.lora_rank,
                                        lora_targets=shape.lora_targets)
        lines.append(f"LoRA rank {shape.lora_rank} on {' '.join(shape.lora_targets)}: "
                     f"{adapters / 1e6:.1f} M trained parameters; the base is frozen and is "
                     "the KL reference")
    if shape.devices > tpu.chips:
        lines.append(f"error: the mesh needs {shape.devices} chips, the slice has {tpu.chips}")
    elif shape.devices < tpu.chips:
        lines.append(f"note: the mesh uses {shape.devices} of the slice's {tpu.chips} chips")
    width = max(map(len, result.terms)) + 2
    lines.append("GiB per chip".ljust(width) + "".join(f"{p:>14}" for p in PHASES))
    for name, by_phase in result.terms.items():
        lines.append(name.ljust(width) + "".join(
            f"{by_phase[p] / GIB:14.2f}" if p in by_phase else f"{'-':>14}" for p in PHASES))
    lines.append("total".ljust(width) + "".join(f"{result.total(p) / GIB:14.2f}"
                                                for p in PHASES))
    lines.extend(verdict(model_config, shape, tpu))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- collectives


def update_collectives(model_config, shape: RunShape) -> dict[str, float]:
    """Per-chip bytes of one update step by the ZeRO-3 formula (module docstring)."""
    if shape.fsdp == 1 and shape.data == 1:
        return {}
    gathered = param_shard_elements(model_config, 1, 1, shape.tensor) * shape.param_bytes
    own = param_shard_elements(model_config, shape.data, shape.fsdp, shape.tensor)
    result = {}
    if shape.fsdp > 1:
        result["all-gather"] = 2 * shape.micro_batches * gathered
        result["reduce-scatter"] = shape.micro_batches * gathered
    if shape.data > 1:
        result["all-reduce"] = shape.micro_batches * own * shape.param_bytes
    return result



# ----------------------------------------------------------------------------- CLI


def load_model_config(model_path: str, model_config: str | None):
    """``--model-config`` (a preset name or a config.json file), else model.path/config.json."""
    from reczero_jax.models.config import ModelConfig

    if model_config is not None:
        if model_config.lower() in PRESETS:
            return ModelConfig.from_hf(PRESETS[model_config.lower()]), model_config
        file = Path(model_config)
        if not file.is_file():
            raise ValueError(f"--model-config {model_config!r} is neither a preset "
                             f"({', '.join(PRESETS)}) nor a config.json file")
        return ModelConfig.from_hf(json.loads(file.read_text())), str(file)
    file = Path(model_path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{file} not found (model.path is not here): pass --model-config "
                         f"with a config.json file or a preset ({', '.join(PRESETS)})")
    return ModelConfig.from_hf(json.loads(file.read_text())), str(file)


def register(subparsers) -> None:
    """Add ``reczero plan`` to the ``reczero`` parser."""
    plan = subparsers.add_parser(
        "plan", help="per-chip memory estimate of a training config on a TPU slice",
        description="Estimate parameters, optimizer state, gradients, activations, logits and "
                    "rollout KV caches per chip for CONFIG's model and mesh on --slice, with a "
                    "verdict and the knob to turn when it does not fit. Formulas: "
                    "reczero_jax/plan.py.")
    plan.add_argument("config", help="YAML experiment config (see configs/)")
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    plan.add_argument("--slice", required=True, dest="tpu_slice",
                      help="accelerator type: v4-8, v5p-8, v5e-16 (v5litepod-16), v6e-8, ...")
    plan.add_argument("--model-config", help="a config.json file or a preset "
                      f"({', '.join(PRESETS)}), when model.path is not on this machine")
    plan.add_argument("--compile", action="store_true",
                      help="also compile the sampler's programs and the GRPO update on a "
                           "simulated CPU mesh of the slice's chips: collective bytes and time "
                           "per step, XLA's memory analysis next to the formula's (minutes for "
                           "a 7B model; nothing is allocated)")
    plan.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from reczero_jax.config import load_config

    config = load_config(args.config, args.overrides)
    model_config, source = load_model_config(config.model.path, args.model_config)
    shape, tpu = RunShape.from_config(config), parse_slice(args.tpu_slice)
    print(format_plan(model_config, source, shape, tpu))
    if args.compile:
        from reczero_jax.plan_compiled import (
            compiled_rollout,
            compiled_update,
            format_collectives,
            format_compiled_update,
        )

        print(format_collectives(model_config, shape, tpu, compiled_rollout(model_config, shape)))
        print(format_compiled_update(model_config, shape, tpu,
                                     compiled_update(model_config, shape)))
    return 0
