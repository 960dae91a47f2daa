"""Data pipeline cost on MovieLens-100k (the recbole wheel copy), CPU, one process:

* ``read``: ``read_source`` (raw files -> interactions table);
* ``samples``: ``build_samples`` (timelines, filter, per-user split; records not yet built);
* ``prepare``: the whole ``tfds_builder.prepare`` (read + samples + building every record +
  TFDS serialisation + array_record writing), into a fresh directory;
* ``load_split``: decoding stored records back into sample dicts, records/s;
* ``pipeline``: grain batches with the SmolLM2 tokenizer (chat template, ``encode_prompt``,
  left padding into buckets), prompts/s at the given global batch size.

Wall seconds and this process's CPU seconds are both given: on a shared machine the wall time
also counts waiting for a core. Prompt token lengths (template included) are over a seeded
sample of each split.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import describe_machine, emit_report, markdown_table


def timed(fn):
    """(result, wall seconds, CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--global-batch", type=int, default=8, help="prompts per batch")
    parser.add_argument("--batches", type=int, default=20, help="pipeline batches timed")
    parser.add_argument("--max-prompt-tokens", type=int, default=6000)
    parser.add_argument("--length-sample", type=int, default=1000, help="prompts per split")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)

    from reczero_jax.data import load_split
    from reczero_jax.data.cli import load_tokenizer
    from reczero_jax.data.pipeline import make_pipeline, prompt_length_stats
    from reczero_jax.data.samples import build_samples
    from reczero_jax.data.sources import read_source
    from reczero_jax.data.tfds_builder import SourceConfig, prepare

    rows = []
    table, wall, cpu = timed(lambda: read_source("movielens-100k"))
    rows.append(["read", len(table.interactions), "interactions", wall, cpu])
    sample_set, wall, cpu = timed(lambda: build_samples(table))
    kept = sum(len(targets) for targets in sample_set.splits.values())
    rows.append(["samples", kept, "samples", wall, cpu])
    with tempfile.TemporaryDirectory() as out:
        config = SourceConfig.for_dataset("movielens-100k")
        (version_dir, _), wall, cpu = timed(lambda: prepare(config, out))
        rows.append(["prepare", kept, "samples", wall, cpu])
        train = load_split(version_dir, "train")
        count = min(len(train), 20_000)
        _, wall, cpu = timed(lambda: train.__getitems__(range(count)))
        rows.append(["load_split", count, "records", wall, cpu])

        tokenizer, load_wall, _ = timed(lambda: load_tokenizer(None))
        iterator = iter(
            make_pipeline(
                train,
                tokenizer,
                global_batch_size=args.global_batch,
                max_prompt_tokens=args.max_prompt_tokens,
                process_index=0,
                process_count=1,
            )
        )
        next(iterator)  # first batch: thread start-up
        batches, wall, cpu = timed(lambda: [next(iterator) for _ in range(args.batches)])
        prompts = args.batches * args.global_batch
        rows.append(["pipeline", prompts, "prompts", wall, cpu])
        widths = sorted({batch["prompt_ids"].shape[1] for batch in batches})
        lengths = {
            split: prompt_length_stats(
                load_split(version_dir, split),
                tokenizer,
                max_prompt_tokens=args.max_prompt_tokens,
                sample_size=args.length_sample,
            )
            for split in ("train", "validation", "test")
        }

    stage_rows = [
        [stage, n, unit, wall, cpu, f"{n / wall:,.0f} {unit}/s"]
        for stage, n, unit, wall, cpu in rows
    ]
    length_rows = [
        [
            split,
            s["count"],
            s["of"],
            s["mean"],
            s["p50"],
            s["p90"],
            s["p99"],
            s["max"],
            s["trimmed"],
        ]
        for split, s in lengths.items()
    ]
    report = "\n\n".join(
        [
            f"Data pipeline benchmark, MovieLens-100k ({describe_machine()}).",
            markdown_table(["stage", "n", "unit", "wall s", "CPU s", "rate (wall)"], stage_rows),
            f"pipeline: global batch {args.global_batch}, padded widths seen {widths}, "
            f"budget {args.max_prompt_tokens}; SmolLM2 tokenizer loaded from GGUF in "
            f"{load_wall:.1f} s.",
            markdown_table(
                ["split", "prompts", "of", "mean", "p50", "p90", "p99", "max", "trimmed"],
                length_rows,
            ),
        ]
    )
    return emit_report(report, args.out)


if __name__ == "__main__":
    main()
