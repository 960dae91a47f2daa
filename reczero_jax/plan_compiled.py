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

from reczero_jax.plan import GIB, USABLE_FRACTION, RunShape, TpuSlice, estimate, simulated_devices

CPU_STAND_IN = {"splash": "blockwise", "cudnn": "blockwise"}  # kernels without a CPU build


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
    import jax.numpy as jnp
    from flax import nnx

    from reczero_jax.config import GRPOConfig, OptimConfig
    from reczero_jax.mesh import make_mesh
    from reczero_jax.models.decoder import Decoder
    from reczero_jax.train.step import Trainer

    dtypes = {4: jnp.float32, 2: jnp.bfloat16}
    mesh = make_mesh(shape.data, shape.fsdp, shape.tensor,
                     devices=simulated_devices(shape.devices))
    attention = CPU_STAND_IN.get(shape.attention, shape.attention)
    model = nnx.eval_shape(lambda: Decoder(
        model_config, dtype=dtypes[shape.compute_bytes], param_dtype=dtypes[shape.param_bytes],
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


