"""A run's policy as a Hugging Face directory: from a live model, or from a checkpoint.

    reczero export --run RUN_DIR [--step N] --out HF_DIR [--dtype bfloat16|float32] [--adapter]

writes ``model.safetensors`` (sharded above 5 GB), ``config.json`` and the tokenizer, which
transformers (and so vLLM and the PyTorch baseline) loads. The architecture and tokenizer
come from ``model.path`` of the config saved with the checkpoint; the weights from the
checkpoint's parameters alone (no optimizer state is read).

A LoRA run (``model.lora.rank > 0``) checkpoints its adapters alone: the full export reads
the base weights from ``model.path`` and merges the adapters into them; ``--adapter`` writes
the adapters alone in PEFT's format (``lora.save_peft_adapter``), for
``peft.PeftModel.from_pretrained(base, HF_DIR)``. An adapted tied LM head is untied by the
full export (``lm_head.weight`` written, ``tie_word_embeddings: false``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from etils import epath
from flax import nnx

from reczero_jax import distributed
from reczero_jax.config import LORA_HEAD, ExperimentConfig, load_config
from reczero_jax.lora import LoRAParam, add_lora, merge_lora, save_peft_adapter
from reczero_jax.mesh import param_shardings, single_device_mesh
from reczero_jax.models import Decoder, from_pretrained, save_pretrained
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
    return save_pretrained(merge_lora(model), out_dir, dtype=dtype, tokenizer=tokenizer)


def restore_model(run_dir, step: int | None = None, *, base_weights: bool = True
                  ) -> tuple[Decoder, dict[str, Any], int]:
    """The policy of ``step`` (default: the latest complete one) of the run in ``run_dir``,
    on one device, with the saved config (a dict) and the step restored. A LoRA run's policy
    is its base (read from ``model.path``; ``base_weights=False``: left abstract, shapes
    only) with the restored adapters."""
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
    section = config["model"]
    dtype, param_dtype = jax_dtype(section["dtype"]), jax_dtype(section["param_dtype"])
    lora = section.get("lora", {}).get("rank", 0)

    def build():
        model = Decoder(read_config(section["path"]), dtype=dtype, param_dtype=param_dtype,
                        rngs=nnx.Rngs(0))
        if lora:
            add_lora(model, rank=lora, alpha=section["lora"]["alpha"],
                     targets=section["lora"]["targets"])
        return model

    abstract = nnx.eval_shape(build)
    graphdef, state, *base = (nnx.split(abstract, LoRAParam, ...) if lora
                              else nnx.split(abstract))
    restored = ckpt.restore(step, abstract_params=state,
                            param_sharding=param_shardings(state, single_device_mesh()))
    ckpt.close()
    if lora and base_weights:
        base = [nnx.state(from_pretrained(section["path"], dtype=dtype, param_dtype=param_dtype))]
    return nnx.merge(graphdef, restored.params, *base), config, restored.step


def export_run(run_dir, out_dir, *, step: int | None = None, dtype: str | None = None,
               adapter: bool = False) -> list[Path]:
    """Write ``step`` of the run in ``run_dir`` (default: the latest complete one) as a
    Hugging Face directory ``out_dir``, in ``dtype`` (default: the parameters' own); with
    ``adapter`` (a LoRA run) its adapters alone, as a PEFT adapter directory."""
    from transformers import AutoTokenizer

    if adapter:
        model, config, restored_step = restore_model(run_dir, step, base_weights=False)
        written = save_peft_adapter(model, out_dir, base_model_path=config["model"]["path"])
        print(f"[reczero] exported the LoRA adapter of step {restored_step} of {run_dir} "
              f"to {out_dir}")
        if model.config.tie_word_embeddings and LORA_HEAD in model.layers.adapters.targets:
            print("[reczero] note: the base's LM head is tied to its embedding: peft applies "
                  "this lm_head adapter exactly, but its merge_and_unload would add it to the "
                  "embedding too; for merged weights run `reczero export` without --adapter "
                  "(it unties the head)")
        return written
    export_dtype = None if dtype is None else jax_dtype(dtype)
    model, config, restored_step = restore_model(run_dir, step)
    model = merge_lora(model)
    tokenizer = AutoTokenizer.from_pretrained(config["model"]["path"])
    written = save_pretrained(model, out_dir, dtype=export_dtype,
                              tokenizer=tokenizer)
    print(f"[reczero] exported step {restored_step} of {run_dir} to {out_dir}")
    return written
