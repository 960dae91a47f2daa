"""``reczero train CONFIG [key=value ...] [--restart]``, ``reczero export`` and ``reczero eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reczero_jax import distributed
from reczero_jax.config import DTYPES


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
    export.add_argument("--dtype", choices=DTYPES,
                        help="weight dtype (default: the parameters' own)")
    export.add_argument("--adapter", action="store_true",
                        help="a LoRA run: write its adapters alone in PEFT's format "
                             "(adapter_config.json, adapter_model.safetensors) instead of "
                             "merged full weights")
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
    evaluate.add_argument("--batch-size", type=int, help="default: the run's, or 8")
    evaluate.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    evaluate.add_argument("--out", help="report JSON (default with --run: RUN/eval_SPLIT.json)")
    evaluate.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from reczero_jax.config import load_config
    from reczero_jax.data.tfds_builder import find_prepared
    from reczero_jax.library_logs import library_logs_to
    from reczero_jax.models.hf import check_model_dir
    from reczero_jax.train.loop import local_run_dir, run

    config = load_config(args.config, args.overrides)
    # Before the run directory is touched and before transformers or TFDS see the paths.
    check_model_dir(config.model.path, "model.path")
    find_prepared(config.data.dir)
    # Before JAX touches a device: joins the hosts of a pod slice (automatic on Cloud TPU).
    distributed.initialize_from_args(args)
    # Only process 0 writes into its run directory (train.loop).
    with library_logs_to(local_run_dir(config.run_dir) if distributed.is_primary() else None):
        run(config, restart=args.restart)
    return 0


def _export(args: argparse.Namespace) -> int:
    from reczero_jax.train.export import export_run

    export_run(args.run, args.out, step=args.step, dtype=args.dtype, adapter=args.adapter)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from reczero_jax.baselines import evaluate_baselines, markdown_table
    from reczero_jax.config import load_config
    from reczero_jax.data import load_split
    from reczero_jax.data.tfds_builder import find_prepared
    from reczero_jax.evaluate import REPORT_COLUMNS, EvalSettings
    from reczero_jax.models import from_pretrained
    from reczero_jax.models.hf import check_model_dir

    model_dir, data_dir, out = args.model, args.data, args.out
    given = {name: value for name, value in (("max_prompt_tokens", args.max_prompt_tokens),
                                             ("max_new_tokens", args.max_new_tokens),
                                             ("batch_size", args.batch_size)) if value}
    settings = EvalSettings(**given)
    if args.run:
        if not (Path(args.run) / "config.yaml").is_file():
            raise FileNotFoundError(f"--run {args.run} holds no config.yaml (pass the run_dir of "
                                    "a `reczero train` run)")
        # Scored as the run's own evaluations were: its layout, reward variant and lengths.
        run = load_config(Path(args.run) / "config.yaml")
        settings = EvalSettings.of_run(run, **given)
        model_dir = Path(args.run) / "export"
        data_dir = data_dir or run.data.dir
        out = out or Path(args.run) / f"eval_{args.split}.json"
    if data_dir is None:
        raise ValueError("reczero eval --model needs --data (a directory from `reczero data "
                         "prepare`)")
    check_model_dir(model_dir, "--model" if args.model else "the run's export/",
                    fix="pass a Hugging Face model directory" if args.model else
                    "the run has not finished: export a checkpoint with `reczero export`")
    find_prepared(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = from_pretrained(model_dir)
    split = load_split(data_dir, args.split)
    records = [split[i] for i in range(len(split) if args.n <= 0 else min(args.n, len(split)))]
    report = settings.evaluate(model, tokenizer, records)
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
