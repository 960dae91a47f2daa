"""Multi-host runs on JAX's multi-controller runtime: joining the processes, feeding the batch.

Every host runs the same program. ``initialize`` joins them with ``jax.distributed.initialize``
before any JAX computation:

* on a Cloud TPU VM, with no arguments: JAX reads the slice's workers from the TPU metadata;
* elsewhere, with an explicit coordinator ``host:port`` (process 0's address), the process
  count and this process's id, given as arguments, flags (``add_arguments``) or the
  environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). CPU
  processes exchange collectives through gloo (TCP);
* one process alone needs nothing: it is a no-op.

Each process then loads only its block of every global batch (``process_batch_share`` tells
which, for ``data.pipeline.make_pipeline``'s ``process_index``/``process_count``) and
``global_batch`` assembles the blocks into global ``jax.Array`` s sharded over the batch axes.
``to_host`` brings global arrays back whole to every process (host metrics, evaluation rows,
the parameters of an export), ``any_process`` lets one process's stop request stop all and
``sync`` waits for every process at a named point. Only the primary process
(``is_primary``) writes logs, metrics, plots and exports; every process takes part in checkpoint
saves (Orbax writes each host's own shards).

Every function here that takes a mesh also takes ``None`` (a model on one device, one process):
the batch stays in host arrays.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from reczero_jax.mesh import LOGICAL_AXIS_RULES, batch_sharding, batch_spec, mesh_axis_size

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes",
         "process_id": "--process-id"}


def on_cloud_tpu_vm() -> bool:
    """libtpu is installed and TPU chips are attached to this host (PCI scan, as JAX does)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    # jax's own test of attached TPU chips (jax is pinned, so this private helper is stable).
    from jax._src.hardware_utils import num_available_tpu_chips_and_device_id

    return num_available_tpu_chips_and_device_id()[0] > 0


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the other processes of this run; returns whether ``jax.distributed`` started here.

    Arguments left None fall back to the environment (module docstring). On a Cloud TPU VM
    JAX finds whatever is still missing; elsewhere give all three, or none to run as one
    process. Must run before JAX touches a device (jax raises otherwise).
    """
    if jax.distributed.is_initialized():
        return False
    settings = {"coordinator": coordinator, "num_processes": num_processes,
                "process_id": process_id}
    for name, value in settings.items():
        if value is None and os.environ.get(ENV[name]):
            settings[name] = os.environ[ENV[name]]
    given = [name for name, value in settings.items() if value is not None]
    missing = [name for name in settings if name not in given]
    if missing and on_cloud_tpu_vm():
        # JAX reads what is missing (usually all three) from the TPU VM's metadata.
        jax.distributed.initialize(settings["coordinator"], _int_or_none(settings["num_processes"]),
                                   _int_or_none(settings["process_id"]))
        return True
    if not given:
        return False
    if missing:
        raise ValueError(
            "multi-process runs need the coordinator address, the process count and this "
            f"process's id; missing: {', '.join(f'{FLAGS[m]} (or {ENV[m]})' for m in missing)}")
    count, index = int(settings["num_processes"]), int(settings["process_id"])
    if not 0 <= index < count:
        raise ValueError(f"--process-id {index} is not in [0, --num-processes {count})")
    if count == 1:
        return False
    # Collectives between CPU processes (the default in jax 0.10 already; TPUs use ICI).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(str(settings["coordinator"]), count, index)
    return True


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id`` (for ``initialize_from_args``)."""
    group = parser.add_argument_group(
        "multi-process", "join several processes (not needed on Cloud TPU, which is automatic)")
    group.add_argument(FLAGS["coordinator"], metavar="HOST:PORT",
                       help=f"process 0's address and a free port [{ENV['coordinator']}]")
    group.add_argument(FLAGS["num_processes"], type=int, metavar="N",
                       help=f"number of processes [{ENV['num_processes']}]")
    group.add_argument(FLAGS["process_id"], type=int, metavar="I",
                       help=f"this process's id, 0..N-1 [{ENV['process_id']}]")


def initialize_from_args(args: argparse.Namespace) -> bool:
    return initialize(args.coordinator, args.num_processes, args.process_id)


def is_primary() -> bool:
    """Process 0: the one that writes logs, metrics, plots and exports."""
    return jax.process_index() == 0


def process_batch_share(mesh: Mesh | None) -> tuple[int, int]:
    """(index, count): this process feeds block ``index`` of ``count`` equal, contiguous blocks
    of every global batch, the batch axis being sharded by ``LOGICAL_AXIS_RULES["batch"]``.

    Usually (jax.process_index(), jax.process_count()); processes whose devices hold the same
    batch rows (a tensor axis across hosts) share an index and must load the same rows.
    """
    if mesh is None:
        _require_one_process()
        return 0, 1
    shards = mesh_axis_size(mesh, LOGICAL_AXIS_RULES["batch"])
    sharding = NamedSharding(mesh, batch_spec(1))
    mine = sorted({index[0].start or 0 for device, index in
                   sharding.devices_indices_map((shards,)).items()
                   if device.process_index == jax.process_index()})
    if mine != list(range(mine[0], mine[0] + len(mine))) or shards % len(mine):
        raise ValueError(
            f"process {jax.process_index()} holds batch shards {mine} of {shards}, not one "
            "contiguous block: order the mesh's devices by process (mesh.make_mesh does)")
    return mine[0] // len(mine), shards // len(mine)


def process_rows(global_size: int, mesh: Mesh | None) -> slice:
    """This process's block of the rows 0..global_size-1 of a batch every process holds whole
    (e.g. one drawn from a shared seed): feed ``batch[process_rows(len(batch), mesh)]`` to
    ``global_batch``."""
    index, count = process_batch_share(mesh)
    if global_size % count:
        raise ValueError(f"a batch of {global_size} rows does not split into {count} equal "
                         "process blocks: make the batch size a multiple of the process count")
    local = global_size // count
    return slice(index * local, (index + 1) * local)


def global_batch(local, mesh: Mesh | None):
    """Process-local numpy batches (a pytree of [b, ...] arrays, this process's rows) -> global
    ``jax.Array`` s of [b * count, ...] with the leading axis over the batch mesh axes.

    Every process calls it with its own block (``process_batch_share``); together the blocks
    make the global batch, in process order. Without a mesh the batch stays as it is.
    """
    if mesh is None:
        _require_one_process()
        return local
    _, count = process_batch_share(mesh)

    def assemble(rows, sharding):
        return jax.make_array_from_process_local_data(
            sharding, rows, (rows.shape[0] * count, *rows.shape[1:]))

    local = jax.tree.map(np.asarray, local)
    return jax.tree.map(assemble, local, batch_sharding(mesh, local))


def to_host(tree):
    """A pytree of global ``jax.Array`` s (or numpy arrays) -> numpy arrays holding the whole
    global value, in every process. A collective when an array spans several processes: every
    process must call it, with arrays of the same global shapes."""
    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(fetch, tree)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set in any process (a collective with several processes), so that a
    decision taken in one process (e.g. stop on SIGTERM) is taken by all: a process that left
    the loop alone would leave the others waiting in their next collective. Every process must
    call it at the same point."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


def sync(name: str) -> None:
    """With several processes, wait until all reach the point named ``name`` (e.g. after
    process 0 prepared files the others read); one process: nothing."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _require_one_process() -> None:
    if jax.process_count() > 1:
        raise ValueError(f"{jax.process_count()} processes need a mesh over all their devices to "
                         "share a batch: build the model with mesh=make_mesh(...)")
