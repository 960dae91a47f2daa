"""LoRA: low-rank adapters on the stacked-layer decoder, their merging and PEFT naming.

    add_lora(model, rank=16, alpha=32, targets=("wq", "wv"))   # in place; returns model
    merged = merge_lora(model)                                 # a plain Decoder

A target projection ``W`` (one of ``TARGETS``; per layer ``[in..., out...]``, e.g. ``wq``
``[d, H, D]``, ``wo`` ``[H, D, d]``) gains factors ``A [in..., r]`` (normal, std 1 / r, as
PEFT's ``init_lora_weights="gaussian"``) and ``B [r, out...]`` (zeros), stacked on the
layers axis like the weights (``[L, ...]``) and sharded by the same logical axes (the rank
axis ``lora_rank`` is never sharded). The projection becomes

    y = x @ W + s * (x @ A) @ B,      s = alpha / r,

so zero-initialised adapters leave the model exactly as it was. The factors are
``LoRAParam`` variables, not ``nnx.Param``: code that reads the base weights (HF export,
``DecoderLayers.stacked``'s weights) never sees them, and the trainer trains them alone
(``nnx.split(model, LoRAParam, ...)``). The decoder applies them in its forward
(``Decoder._project``), the sampler's too: the rollout copy (``sampling.rollout_model``)
reshards and casts the adapters with the weights and keeps them apart. Merging them into the
copy instead was measured worse: on the tiny fp32 test model with large adapters the
sampler-trainer log-prob gap grew from 5.7e-6 to 3.9e-5 (W + s A B rounds differently from
x W + (x A)(s B)), and in bf16 a small delta added to a bf16 weight is partly rounded away;
the forward's extra cost is r (IN + OUT) per target and token, under 1% of the projections
at r = 16 on a 7B model. ``adapters_off`` turns them off in a module, which is how the
trainer computes the KL reference: the base is the reference.

The LM head (target ``lm_head``, not in the default ``TARGETS``) gains one pair, not one per
layer: ``A [d, r]`` (normal, std 1 / r) and ``B [r, V]`` (zeros), sharded like the head
(``embed``, ``vocab``), and ``Decoder.logits`` computes

    logits = h @ W_head + s * (h @ A) @ B,      W_head = lm_head, or embed^T when tied,

so a tied model's embedding (the input side) is never adapted. ``merge_lora`` therefore
unties such a head: the merged model has ``tie_word_embeddings=False`` and its own
``lm_head = embed^T + s A B``, which the HF export writes as ``lm_head.weight``.

PEFT format (``peft_tensors``): ``lora_A.weight [r, IN]`` and ``lora_B.weight [OUT, r]`` of
each ``nn.Linear`` of the transformers model, named
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (the head's:
``base_model.model.lm_head.lora_A.weight [r, d]``, ``lora_B.weight [V, r]``); PEFT scales by
``lora_alpha / r`` (``use_rslora`` false), as here. On a tied base peft 0.21 wraps the tied
``lm_head`` module in a LoRA ``Linear`` (warning that it cannot tie the adapters;
``ensure_weight_tying`` is left off: it would move the adapter onto the embedding, a
different model), so its unmerged forward is ours exactly and the embedding is left alone;
but its ``merge_and_unload`` adds s A B into the tensor the two share, changing the
embedding too. Merged weights come from ``merge_lora`` (``reczero export`` without
``--adapter``), or from peft after untying the base's head first.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from reczero_jax import distributed
from reczero_jax.config import LORA_HEAD as HEAD
from reczero_jax.config import LORA_TARGETS as TARGETS
from reczero_jax.config import LoRASection, check_lora
from reczero_jax.mesh import shard_model
from reczero_jax.models.decoder import Decoder
from reczero_jax.models.hf import PARAM_TABLE, HFTensor

# Leading dims of a target's per-layer weight that are its inputs (the rest: its outputs).
INPUT_DIMS = {"wo": 2}
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRAParam(nnx.Variable):
    """A trainable low-rank factor (the base weights are ``nnx.Param``)."""


class Adapters(nnx.Module):
    """The factors of every target of a decoder, held on its ``DecoderLayers``: per layer
    projection ``{target}_a [L, in..., r]`` and ``{target}_b [L, r, out...]``; for the LM head
    (``lm_head`` in ``targets``) ``lm_head_a [d, r]`` and ``lm_head_b [r, V]``, one pair for
    the model. One module, so one switch (``enabled``, static) turns them all off."""

    def __init__(self, model: Decoder, *, rank: int, alpha: float, targets: Sequence[str],
                 rngs: nnx.Rngs):
        self.rank, self.alpha, self.targets = rank, float(alpha), tuple(targets)
        self.enabled = True
        for name in self.layer_targets:
            weight = getattr(model.layers, name)
            axes = weight.get_metadata()["logical_axes"]
            split = 1 + INPUT_DIMS.get(name, 1)  # the layers axis + the input dims
            a = jax.random.normal(rngs.params(), (*weight.shape[:split], rank), jnp.float32)
            setattr(self, f"{name}_a", LoRAParam(a / rank,
                                                 logical_axes=(*axes[:split], "lora_rank")))
            setattr(self, f"{name}_b", LoRAParam(
                jnp.zeros((weight.shape[0], rank, *weight.shape[split:]), jnp.float32),
                logical_axes=(axes[0], "lora_rank", *axes[split:])))
        if HEAD in self.targets:  # the head [d, V] (embed^T when tied): sharded like it
            d, vocab = model.config.hidden_size, model.config.vocab_size
            a = jax.random.normal(rngs.params(), (d, rank), jnp.float32)
            self.lm_head_a = LoRAParam(a / rank, logical_axes=("embed", "lora_rank"))
            self.lm_head_b = LoRAParam(jnp.zeros((rank, vocab), jnp.float32),
                                       logical_axes=("lora_rank", "vocab"))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def layer_targets(self) -> tuple[str, ...]:
        return tuple(name for name in self.targets if name != HEAD)

    def factors(self) -> dict[str, tuple[jax.Array, jax.Array]]:
        """``{target: (A, s * B)}`` of the layer projections, stacked on the layers axis (the
        scale folded into B)."""
        return {name: self._factor_pair(name) for name in self.layer_targets}

    def head_factors(self) -> tuple[jax.Array, jax.Array] | None:
        """The LM head's ``(A [d, r], s * B [r, V])``, or None when the head is no target."""
        return self._factor_pair(HEAD) if HEAD in self.targets else None

    def _factor_pair(self, name: str) -> tuple[jax.Array, jax.Array]:
        return getattr(self, f"{name}_a")[...], self.scale * getattr(self, f"{name}_b")[...]


def add_lora(model: Decoder, *, rank: int, alpha: float, targets: Sequence[str] = TARGETS,
             seed: int = 0) -> Decoder:
    """Attach adapters of ``rank`` on ``targets`` to ``model`` (in place, placed on its mesh
    when it has one); returns the model. B starts at zero: the logits are unchanged."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    check_lora(LoRASection(rank=rank, alpha=alpha, targets=list(targets)))
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters (merge_lora first)")
    model.layers.adapters = Adapters(model, rank=rank, alpha=alpha, targets=targets,
                                     rngs=nnx.Rngs(seed))
    if model.mesh is not None:
        shard_model(model.layers.adapters, model.mesh)
    return model


def has_lora(model: Decoder) -> bool:
    return getattr(model.layers, "adapters", None) is not None


def adapters_off(model: Decoder) -> Decoder:
    """``model`` (in place) computing with its base weights alone; returns it."""
    if has_lora(model):
        model.layers.adapters.enabled = False
    return model


def delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """The weight update A @ B [L, in..., out...] (float32) of A [L, in..., r], B [L, r, out...]."""
    layers, rank = a.shape[0], a.shape[-1]
    product = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank).astype(jnp.float32),
                         b.reshape(layers, rank, -1).astype(jnp.float32))
    return product.reshape(*a.shape[:-1], *b.shape[2:])


def merge_lora(model: Decoder) -> Decoder:
    """A copy of ``model`` without adapters whose weights hold them: W + s * A @ B, computed in
    float32 and stored in W's dtype. Works on concrete and traced modules.

    An adapted tied head is untied: the copy's config has ``tie_word_embeddings=False`` and a
    ``lm_head`` [d, V] = embed^T + s * A @ B, the embedding unchanged (the input side never
    had the adapter)."""
    merged = nnx.clone(model)
    if not has_lora(merged):
        return merged
    adapters = merged.layers.adapters
    for name, (a, b) in adapters.factors().items():
        weight = getattr(merged.layers, name)
        weight[...] = (weight[...].astype(jnp.float32) + delta(a, b)).astype(weight.dtype)
    head = adapters.head_factors()
    if head is not None:
        a, b = head
        if merged.config.tie_word_embeddings:
            embed = merged.embed
            merged.config = dataclasses.replace(merged.config, tie_word_embeddings=False)
            merged.lm_head = nnx.Param(embed[...].T, logical_axes=tuple(
                reversed(embed.get_metadata()["logical_axes"])))
        weight = merged.lm_head
        weight[...] = (weight[...].astype(jnp.float32) + delta(a[None], b[None])[0]
                       ).astype(weight.dtype)
    del merged.layers.adapters
    return merged


# ----------------------------------------------------------------------------- PEFT


def _weight_entry(target: str) -> HFTensor:
    """The ``hf.PARAM_TABLE`` row of a target's weight: a layer projection or the LM head
    (PEFT adapts the head's ``nn.Linear`` even when it is tied to the embedding)."""
    path = (HEAD,) if target == HEAD else ("layers", target)
    (entry,) = [e for e in PARAM_TABLE if e.path == path]
    return entry


def _peft_entries(target: str) -> tuple[HFTensor, HFTensor]:
    """Where a target's A and B go in a PEFT adapter file, as ``hf.HFTensor`` rows: both are
    "linear" (A [in..., r] -> lora_A.weight [r, IN], B [r, out...] -> lora_B.weight [OUT, r])."""
    entry = _weight_entry(target)
    module = PEFT_PREFIX + entry.name.removesuffix(".weight")
    return (HFTensor(entry.path, module + ".lora_A.weight", "linear", n_in=entry.n_in),
            HFTensor(entry.path, module + ".lora_B.weight", "linear", n_in=1))


def peft_tensors(model: Decoder) -> Iterator[tuple[str, np.ndarray]]:
    """The adapters as (PEFT name, float32 host array) pairs, target by target and layer by
    layer (the head's: ``base_model.model.lm_head.lora_A.weight [r, d]``, ``.lora_B.weight
    [V, r]``)."""
    adapters = model.layers.adapters
    for target in adapters.targets:
        for entry, factor in zip(_peft_entries(target), ("a", "b"), strict=True):
            array = distributed.to_host(getattr(adapters, f"{target}_{factor}")[...])
            per_layer = array if entry.stacked else [array]
            for name, layer in zip(entry.names(model.config.num_layers), per_layer, strict=True):
                yield name, entry.to_hf(np.asarray(layer, np.float32))


def peft_module_name(target: str) -> str:
    """``wq`` -> ``q_proj``, ``lm_head`` -> ``lm_head``: the transformers module PEFT's
    ``target_modules`` names."""
    return _weight_entry(target).name.removesuffix(".weight").rsplit(".", 1)[-1]


def save_peft_adapter(model: Decoder, out_dir, *, base_model_path: str = "") -> list[Path]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for
    ``peft.PeftModel.from_pretrained(base, out_dir)``; returns the files."""
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to export (model.lora.rank is 0); "
                         "export the full weights without --adapter")
    adapters = model.layers.adapters
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / ADAPTER_WEIGHTS
    save_file(dict(peft_tensors(model)), weights, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_path,
        "r": adapters.rank, "lora_alpha": adapters.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(peft_module_name(t) for t in adapters.targets),
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return [weights, out_dir / ADAPTER_CONFIG]


def adapter_count(config, rank: int, targets: Sequence[str]) -> int:
    """Adapter parameters of a ``ModelConfig``: sum over layer targets of L * r * (IN + OUT),
    plus r * (d + V) for the LM head (one pair, not per layer)."""
    d, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    sizes = {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w_gate": (d, i),
             "w_up": (d, i), "w_down": (i, d)}
    head = rank * (d + config.vocab_size) if HEAD in targets else 0
    return config.num_layers * rank * sum(sum(sizes[t]) for t in targets if t != HEAD) + head
