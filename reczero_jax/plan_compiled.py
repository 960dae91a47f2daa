"""XLA's per-chip memory of the real GRPO update, next to ``plan.estimate``'s formula.

``reczero plan --compile`` lowers and compiles ``Trainer.grpo_update`` for the config's model
and shapes on a simulated CPU mesh with the slice's chip count, from abstract parameters,
optimizer state and rollout (``Trainer(..., abstract=True)``: nothing is allocated), and
reads ``compiled.memory_analysis()``: arguments + outputs - donated + temporaries, the same
peak ``Trainer.check_memory`` enforces.

What differs from the TPU program: Pallas's splash kernel (``auto`` on TPU) does not compile
for CPU, so the CPU program runs ``blockwise`` in its place (both keep O(queries) residuals;
splash also keeps the [prefix; self] keys and values, which the formula counts); the update
is compiled at the longest response bucket, ``grpo.max_new_tokens`` (trimmed updates are
smaller).
"""

from __future__ import annotations

import os
import re

from reczero_jax.config import DTYPE_BYTES
from reczero_jax.plan import (
    BANDWIDTH,
    GIB,
    USABLE_FRACTION,
    RunShape,
    TpuSlice,
    estimate,
    param_shard_elements,
    sampling_layout,
    update_collectives,
)

CPU_STAND_IN = {"splash": "blockwise", "cudnn": "blockwise"}  # kernels without a CPU build


def dtype_of(bytes_per_element: int):
    """The config dtype of a ``RunShape``'s element size (4: float32, 2: bfloat16)."""
    from reczero_jax.models.dtypes import jax_dtype

    (name,) = [name for name, size in DTYPE_BYTES.items() if size == bytes_per_element]
    return jax_dtype(name)


def simulated_devices(count: int) -> list:
    """``count`` CPU devices for compiling (never running) a slice's programs; works when jax's
    backends have not started yet, else needs XLA_FLAGS set before jax was imported. Never
    fewer devices than XLA_FLAGS asks for: ``jax_num_cpu_devices`` overrides the flag, and
    whatever runs next in this process (a test suite's other tests) may count on it."""
    import jax

    flagged = re.search(r"--xla_force_host_platform_device_count=(\d+)",
                        os.environ.get("XLA_FLAGS", ""))
    wanted = max(count, jax.config.jax_num_cpu_devices, int(flagged[1]) if flagged else 1)
    try:
        jax.config.update("jax_num_cpu_devices", wanted)
    except RuntimeError:  # backends already initialised: use what there is
        pass
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ValueError(f"--compile needs {count} simulated CPU devices, jax has "
                         f"{len(devices)}: set XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{count} before jax is imported")
    return devices[:count]


def compiled_rollout(model_config, shape: RunShape) -> dict[str, dict]:
    """XLA's view of the sampler's programs for ``shape`` on a simulated CPU mesh: per program
    (reshard, prefill, decode) its collective bytes by kind and its memory analysis."""
    from flax import nnx

    from reczero_jax.collectives import collective_bytes
    from reczero_jax.mesh import make_mesh
    from reczero_jax.models.decoder import Decoder
    from reczero_jax.sampling import compile_rollout

    mesh = make_mesh(shape.data, shape.fsdp, shape.tensor,
                     devices=simulated_devices(shape.devices))
    model = nnx.eval_shape(lambda: Decoder(
        model_config, dtype=dtype_of(shape.compute_bytes), param_dtype=dtype_of(shape.param_bytes),
        rngs=nnx.Rngs(0), mesh=mesh, remat=shape.remat))
    programs = compile_rollout(model, batch=shape.prompts_per_step,
                               prompt_length=shape.sample_prompt_tokens,
                               num_samples=shape.group_size, max_new_tokens=shape.new_tokens)
    return {name: {"collectives": collective_bytes(program.as_text()),
                   "memory": program.memory_analysis()} for name, program in programs.items()}


def format_collectives(model_config, shape: RunShape, tpu: TpuSlice, compiled: dict) -> str:
    """Collective bytes per chip of each program, as time at the slice's bandwidths."""
    from reczero_jax.collectives import format_bytes

    hbm, ici = BANDWIDTH[tpu.generation]
    one_way = None if ici is None else ici / 2

    def seconds(total: float) -> str:
        return "no ICI figure" if one_way is None else f"{total / one_way * 1e3:9.2f} ms"

    lines = [f"collectives per chip (XLA, simulated CPU mesh of {shape.devices} devices; time "
             f"at {tpu.generation} ICI {'n/a' if ici is None else f'{one_way / 1e9:.0f} GB/s'}"
             f" one way, HBM {hbm / 1e9:.0f} GB/s)"]
    rows = []
    for name, label, factor in (("reshard", "reshard (once per rollout)", 1.0),
                                ("prefill", "prefill", 1.0),
                                ("decode", "decode, per token", 1 / shape.new_tokens),
                                ("decode", f"decode, {shape.new_tokens} tokens", 1.0)):
        if name in compiled:
            bytes_ = compiled[name]["collectives"].scaled(factor)
            rows.append((label, bytes_.by_kind, bytes_.total))
    update = {k: v * 1.0 for k, v in update_collectives(model_config, shape).items()}
    rows.append(("update (ZeRO-3 formula)", update, sum(update.values())))
    for label, by_kind, total in rows:
        lines.append(f"  {label:<28} {seconds(total)}   {format_bytes(by_kind)}")
    sampler = sampling_layout(model_config, shape.data, shape.fsdp, shape.tensor)
    weights = (sampler.copy_elements * shape.compute_bytes if sampler.rollout
               else param_shard_elements(model_config, shape.data, shape.fsdp, shape.tensor)
               * shape.param_bytes)
    caches = estimate(model_config, shape).terms
    cache_bytes = (caches["prompt KV cache"]["decode"] + caches["response KV caches"]["decode"])
    lines.append(f"  decode HBM floor per token   {(weights + cache_bytes) / hbm * 1e3:9.2f} ms"
                 f"   reads weights {weights / GIB:.2f} GiB + KV caches {cache_bytes / GIB:.2f} GiB")
    lines.extend(f"  note: {note}" for note in sampler.notes)
    lines.append("XLA memory analysis per chip (GiB: arguments, temporaries, outputs):")
    for name, result in compiled.items():
        memory = result["memory"]
        lines.append(f"  {name:<8} {memory.argument_size_in_bytes / GIB:8.2f} "
                     f"{memory.temp_size_in_bytes / GIB:8.2f} "
                     f"{memory.output_size_in_bytes / GIB:8.2f}")
    return "\n".join(lines)


def abstract_rollout(shape: RunShape):
    """A ``Rollout`` of ShapeDtypeStructs: B prompts of the bucketed prompt length, G
    responses of ``new_tokens``."""
    import jax
    import jax.numpy as jnp

    from reczero_jax.train.step import Rollout

    batch, group = shape.prompts_per_step, shape.group_size
    prompt, response = shape.sample_prompt_tokens, shape.new_tokens

    def struct(dims, dtype):
        return jax.ShapeDtypeStruct(dims, dtype)

    return Rollout(
        prompt_ids=struct((batch, prompt), jnp.int32),
        prompt_mask=struct((batch, prompt), jnp.int32),
        responses=struct((batch, group, response), jnp.int32),
        response_mask=struct((batch, group, response), jnp.float32),
        old_logp=struct((batch, group, response), jnp.float32),
        rewards=struct((batch, group), jnp.float32),
        advantages=struct((batch, group), jnp.float32),
        format_ok=struct((batch, group), jnp.bool_),
        ratings=struct((batch, group), jnp.float32),
        lengths=struct((batch, group), jnp.int32))


def compiled_update(model_config, shape: RunShape) -> dict[str, float]:
    """``Trainer.memory_report`` of the abstract GRPO update for ``shape`` on a simulated CPU
    mesh of ``shape.devices`` chips: bytes per chip, ``peak_bytes`` included."""
    from flax import nnx

    from reczero_jax.config import GRPOConfig, OptimConfig
    from reczero_jax.mesh import make_mesh
    from reczero_jax.models.decoder import Decoder
    from reczero_jax.train.step import Trainer

    mesh = make_mesh(shape.data, shape.fsdp, shape.tensor,
                     devices=simulated_devices(shape.devices))
    attention = CPU_STAND_IN.get(shape.attention, shape.attention)
    model = nnx.eval_shape(lambda: Decoder(
        model_config, dtype=dtype_of(shape.compute_bytes), param_dtype=dtype_of(shape.param_bytes),
        rngs=nnx.Rngs(0), mesh=mesh, remat=shape.remat, attention=attention))
    grpo = GRPOConfig(group_size=shape.group_size, max_new_tokens=shape.new_tokens,
                      kl_coef=1e-3 if shape.reference_model else 0.0,
                      logprob_chunk=shape.logprob_chunk)
    trainer = Trainer(model, mesh, OptimConfig(micro_batches=shape.micro_batches), grpo,
                      abstract=True)
    return trainer.memory_report(abstract_rollout(shape))


def format_compiled_update(model_config, shape: RunShape, tpu: TpuSlice,
                           report: dict[str, float]) -> str:
    """XLA's analysis of the update next to the formula's update phase, per chip, and XLA's
    verdict against the same budget as the formula's (90 % of HBM)."""
    formula = estimate(model_config, shape).total("update")
    budget, peak = USABLE_FRACTION * tpu.hbm_bytes, report["peak_bytes"]
    verdict = (f"FITS: {(budget - peak) / GIB:.1f} GiB headroom" if peak <= budget
               else f"DOES NOT FIT: {(peak - budget) / GIB:.1f} GiB over")
    stand_in = CPU_STAND_IN.get(shape.attention)
    note = f" ({stand_in} standing in for {shape.attention})" if stand_in else ""
    return "\n".join([
        f"GRPO update, XLA memory analysis per chip (simulated CPU mesh of {shape.devices} "
        f"devices{note}):",
        f"  arguments {report['argument_size_in_bytes'] / GIB:.2f} + outputs "
        f"{report['output_size_in_bytes'] / GIB:.2f} - donated "
        f"{report['alias_size_in_bytes'] / GIB:.2f} + temporaries "
        f"{report['temp_size_in_bytes'] / GIB:.2f} = peak {report['peak_bytes'] / GIB:.2f} GiB; "
        f"formula {formula / GIB:.2f} GiB (formula / XLA = {formula / report['peak_bytes']:.2f})",
        f"verdict (XLA, update): {verdict} of {budget / GIB:.1f} GiB usable",
    ])


