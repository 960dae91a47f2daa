"""Experiment configuration: typed dataclasses as the schema, YAML files, ``key=value`` overrides.

    config = load_config("configs/reczero_ml100k_smollm2.yaml", ["grpo.group_size=4"])

OmegaConf structured configs do the merging: an unknown key or a value of the wrong type is
an error naming it. The resolved config is saved into the run directory and reloads to the
same run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from reczero_jax.models import attention
from reczero_jax.train.step import GRPOConfig, OptimConfig

ALGORITHMS = ("reczero", "recone", "sft")
ATTENTIONS = attention.IMPLEMENTATIONS  # model.attention's choices


@dataclasses.dataclass
class ModelSection:
    path: str = "artifacts/smollm2-135m-instruct"  # a Hugging Face directory
    dtype: str = "float32"  # compute dtype: float32 or bfloat16
    param_dtype: str = "float32"  # master weights
    remat: bool = False
    attention: str = "auto"  # one of ATTENTIONS (models.attention: which and why)


@dataclasses.dataclass
class DataSection:
    dir: str = "artifacts/ml100k"  # prepared by `reczero data prepare`
    layout: str = "chat"
    max_prompt_tokens: int = 1024
    train_samples: int = 0  # 0: the whole train split
    eval_samples: int = 64  # per evaluation (0: the whole split)
    eval_split: str = "test"


@dataclasses.dataclass
class MeshSection:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass
class SFTSection:
    """RecOne's warm start: supervised fine-tuning on four-tag reasoning traces."""

    traces: str = "template"  # "template" (built-in scaffold teacher) or a JSON-lines file
    steps: int = 20
    batch_size: int = 4
    learning_rate: float = 1e-5
    max_response_tokens: int = 256


@dataclasses.dataclass
class TrainSection:
    steps: int = 300  # GRPO steps (paper: 2,400 samples = 300 steps of 8 prompts)
    prompts_per_step: int = 8
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_max_new_tokens: int = 512
    eval_batch_size: int = 8
    reward: str = "rating"
    checkpoint_every: int = 50
    checkpoint_dir: str = ""  # "": RUN_DIR/checkpoints; a gs:// URL keeps them off the hosts
    keep_checkpoints: int = 2


@dataclasses.dataclass
class ExperimentConfig:
    algorithm: str = "reczero"
    run_dir: str = "runs/reczero"
    seed: int = 0
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    sft: SFTSection = dataclasses.field(default_factory=SFTSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Schema defaults <- YAML file <- ``key.sub=value`` overrides, validated by type."""
    merged = OmegaConf.structured(ExperimentConfig)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        where = f" in {path}" if path else ""
        key = f" {error.full_key}:" if getattr(error, "full_key", None) else ""
        raise ValueError(f"invalid config{where}:{key} {str(error).splitlines()[0]}") from None


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
