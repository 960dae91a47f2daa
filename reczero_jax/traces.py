"""Four-tag reasoning traces for RecOne's warm-start SFT.

``template_trace`` is the built-in offline teacher. It is a scaffold for the output format,
not a claim of reasoning: it fills the four sections from the sample's own data (the user's
highest and lowest rated titles, the item's name and its rating record, a stated comparison
of the two averages) and rates round((user_avg + item_avg) / 2). A small model fine-tuned on
it learns to emit well-formed answers, which GRPO's format reward needs before the rating
reward can teach anything.

External traces (e.g. from DeepSeek-R1) are JSON lines ``{"user_id", "item_id", "response"}``
validated against the samples and the format rule by ``load_traces``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from reczero_jax.rewards import rating_reward


def template_rating(sample: dict[str, Any]) -> int:
    """round((user_avg + item_avg) / 2), clipped to 1..5."""
    mean = (float(sample["user_avg_rating"]) + float(sample["item_avg_rating"])) / 2
    return int(min(5, max(1, round(mean))))


def _title(entry: dict[str, Any]) -> str:
    return str(entry.get("title") or f"item {entry.get('item_id', '?')}")


def template_trace(sample: dict[str, Any]) -> str:
    """The scaffold trace of one sample (module docstring)."""
    history = sample["user_history"]
    best = max(history, key=lambda e: e["rating"])
    worst = min(history, key=lambda e: e["rating"])
    user_avg, item_avg = float(sample["user_avg_rating"]), float(sample["item_avg_rating"])
    item = sample.get("item") or {}
    ratings = [e["rating"] for e in sample["item_history"]]
    leaning = "higher" if user_avg > item_avg else "lower" if user_avg < item_avg else "the same"
    return (
        f"<analyze user>The user rates {user_avg:.2f} on average. They liked "
        f"{_title(best)} ({best['rating']}) and liked {_title(worst)} least "
        f"({worst['rating']}).</analyze user>\n"
        f"<analyze item>{item.get('title') or 'the target item'}\n"
        f"[pos] Other users rated it {item_avg:.2f} on average, recently {ratings}.\n"
        f"[neg] Ratings below the user's usual {user_avg:.2f} would suggest a weaker fit."
        f"</analyze item>\n"
        f"<match>The user's average is {leaning} than the item's; weighing both gives a "
        f"rating between them.</match>\n"
        f"<rate>{template_rating(sample)}</rate>"
    )


def load_traces(path: str | Path, samples: Iterable[dict[str, Any]]) -> tuple[dict, dict]:
    """Read external traces (JSON lines) keyed by (user_id, item_id).

    A line is kept when it parses, names a known sample, and its response passes the format
    rule with a rating equal to the sample's. Returns (traces by key, counts by outcome).
    """
    known = {(str(s["user_id"]), str(s["item_id"])): s for s in samples}
    traces: dict[tuple[str, str], str] = {}
    counts = {"kept": 0, "malformed_json": 0, "unknown_sample": 0, "bad_format": 0,
              "wrong_rating": 0, "duplicate": 0}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, response = (str(row["user_id"]), str(row["item_id"])), str(row["response"])
        except (json.JSONDecodeError, KeyError, TypeError):
            counts["malformed_json"] += 1
            continue
        sample = known.get(key)
        if sample is None:
            counts["unknown_sample"] += 1
            continue
        result = rating_reward(response, sample["rating"])
        if not result.format_ok:
            counts["bad_format"] += 1
        elif result.rating != sample["rating"]:
            counts["wrong_rating"] += 1
        elif key in traces:
            counts["duplicate"] += 1
        else:
            traces[key] = response
            counts["kept"] += 1
    return traces, counts
