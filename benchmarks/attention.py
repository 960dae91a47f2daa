"""Attention implementations side by side in the GRPO update: step time and compiled memory.

Per implementation (``model.attention``) and shape (P, R, G): the same GRPO update as
``benchmarks.train_step``'s ``shared`` arm (same small decoder, same random batch), with

* the compiled update's per-device peak bytes (``Trainer.memory_report``: XLA's memory
  analysis, arguments + outputs - donated + temporaries; deterministic, nothing allocated),
* the warm step time (median of ``--repeats`` after a compiling warm-up), only for shapes
  up to ``--time-up-to`` prompt + response tokens (longer shapes: memory only; the
  materialised update at (4096, 1024, 8) would need its ~GiB of scores on this machine).

Goals (issue 16): at (4096, 1024, 8) blockwise's peak memory <= 1/4 of materialized's; at
(1024, 128, 8) its step time within 1.25x of materialized's.

Run: ``python -m benchmarks.attention [--shapes 1024x128x8 4096x1024x8] [--impls ...]``
(CPU: materialized and blockwise; splash runs on CPU only in Pallas's interpreter, far too
slow to time, so it is a TPU arm; cudnn needs a GPU).

``python -m benchmarks.attention --gpu-check`` (on a GPU machine): cudnn and blockwise
against materialized on one attention call (bf16, forward and gradients), then the table
with the cudnn arm in bf16 compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import Timing, describe_machine, emit_report, markdown_table, time_call
from benchmarks.sampling import Shape
from benchmarks.train_step import DecoderSize, as_rollout, make_batch

DEFAULT_SHAPES = ("1024x128x8", "4096x1024x8")
DEFAULT_IMPLS = {"cpu": ("materialized", "blockwise"), "gpu": ("materialized", "blockwise", "cudnn"),
                 "tpu": ("materialized", "blockwise", "splash")}
GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Result:
    shape: Shape
    impl: str
    peak_bytes: float
    temp_bytes: float
    timing: Timing | None
    grad_norm: float | None


def measure(impl: str, shape: Shape, size: DecoderSize, dtype, repeats: int, timed: bool
            ) -> Result:
    from flax import nnx

    from reczero_jax.mesh import single_device_mesh
    from reczero_jax.models import Decoder
    from reczero_jax.train.step import GRPOConfig, OptimConfig, Trainer

    config = size.config()
    model = Decoder(config, rngs=nnx.Rngs(0), dtype=dtype, attention=impl)
    trainer = Trainer(model, single_device_mesh(), OptimConfig(),
                      GRPOConfig(group_size=shape.samples, max_new_tokens=shape.new_tokens))
    rollout = as_rollout(make_batch(shape, config.vocab_size))
    report = trainer.memory_report(rollout)
    timing = grad_norm = None
    if timed:
        last = {}
        timing = time_call(lambda: last.update(trainer.grpo_step(rollout)), repeats=repeats)
        grad_norm = float(last["grad_norm"])
    return Result(shape, impl, report["peak_bytes"], report["temp_size_in_bytes"], timing,
                  grad_norm)


def results_table(results: list[Result]) -> str:
    reference = {res.shape: res for res in results if res.impl == "materialized"}
    rows = []
    for res in results:
        ref = reference.get(res.shape)
        seconds = res.timing.median_s if res.timing else None
        rows.append([
            str(res.shape), res.impl, f"{res.peak_bytes / GIB:.3f}", f"{res.temp_bytes / GIB:.3f}",
            f"{res.peak_bytes / ref.peak_bytes:.2f}" if ref else "-",
            f"{seconds:.3f}" if seconds else "not timed",
            f"{seconds / ref.timing.median_s:.2f}x" if seconds and ref and ref.timing else "-",
            f"{res.grad_norm:.5g}" if res.grad_norm is not None else "-"])
    return markdown_table(["shape", "attention", "peak GiB/device", "temporaries GiB",
                           "peak / materialized", "warm s/step", "time / materialized",
                           "grad norm"], rows)


def gpu_check() -> str:
    """cudnn and blockwise vs materialized on one bf16 attention call with a prefix and left
    padding: max |difference| of outputs (valid rows) and of gradients."""
    from reczero_jax.models import attention
    from reczero_jax.models.decoder import causal_mask

    rng = np.random.default_rng(0)
    b, g, t, p, h, k, d = 2, 4, 200, 300, 8, 2, 64
    arrays = [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in (
        (b, g, t, h, d), (b, g, t, k, d), (b, g, t, k, d), (b, p, k, d), (b, p, k, d))]
    prefix_mask = jnp.asarray(np.arange(p) >= np.array([0, 37])[:, None])
    valid = jnp.ones((b, g, t), bool)
    mask = causal_mask(valid)
    rows = []
    for name in ("blockwise", "cudnn"):
        for with_prefix in (False, True):
            def loss(fn, q, k_, v, pk, pv, with_prefix=with_prefix):
                prefix = (pk, pv, prefix_mask) if with_prefix else None
                return fn(q, k_, v, mask, prefix).astype(jnp.float32).sum(), fn(
                    q, k_, v, mask, prefix)
            grad = jax.grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True)
            ref_grads, ref_out = grad(attention.materialized, *arrays)
            grads, out = grad(attention.implementation(name, dtype=jnp.bfloat16), *arrays)
            diff = lambda a, c: float(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32)).max())
            rows.append([name, with_prefix, diff(out, ref_out),
                         max(diff(x, y) for x, y in zip(grads, ref_grads, strict=True))])
    return markdown_table(["attention", "prefix", "max |out - ref| (bf16)",
                           "max |grad - ref| (bf16)"], rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="PxRxG: prompt x response tokens x samples per prompt")
    parser.add_argument("--impls", nargs="+", help="attention implementations (default: "
                        "materialized, blockwise and the backend's kernel where it has one)")
    parser.add_argument("--repeats", type=int, default=2, help="timed warm steps (median)")
    parser.add_argument("--time-up-to", type=int, default=2048,
                        help="time only shapes with P + R up to this many tokens")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype")
    parser.add_argument("--gpu-check", action="store_true",
                        help="cudnn equality check, then the table with bf16 compute")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    sections = []
    if args.gpu_check:
        sections.append(gpu_check())
        args.dtype = "bfloat16"
    dtype = jnp.dtype(args.dtype)
    impls = args.impls or DEFAULT_IMPLS.get(jax.default_backend(), DEFAULT_IMPLS["cpu"])
    size = DecoderSize()
    results = []
    for text in args.shapes:
        shape = Shape.parse(text, 1)
        timed = shape.prompt + shape.new_tokens <= args.time_up_to
        for impl in impls:
            start = time.perf_counter()
            results.append(measure(impl, shape, size, dtype, args.repeats, timed))
            print(f"{shape} {impl}: peak {results[-1].peak_bytes / GIB:.3f} GiB"
                  + (f", {results[-1].timing.median_s:.3f} s/step" if timed else "")
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    sections[:0] = [
        f"Attention implementations in the GRPO update ({describe_machine()}).",
        f"Decoder: {size.layers} layers, width {size.hidden}, {size.heads} query / "
        f"{size.kv_heads} kv heads of {size.hidden // size.heads}, MLP {size.mlp}, vocabulary "
        f"{size.vocab}, {args.dtype} compute; one prompt per step; blocks "
        f"{_blocks()}. Peak = XLA's compiled memory analysis per device (arguments + outputs "
        f"- donated + temporaries). Times: median of {args.repeats} warm steps; shapes over "
        f"{args.time_up_to} tokens are not timed."]
    sections.insert(1, results_table(results))
    return emit_report("\n\n".join(sections), args.out)


def _blocks() -> str:
    from reczero_jax.models import attention

    return f"block_q {attention.BLOCK_Q}, block_k {attention.BLOCK_K}"


if __name__ == "__main__":
    main()
