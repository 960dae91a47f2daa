"""Device meshes and the one table that maps logical axis names to mesh axes.

Every parameter and activation names its dimensions with logical axes (``"embed"``,
``"heads"``, ...). ``LOGICAL_AXIS_RULES`` maps each to a mesh axis of the
``("data", "fsdp", "tensor")`` mesh, so changing the parallelism layout is one edit here.
A dimension that does not divide its mesh axis is an error naming the parameter, never a
silent replication.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # examples (prompts, or prompts x samples)
    "embed": "fsdp",  # model width of every weight: ZeRO-3 style parameter sharding
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "head_dim": None,
    "norm": None,
    "length": None,
    "group": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh (Auto axis types) over the first data*fsdp*tensor devices."""
    devices = list(jax.devices() if devices is None else devices)
    needed = data * fsdp * tensor
    if needed > len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {needed} devices, "
            f"but only {len(devices)} are visible (on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} before importing jax)"
        )
    grid = np.asarray(devices[:needed]).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def single_device_mesh() -> Mesh:
    return make_mesh(1, 1, 1)


def logical_to_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names, through ``LOGICAL_AXIS_RULES``."""
    return PartitionSpec(*(None if name is None else LOGICAL_AXIS_RULES[name]
                           for name in logical_axes))


def batch_spec(ndim: int) -> PartitionSpec:
    """PartitionSpec of a rank-``ndim`` array whose leading axis is the batch: that axis over
    the ``"batch"`` mesh axes (``LOGICAL_AXIS_RULES``), the others replicated."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1))


def batch_sharding(mesh: Mesh, tree):
    """The NamedSharding of every array in ``tree`` (a pytree of arrays or ShapeDtypeStructs,
    each [batch, ...]) by its rank (``batch_spec``): a tree of ``tree``'s structure."""
    return jax.tree.map(lambda leaf: NamedSharding(mesh, batch_spec(np.ndim(leaf))), tree)


def mesh_axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else axis
    return int(np.prod([mesh.shape[name] for name in names]))


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int],
                   what: str) -> NamedSharding:
    """NamedSharding of an array of ``shape`` whose dims are ``logical_axes``.

    Raises a ValueError naming ``what``, the dimension and the mesh axis when a dimension
    does not divide the mesh axis it is mapped to.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{what}: {len(logical_axes)} logical axes for shape {tuple(shape)}")
    spec = logical_to_spec(logical_axes)
    for dim, (name, size, axis) in enumerate(zip(logical_axes, shape, spec, strict=True)):
        parts = mesh_axis_size(mesh, axis)
        if size % parts:
            raise ValueError(
                f"{what}: dimension {dim} ({name!r}, size {size}) does not divide mesh axis "
                f"{axis!r} of size {parts}; choose a mesh whose {axis!r} size divides {size}"
            )
    return NamedSharding(mesh, spec)


def constrain(x: jax.Array, mesh: Mesh | None, logical_axes: Sequence[str | None]) -> jax.Array:
    """Inside jit: pin ``x`` to the sharding of its logical axes on ``mesh`` (no-op without one)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes)))


def param_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """For a (possibly abstract) model state, the NamedSharding of every parameter.

    The result has the state's own structure (each Variable holding its sharding), so it
    serves directly as ``in_shardings`` / ``out_shardings`` for functions of the state.
    """

    def sharding_of(path, variable):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"parameter {'.'.join(map(str, path))} has no logical_axes metadata")
        sharding = named_sharding(mesh, axes, variable.shape,
                                  "parameter " + ".".join(map(str, path)))
        return variable.replace(sharding)

    return nnx.map_state(sharding_of, state)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every parameter of ``model`` on ``mesh`` by its logical axes (in place); returns it."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model
