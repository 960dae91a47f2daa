"""The HLO collective reader on small programs whose collectives are known."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from reczero_jax.collectives import collective_bytes, shape_bytes


def _mesh(n=4):
    return Mesh(np.asarray(jax.devices()[:n]), ("x",), axis_types=(AxisType.Auto,))


def _compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_shape_bytes_reads_every_array_of_a_tuple():
    assert shape_bytes("(f32[4,8]{1,0}, bf16[3]{0}, pred[])") == 4 * 32 + 2 * 3 + 1


def test_fori_loop_collectives_are_multiplied_by_the_trip_count():
    mesh = _mesh()
    trips = 5

    def program(a):  # a: [16, 8] f32, 4 rows per device
        @partial(jax.shard_map, mesh=mesh, in_specs=PartitionSpec("x"),
                 out_specs=PartitionSpec(), check_vma=False)
        def inner(block):
            def body(i, carry):  # depends on the carry so XLA cannot hoist the collectives
                summed = jax.lax.psum(block * carry, "x")  # all-reduce of [4, 8]
                gathered = jax.lax.all_gather(block + carry, "x")  # [4, 4, 8]
                scattered = jax.lax.psum_scatter(block - carry, "x", tiled=True)  # [1, 8]
                return carry + summed.sum() + gathered.sum() + scattered.sum()
            return jax.lax.fori_loop(0, trips, body, jnp.zeros(()))
        return inner(a)

    a = jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, PartitionSpec("x")))
    result = collective_bytes(_compiled_text(program, a))
    assert result.unknown_trip_counts == 0
    assert result.by_kind["all-gather"] == trips * 4 * 4 * 8 * 4
    assert result.by_kind["all-reduce"] == trips * 4 * 8 * 4
    assert result.by_kind["reduce-scatter"] == trips * 4 * 8 * 4  # the unreduced input
    assert result.by_kind["all-to-all"] == result.by_kind["collective-permute"] == 0


def test_early_exit_while_loop_uses_its_bound_and_nested_loops_multiply():
    mesh = _mesh()

    def program(a, limit):
        @partial(jax.shard_map, mesh=mesh, in_specs=(PartitionSpec("x"), PartitionSpec()),
                 out_specs=PartitionSpec(), check_vma=False)
        def inner(block, limit):
            def inner_body(j, carry):
                return carry + jax.lax.psum(block * carry, "x").sum()

            def cond(state):
                step, total = state
                return (step < 7) & (total < limit)  # stops early: no known trip count

            def body(state):
                step, total = state
                return step + 1, jax.lax.fori_loop(0, 3, inner_body, total)
            return jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.zeros(())))[1]
        return inner(a, limit)

    a = jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, PartitionSpec("x")))
    result = collective_bytes(_compiled_text(program, a, jnp.float32(1e9)))
    assert result.by_kind["all-reduce"] == 7 * 3 * 4 * 8 * 4


def test_text_without_entry_is_an_error():
    with pytest.raises(ValueError, match="ENTRY"):
        collective_bytes("HloModule nothing\n")
