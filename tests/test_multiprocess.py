"""Multi-host set-up in one process (reczero_jax.distributed): the calls that do nothing or
fail clearly without other processes, and the global batch. Several processes run the whole
program in tests/test_multiprocess_loop.py (training, checkpoints restored in one process)
and the dynamic-sampling selection in tests/test_dynamic.py."""

import argparse

import jax
import numpy as np
import pytest

from reczero_jax import distributed
from reczero_jax.mesh import make_mesh

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
