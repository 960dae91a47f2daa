"""The built-in offline teacher: a scaffold for the four-tag format, not a claim of reasoning.

It fills the four sections from the sample's own data (the user's highest and lowest rated
titles, the item's name and its rating record, a stated comparison of the two averages) and
rates round((user_avg + item_avg) / 2). A small model fine-tuned on it learns to emit
well-formed answers, which GRPO's format reward needs before the rating reward can teach
anything. Its rating is not the true rating, so most template traces would fail the
"reaches the true rating" rule that teacher traces must pass (see ``reczero_jax.traces.rules``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reczero_jax.traces.rules import BAD_FORMAT, OK, judge


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


def template_records(samples: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """A template trace for every sample, as trace-file records, and counts: ``samples``,
    ``format_ok``, ``rating_equals_truth`` (only those pass ``io.validate_traces``; the
    training loop's ``sft.traces: template`` uses all of them)."""
    records, counts = [], {"samples": len(samples), "format_ok": 0, "rating_equals_truth": 0}
    for sample in samples:
        response = template_trace(sample)
        verdict = judge(response, int(sample["rating"]))
        counts["format_ok"] += verdict != BAD_FORMAT
        counts["rating_equals_truth"] += verdict == OK
        records.append({"user_id": str(sample["user_id"]), "item_id": str(sample["item_id"]),
                        "response": response, "rating": int(sample["rating"]),
                        "rationalised": False, "teacher": "template"})
    return records, counts
