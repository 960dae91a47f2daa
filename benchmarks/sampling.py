"""Sampling throughput on SmolLM2-135M, CPU, one process, three arms doing the same work:

* ``shared``: our sampler, each prompt prefilled once, G samples decoding against one copy of
  its KV cache (``generate(..., shared_prompt=True)``);
* ``naive``: our sampler with the prompt repeated G times (``shared_prompt=False``);
* ``transformers``: ``model.generate`` (torch, ``num_return_sequences=G``, ``use_cache=True``).

Every arm samples at temperature 1 with no top-k / top-p and generates exactly R tokens per
sample (ours: ``eos_ids=()``; transformers: ``min_new_tokens=R``), from random prompts of
exactly P tokens (no padding). Throughput is generated tokens per second, B*G*R / median warm
time; our compile time (first call - warm median) is reported apart.

Work counted per arm (fp32; L layers, d width, H query / K kv heads, D head dim, I MLP width,
V vocab; N = L (2 d H D + 2 d K D + 3 d I) + d V, the weights used in matmuls per token, the
tied embedding counted once as the output head):

* FLOPs = prefill + decode, where a token at which attention sees n keys costs
  2 N + 4 L H D n (QK^T and AV), and the prefill computes logits only at its last position:
  prefill = rows_p (2 (N - d V) P + 2 d V + 4 L H D P (P + 1) / 2);
  decode = B G sum_{j=1}^{R-1} (2 N + 4 L H D (P + j)) (the first token comes from the prefill).
* bytes = what must be read: the weights (4 N) once per forward pass (the prefill and each of
  the R - 1 decode steps) plus, at each decode step j, the KV cache it attends to:
  4 * 2 L K D (rows_p P + B G j).

rows_p, the prompt rows prefilled and read at every step, is B for ``shared`` and B*G for
the other two arms, so the naive arms are charged for the work they really do. Achieved
rates are that work over the whole warm call (prefill + decode), divided by the ceilings of
``benchmarks.common`` (fp32 matmul FLOP/s, in-place copy bytes/s) measured in this run.

Mesh case (``--mesh 2x4x1 1x8x1``, DATAxFSDPxTENSOR on simulated CPU devices, set up before
jax starts): the ``shared`` arm with the weights in the training layout (ZeRO-3 over fsdp) and
``generate``'s default rollout layout side by side, with the collective bytes per chip of one
decode step and of the reshard, read from the compiled programs
(``sampling.compile_rollout`` + ``collectives.collective_bytes``). Simulated devices share
this machine's cores, so their tokens/s are only indicative; the bytes are the measure.
SmolLM2's 9 heads and 3 kv heads divide no mesh of 2 or more chips here, so its attention is
replicated in the rollout layout (the rules' stated fallback) and tensor must be 1.

Run: ``python -m benchmarks.sampling [--shapes 1024x128x8 256x64x8 1024x64x4] [--out FILE]``;
``python -m benchmarks.sampling --mesh 2x4x1 1x8x1 --shapes 64x16x4 --batch 8``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import (
    Ceilings,
    Timing,
    cpu_count,
    describe_machine,
    emit_report,
    markdown_table,
    measure_ceilings,
    speedup_table,
    time_call,
)
from reczero_jax.models.config import ModelConfig

DEFAULT_SHAPES = ("1024x128x8", "256x64x8", "1024x64x4")
DEFAULT_MODEL_DIR = Path("artifacts/smollm2")
ARMS = ("shared", "naive", "transformers")
FP32_BYTES = 4


@dataclasses.dataclass(frozen=True)
class Shape:
    """B prompts of P tokens, G samples of R new tokens each."""

    prompt: int
    new_tokens: int
    samples: int
    batch: int = 1

    @classmethod
    def parse(cls, text: str, batch: int) -> Shape:
        try:
            prompt, new_tokens, samples = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape {text!r} is not PxRxG (e.g. 1024x128x8)") from None
        return cls(prompt, new_tokens, samples, batch)

    @property
    def generated(self) -> int:
        return self.batch * self.samples * self.new_tokens

    def __str__(self) -> str:
        return f"P={self.prompt} R={self.new_tokens} G={self.samples} B={self.batch}"


# ----------------------------------------------------------------------------- work model


def matmul_weights(config: ModelConfig) -> int:
    """N: weights used in matmuls per token, blocks plus the output head."""
    d, hd = config.hidden_size, config.head_dim
    attention = 2 * d * config.num_heads * hd + 2 * d * config.num_kv_heads * hd
    per_layer = attention + 3 * d * config.intermediate_size
    return config.num_layers * per_layer + d * config.vocab_size


def generation_flops(config: ModelConfig, shape: Shape, prompt_rows: int) -> float:
    """Model FLOPs of prefill + decode (formula in the module docstring)."""
    n, head = matmul_weights(config), config.hidden_size * config.vocab_size
    per_key = 4 * config.num_layers * config.num_heads * config.head_dim
    p, r = shape.prompt, shape.new_tokens
    prefill = prompt_rows * (2 * (n - head) * p + 2 * head + per_key * p * (p + 1) / 2)
    keys_seen = (r - 1) * p + r * (r - 1) / 2  # sum_{j=1}^{R-1} (P + j)
    decode = shape.batch * shape.samples * (2 * n * (r - 1) + per_key * keys_seen)
    return float(prefill + decode)


def generation_bytes(config: ModelConfig, shape: Shape, prompt_rows: int) -> float:
    """Bytes that must be read: weights per forward pass, KV cache per decode step."""
    weights = FP32_BYTES * matmul_weights(config)
    kv_per_key = FP32_BYTES * 2 * config.num_layers * config.num_kv_heads * config.head_dim
    r = shape.new_tokens
    response_keys = shape.batch * shape.samples * r * (r - 1) / 2  # sum_{j=1}^{R-1} B G j
    kv = kv_per_key * (prompt_rows * shape.prompt * (r - 1) + response_keys)
    return float(weights * r + kv)


# ----------------------------------------------------------------------------- arms


def ensure_model_dir(model_dir: Path) -> Path:
    """The SmolLM2 HF directory, converted from the GGUF asset the first time."""
    if not (model_dir / "config.json").is_file():
        from reczero_jax.models.gguf import convert_gguf

        print(f"converting SmolLM2 GGUF into {model_dir} (once)")
        convert_gguf(out_dir=model_dir)
    return model_dir


def our_arm(model, shared: bool, ids: np.ndarray, shape: Shape) -> Callable[[], object]:
    from reczero_jax.sampling import generate

    mask = np.ones_like(ids)

    def run():
        out = generate(model, ids, mask, num_samples=shape.samples,
                       max_new_tokens=shape.new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                       eos_ids=(), rng=jax.random.key(0), shared_prompt=shared)
        return out.tokens

    return run


def transformers_arm(model, ids: np.ndarray, shape: Shape) -> Callable[[], object]:
    import torch

    input_ids = torch.as_tensor(ids, dtype=torch.long)

    def run():
        with torch.inference_mode():
            return model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                  do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  num_return_sequences=shape.samples,
                                  max_new_tokens=shape.new_tokens,
                                  min_new_tokens=shape.new_tokens, use_cache=True,
                                  pad_token_id=0)

    return run


def check_output(arm: str, tokens, shape: Shape) -> None:
    """Every arm must have generated exactly B*G*R tokens, or the comparison is void."""
    got = tuple(np.asarray(tokens).shape)
    want = ((shape.batch * shape.samples, shape.prompt + shape.new_tokens)
            if arm == "transformers" else (shape.batch, shape.samples, shape.new_tokens))
    if got != want:
        raise RuntimeError(f"{arm} returned tokens of shape {got}, expected {want}")


@dataclasses.dataclass(frozen=True)
class Result:
    shape: Shape
    arm: str
    timing: Timing
    flops: float
    bytes: float

    @property
    def tokens_per_s(self) -> float:
        return self.shape.generated / self.timing.median_s


def measure(arm: str, shape: Shape, ours, theirs, config: ModelConfig, repeats: int) -> Result:
    rng = np.random.RandomState(0)
    ids = rng.randint(100, config.vocab_size, (shape.batch, shape.prompt)).astype(np.int32)
    if arm == "transformers":
        fn = transformers_arm(theirs, ids, shape)
        # Eager torch compiles nothing: a short call warms its allocator and kernels.
        warmup = transformers_arm(theirs, ids[:, :16],
                                  dataclasses.replace(shape, prompt=16, new_tokens=2))
    else:
        fn, warmup = our_arm(ours, arm == "shared", ids, shape), None
    last = {}

    def recorded():
        last["tokens"] = fn()
        return last["tokens"]

    timing = time_call(recorded, repeats=repeats, warmup=warmup)
    check_output(arm, last["tokens"], shape)
    prompt_rows = shape.batch * (1 if arm == "shared" else shape.samples)
    return Result(shape, arm, timing, generation_flops(config, shape, prompt_rows),
                  generation_bytes(config, shape, prompt_rows))


# ----------------------------------------------------------------------------- report


def results_table(results: list[Result], ceilings: Ceilings) -> str:
    rows = []
    for res in results:
        seconds = res.timing.median_s
        compile_s = "eager" if res.arm == "transformers" else f"{res.timing.compile_s:.1f}"
        rows.append([str(res.shape), res.arm, f"{res.tokens_per_s:.1f}", f"{seconds:.2f}",
                     compile_s, f"{res.flops / seconds / 1e9:.1f}",
                     f"{100 * res.flops / seconds / ceilings.matmul_flops:.0f}%",
                     f"{res.bytes / seconds / 1e9:.2f}",
                     f"{100 * res.bytes / seconds / ceilings.copy_bytes:.0f}%"])
    return markdown_table(["shape", "arm", "tokens/s", "warm s", "compile s", "GFLOP/s",
                           "of matmul", "GB/s", "of copy"], rows)


def ratios_table(results: list[Result]) -> str:
    # Same tokens in every arm: time ratios are inverse throughput ratios.
    return speedup_table(results, ("naive", "transformers"), lambda res: 1 / res.tokens_per_s,
                         ("shared / naive", "shared / transformers"))


# ----------------------------------------------------------------------------- mesh case


def parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        data, fsdp, tensor = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"mesh {text!r} is not DATAxFSDPxTENSOR (e.g. 2x4x1)") from None
    return data, fsdp, tensor


def mesh_rows(model_dir: Path, mesh_shape: tuple[int, int, int], shape: Shape,
              repeats: int) -> list[list[str]]:
    """One row per layout (training, rollout): decode and reshard collectives, tokens/s."""
    from flax import nnx

    from reczero_jax.collectives import collective_bytes, format_bytes
    from reczero_jax.mesh import make_mesh
    from reczero_jax.models.hf import from_pretrained
    from reczero_jax.sampling import bucket_length, compile_rollout

    mesh = make_mesh(*mesh_shape)
    model = from_pretrained(model_dir, mesh=mesh)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    rng = np.random.RandomState(0)
    ids = rng.randint(100, model.config.vocab_size, (shape.batch, shape.prompt)).astype(np.int32)
    rows = []
    for rollout_layout in (False, True):
        programs = compile_rollout(model, batch=shape.batch,
                                   prompt_length=bucket_length(shape.prompt),
                                   num_samples=shape.samples, max_new_tokens=shape.new_tokens,
                                   rollout_layout=rollout_layout)
        decode = collective_bytes(programs["decode"].as_text()).scaled(1 / shape.new_tokens)
        reshard = (collective_bytes(programs["reshard"].as_text()).total
                   if "reshard" in programs else 0.0)

        def run(layout=rollout_layout):
            from reczero_jax.sampling import generate

            return generate(model, ids, np.ones_like(ids), num_samples=shape.samples,
                            max_new_tokens=shape.new_tokens, eos_ids=(), rng=jax.random.key(0),
                            rollout_layout=layout).tokens

        timing = time_call(run, repeats=repeats)
        rows.append(["x".join(map(str, mesh_shape)), str(shape),
                     "rollout" if rollout_layout else "training",
                     f"{decode.total / 1e6:.2f}", f"{100 * decode.total / param_bytes:.2f}%",
                     format_bytes(decode.by_kind), f"{reshard / 1e6:.1f}",
                     f"{shape.generated / timing.median_s:.1f}", f"{timing.compile_s:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def mesh_main(args) -> str:
    from reczero_jax.plan_compiled import simulated_devices

    meshes = [parse_mesh(text) for text in args.mesh]
    simulated_devices(max(d * f * t for d, f, t in meshes))  # before jax starts its backends
    model_dir = ensure_model_dir(args.model_dir)
    rows = [row for mesh_shape in meshes for text in args.shapes
            for row in mesh_rows(model_dir, mesh_shape, Shape.parse(text, args.batch),
                                 args.repeats)]
    table = markdown_table(["mesh", "shape", "layout", "decode MB/token", "of params",
                            "by kind", "reshard MB", "tokens/s", "compile s"], rows)
    report = "\n\n".join([
        f"Sampling on a mesh of simulated CPU devices, SmolLM2-135M fp32 "
        f"({describe_machine()}). Collective bytes per chip from the compiled programs; "
        f"tokens/s of simulated devices sharing the cores are only indicative. Median of "
        f"{args.repeats} warm call(s).", table])
    return emit_report(report, args.out)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="PxRxG: prompt tokens x new tokens x samples per prompt")
    parser.add_argument("--batch", type=int, default=1, help="prompts per call (B)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed warm calls per arm after the warm-up (median reported)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help="SmolLM2 HF directory (converted from the GGUF asset if absent)")
    parser.add_argument("--torch-threads", type=int, default=cpu_count(),
                        help="torch.set_num_threads (default: the cores XLA's CPU pool uses)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--mesh", nargs="+", metavar="DATAxFSDPxTENSOR",
                        help="run the mesh case instead: training vs rollout layout on "
                             "simulated CPU devices")
    args = parser.parse_args(argv)
    if args.mesh:
        return mesh_main(args)
    shapes = [Shape.parse(text, args.batch) for text in args.shapes]

    import torch
    import transformers

    from reczero_jax.models.hf import from_pretrained

    torch.set_num_threads(args.torch_threads)
    model_dir = ensure_model_dir(args.model_dir)
    ours = from_pretrained(model_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                               dtype=torch.float32).eval()
    ceilings = measure_ceilings()
    print(describe_machine())
    print(f"ceilings: {ceilings.describe()}")

    results = []
    for shape in shapes:
        for arm in args.arms:
            start = time.perf_counter()
            results.append(measure(arm, shape, ours, theirs, ours.config, args.repeats))
            print(f"{shape} {arm}: {results[-1].tokens_per_s:.1f} tokens/s "
                  f"({time.perf_counter() - start:.0f} s with warm-up)", flush=True)

    report = "\n\n".join([
        f"Sampling benchmark, SmolLM2-135M fp32 on CPU ({describe_machine()}).",
        f"Ceilings measured in this run: {ceilings.describe()}. torch.set_num_threads("
        f"{args.torch_threads}); XLA's CPU thread pool runs on the {cpu_count()} cores. Median of "
        f"{args.repeats} warm call(s) after a warm-up; transformers attention: "
        f"{theirs.config._attn_implementation}.",
        results_table(results, ceilings),
        ratios_table(results),
    ])
    return emit_report(report, args.out)


if __name__ == "__main__":
    main()
