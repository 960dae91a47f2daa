"""``reczero train CONFIG [key=value ...] [--restart]``, ``reczero export`` and ``reczero eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reczero_jax import distributed


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="run RecZero (GRPO), RecOne (warm-start SFT + GRPO) or SFT",
        description="Train with a YAML config; key.sub=value arguments override it.")
    train.add_argument("config", help="YAML experiment config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    train.add_argument("--restart", action="store_true",
                       help="delete the checkpoints and logs in run_dir and start over (without "
                            "it, a run directory with checkpoints resumes from the latest)")
    distributed.add_arguments(train)
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
        "eval", help="greedy evaluation of a model on a prepared split, next to the baselines",
        description="Greedy decoding; MAE/RMSE (parse failures scored with the user's "
                    "average), parse and format rates, accuracies, cost; the classic baselines "
                    "(means, biased MF) fitted on the train split and scored on the same samples.")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory of `reczero train`: its export/ model, "
                                      "data and lengths (the report goes into it)")
    source.add_argument("--model", help="Hugging Face model directory")
    evaluate.add_argument("--data", help="directory from `reczero data prepare` (with --model)")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--n", type=int, default=64, help="samples to evaluate (0: all)")
    evaluate.add_argument("--max-prompt-tokens", type=int, help="default: the run's, or 1024")
    evaluate.add_argument("--max-new-tokens", type=int, help="default: the run's, or 512")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    evaluate.add_argument("--out", help="report JSON (default with --run: RUN/eval_SPLIT.json)")
    evaluate.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from reczero_jax.config import load_config
    from reczero_jax.train.loop import run

    # Before JAX touches a device: joins the hosts of a pod slice (automatic on Cloud TPU).
    distributed.initialize_from_args(args)
    run(load_config(args.config, args.overrides), restart=args.restart)
    return 0


def _export(args: argparse.Namespace) -> int:
    from reczero_jax.train.export import export_run

    export_run(args.run, args.out, step=args.step, dtype=args.dtype)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from reczero_jax.baselines import evaluate_baselines, markdown_table
    from reczero_jax.config import load_config
    from reczero_jax.data import load_split
    from reczero_jax.evaluate import REPORT_COLUMNS, evaluate
    from reczero_jax.models import from_pretrained, stop_token_ids
    from reczero_jax.rewards import TokenRewardFn

    model_dir, data_dir, out = args.model, args.data, args.out
    max_prompt_tokens, max_new_tokens = args.max_prompt_tokens or 1024, args.max_new_tokens or 512
    if args.run:
        run = load_config(Path(args.run) / "config.yaml")
        model_dir = Path(args.run) / "export"
        data_dir = data_dir or run.data.dir
        max_prompt_tokens = args.max_prompt_tokens or run.data.max_prompt_tokens
        max_new_tokens = args.max_new_tokens or run.train.eval_max_new_tokens
        out = out or Path(args.run) / f"eval_{args.split}.json"
    if data_dir is None:
        raise SystemExit("reczero eval: --model needs --data (a directory from `reczero data "
                         "prepare`)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = from_pretrained(model_dir)
    split = load_split(data_dir, args.split)
    records = [split[i] for i in range(len(split) if args.n <= 0 else min(args.n, len(split)))]
    reward_fn = TokenRewardFn(tokenizer, eos_ids=stop_token_ids(model.config, tokenizer))
    report = evaluate(model, tokenizer, records, reward_fn=reward_fn,
                      max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                      batch_size=args.batch_size)
    table = {Path(model_dir).name if args.model else Path(args.run).name: report["metrics"]}
    if not args.no_baselines:
        train = load_split(data_dir, "train")
        report["baselines"] = evaluate_baselines([train[i] for i in range(len(train))], records)
        table |= report["baselines"]
    print(markdown_table(table, REPORT_COLUMNS))
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"[reczero] report: {out}")
    return 0
