"""``reczero traces generate`` and ``reczero traces import``: warm-start traces for RecOne."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reczero_jax.config import DTYPES, LAYOUTS

TEMPLATE = "template"


def register(subparsers) -> None:
    """Add the ``traces`` command group (``generate``, ``import``) to the ``reczero`` parser."""
    group = subparsers.add_parser("traces", help="warm-start reasoning traces for RecOne")
    commands = group.add_subparsers(dest="traces_command", required=True, metavar="SUBCOMMAND")

    generate = commands.add_parser(
        "generate", help="write four-tag traces with a teacher model (or the template)",
        description=(
            "Sample one answer per sample from the teacher; an answer that fails the format "
            "rule or misses the true rating is sampled once more with the true rating given as "
            "a hint (reczero_jax.traces.rules.RATING_HINT) and kept only if it then passes. "
            "Saved records hold no prompt, so the hint never reaches training. "
            "--teacher template writes the built-in scaffold trace of every sample instead."))
    generate.add_argument("--teacher", required=True,
                          help="Hugging Face model directory (Llama/Qwen2), or 'template'")
    _data_arguments(generate)
    generate.add_argument("--n", type=int, default=1000,
                          help="the first N samples of the split (0: all; the paper used ~1000)")
    generate.add_argument("--out", type=Path, default=Path("traces.jsonl"))
    generate.add_argument("--max-prompt-tokens", type=int, default=6000,
                          help="prompt budget, the hint included (PAPER.md: 6000)")
    generate.add_argument("--max-new-tokens", type=int, default=1024)
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument("--temperature", type=float, default=0.6,
                          help="sampling temperature (0: greedy; 0.6 is DeepSeek-R1's advice)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--layout", choices=LAYOUTS, default="chat",
                          help="prompt layout (see reczero_jax.prompts)")
    generate.add_argument("--dtype", choices=DTYPES, default="float32",
                          help="teacher compute and parameter dtype")
    generate.set_defaults(func=run_generate)

    imported = commands.add_parser(
        "import", help="validate external traces (JSON lines) against the samples",
        description=(
            "Check every line of FILE: JSON object with user_id, item_id, response; a sample "
            "of the split; the four-tag format rule; the true rating; first trace per sample. "
            "Prints counts by reason with file:line examples and writes the valid traces, "
            "normalised, to --out. Exit status 1 when no line is valid."))
    imported.add_argument("file", type=Path, help="JSON-lines trace file")
    _data_arguments(imported)
    imported.add_argument("--out", type=Path, help="write the valid traces here (default: only check)")
    imported.set_defaults(func=run_import)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path,
                        help="directory from `reczero data prepare`")
    parser.add_argument("--split", default="train")


def _load_samples(data: Path, split: str, limit: int = 0) -> list[dict]:
    from reczero_jax.data import load_split

    source = load_split(data, split)
    count = len(source) if limit <= 0 else min(limit, len(source))
    return [source[i] for i in range(count)]


def _print_counts(title: str, counts: dict[str, int]) -> None:
    print(title)
    for name, count in counts.items():
        print(f"  {name}: {count}")


def run_generate(args: argparse.Namespace) -> int:
    from reczero_jax.traces.io import write_traces

    samples = _load_samples(args.data, args.split, args.n)
    if args.teacher == TEMPLATE:
        from reczero_jax.traces.template import template_records

        records, counts = template_records(samples)
        _print_counts("template traces (a format scaffold; only rating_equals_truth of them pass "
                      "`traces import`):", counts)
    else:
        records, counts = _teacher_records(args, samples)
        _print_counts(f"teacher {args.teacher}:", counts)
    written = write_traces(args.out, records)
    print(f"wrote {written} traces to {args.out}")
    return 0


def _teacher_records(args: argparse.Namespace, samples: list[dict]):
    from transformers import AutoTokenizer

    from reczero_jax.models import from_pretrained
    from reczero_jax.models.dtypes import JAX_DTYPES
    from reczero_jax.models.hf import check_model_dir
    from reczero_jax.traces.teacher import generate_traces

    check_model_dir(args.teacher, "--teacher",
                    "convert one with `reczero model convert-gguf`, or pass --teacher template")
    dtype = JAX_DTYPES[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    model = from_pretrained(args.teacher, dtype=dtype, param_dtype=dtype)
    return generate_traces(model, tokenizer, samples, max_prompt_tokens=args.max_prompt_tokens,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           temperature=args.temperature, seed=args.seed, layout=args.layout,
                           teacher=Path(args.teacher).name)


def run_import(args: argparse.Namespace) -> int:
    from reczero_jax.traces.io import validate_traces, write_traces

    try:
        records, report = validate_traces(args.file, _load_samples(args.data, args.split))
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.format())
    if args.out:
        print(f"wrote {write_traces(args.out, records)} traces to {args.out}")
    return 0 if records else 1
