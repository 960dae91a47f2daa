"""Experiment configuration: typed dataclasses as the schema, YAML files, ``key=value`` overrides.

    config = load_config("configs/reczero_ml100k_smollm2.yaml", ["grpo.group_size=4"])

OmegaConf structured configs do the merging: an unknown key or a value of the wrong type is
an error naming it. ``load_config`` then checks every choice field against its allowed names
(``CHOICES``) and that the batch splits over the mesh (``check_batch_split``), so a typo fails
here, before a run directory is touched, not inside a jitted step. The resolved config is
saved into the run directory and reloads to the same run.

This module is the bottom of the package: pure Python (no jax). The modules that dispatch on
its choice names import them (``grpo``, ``prompts``, ``models.dtypes``, the CLIs' flags);
``rewards.host.VARIANTS`` is checked against ``REWARDS`` by a test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The allowed names of every choice field; the modules that dispatch on them import these.
ALGORITHMS = ("reczero", "recone", "sft")
ESTIMATORS = ("grpo", "drgrpo", "rloo")  # grpo.group_advantages
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")  # grpo.kl_penalty
LAYOUTS = ("chat", "user", "raw")  # prompts.encode_prompt
REWARDS = ("rating", "exact", "think_answer", "answer_only")  # rewards.host.VARIANTS
DATA_SUBSETS = ("random", "first")  # data.subset: how data.train_samples are chosen
FINAL_POLICIES = ("last", "best_val")  # train.final_policy
# grpo.dynamic_sampling_metric: the per-sample values whose spread makes a group informative.
SAMPLING_METRICS = ("reward", "format")
ATTENTIONS = ("auto", "materialized", "blockwise", "splash", "cudnn")  # models.attention
# Dtype names of model.dtype / model.param_dtype (and --dtype flags) and their bytes per
# element; ``models.dtypes.JAX_DTYPES`` maps the same names to jax dtypes.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
DTYPES = tuple(DTYPE_BYTES)
# What LoRA may adapt (reczero_jax.lora), by the decoder's weight names: the layers'
# projections (LORA_TARGETS, the default) and the LM head (LORA_HEAD; with tied embeddings
# the head is embed^T, whose adapter leaves the embedding as it is).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
LORA_HEAD = "lm_head"
LORA_ALLOWED_TARGETS = (*LORA_TARGETS, LORA_HEAD)


@dataclasses.dataclass
class OptimConfig:
    """AdamW with global-norm clipping; constant learning rate (the paper's: no warm-up).

    ``memory_budget_gib``: per-device memory the compiled GRPO update may need
    (``Trainer.check_memory``); 0 turns the check off.
    """

    learning_rate: float = 2e-6
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    micro_batches: int = 1
    memory_budget_gib: float = 0.0


@dataclasses.dataclass
class GRPOConfig:
    """GRPO as trained in the paper (PAPER.md, "GRPO as trained"); every knob a value."""

    group_size: int = 8
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    estimator: str = "grpo"  # ESTIMATORS
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    loss_agg: str = "token-mean"  # LOSS_AGGREGATIONS
    kl_coef: float = 0.0
    kl_kind: str = "k3"  # KL_KINDS
    entropy_coef: float = 0.0
    updates_per_rollout: int = 1
    # One prompt forward per prompt, shared by its G samples: in the sampler (the prompt's KV
    # cache) and in the update's forward. False repeats the prompt G times in both (the naive
    # reference the benchmarks compare against); the results are the same.
    shared_prompt: bool = True
    # Positions per LM-head chunk in the update's log-probs and entropies (policy.token_stats):
    # only [B, G, chunk, V] float32 logits live at once, recomputed in the backward. 0: all R
    # positions at once. The same for SFT's loss.
    logprob_chunk: int = 0
    # DAPO's dynamic sampling ("filter groups", train.dynamic): a group whose samples all got
    # the same reward (or all the same format flag, dynamic_sampling_metric) has zero
    # advantage and moves nothing, so it is dropped and further prompts are sampled, round
    # after round, until train.prompts_per_step groups are informative or max_sampling_rounds
    # rounds ran; then dropped groups fill the batch up (still zero advantage), which keeps its
    # shape.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    dynamic_sampling_metric: str = "reward"  # SAMPLING_METRICS


@dataclasses.dataclass
class LoRASection:
    """Low-rank adapters (``reczero_jax.lora``): rank 0 trains every weight (no LoRA); rank
    r > 0 trains adapters alone on ``targets`` (some of ``LORA_ALLOWED_TARGETS``; by default
    the seven projections ``LORA_TARGETS``), scaled by alpha / r.
    ``model.param_dtype`` then applies to the frozen base only (adapters are float32)."""

    rank: int = 0
    alpha: float = 32.0
    targets: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))


@dataclasses.dataclass
class ModelSection:
    path: str = "artifacts/smollm2-135m-instruct"  # a Hugging Face directory
    dtype: str = "float32"  # compute dtype: DTYPES
    param_dtype: str = "float32"  # master weights: DTYPES
    remat: bool = False
    attention: str = "auto"  # one of ATTENTIONS (models.attention: which and why)
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)



@dataclasses.dataclass
class DataSection:
    dir: str = "artifacts/ml100k"  # prepared by `reczero data prepare`
    layout: str = "chat"  # LAYOUTS
    max_prompt_tokens: int = 1024
    train_samples: int = 0  # 0: the whole train split
    subset: str = "random"  # which train_samples: a seed-ed random subset, or "first" (earliest)
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
    reward: str = "rating"  # REWARDS
    checkpoint_every: int = 50
    checkpoint_dir: str = ""  # "": RUN_DIR/checkpoints; a gs:// URL keeps them off the hosts
    keep_checkpoints: int = 2
    # The policy exported and evaluated at the end: the last step's, or the step's of lowest
    # validation MAE (needs validation: eval_every > 0; that step is saved when it happens).
    final_policy: str = "last"


@dataclasses.dataclass
class ExperimentConfig:
    algorithm: str = "reczero"  # ALGORITHMS
    run_dir: str = "runs/reczero"
    seed: int = 0
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    sft: SFTSection = dataclasses.field(default_factory=SFTSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)


# Choice fields by dotted key: the allowed values of each.
CHOICES = {
    "algorithm": ALGORITHMS,
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.attention": ATTENTIONS,
    "data.layout": LAYOUTS,
    "data.subset": DATA_SUBSETS,
    "grpo.estimator": ESTIMATORS,
    "grpo.loss_agg": LOSS_AGGREGATIONS,
    "grpo.kl_kind": KL_KINDS,
    "grpo.dynamic_sampling_metric": SAMPLING_METRICS,
    "train.reward": REWARDS,
    "train.final_policy": FINAL_POLICIES,
}


def check_choices(config: ExperimentConfig) -> None:
    """A ValueError naming the first choice field whose value is not one of its ``CHOICES``."""
    for key, allowed in CHOICES.items():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not a known value (use one of: "
                             f"{', '.join(allowed)})")


def check_batch_split(prompts: int, micro_batches: int, shards: int,
                      what: str = "prompts per step") -> None:
    """Readable errors for a batch of ``prompts`` that cannot be split into ``micro_batches``
    micro-batches each divisible over ``shards`` devices (the data x fsdp mesh axes, which
    shard the batch): ``prompts % micro_batches == 0`` and
    ``(prompts / micro_batches) % shards == 0``."""
    if prompts % micro_batches:
        raise ValueError(f"{what} ({prompts}) is not a multiple of optim.micro_batches "
                         f"({micro_batches})")
    per_micro_batch = prompts // micro_batches
    if per_micro_batch % shards:
        raise ValueError(
            f"each micro-batch holds {per_micro_batch} prompts, which does not divide the data x "
            f"fsdp mesh axes ({shards} devices): {what}={prompts} must split into "
            f"optim.micro_batches={micro_batches} micro-batches that each divide over them "
            f"(make it a multiple of {micro_batches * shards})")


def check_lora(lora: LoRASection) -> None:
    """A ValueError for a negative rank, or targets that are neither projections of the
    decoder nor its LM head."""
    if lora.rank < 0:
        raise ValueError(f"model.lora.rank={lora.rank} must be >= 0 (0: no LoRA)")
    unknown = [name for name in lora.targets if name not in LORA_ALLOWED_TARGETS]
    if lora.rank and (unknown or not lora.targets):
        raise ValueError(f"model.lora.targets={list(lora.targets)}: "
                         f"{'unknown ' + ', '.join(unknown) if unknown else 'empty'} "
                         f"(use some of: {', '.join(LORA_ALLOWED_TARGETS)})")


def check_config(config: ExperimentConfig) -> None:
    """What can be checked without a device: the choice fields, the batch splits of the
    phases the algorithm runs (GRPO: ``train.prompts_per_step`` in ``optim.micro_batches``;
    SFT: ``sft.batch_size`` in one) over the data x fsdp mesh axes, and that
    ``train.final_policy=best_val`` has validations to choose from."""
    check_choices(config)
    if config.grpo.logprob_chunk < 0:
        raise ValueError(f"grpo.logprob_chunk={config.grpo.logprob_chunk} must be >= 0 "
                         "(0: unchunked; e.g. 256 positions per chunk)")
    if config.grpo.max_sampling_rounds < 1:
        raise ValueError(f"grpo.max_sampling_rounds={config.grpo.max_sampling_rounds} must be "
                         ">= 1 (the rounds of prompts grpo.dynamic_sampling may sample per step)")
    check_lora(config.model.lora)
    shards = config.mesh.data * config.mesh.fsdp
    if config.algorithm in ("reczero", "recone"):
        check_batch_split(config.train.prompts_per_step, config.optim.micro_batches, shards,
                          "train.prompts_per_step")
    if config.algorithm in ("recone", "sft"):
        check_batch_split(config.sft.batch_size, 1, shards, "sft.batch_size")
    train = config.train
    if train.final_policy == "best_val" and (config.algorithm == "sft"
                                             or not 0 < train.eval_every <= train.steps):
        raise ValueError(
            "train.final_policy=best_val picks the GRPO step of lowest validation MAE, but this "
            f"run validates none (algorithm={config.algorithm}, train.eval_every="
            f"{train.eval_every}, train.steps={train.steps}): set train.eval_every to a value in "
            "1..train.steps with algorithm reczero or recone, or train.final_policy=last")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Schema defaults <- YAML file <- ``key.sub=value`` overrides, validated by type, then by
    ``check_config``. Every problem is a ValueError naming the file and the key."""
    where = f" in {path}" if path else ""
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found (pass a YAML experiment config, "
                                "e.g. configs/reczero_ml100k_smollm2.yaml)")
    merged = OmegaConf.structured(ExperimentConfig)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(merged)
    except yaml.YAMLError as error:
        raise ValueError(f"invalid config{where}: not YAML ({' '.join(str(error).split())})"
                         ) from None
    except OmegaConfBaseException as error:
        key = f" {error.full_key}:" if getattr(error, "full_key", None) else ""
        raise ValueError(f"invalid config{where}:{key} {str(error).splitlines()[0]} (the keys "
                         "and their types: reczero_jax/config.py)") from None
    try:
        check_config(config)
    except ValueError as error:
        raise ValueError(f"invalid config{where}: {error}") from None
    return config


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
