"""Device meshes and the tables that map logical axis names to mesh axes.

Every parameter and activation names its dimensions with logical axes (``"embed"``,
``"heads"``, ...). A rules table maps each to a mesh axis of the ``("data", "fsdp",
"tensor")`` mesh, so changing the parallelism layout is one edit here. There are two:

* ``LOGICAL_AXIS_RULES`` (``TRAINING_RULES``), the training layout: weights ZeRO-3 sharded
  over fsdp on their model width and tensor-parallel over tensor; the batch over data x fsdp.
  A dimension that does not divide its mesh axis is an error naming the parameter, never a
  silent replication.
* ``rollout_rules(mesh, config)``, the sampling layout: no weight is sharded on its model
  width, so a decode step never gathers weights; heads, kv heads, MLP and vocabulary are
  tensor-parallel over the chips of fsdp x tensor; the batch over data. Where a dimension does
  not divide, the table falls back in a stated order and says so (see ``rollout_rules``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None

LOGICAL_AXIS_RULES: dict[str, MeshAxes] = {
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
    "lora_rank": None,  # a LoRA factor's rank (small: never sharded)
}


@dataclasses.dataclass(frozen=True)
class AxisRules(Mapping):
    """A rules table (logical axis -> mesh axes) that is hashable, so a module can hold it as
    static structure; ``notes`` say which fallbacks built it (empty for the training table)."""

    name: str
    table: tuple[tuple[str, MeshAxes], ...]
    notes: tuple[str, ...] = ()

    def __getitem__(self, logical: str) -> MeshAxes:
        return dict(self.table)[logical]

    def __iter__(self):
        return (name for name, _ in self.table)

    def __len__(self) -> int:
        return len(self.table)


TRAINING_RULES = AxisRules("training", tuple(LOGICAL_AXIS_RULES.items()))
# The axes whose chips split one copy of the weights (training: ZeRO-3 over fsdp, tensor
# parallel over tensor); the rollout layout spends them all on tensor parallelism.
MODEL_AXES = ("fsdp", "tensor")
_log = logging.getLogger(__name__)


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


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: Mapping[str, MeshAxes] = TRAINING_RULES) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names, through ``rules``."""
    return PartitionSpec(*(None if name is None else rules[name] for name in logical_axes))


def batch_spec(ndim: int, rules: Mapping[str, MeshAxes] = TRAINING_RULES) -> PartitionSpec:
    """PartitionSpec of a rank-``ndim`` array whose leading axis is the batch: that axis over
    the ``"batch"`` mesh axes of ``rules``, the others replicated."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules)


def batch_sharding(mesh: Mesh, tree, rules: Mapping[str, MeshAxes] = TRAINING_RULES):
    """The NamedSharding of every array in ``tree`` (a pytree of arrays or ShapeDtypeStructs,
    each [batch, ...]) by its rank (``batch_spec``): a tree of ``tree``'s structure."""
    return jax.tree.map(lambda leaf: NamedSharding(mesh, batch_spec(np.ndim(leaf), rules)), tree)


def mesh_axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else axis
    return int(np.prod([mesh.shape[name] for name in names]))


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int],
                   what: str, rules: Mapping[str, MeshAxes] = TRAINING_RULES) -> NamedSharding:
    """NamedSharding of an array of ``shape`` whose dims are ``logical_axes``.

    Raises a ValueError naming ``what``, the dimension and the mesh axis when a dimension
    does not divide the mesh axis it is mapped to.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{what}: {len(logical_axes)} logical axes for shape {tuple(shape)}")
    spec = logical_to_spec(logical_axes, rules)
    for dim, (name, size, axis) in enumerate(zip(logical_axes, shape, spec, strict=True)):
        parts = mesh_axis_size(mesh, axis)
        if size % parts:
            raise ValueError(
                f"{what}: dimension {dim} ({name!r}, size {size}) does not divide mesh axis "
                f"{axis!r} of size {parts}; choose a mesh whose {axis!r} size divides {size}"
            )
    return NamedSharding(mesh, spec)


def constrain(x: jax.Array, mesh: Mesh | None, logical_axes: Sequence[str | None],
              rules: Mapping[str, MeshAxes] = TRAINING_RULES) -> jax.Array:
    """Inside jit: pin ``x`` to the sharding of its logical axes on ``mesh`` (no-op without one)."""
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_shardings(state: nnx.State, mesh: Mesh,
                    rules: Mapping[str, MeshAxes] = TRAINING_RULES) -> nnx.State:
    """For a (possibly abstract) model state, the NamedSharding of every parameter.

    The result has the state's own structure (each Variable holding its sharding), so it
    serves directly as ``in_shardings`` / ``out_shardings`` for functions of the state.
    """

    def sharding_of(path, variable):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"parameter {'.'.join(map(str, path))} has no logical_axes metadata")
        sharding = named_sharding(mesh, axes, variable.shape,
                                  "parameter " + ".".join(map(str, path)), rules)
        return variable.replace(sharding)

    return nnx.map_state(sharding_of, state)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every parameter of ``model`` on ``mesh`` by its logical axes (in place); returns it."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    return model


# ----------------------------------------------------------------------------- rollout layout


def rollout_rules(mesh: Mesh, config) -> AxisRules:
    """The sampling layout of a model ``config`` (a ``ModelConfig``) on ``mesh``.

    * ``embed`` (every weight's model width): replicated, so no weight is gathered per step;
    * ``heads`` and ``kv_heads`` share one choice (a query head's kv head then sits on its
      chip: grouped attention needs no communication), ``mlp`` and ``vocab`` one each, taken
      as the first in this order that divides the dimension:
        1. fsdp x tensor (all the chips that hold one copy of the weights),
        2. one of them alone, the larger first (fsdp on a tie): the dimension is replicated
           over the other factor, costing memory and repeated compute there, not traffic,
        3. no sharding (replicated over both);
      e.g. Qwen2.5-7B (28 heads, 4 kv heads) on fsdp=8 takes step 3 for the attention
      (8 divides neither; there is no tensor axis) while its MLP (18,944) and vocabulary
      (152,064) take step 1;
    * ``batch``: data (the model axes are busy with the weights); the KV caches follow
      (batch, kv_heads); every other axis is replicated.

    Each fallback is a line in ``notes`` and is logged (once per mesh and config) as a
    warning, so none is silent.
    """
    return _rollout_rules(tuple(mesh.shape.items()), config.num_heads, config.num_kv_heads,
                          config.intermediate_size, config.vocab_size)


@functools.lru_cache(maxsize=64)
def _rollout_rules(mesh_shape: tuple[tuple[str, int], ...], heads: int, kv_heads: int,
                   mlp: int, vocab: int) -> AxisRules:
    sizes = dict(mesh_shape)
    model_axes = tuple(axis for axis in MODEL_AXES if sizes.get(axis, 1) > 1)
    full = math.prod(sizes[axis] for axis in model_axes)
    # Subsets of the model axes (kept in mesh order), the largest product first.
    candidates = sorted((subset for r in range(len(model_axes), 0, -1)
                         for subset in itertools.combinations(model_axes, r)),
                        key=lambda subset: -math.prod(sizes[a] for a in subset))
    notes = []

    def choose(name: str, dims: dict[str, int]) -> MeshAxes:
        for subset in candidates:
            parts = math.prod(sizes[a] for a in subset)
            if all(size % parts == 0 for size in dims.values()):
                break
        else:
            subset, parts = (), 1
        if parts < full:
            what = " and ".join(f"{dim} ({size})" for dim, size in dims.items())
            notes.append(f"rollout layout: {what} not divisible by fsdp x tensor = {full}: "
                         f"{name} sharded over {' x '.join(subset) or 'no axis'} ({parts}), replicated over "
                         f"the remaining factor {full // parts}")
        return None if not subset else subset[0] if len(subset) == 1 else subset

    attention = choose("heads and kv_heads", {"heads": heads, "kv_heads": kv_heads})
    table = dict(LOGICAL_AXIS_RULES, embed=None, heads=attention, kv_heads=attention,
                 mlp=choose("mlp", {"mlp": mlp}), vocab=choose("vocab", {"vocab": vocab}),
                 batch="data")
    for note in notes:
        _log.warning(note)
    return AxisRules("rollout", tuple(table.items()), tuple(notes))
