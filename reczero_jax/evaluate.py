"""Greedy evaluation: one decoded answer per sample, scored with the token reward.

Reports MAE / RMSE (a parse failure is scored with the user's average rating, clipped to the
scale: see ``rewards.rating_metrics``), parse and format rates, exact and within-one accuracy,
a breakdown by user-history length, and cost: generated tokens per request, latency (mean wall
time of a batch, which every request in it waits for), requests and generated tokens per second.
Times include the compilation of each new batch shape, so short evaluations overstate latency.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from tqdm.auto import tqdm

from reczero_jax import distributed
from reczero_jax.data.padding import default_pad_id
from reczero_jax.data.pipeline import make_pipeline
from reczero_jax.models.decoder import Decoder
from reczero_jax.models.hf import stop_token_ids
from reczero_jax.rewards import TokenRewardFn, rating_metrics
from reczero_jax.sampling import generate

if TYPE_CHECKING:
    from reczero_jax.config import ExperimentConfig

# (low, high) inclusive; high None is open-ended, so every history length falls in one bin.
HISTORY_BINS = ((0, 3), (4, 6), (7, 9), (10, None))
REPORT_COLUMNS = ("mae", "rmse", "parse_rate", "format_rate", "exact_accuracy",
                  "within_one_accuracy", "tokens_per_request", "n")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How a model is evaluated: the prompt layout, the reward variant (its answer format and
    how the rating is read), prompt and answer lengths, the batch size."""

    layout: str = "chat"
    reward: str = "rating"
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    batch_size: int = 8

    @classmethod
    def of_run(cls, config: ExperimentConfig, **overrides: int | str | None) -> EvalSettings:
        """A run's settings, from its config: ``data.layout``, ``train.reward``,
        ``data.max_prompt_tokens``, ``train.eval_max_new_tokens``, ``train.eval_batch_size``.
        The training loop's evaluations and ``reczero eval --run`` both take theirs from here,
        so a run is scored alike in and after training. ``overrides`` left None keep the
        run's values."""
        settings = cls(layout=config.data.layout, reward=config.train.reward,
                       max_prompt_tokens=config.data.max_prompt_tokens,
                       max_new_tokens=config.train.eval_max_new_tokens,
                       batch_size=config.train.eval_batch_size)
        return dataclasses.replace(
            settings, **{name: value for name, value in overrides.items() if value is not None})

    def reward_fn(self, tokenizer, eos_ids: Sequence[int]) -> TokenRewardFn:
        """The reward variant's token reward; ``eos_ids``: the model's stop tokens
        (``models.stop_token_ids``), left out of a response they end."""
        return TokenRewardFn(tokenizer, kind=self.reward, eos_ids=eos_ids)

    def evaluate(self, model: Decoder, tokenizer, records: Sequence[dict[str, Any]], *,
                 reward_fn: TokenRewardFn | None = None, desc: str = "eval") -> dict[str, Any]:
        """``evaluate`` with these settings. ``reward_fn``: ``self.reward_fn(...)``, built once
        by a caller that evaluates repeatedly (default: built here)."""
        reward_fn = reward_fn or self.reward_fn(tokenizer, stop_token_ids(model.config, tokenizer))
        return evaluate(model, tokenizer, records, reward_fn=reward_fn,
                        max_prompt_tokens=self.max_prompt_tokens,
                        max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                        layout=self.layout, desc=desc)


def evaluate(model: Decoder, tokenizer, records: Sequence[dict[str, Any]], *,
             reward_fn: TokenRewardFn, max_prompt_tokens: int, max_new_tokens: int,
             batch_size: int = 8, layout: str = "chat", desc: str = "eval") -> dict[str, Any]:
    """Greedy-decode every record and score it. Returns metrics and per-sample rows.

    With several processes (a model on a mesh over all their devices) each process encodes
    and feeds its block of every batch; the decoded answers come back whole to every process,
    so each returns every row and the same metrics. Every process sees the same batches
    (the last one padded to ``batch_size``), so all take part in the same collectives.
    """
    index, count = distributed.process_batch_share(model.mesh)
    batches = make_pipeline(records, tokenizer, global_batch_size=batch_size,
                            max_prompt_tokens=max_prompt_tokens, shuffle=False,
                            drop_remainder=False, layout=layout, process_index=index,
                            process_count=count)
    pad_id, eos_ids = default_pad_id(tokenizer), stop_token_ids(model.config, tokenizer)
    rows: list[dict[str, Any]] = []
    generated_tokens, batch_seconds = 0, []
    progress = tqdm(total=len(records), desc=desc, unit="sample", leave=False,
                    disable=not distributed.is_primary())
    for local in batches:
        start = time.perf_counter()
        batch = distributed.global_batch(
            {"prompt_ids": local["prompt_ids"], "prompt_mask": local["prompt_mask"],
             "rating": local["rating"].astype(np.float32),
             "record_index": local["record_index"].astype(np.int32),
             "valid": local["valid"]}, model.mesh)
        out = generate(model, batch["prompt_ids"], batch["prompt_mask"], num_samples=1,
                       max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=eos_ids,
                       pad_id=pad_id, rng=jax.random.key(0))
        tokens, lengths = out.tokens[:, 0], out.lengths[:, 0]
        _, format_ok, rating = reward_fn(tokens, lengths, batch["rating"])
        format_ok, rating, tokens, lengths, valid, record_index = distributed.to_host(
            (format_ok, rating, tokens, lengths, batch["valid"], batch["record_index"]))
        batch_seconds.append(time.perf_counter() - start)
        for i in np.flatnonzero(valid):
            record = records[int(record_index[i])]
            rows.append({
                "user_id": record["user_id"], "item_id": record["item_id"],
                "rating": int(record["rating"]), "user_avg_rating": record["user_avg_rating"],
                "history_length": len(record.get("user_history", ())),
                # A number outside the scale (or none) is a parse failure, scored by fallback.
                "prediction": float(rating[i]) if 1.0 <= rating[i] <= 5.0 else None,
                "format_ok": bool(format_ok[i]), "generated_tokens": int(lengths[i]),
                "response": tokenizer.decode(tokens[i, : lengths[i]]),
            })
            generated_tokens += int(lengths[i])
        progress.update(int(valid.sum()))
    progress.close()
    metrics = score_rows(rows)
    seconds = sum(batch_seconds)
    metrics.update(tokens_per_request=generated_tokens / max(len(rows), 1),
                   seconds=seconds, latency_seconds=seconds / max(len(batch_seconds), 1),
                   requests_per_second=len(rows) / max(seconds, 1e-9),
                   tokens_per_second=generated_tokens / max(seconds, 1e-9),
                   by_history_length=by_history_length(rows))
    return {"metrics": metrics, "rows": rows}


def score_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return rating_metrics([r["prediction"] for r in rows], [r["rating"] for r in rows],
                          [r["user_avg_rating"] for r in rows], [r["format_ok"] for r in rows])


def by_history_length(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Metrics per bin of user-history length (entries shown in the prompt), keyed "low-high"
    or "low+" for the open-ended last bin; empty bins are left out."""
    table = {}
    for low, high in HISTORY_BINS:
        selected = [r for r in rows
                    if low <= r["history_length"] and (high is None or r["history_length"] <= high)]
        if selected:
            table[f"{low}+" if high is None else f"{low}-{high}"] = score_rows(selected)
    return table
