"""How fast a few-row matmul can read its weights on this CPU, in three libraries, beside how
fast XLA can read the same bytes with nothing to compute (issue 21's decode roofline).

A decode step multiplies ``rows`` activations (B prompts x G samples) by every weight matrix:

    y = x @ W_l,  x [rows, K],  W_l [K, N],  l = 1..layers (distinct weights, as in a model)

so at 8 rows each weight is used for 8 multiply-adds and the step is bound by reading W.
Arms, each on the same stacked fp32 weights ``[layers, K, N]``:

* ``xla``: the layers in a ``lax.scan`` (as ``Decoder.decode_step`` runs them);
* ``numpy`` (OpenBLAS) and ``torch``: a Python loop of ``x @ W[l]``;
* ``xla read``: ``W.sum(axis=(1, 2))``, the same bytes read once with no dot: the most a
  weight-streaming kernel could expect from XLA here.

Reported per arm: ms per layer and the weight bytes read per second (``K N 4 / t``), beside
the machine's copy ceiling (``benchmarks.common``: read + write counted). Shapes are
SmolLM2-135M's: its MLP matrices (up/gate and down) and its tied LM head.

    python -m benchmarks.dot_rows [--rows 8] [--repeats 7]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    cpu_count,
    describe_machine,
    markdown_table,
    measure_ceilings,
    time_call,
)

# (K, N, layers): SmolLM2-135M's [576, 1536] and [1536, 576] MLP matrices over its 30 layers,
# and its [576, 49152] LM head.
SHAPES = ((576, 1536, 30), (1536, 576, 30), (576, 49152, 1))


def arms(x: np.ndarray, weights: np.ndarray):
    """{arm: a call computing every layer's product (or, for ``xla read``, reading W)}."""
    import torch

    layers = weights.shape[0]
    x_jax, w_jax = jnp.asarray(x), jnp.asarray(weights)
    scanned = jax.jit(lambda x, w: jax.lax.scan(lambda c, w_l: (c, c @ w_l), x, w)[1])
    read = jax.jit(lambda w: w.sum(axis=(1, 2)))
    x_torch, w_torch = torch.from_numpy(x), torch.from_numpy(weights)
    return {
        "xla": lambda: scanned(x_jax, w_jax),
        "numpy": lambda: [x @ weights[layer] for layer in range(layers)],
        "torch": lambda: [x_torch @ w_torch[layer] for layer in range(layers)],
        "xla read": lambda: read(w_jax),
    }


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="activation rows (B x G)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per arm (median)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(cpu_count())
    ceilings = measure_ceilings()
    rng = np.random.default_rng(0)
    rows = []
    for k, n, layers in SHAPES:
        weights = rng.standard_normal((layers, k, n), np.float32)
        x = rng.standard_normal((args.rows, k), np.float32)
        for arm, call in arms(x, weights).items():
            # The warm-up call compiles (xla) and faults the pages in (all arms).
            seconds = time_call(call, repeats=args.repeats).median_s / layers
            rows.append([f"[{args.rows}, {k}] x [{k}, {n}] x {layers}", arm,
                         f"{seconds * 1e3:.3f}", f"{k * n * 4 / seconds / 1e9:.1f}"])
    report = "\n\n".join([
        describe_machine(), f"Ceilings measured in this run: {ceilings.describe()}. "
        f"torch.set_num_threads({cpu_count()}).",
        markdown_table(["dot (per layer)", "arm", "ms per layer", "weight GB/s read"], rows)])
    print(report)
    return report


if __name__ == "__main__":
    main()
