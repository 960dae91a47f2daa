"""Hugging Face checkpoints <-> :class:`Decoder`, through one table used by load and save.

``PARAM_TABLE`` says, for every parameter of the decoder, which HF tensor holds it and how
its layout differs. Loading and saving both walk that one table, so they cannot disagree.

Layouts (per layer for the stacked ``layers.*`` parameters; d width, H/K heads, D head dim):

* ``same``: identical arrays (embedding ``[V, d]``, RMSNorm scales ``[d]``).
* ``flat``: HF keeps the heads flattened: bias ``[H*D]`` <-> ours ``[H, D]``.
* ``linear``: a ``torch.nn.Linear`` weight ``W [out, in]``, which ours stores as ``W.T``
  with the input and output dims unflattened: ``q_proj [H*D, d]`` <-> ``wq [d, H, D]``,
  ``o_proj [d, H*D]`` <-> ``wo [H, D, d]`` (``n_in`` = how many of our leading dims are
  inputs: 1 for ``wq``, 2 for ``wo``).

``generation_config.json`` contributes the EOS ids generation stops at
(``ModelConfig.generation_eos_token_ids``); ``stop_token_ids`` is the one place that joins them
with ``config.json``'s and the tokenizer's, and the writers record that union in the file.

Loading fills one stacked parameter at a time from the L per-layer tensors (read lazily
with ``safetensors.safe_open``) into a single host buffer, then places it straight into
its target sharding, so host memory holds at most one parameter kind, never the model twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from reczero_jax import distributed
from reczero_jax import mesh as meshlib
from reczero_jax.models.config import ModelConfig
from reczero_jax.models.decoder import Decoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_FLOAT_DTYPES = ("F32", "BF16", "F16")


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where parameter ``path`` lives in an HF checkpoint; ``{i}`` in ``name`` is the layer."""

    path: tuple[str, ...]
    name: str
    layout: str  # "same" | "flat" | "linear"
    n_in: int = 1  # linear only: leading dims of our array that are the Linear's inputs

    @property
    def stacked(self) -> bool:
        return self.path[0] == "layers"

    def names(self, num_layers: int) -> list[str]:
        return [self.name.format(i=i) for i in range(num_layers)] if self.stacked else [self.name]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """HF tensor shape for one (per-layer) array of ours of ``shape``."""
        if self.layout == "flat":
            return (math.prod(shape),)
        if self.layout == "linear":
            return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))
        return tuple(shape)

    def to_ours(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (tensor.T if self.layout == "linear" else tensor).reshape(shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        hf_shape = self.hf_shape(array.shape)
        if self.layout == "linear":
            return np.ascontiguousarray(array.reshape(hf_shape[::-1]).T)
        return np.ascontiguousarray(array.reshape(hf_shape))


_LAYER = "model.layers.{i}."
PARAM_TABLE = (
    HFTensor(("embed",), "model.embed_tokens.weight", "same"),
    HFTensor(("layers", "attn_norm"), _LAYER + "input_layernorm.weight", "same"),
    HFTensor(("layers", "wq"), _LAYER + "self_attn.q_proj.weight", "linear"),
    HFTensor(("layers", "bq"), _LAYER + "self_attn.q_proj.bias", "flat"),
    HFTensor(("layers", "wk"), _LAYER + "self_attn.k_proj.weight", "linear"),
    HFTensor(("layers", "bk"), _LAYER + "self_attn.k_proj.bias", "flat"),
    HFTensor(("layers", "wv"), _LAYER + "self_attn.v_proj.weight", "linear"),
    HFTensor(("layers", "bv"), _LAYER + "self_attn.v_proj.bias", "flat"),
    HFTensor(("layers", "wo"), _LAYER + "self_attn.o_proj.weight", "linear", n_in=2),
    HFTensor(("layers", "mlp_norm"), _LAYER + "post_attention_layernorm.weight", "same"),
    HFTensor(("layers", "w_gate"), _LAYER + "mlp.gate_proj.weight", "linear"),
    HFTensor(("layers", "w_up"), _LAYER + "mlp.up_proj.weight", "linear"),
    HFTensor(("layers", "w_down"), _LAYER + "mlp.down_proj.weight", "linear"),
    HFTensor(("final_norm",), "model.norm.weight", "same"),
    HFTensor(("lm_head",), "lm_head.weight", "linear"),
)
_BY_PATH = {entry.path: entry for entry in PARAM_TABLE}
# With tied embeddings the head is the embedding; some writers still store it.
_TIED_HEAD, _EMBED = "lm_head.weight", "model.embed_tokens.weight"


# ----------------------------------------------------------------------------- reading


MODEL_DIR_FIX = "convert one with `reczero model convert-gguf --out DIR`, or give another path"


def check_model_dir(path: str | os.PathLike, what: str = "model directory",
                    fix: str = MODEL_DIR_FIX) -> Path:
    """``path`` if it is a local Hugging Face model directory (config.json and safetensors
    weights), else a FileNotFoundError "<what> <path> <what is missing> (<fix>)". Callers run it
    before transformers sees the path, which would take a missing directory for a hub repo id."""
    directory = Path(path)
    if not directory.exists():
        problem = "does not exist"
    elif not directory.is_dir():
        problem = "is not a directory"
    elif not (directory / "config.json").is_file():
        problem = "has no config.json (not a Hugging Face model directory)"
    elif not ((directory / SINGLE_FILE).is_file() or (directory / INDEX_FILE).is_file()):
        problem = f"has no weights ({SINGLE_FILE} or {INDEX_FILE})"
    else:
        return directory
    raise FileNotFoundError(f"{what} {path} {problem} ({fix})")


def read_config(path: str | os.PathLike) -> ModelConfig:
    """ModelConfig from ``path/config.json`` (transformers 4.x or 5.x layout), with the EOS ids
    of ``path/generation_config.json`` when that file exists."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: is {path} a Hugging Face model dir?")
    config = ModelConfig.from_hf(json.loads(config_file.read_text()))
    return dataclasses.replace(config, generation_eos_token_ids=_generation_eos_ids(path))


def _generation_eos_ids(path: str | os.PathLike) -> tuple[int, ...]:
    """``eos_token_id`` (an int or a list) of ``path/generation_config.json``; () without one."""
    file = Path(path) / GENERATION_CONFIG_FILE
    if not file.is_file():
        return ()
    eos = json.loads(file.read_text()).get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{file}: eos_token_id must be an integer or a list of integers, "
                         f"got {eos!r}; fix or delete the file")
    return tuple(ids)


def stop_token_ids(config: ModelConfig, tokenizer=None) -> tuple[int, ...]:
    """The ids a response ends at, sorted: the union of ``config.json``'s EOS ids,
    ``generation_config.json``'s and (when given) the tokenizer's ``eos_token_id``.

    What the sampler, evaluation and training stop at, and what ``save_pretrained`` writes to
    ``generation_config.json``: instruct models end a turn with a token that ``config.json``
    may not name (Qwen2.5-Instruct stops at ``<|im_end|>`` and ``<|endoftext|>``).
    """
    ids = {*config.eos_token_ids, *config.generation_eos_token_ids}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


class CheckpointFiles(contextlib.ExitStack):
    """The safetensors files of a checkpoint directory, opened lazily (memory-mapped).

    ``shapes`` maps every tensor name to (shape, safetensors dtype) without reading data;
    ``read(name)`` reads one tensor into host memory.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self._handles: dict[str, object] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], str]] = {}

    def __enter__(self) -> CheckpointFiles:
        super().__enter__()
        for file in self._file_names():
            handle = self.enter_context(safe_open(self.path / file, framework="np"))
            for name in handle.keys():
                tensor = handle.get_slice(name)
                self.shapes[name] = (tuple(tensor.get_shape()), tensor.get_dtype())
                self._handles[name] = handle
        return self

    def _file_names(self) -> list[str]:
        # transformers' order: the single file first, then the index of shards
        if (self.path / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        if (self.path / INDEX_FILE).is_file():
            weight_map = json.loads((self.path / INDEX_FILE).read_text())["weight_map"]
            return sorted(set(weight_map.values()))
        pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(
            p.name for p in self.path.glob("*.pt"))
        hint = (f" (found {pickles}: pickled weights are not loaded, since unpickling runs code; "
                f"convert them to safetensors)" if pickles else "")
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}{hint}")

    def read(self, name: str) -> np.ndarray:
        return self._handles[name].get_tensor(name)


def _expected_tensors(state: nnx.State, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the model needs, with its expected shape."""
    expected = {}
    for path, variable in nnx.to_flat_state(state):
        entry = _BY_PATH[path]
        shape = tuple(variable.shape[1:] if entry.stacked else variable.shape)
        for name in entry.names(config.num_layers):
            expected[name] = entry.hf_shape(shape)
    return expected


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_tensors(files: CheckpointFiles, expected: dict[str, tuple[int, ...]],
                   config: ModelConfig) -> None:
    """Raise on a missing, unexpected, mis-shaped or non-float tensor (before reading any data)."""
    found = set(files.shapes)
    if config.tie_word_embeddings and _TIED_HEAD in found and _TIED_HEAD not in expected:
        _check_tied_head(files)
        found.discard(_TIED_HEAD)
    missing, unexpected = set(expected) - found, found - set(expected)
    if missing:
        raise ValueError(f"checkpoint {files.path} lacks {len(missing)} tensor(s) the "
                         f"config.json model needs: {_listing(missing)}")
    if unexpected:
        raise ValueError(f"checkpoint {files.path} has {len(unexpected)} tensor(s) the "
                         f"{config.model_type} decoder does not use: {_listing(unexpected)}")
    for name, shape in expected.items():
        found_shape, dtype = files.shapes[name]
        if found_shape != shape:
            raise ValueError(f"tensor {name} has shape {found_shape}, expected {shape} "
                             f"from config.json")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {name} has dtype {dtype}; only {_FLOAT_DTYPES} are read "
                             f"(dequantise the checkpoint first)")


def _check_tied_head(files: CheckpointFiles) -> None:
    """A tied checkpoint may store lm_head.weight too; it is dropped only if it is the embedding."""
    if not np.array_equal(files.read(_TIED_HEAD), files.read(_EMBED)):
        raise ValueError(f"config.json ties the embeddings, but {_TIED_HEAD} differs from "
                         f"{_EMBED}; set tie_word_embeddings to false in config.json")


def _read_param(files: CheckpointFiles, entry: HFTensor, shape: tuple[int, ...],
                dtype: np.dtype, num_layers: int) -> np.ndarray:
    """One parameter of ours as a host array, assembled from its HF tensor(s)."""
    if not entry.stacked:
        return entry.to_ours(files.read(entry.name), shape).astype(dtype, copy=False)
    buffer = np.empty(shape, dtype)
    for layer, name in enumerate(entry.names(num_layers)):
        buffer[layer] = entry.to_ours(files.read(name), shape[1:])
    return buffer


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    mesh: jax.sharding.Mesh | None = None, attention: str = "auto") -> Decoder:
    """Load a Llama / Qwen2 Hugging Face checkpoint directory into a :class:`Decoder`.

    Reads ``config.json`` and ``model.safetensors`` (or the shards named by
    ``model.safetensors.index.json``), fp32, bf16 or fp16. ``dtype`` is the compute dtype;
    parameters are stored as ``param_dtype`` (float32 unless given, whatever the file holds).
    Each parameter is placed in its sharding on ``mesh`` (logical axes through
    ``reczero_jax.mesh``; one device when ``mesh`` is None), and the mesh is passed to the
    decoder for its activation sharding constraints. ``attention`` picks the decoder's
    attention implementation (``models.attention.IMPLEMENTATIONS``).
    Raises ValueError naming any missing, unexpected or mis-shaped tensor.
    """
    config = read_config(path)
    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, param_dtype=param_dtype,
                                              rngs=nnx.Rngs(0), mesh=mesh,
                                              attention=attention))
    graphdef, state = nnx.split(abstract)
    shardings = {param_path: sharding.get_value() for param_path, sharding in nnx.to_flat_state(
        meshlib.param_shardings(state, mesh or meshlib.single_device_mesh()))}
    with CheckpointFiles(path) as files:
        _check_tensors(files, _expected_tensors(state, config), config)
        for param_path, variable in nnx.to_flat_state(state):
            host = _read_param(files, _BY_PATH[param_path], tuple(variable.shape),
                               np.dtype(param_dtype), config.num_layers)
            variable.set_value(jax.make_array_from_callback(
                host.shape, shardings[param_path], lambda index, host=host: host[index]))
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- writing


def write_checkpoint(out_dir: str | os.PathLike, config: ModelConfig,
                     tensors: Iterable[tuple[str, np.ndarray]], *, dtype_name: str,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     eos_ids: Sequence[int] | None = None) -> list[Path]:
    """Write ``config.json``, ``generation_config.json`` and the HF-named ``tensors`` as
    safetensors; returns the files.

    ``generation_config.json`` holds the BOS id and ``eos_ids`` (default
    ``stop_token_ids(config)``), the ids generation stops at, as transformers'
    ``GenerationConfig`` reads them (other generation defaults of a source model are not kept).

    Tensors are consumed one at a time and flushed to a shard file whenever the next one
    would take the shard past ``max_shard_bytes``; with several shards the files are
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    Weight files of an earlier checkpoint in ``out_dir`` are replaced.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / SINGLE_FILE, out_dir / INDEX_FILE,
                  *out_dir.glob("model-*-of-*.safetensors")):
        stale.unlink(missing_ok=True)
    shards: list[tuple[Path, list[str]]] = []
    pending: dict[str, np.ndarray] = {}
    pending_bytes = total_bytes = 0

    def flush():
        part = out_dir / f".part-{len(shards):05d}.safetensors"
        save_file(pending, part, metadata={"format": "pt"})
        shards.append((part, list(pending)))
        pending.clear()

    for name, tensor in tensors:
        if pending and pending_bytes + tensor.nbytes > max_shard_bytes:
            flush()
            pending_bytes = 0
        pending[name] = np.ascontiguousarray(tensor)
        pending_bytes += tensor.nbytes
        total_bytes += tensor.nbytes
    if pending or not shards:
        flush()

    written = []
    if len(shards) == 1:
        written.append(shards[0][0].replace(out_dir / SINGLE_FILE))
    else:
        weight_map = {}
        for k, (part, names) in enumerate(shards, start=1):
            final = part.replace(out_dir / f"model-{k:05d}-of-{len(shards):05d}.safetensors")
            weight_map.update(dict.fromkeys(names, final.name))
            written.append(final)
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(out_dir / INDEX_FILE)
    # `dtype` is the transformers 5.x key, `torch_dtype` the 4.x one.
    hf_config = {**config.to_hf(), "dtype": dtype_name, "torch_dtype": dtype_name}
    (out_dir / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    written.append(out_dir / CONFIG_FILE)
    eos_ids = stop_token_ids(config) if eos_ids is None else eos_ids
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": [int(i) for i in eos_ids]}
    generation = {key: value for key, value in generation.items() if value not in (None, [])}
    (out_dir / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    written.append(out_dir / GENERATION_CONFIG_FILE)
    return written


def hf_tensors(model: Decoder, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """The model's parameters as (HF name, host array) pairs, one parameter kind at a time."""
    for param_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        entry = _BY_PATH[param_path]
        array = distributed.to_host(variable.get_value())  # multi-host: gathered
        if dtype is not None:
            array = array.astype(dtype)
        per_layer = array if entry.stacked else [array]
        for name, layer in zip(entry.names(model.config.num_layers), per_layer, strict=True):
            yield name, entry.to_hf(layer)


def save_pretrained(model: Decoder, out_dir: str | os.PathLike, *, dtype=None, tokenizer=None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write ``model`` as a Hugging Face checkpoint directory; returns the files written.

    ``config.json``, ``generation_config.json`` (the ids generation stops at:
    ``stop_token_ids(model.config, tokenizer)``) and ``model.safetensors`` (HF names and
    layouts), split into shards with an index above ``max_shard_bytes``. ``dtype`` casts the
    weights (default: as stored). ``tokenizer`` (a transformers tokenizer) is saved alongside
    when given, so the directory is complete for ``transformers.AutoModelForCausalLM`` /
    ``AutoTokenizer``.
    """
    if dtype is None:
        dtype = model.embed.get_value().dtype
    written = write_checkpoint(out_dir, model.config, hf_tensors(model, dtype),
                               dtype_name=np.dtype(dtype).name, max_shard_bytes=max_shard_bytes,
                               eos_ids=stop_token_ids(model.config, tokenizer))
    if tokenizer is not None:
        written += [Path(f) for f in tokenizer.save_pretrained(out_dir)]
    return written
