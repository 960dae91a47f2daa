"""`reczero train` across 2 processes (4 CPU devices each, gloo) against the same run in one
process with 8 devices: the training program (rollout, update, validation, evaluation, SFT
warm start, checkpoints, export) assembles its global batches from per-process shares.

Each process has its own run directory, as hosts of a pod slice have their own disks; the
checkpoints are shared (as in a gs:// bucket). Process 0 writes the logs, reports and export;
process 1 writes nothing of its own. The processes' checkpoint restores in one process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from reczero_jax import distributed
from reczero_jax.config import load_config
from reczero_jax.mesh import make_mesh
from reczero_jax.train.checkpoint import Checkpointer
from reczero_jax.train.loop import run
from tests.helpers import free_port, restored_state, wait_for

ROOT = Path(__file__).resolve().parents[1]

# RecOne: one SFT step, then 2 GRPO steps with validation after the second. 3 of the 4 test
# samples in batches of 4 (the batch is padded), 2 validation samples (padded too).
STEPS = {"sft.steps": 1, "train.steps": 2}


def overrides(model_dir, data_dir, run_dir, checkpoint_dir) -> list[str]:
    settings = {"algorithm": "recone", "run_dir": run_dir, "train.checkpoint_dir": checkpoint_dir,
                "model.path": model_dir, "data.dir": data_dir, "data.max_prompt_tokens": 512,
                "data.eval_samples": 3, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                "sft.batch_size": 4, "sft.max_response_tokens": 256, "sft.learning_rate": 1e-3,
                # A random model's answers all get the format penalty, so the advantages are 0:
                # an entropy bonus makes the GRPO update depend on the sampled tokens.
                "grpo.group_size": 2, "grpo.max_new_tokens": 8, "grpo.entropy_coef": 0.01,
                "train.prompts_per_step": 4,
                "train.eval_every": 2, "train.eval_max_new_tokens": 8, "train.eval_batch_size": 4,
                "optim.learning_rate": 1e-3, **STEPS}
    return [f"{key}={value}" for key, value in settings.items()]


def start_training(tmp_path: Path, model_dir, data_dir, count: int) -> list[subprocess.Popen]:
    """``count`` processes of ``reczero train`` on 4 devices each, process i in run dir p<i>."""
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    for name in distributed.ENV.values():
        env.pop(name, None)
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    return [subprocess.Popen(
        [sys.executable, "-m", "reczero_jax.cli", "train", str(config),
         *overrides(model_dir, data_dir, tmp_path / f"p{index}", tmp_path / "checkpoints"),
         "--coordinator", f"localhost:{port}", "--num-processes", str(count),
         "--process-id", str(index)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in range(count)]


TIMED = {"time", "seconds", "latency_seconds", "requests_per_second", "tokens_per_second",
         "rollout_seconds", "update_seconds"}


def numbers(tree, prefix="") -> dict:
    """Nested results flattened to {"a/b": value}, leaving out wall-clock times."""
    if isinstance(tree, dict):
        return {key: value for name, sub in tree.items() if name not in TIMED
                for key, value in numbers(sub, f"{prefix}{name}/").items()}
    if isinstance(tree, list):
        return {key: value for i, sub in enumerate(tree)
                for key, value in numbers(sub, f"{prefix}{i}/").items()}
    return {prefix: tree}


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_run_the_program_like_one(tmp_path, tiny_model_dir, small_ml100k):
    procs = start_training(tmp_path, tiny_model_dir, small_ml100k, count=2)
    # Meanwhile, the same run in this process over its 8 devices.
    single_dir = tmp_path / "single"
    single = run(load_config(None, overrides(tiny_model_dir, small_ml100k, single_dir,
                                             single_dir / "checkpoints")))
    outputs = wait_for(procs, timeout=300)
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in outputs[0]

    multi_dir = tmp_path / "p0"
    assert not (tmp_path / "p1").exists(), "process 1 wrote into its run directory"
    multi = json.loads((multi_dir / "eval.json").read_text())
    assert list(multi) == ["zero-shot", "after SFT", "after SFT + GRPO"]
    assert all(metrics["n"] == 3 for metrics in multi.values())
    assert numbers(multi) == pytest.approx(numbers(single), abs=1e-5, nan_ok=True)
    assert numbers(metric_rows(multi_dir)) == pytest.approx(numbers(metric_rows(single_dir)),
                                                            abs=1e-4, nan_ok=True)
    phases = [row["phase"] for row in metric_rows(multi_dir)]
    assert phases.count("sft") == 1 and phases.count("grpo") == 2 and phases.count("val") == 1
    assert all(row["grad_norm"] > 0 for row in metric_rows(multi_dir) if row["phase"] == "grpo")
    samples = (multi_dir / "eval_samples.jsonl").read_text()
    assert samples == (single_dir / "eval_samples.jsonl").read_text()

    exported = load_file(multi_dir / "export" / "model.safetensors")
    reference = load_file(single_dir / "export" / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert exported.keys() == reference.keys() == initial.keys()
    for name in reference:
        assert np.abs(reference[name] - initial[name]).max() > 1e-4, f"{name} did not train"
        np.testing.assert_allclose(exported[name], reference[name], rtol=0, atol=1e-5,
                                   err_msg=name)
    # The processes' last checkpoint, restored in this one process, holds the parameters and
    # optimizer state of the same run in one process.
    step = sum(STEPS.values())
    assert Checkpointer(tmp_path / "checkpoints").latest_complete_step() == step
    multi_state, multi_end = restored_state(multi_dir, step)
    single_state, _ = restored_state(single_dir, step)
    assert multi_end.step == step and multi_end.progress["phase"] == "grpo"
    # Parameters and optimizer state: more leaves than the parameters alone.
    assert len(multi_state) == len(single_state) > len(jax.tree.leaves(multi_end.params))
    for restored, expected in zip(multi_state, single_state, strict=True):
        np.testing.assert_allclose(restored, expected, rtol=0, atol=1e-5)


# --- one process: the helpers the loop uses leave the batch whole ---------------------------


def test_one_process_feeds_and_fetches_the_whole_batch():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    for where in (mesh, None):
        assert distributed.process_rows(8, where) == slice(0, 8)
    rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    sharded = distributed.global_batch(rows, mesh)
    assert sharded.sharding.shard_shape(rows.shape) == (2, 3)
    np.testing.assert_array_equal(distributed.to_host(sharded), rows)
    assert distributed.global_batch(rows, None) is rows
    assert distributed.any_process(True) and not distributed.any_process(False)
