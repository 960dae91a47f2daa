"""``make bench``: run every benchmark and write ``benchmarks/RESULTS.md``.

Each benchmark runs in its own process (so one's compiled programs and threads do not
distort the next) and prints a markdown report; this collects them under the machine
description, with the exact command of each.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import describe_machine

BENCHMARKS = (
    ("Sampling: shared-prompt sampler vs naive vs transformers generate", "benchmarks.sampling"),
    ("GRPO train step: shared-prompt vs naive vs PyTorch", "benchmarks.train_step"),
    ("Attention implementations in the GRPO update: memory and time", "benchmarks.attention"),
    ("Token reward vs host reward", "benchmarks.reward"),
    ("Data pipeline", "benchmarks.data_pipeline"),
    ("Whole GRPO step: reczero-jax vs TRL and Tunix", "benchmarks.peers"),
    ("Few-row matmuls: how fast each library reads the weights", "benchmarks.dot_rows"),
)
RESULTS = Path(__file__).with_name("RESULTS.md")


def main() -> int:
    sections = [f"# Benchmark results\n\n{describe_machine()}\n"]
    failed = []
    for title, module in BENCHMARKS:
        command = [sys.executable, "-m", module]
        print(f"[bench] {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        minutes = (time.perf_counter() - start) / 60
        body = done.stdout.strip() if done.returncode == 0 else (
            f"FAILED (exit {done.returncode}):\n\n```\n{done.stderr[-3000:]}\n```")
        if done.returncode:
            failed.append(module)
        sections.append(f"## {title}\n\nCommand: `python -m {module}` ({minutes:.1f} min)\n\n{body}\n")
    RESULTS.write_text("\n".join(sections))
    print(f"[bench] wrote {RESULTS}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
