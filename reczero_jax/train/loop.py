"""The programs users run: RecZero (GRPO only), RecOne (warm-start SFT, then GRPO), SFT.

    run(config) -> {"zero-shot": metrics, "after SFT": metrics, "after GRPO": metrics}

Writes into ``config.run_dir``: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per
step and phase), ``eval.json`` / ``eval.md`` (every evaluation, with per-sample answers in
``eval_samples.jsonl``) and ``export/`` (the final policy as a Hugging Face directory).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from reczero_jax import prompts, traces
from reczero_jax.baselines import markdown_table
from reczero_jax.config import ExperimentConfig, save_config
from reczero_jax.data import load_split
from reczero_jax.data.pipeline import default_pad_id, make_pipeline
from reczero_jax.evaluate import REPORT_COLUMNS, evaluate
from reczero_jax.mesh import make_mesh
from reczero_jax.models import from_pretrained, save_pretrained
from reczero_jax.rewards import TokenRewardFn
from reczero_jax.train.step import OptimConfig, Trainer, rollout

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, phase: str, step: int, metrics: dict[str, Any]) -> None:
        row = {"phase": phase, "step": step, "time": time.time()}
        # Scalars only: nested breakdowns (e.g. by history length) go to eval.json.
        row.update({k: float(v) for k, v in metrics.items()
                    if isinstance(v, int | float | np.number) or getattr(v, "ndim", None) == 0})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def run(config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    # A run starts afresh (no resume yet): logs of an earlier run in this directory go.
    for name in ("metrics.jsonl", "eval_samples.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    log = MetricsLog(run_dir / "metrics.jsonl")
    mesh = make_mesh(**dataclasses.asdict(config.mesh))
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    model = from_pretrained(config.model.path, dtype=DTYPES[config.model.dtype],
                            param_dtype=DTYPES[config.model.param_dtype], mesh=mesh)
    model.remat = config.model.remat
    train_records = _take(load_split(config.data.dir, "train"), config.data.train_samples)
    eval_records = _take(load_split(config.data.dir, config.data.eval_split),
                         config.data.eval_samples)
    reward_fn = TokenRewardFn(tokenizer, kind=config.train.reward)
    eos_ids = tuple(sorted(set(model.config.eos_token_ids) | {tokenizer.eos_token_id}))
    print(f"[reczero] {config.algorithm}: {len(train_records)} train samples, "
          f"{len(eval_records)} {config.data.eval_split} samples, mesh {dict(mesh.shape)}")

    results: dict[str, dict[str, Any]] = {}

    def run_eval(name: str) -> None:
        report = evaluate(model, tokenizer, eval_records, reward_fn=reward_fn,
                          max_prompt_tokens=config.data.max_prompt_tokens,
                          max_new_tokens=config.train.eval_max_new_tokens,
                          batch_size=config.train.eval_batch_size, layout=config.data.layout,
                          desc=f"eval {name}")
        results[name] = report["metrics"]
        log.write(f"eval {name}", 0, report["metrics"])
        with (run_dir / "eval_samples.jsonl").open("a") as f:
            for row in report["rows"]:
                f.write(json.dumps({"model": name, **row}) + "\n")
        m = report["metrics"]
        print(f"[reczero] {name}: MAE {m['mae']:.4f} RMSE {m['rmse']:.4f} "
              f"parse {m['parse_rate']:.2f} format {m['format_rate']:.2f} "
              f"tokens/request {m['tokens_per_request']:.0f}")

    run_eval("zero-shot")
    if config.algorithm in ("recone", "sft"):
        model = warm_start(model, mesh, tokenizer, train_records, config, log)
        run_eval("after SFT")
    if config.algorithm in ("reczero", "recone"):
        model = train_grpo(model, mesh, tokenizer, train_records, reward_fn, eos_ids, config, log)
        run_eval("after GRPO" if config.algorithm == "reczero" else "after SFT + GRPO")

    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    (run_dir / "eval.md").write_text(markdown_table(results, REPORT_COLUMNS) + "\n")
    save_pretrained(model, run_dir / "export", tokenizer=tokenizer)
    print(f"[reczero] run directory {run_dir}: eval.md, metrics.jsonl, export/")
    return results


def _take(records: Sequence[dict], limit: int) -> list[dict]:
    count = len(records) if limit <= 0 else min(limit, len(records))
    return [records[i] for i in range(count)]


# ----------------------------------------------------------------------------- SFT


def sft_examples(records: Sequence[dict], tokenizer, config: ExperimentConfig
                 ) -> list[tuple[list[int], int]]:
    """(prompt + response + end-of-turn ids, prompt length) per record with a trace."""
    if config.sft.traces == "template":
        responses = {i: traces.template_trace(r) for i, r in enumerate(records)}
    else:
        loaded, counts = traces.load_traces(config.sft.traces, records)
        print(f"[reczero] traces from {config.sft.traces}: {counts}")
        responses = {i: loaded[(str(r["user_id"]), str(r["item_id"]))]
                     for i, r in enumerate(records)
                     if (str(r["user_id"]), str(r["item_id"])) in loaded}
    examples = []
    for i, response in responses.items():
        prompt = prompts.encode_prompt(records[i], tokenizer,
                                       max_prompt_tokens=config.data.max_prompt_tokens,
                                       layout=config.data.layout).ids
        answer = tokenizer.encode(response, add_special_tokens=False)
        answer = answer[: config.sft.max_response_tokens - 1] + [tokenizer.eos_token_id]
        examples.append((prompt + answer, len(prompt)))
    if not examples:
        raise ValueError("no SFT examples: no trace matched a training sample")
    return examples


def sft_batches(examples, batch_size: int, length: int, pad_id: int, seed: int
                ) -> Iterator[tuple]:
    """Right-padded [B, length] ids, attention mask and loss mask (response tokens), forever;
    each batch a fresh seeded draw of distinct examples. One fixed length: one compilation."""
    rng = np.random.default_rng(seed)
    while True:
        chosen = [examples[i] for i in rng.permutation(len(examples))[:batch_size]]
        ids = np.full((len(chosen), length), pad_id, np.int32)
        mask = np.zeros((len(chosen), length), np.int32)
        loss_mask = np.zeros((len(chosen), length), np.int32)
        for row, (tokens, prompt_length) in enumerate(chosen):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
            loss_mask[row, prompt_length: len(tokens)] = 1
        yield ids, mask, loss_mask


def warm_start(model, mesh, tokenizer, records, config: ExperimentConfig, log: MetricsLog):
    """RecOne's warm start: SFT on four-tag traces (loss on the response tokens only)."""
    examples = sft_examples(records, tokenizer, config)
    optim = OptimConfig(**{**dataclasses.asdict(config.optim),
                           "learning_rate": config.sft.learning_rate, "micro_batches": 1})
    trainer = Trainer(model, mesh, optim)
    longest = config.data.max_prompt_tokens + config.sft.max_response_tokens
    batches = sft_batches(examples, config.sft.batch_size, -(-longest // 128) * 128,
                          default_pad_id(tokenizer), config.seed)
    progress = tqdm(range(config.sft.steps), desc="SFT", unit="step")
    for step in progress:
        metrics = trainer.sft_step(*next(batches))
        log.write("sft", step, metrics)
        progress.set_postfix(loss=f"{metrics['loss']:.3f}")
    return trainer.model


# ----------------------------------------------------------------------------- GRPO


def train_grpo(model, mesh, tokenizer, records, reward_fn, eos_ids, config: ExperimentConfig,
               log: MetricsLog):
    """GRPO: rollout (sample G answers per prompt, token rewards, advantages) then update."""
    reference = model if config.grpo.kl_coef else None
    trainer = Trainer(model, mesh, config.optim, config.grpo, ref_model=reference)
    batches = iter(make_pipeline(records, tokenizer,
                                 global_batch_size=config.train.prompts_per_step,
                                 max_prompt_tokens=config.data.max_prompt_tokens,
                                 seed=config.seed, num_epochs=None, layout=config.data.layout))
    key = jax.random.key(config.seed)
    pad_id = default_pad_id(tokenizer)
    progress = tqdm(range(config.train.steps), desc="GRPO", unit="step")
    for step in progress:
        batch = next(batches)
        start = time.perf_counter()
        scored = rollout(trainer.model, reward_fn, batch["prompt_ids"], batch["prompt_mask"],
                         batch["rating"].astype(np.float32), jax.random.fold_in(key, step),
                         config.grpo, eos_ids=eos_ids, pad_id=pad_id)
        jax.block_until_ready(scored)
        rollout_seconds = time.perf_counter() - start
        # With several updates per rollout, each one reuses it and the sampler's log-probs
        # are the old policy's (see Trainer._grpo_loss_terms).
        for _ in range(config.grpo.updates_per_rollout):
            metrics = trainer.grpo_step(scored)
        metrics.update(rollout_metrics(scored, batch["rating"]),
                       rollout_seconds=rollout_seconds,
                       update_seconds=time.perf_counter() - start - rollout_seconds)
        log.write("grpo", step, metrics)
        progress.set_postfix(reward=f"{metrics['reward_mean']:.2f}",
                             format=f"{metrics['format_rate']:.2f}")
    return trainer.model


def rollout_metrics(scored, ratings) -> dict[str, float]:
    """Sample MAE over parsed answers, and generated tokens per second of the rollout."""
    predicted = np.asarray(scored.ratings)
    truth = np.broadcast_to(np.asarray(ratings, np.float32)[:, None], predicted.shape)
    parsed = np.isfinite(predicted)
    return {"sample_mae": float(np.abs(predicted - truth)[parsed].mean()) if parsed.any()
            else float("nan"), "parse_rate": float(parsed.mean()),
            "generated_tokens": float(np.asarray(scored.lengths).sum())}
