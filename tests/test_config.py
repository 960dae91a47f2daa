"""Experiment configs: unknown keys and wrong types named, shipped YAMLs load, resolved
configs reload to the same run, the paper recipe in configs/paper."""

from pathlib import Path

import numpy as np
import pytest

from reczero_jax.config import (
    ALGORITHMS,
    CHOICES,
    DTYPE_BYTES,
    DTYPES,
    ESTIMATORS,
    LAYOUTS,
    REWARDS,
    ExperimentConfig,
    check_batch_split,
    load_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "paper").glob("*.yaml"))
PAPER = sorted((CONFIGS / "paper").glob("*.yaml"))


def test_configs_are_shipped():
    assert len(SHIPPED) >= 2 + 6  # two CPU defaults, three datasets x two TPU kinds


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_reloads_resolved(path, tmp_path):
    config = load_config(path)
    assert isinstance(config, ExperimentConfig) and config.algorithm in ALGORITHMS
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_configs_follow_the_recipe(path):
    # PAPER.md: G = 8, 8 prompts per batch, LR 2e-6, one epoch, temperature 1.0, KL 0, clip 0.2.
    config = load_config(path)
    assert config.grpo.group_size == 8 and config.train.prompts_per_step == 8
    assert config.grpo.temperature == 1.0 and config.grpo.clip_eps == 0.2
    if config.model.lora.rank:  # the LoRA variants: a larger step, the free KL reference
        assert config.optim.learning_rate == 1e-5 and config.grpo.kl_coef == 0.001
        assert config.data.max_prompt_tokens == 6000 and config.grpo.max_new_tokens == 2048
    else:
        assert config.optim.learning_rate == 2e-6 and config.grpo.kl_coef == 0.0
    assert config.train.steps * config.train.prompts_per_step == config.data.train_samples


def test_overrides_resolve_and_the_saved_config_reloads_to_the_same_run(tmp_path):
    overrides = ["algorithm=recone", "seed=7", "grpo.group_size=4", "optim.learning_rate=3e-6",
                 "model.remat=true", "sft.traces=traces.jsonl", "run_dir=runs/true"]
    config = load_config(CONFIGS / "reczero_ml100k_smollm2.yaml", overrides)
    assert (config.algorithm, config.seed, config.grpo.group_size) == ("recone", 7, 4)
    assert config.optim.learning_rate == 3e-6 and config.model.remat is True
    assert config.run_dir == "runs/true"
    # The YAML's own values stay where no override touches them.
    assert config.data.train_samples == load_config(
        CONFIGS / "reczero_ml100k_smollm2.yaml").data.train_samples

    save_config(config, tmp_path / "config.yaml")
    # No file and no overrides beyond the saved one: every value comes back, defaults included.
    assert load_config(tmp_path / "config.yaml") == config
    assert load_config(tmp_path / "config.yaml") != load_config(None)


def write_yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = write_yaml(tmp_path, "train:\n  stepz: 3\n")
    with pytest.raises(ValueError, match="stepz") as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_unknown_key_in_override_is_named():
    with pytest.raises(ValueError, match="group_sise"):
        load_config(None, ["grpo.group_sise=4"])
    with pytest.raises(ValueError, match="not_a_section"):
        load_config(None, ["not_a_section.steps=4"])


@pytest.mark.parametrize(("override", "key"), [
    ("train.steps=abc", "train.steps"),
    ("seed=1.5", "seed"),
    ("model.remat=maybe", "model.remat"),
    ("grpo.group_size=[8]", "grpo.group_size"),
])
def test_wrong_type_in_override_names_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    path = write_yaml(tmp_path, "data:\n  max_prompt_tokens: long\n")
    with pytest.raises(ValueError, match=r"data\.max_prompt_tokens"):
        load_config(path)


def test_unknown_algorithm_is_named():
    with pytest.raises(ValueError, match="'ppo'") as error:
        load_config(None, ["algorithm=ppo"])
    assert all(name in str(error.value) for name in ALGORITHMS)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_field_is_checked_at_load(key):
    with pytest.raises(ValueError) as error:
        load_config(None, [f"{key}=typo"])
    message = str(error.value)
    assert f"{key}='typo'" in message and ", ".join(CHOICES[key]) in message
    for value in CHOICES[key]:  # (best_val needs validations to choose from)
        assert load_config(None, [f"{key}={value}", "train.eval_every=1"]) is not None


def test_choice_names_are_the_ones_the_code_dispatches_on():
    from reczero_jax import grpo, prompts
    from reczero_jax.models.dtypes import JAX_DTYPES
    from reczero_jax.rewards import VARIANTS

    assert tuple(VARIANTS) == REWARDS
    assert tuple(JAX_DTYPES) == DTYPES == tuple(DTYPE_BYTES)
    assert {name: np.dtype(dtype).itemsize for name, dtype in JAX_DTYPES.items()} == DTYPE_BYTES
    # grpo and prompts take their lists from here (one home per list).
    assert grpo.ESTIMATORS is ESTIMATORS and prompts.LAYOUTS is LAYOUTS


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.prompts_per_step=6", "optim.micro_batches=4"],
     r"train.prompts_per_step \(6\) is not a multiple of optim.micro_batches \(4\)"),
    (["train.prompts_per_step=8", "optim.micro_batches=2", "mesh.fsdp=8"],
     "each micro-batch holds 4 prompts, which does not divide the data x fsdp mesh axes"),
    (["algorithm=sft", "sft.batch_size=4", "mesh.data=8"],
     r"sft.batch_size \(4\) is not a multiple|each micro-batch holds 4 prompts"),
])
def test_batch_that_does_not_split_over_the_mesh_fails_at_load(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)
    check_batch_split(8, 2, 4)  # 8 prompts, 2 micro-batches of 4, each over 4 devices: fine
