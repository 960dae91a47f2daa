"""Helpers every benchmark shares: what machine ran it, what that machine can do at best,
how a call is timed, and how the results are printed.

Ceilings are measured here with jax, not taken from a datasheet:

* matmul: ``C = A @ B`` with A, B fp32 ``[n, n]`` counts ``2 n^3`` FLOPs.
* copy: ``x <- x + 1`` in place on an fp32 array of ``nbytes`` (far larger than the caches)
  moves ``2 * nbytes`` (read once, write once), the STREAM "copy" convention.

An arm's "fraction of a ceiling" is its achieved rate divided by the ceiling's rate.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from importlib import metadata

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of one timed function: the warm-up call and the warm calls after it.
    When the warm-up is the same call (jax: it compiles), ``compile_s`` = warm-up - median
    is the one-off cost of the first call."""

    warmup_s: float
    warm_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.warm_s)

    @property
    def compile_s(self) -> float:
        return max(self.warmup_s - self.median_s, 0.0)


def time_call(fn: Callable[[], object], *, repeats: int = 3,
              warmup: Callable[[], object] | None = None) -> Timing:
    """Call ``warmup`` (default: ``fn``) once, then ``fn`` ``repeats`` times; each call waits
    for its result (``jax.block_until_ready``; torch tensors pass through it untouched, and
    torch CPU calls return finished). A cheaper ``warmup`` suits code that does not compile."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    def timed(call) -> float:
        start = time.perf_counter()
        jax.block_until_ready(call())
        return time.perf_counter() - start

    first = timed(warmup or fn)
    return Timing(first, tuple(timed(fn) for _ in range(repeats)))


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the host's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine(packages: Sequence[str] = ("jax", "jaxlib", "flax", "torch",
                                                "transformers", "numpy")) -> str:
    """One line: CPU, cores, jax backend/devices, Python and the versions of ``packages``."""
    versions = ", ".join(f"{name} {_version(name)}" for name in packages)
    devices = jax.devices()
    return (f"{_cpu_model()}, {cpu_count()} cores; jax backend {jax.default_backend()} with "
            f"{len(devices)} device(s); Python {platform.python_version()}; {versions}")


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Best rates measured on this machine: fp32 matmul FLOP/s and copy bytes/s."""

    matmul_flops: float
    copy_bytes: float

    def describe(self) -> str:
        return (f"fp32 matmul {self.matmul_flops / 1e9:.1f} GFLOP/s, "
                f"copy {self.copy_bytes / 1e9:.1f} GB/s (read + write)")


def measure_matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an fp32 ``[n, n] @ [n, n]`` (2 n^3 FLOPs), best of ``repeats`` warm calls."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    timing = time_call(lambda: matmul(a, b), repeats=repeats)
    return 2 * n**3 / min(timing.warm_s)


def measure_copy_bytes(nbytes: int = 512 * 2**20, repeats: int = 10) -> float:
    """Bytes/s of ``x <- x + 1`` over ``nbytes`` of fp32 (counts read + write = 2 * nbytes),
    best of ``repeats`` warm calls. The input is donated so the result reuses its buffer:
    a fresh output buffer each call would time the kernel's page faults, not the memory."""
    step = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    held = [jnp.zeros((nbytes // 4,), jnp.float32)]

    def copy():
        held[0] = step(held[0])
        return held[0]

    timing = time_call(copy, repeats=repeats)
    return 2 * nbytes / min(timing.warm_s)


def measure_ceilings() -> Ceilings:
    return Ceilings(measure_matmul_flops(), measure_copy_bytes())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are written with 3 significant digits."""
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} headers")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def speedup_table(results, others: Sequence[str], cost: Callable[[object], float],
                  headers: Sequence[str]) -> str:
    """Per shape, cost(other) / cost(shared) for each arm in ``others`` ("-" when absent).

    ``results`` hold ``.shape``, ``.arm``; ``cost`` is lower-is-better (seconds per step, or
    seconds per token), so a ratio above 1 says how many times faster the shared arm is.
    """
    by_shape: dict[object, dict[str, object]] = {}
    for res in results:
        by_shape.setdefault(res.shape, {})[res.arm] = res
    rows = [[str(shape)] + [f"{cost(arms[other]) / cost(arms['shared']):.2f}x"
                            if other in arms else "-" for other in others]
            for shape, arms in by_shape.items() if "shared" in arms]
    return markdown_table(["shape", *headers], rows)


def emit_report(report: str, out=None) -> str:
    """Print a markdown report and, if ``out`` (a Path) is given, also write it there."""
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report + "\n")
    return report
