"""``reczero train CONFIG [key=value ...] [--restart]``, ``reczero export`` and ``reczero eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="run RecZero (GRPO), RecOne (warm-start SFT + GRPO) or SFT",
        description="Train with a YAML config; key.sub=value arguments override it.")
    train.add_argument("config", help="YAML experiment config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    train.add_argument("--restart", action="store_true",
                       help="delete the checkpoints and logs in run_dir and start over (without "
                            "it, a run directory with checkpoints resumes from the latest)")
    train.set_defaults(func=_train)

    export = subparsers.add_parser(
        "export", help="write a run's checkpoint as a Hugging Face model directory",
        description="Restore a checkpoint's parameters and write safetensors, config.json and "
                    "the tokenizer (architecture and tokenizer from the run's model.path).")
    export.add_argument("--run", required=True, help="run directory of `reczero train`")
    export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--dtype", choices=("bfloat16", "float32"),
                        help="weight dtype (default: the parameters' own)")
    export.set_defaults(func=_export)

    evaluate = subparsers.add_parser(
        "eval", help="greedy evaluation of a model on a prepared split",
        description="Greedy decoding; MAE/RMSE (parse failures scored with the user's "
                    "average), parse and format rates, accuracies, cost.")
    evaluate.add_argument("--model", required=True, help="Hugging Face model directory")
    evaluate.add_argument("--data", required=True, help="directory from `reczero data prepare`")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--n", type=int, default=64, help="samples to evaluate (0: all)")
    evaluate.add_argument("--max-prompt-tokens", type=int, default=1024)
    evaluate.add_argument("--max-new-tokens", type=int, default=512)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--out", help="write the report as JSON here")
    evaluate.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from reczero_jax.config import load_config
    from reczero_jax.train.loop import run

    run(load_config(args.config, args.overrides), restart=args.restart)
    return 0


def _export(args: argparse.Namespace) -> int:
    from reczero_jax.train.export import export_run

    export_run(args.run, args.out, step=args.step, dtype=args.dtype)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from reczero_jax.baselines import markdown_table
    from reczero_jax.data import load_split
    from reczero_jax.evaluate import REPORT_COLUMNS, evaluate
    from reczero_jax.models import from_pretrained
    from reczero_jax.rewards import TokenRewardFn

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = from_pretrained(args.model)
    split = load_split(args.data, args.split)
    records = [split[i] for i in range(len(split) if args.n <= 0 else min(args.n, len(split)))]
    report = evaluate(model, tokenizer, records, reward_fn=TokenRewardFn(tokenizer),
                      max_prompt_tokens=args.max_prompt_tokens,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(markdown_table({Path(args.model).name: report["metrics"]}, REPORT_COLUMNS))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0
