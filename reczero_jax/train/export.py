"""A run's policy as a Hugging Face directory: from a live model, or from a checkpoint.

    reczero export --run RUN_DIR [--step N] --out HF_DIR [--dtype bfloat16|float32]

writes ``model.safetensors`` (sharded above 5 GB), ``config.json`` and the tokenizer, which
transformers (and so vLLM and the PyTorch baseline) loads. The architecture and tokenizer
come from ``model.path`` of the config saved with the checkpoint; the weights from the
checkpoint's parameters alone (no optimizer state is read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from etils import epath
from flax import nnx

from reczero_jax import distributed
from reczero_jax.config import ExperimentConfig, load_config
from reczero_jax.mesh import param_shardings, single_device_mesh
from reczero_jax.models import Decoder, save_pretrained
from reczero_jax.models.dtypes import jax_dtype
from reczero_jax.models.hf import read_config
from reczero_jax.train.checkpoint import Checkpointer

CHECKPOINTS = "checkpoints"  # RUN_DIR/checkpoints holds the run's Orbax steps by default


def checkpoint_directory(config: ExperimentConfig) -> epath.Path:
    """``train.checkpoint_dir`` (a local path or a ``gs://`` URL), by default RUN_DIR/checkpoints."""
    return epath.Path(config.train.checkpoint_dir or Path(config.run_dir) / CHECKPOINTS)


def export_model(model: Decoder, out_dir, *, tokenizer=None, dtype=None) -> list[Path]:
    """``save_pretrained`` written by process 0 alone. Every process must call it: with
    several processes the parameters are first gathered to each host (a collective)."""
    if jax.process_count() > 1:
        # Whole on every host first: save_pretrained then runs in process 0 alone.
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, distributed.to_host(state))
    if not distributed.is_primary():
        return []
    return save_pretrained(model, out_dir, dtype=dtype, tokenizer=tokenizer)


def restore_model(run_dir, step: int | None = None) -> tuple[Decoder, dict[str, Any], int]:
    """The policy of ``step`` (default: the latest complete one) of the run in ``run_dir``,
    on one device, with the saved config (a dict) and the step restored."""
    # The run's own train.checkpoint_dir when it set one; its run_dir may have moved since.
    saved_config = Path(run_dir) / "config.yaml"
    elsewhere = load_config(saved_config).train.checkpoint_dir if saved_config.exists() else ""
    directory = epath.Path(elsewhere or epath.Path(run_dir) / CHECKPOINTS)
    ckpt = Checkpointer(directory) if directory.exists() else None
    if ckpt is None or not ckpt.all_steps():
        raise FileNotFoundError(f"no checkpoint in {directory}: is {run_dir} a run directory "
                                "of `reczero train`?")
    if step is not None and step not in ckpt.all_steps():
        raise ValueError(f"step {step} is not in {ckpt.directory}; saved steps: "
                         f"{ckpt.all_steps()}")
    config = ckpt.saved_config(step)
    abstract = nnx.eval_shape(lambda: Decoder(
        read_config(config["model"]["path"]), dtype=jax_dtype(config["model"]["dtype"]),
        param_dtype=jax_dtype(config["model"]["param_dtype"]), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    restored = ckpt.restore(step, abstract_params=state,
                            param_sharding=param_shardings(state, single_device_mesh()))
    ckpt.close()
    return nnx.merge(graphdef, restored.params), config, restored.step


def export_run(run_dir, out_dir, *, step: int | None = None, dtype: str | None = None
               ) -> list[Path]:
    """Write ``step`` of the run in ``run_dir`` (default: the latest complete one) as a
    Hugging Face directory ``out_dir``, in ``dtype`` (default: the parameters' own)."""
    from transformers import AutoTokenizer

    export_dtype = None if dtype is None else jax_dtype(dtype)
    model, config, restored_step = restore_model(run_dir, step)
    tokenizer = AutoTokenizer.from_pretrained(config["model"]["path"])
    written = save_pretrained(model, out_dir, dtype=export_dtype,
                              tokenizer=tokenizer)
    print(f"[reczero] exported step {restored_step} of {run_dir} to {out_dir}")
    return written
