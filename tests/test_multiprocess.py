"""Multi-host code paths with several CPU processes on this machine (reczero_jax.distributed).

The slow test starts 2 processes with 4 CPU devices each (gloo collectives over localhost);
they train 2 GRPO steps on one (data=2, fsdp=2, tensor=2) mesh over the 8 devices, each
feeding its half of every batch, and save a checkpoint together. This process (8 devices,
tests/conftest.py) runs the same steps alone and restores that checkpoint.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from reczero_jax import distributed
from reczero_jax.mesh import make_mesh
from reczero_jax.train.checkpoint import Checkpointer
from tests import multiprocess_worker as worker
from tests.helpers import free_port, tiny_model, wait_for

ROOT = Path(__file__).resolve().parents[1]


def start_processes(out: Path, count: int, devices_each: int) -> list[subprocess.Popen]:
    """``count`` workers (tests/multiprocess_worker.py) joined through a free localhost port."""
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}
    for name in distributed.ENV.values():
        env.pop(name, None)
    return [subprocess.Popen(
        [sys.executable, "-m", "tests.multiprocess_worker", "--coordinator", f"localhost:{port}",
         "--num-processes", str(count), "--process-id", str(index), "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in range(count)]




@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
    procs = start_processes(tmp_path, count=2, devices_each=4)
    # Meanwhile, the same steps in this one process over its 8 devices.
    mesh = make_mesh(**worker.MESH)
    reference = worker.train(mesh)
    for index, output in enumerate(wait_for(procs, timeout=240)):
        assert f"process {index} of 2: 4 local of 8 devices" in output
    multi = dict(np.load(tmp_path / "params.npz"))

    single = worker.flat_numpy(reference.params)
    initial = worker.flat_numpy(nnx.state(tiny_model()))
    assert single.keys() == multi.keys() == initial.keys()
    for name in single:
        assert np.abs(single[name] - initial[name]).max() > 1e-3, f"{name} did not train"
        np.testing.assert_allclose(multi[name], single[name], rtol=0, atol=1e-6, err_msg=name)

    with Checkpointer(tmp_path / "checkpoints") as checkpoints:
        restored = checkpoints.restore(abstract_params=reference.params,
                                       param_sharding=reference.param_sharding,
                                       abstract_opt_state=reference.opt_state,
                                       opt_sharding=reference.opt_sharding)
    assert restored.step == worker.STEPS
    for name, value in worker.flat_numpy(restored.params).items():
        np.testing.assert_array_equal(value, multi[name], err_msg=name)
    leaves = jax.tree.leaves(restored.opt_state)
    assert leaves and all(leaf.sharding.mesh.devices.size == 8 for leaf in leaves)
    for restored_leaf, reference_leaf in zip(leaves, jax.tree.leaves(reference.opt_state),
                                             strict=True):
        np.testing.assert_allclose(np.asarray(restored_leaf), np.asarray(reference_leaf),
                                   rtol=0, atol=1e-6)


# --- one process: the same calls do nothing or fail clearly --------------------------------


def test_one_process_needs_no_initialization(monkeypatch):
    for name in distributed.ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize("localhost:1234", 1, 0) is False
    assert not jax.distributed.is_initialized()
    assert distributed.is_primary()


@pytest.mark.parametrize("kwargs, message", [
    ({"coordinator": "localhost:1"}, "missing: --num-processes (or JAX_NUM_PROCESSES), "
                                     "--process-id (or JAX_PROCESS_ID)"),
    ({"num_processes": 2, "process_id": 2, "coordinator": "h:1"}, "--process-id 2 is not in"),
])
def test_incomplete_or_inconsistent_settings_fail_clearly(monkeypatch, kwargs, message):
    for name in distributed.ENV.values():
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distributed.initialize(**kwargs)


def test_environment_fills_in_missing_settings(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="missing: --process-id"):
        distributed.initialize()
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert distributed.initialize() is False  # a complete single-process setting


def test_cloud_tpu_vm_leaves_the_missing_settings_to_jax(monkeypatch):
    for name in distributed.ENV.values():
        monkeypatch.delenv(name, raising=False)
    assert distributed.on_cloud_tpu_vm() is False  # no libtpu here
    calls = []
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    assert distributed.initialize() is True
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:8476")
    assert distributed.initialize() is True
    assert calls == [(None, None, None), ("10.0.0.2:8476", None, None)]


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    args = parser.parse_args(["--coordinator", "10.0.0.2:8476", "--num-processes", "4",
                              "--process-id", "3"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("10.0.0.2:8476", 4, 3)
    assert parser.parse_args([]).num_processes is None


def test_global_batch_on_one_process_is_the_batch_sharded_over_data_and_fsdp():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert distributed.process_batch_share(mesh) == (0, 1)
    rows = {"ids": np.arange(8 * 3).reshape(8, 3), "rating": np.arange(8.0)}
    batch = distributed.global_batch(rows, mesh)
    np.testing.assert_array_equal(np.asarray(batch["ids"]), rows["ids"])
    assert batch["ids"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert batch["rating"].sharding.shard_shape((8,)) == (2,)
