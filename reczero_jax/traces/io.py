"""Trace files: JSON lines, one trace per line, validated against the samples.

A line is an object with at least ``user_id``, ``item_id`` (strings or numbers; compared as
strings) and ``response`` (a string). Other keys are metadata and are kept. Files written here
hold, per line::

    {"user_id": str, "item_id": str, "response": str, "rating": int (the true rating),
     "rationalised": bool, "teacher": str, ...}

Validation keeps a line when it parses, names a sample of the split, its response passes the
format rule and rates the sample's true rating (``rules.judge``) and its sample has no earlier
trace in the file. Every other line is counted under one reason (``REJECT_REASONS``) with a few
``file:line: detail`` examples. Blank lines are not records and are skipped.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reczero_jax.traces.rules import BAD_FORMAT, OK, WRONG_RATING, judge
from reczero_jax.traces.template import template_trace

REQUIRED_FIELDS = ("user_id", "item_id", "response")
REJECT_REASONS = ("bad_json", "missing_field", "unknown_sample", "bad_format", "wrong_rating",
                  "duplicate")
_VERDICT_REASON = {BAD_FORMAT: "bad_format", WRONG_RATING: "wrong_rating"}


def sample_key(record: dict[str, Any]) -> tuple[str, str]:
    """(user_id, item_id) as strings: how traces are matched to samples."""
    return str(record["user_id"]), str(record["item_id"])


@dataclass
class ValidationReport:
    """Lines read, kept, and rejected by reason with up to ``max_examples`` examples each."""

    path: str
    max_examples: int = 3
    lines: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def reject(self, reason: str, line_number: int, detail: str) -> None:
        self.rejected[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(f"{self.path}:{line_number}: {detail}")

    def counts(self) -> dict[str, int]:
        """{"kept": n, reason: n for every reason in REJECT_REASONS (zeros included)}."""
        return {"kept": self.kept, **{reason: self.rejected[reason] for reason in REJECT_REASONS}}

    def format(self) -> str:
        """The report as printed lines: totals, then each reason with its examples."""
        lines = [f"{self.path}: {self.lines} traces read, {self.kept} valid, "
                 f"{sum(self.rejected.values())} rejected"]
        for reason in REJECT_REASONS:
            if self.rejected[reason]:
                lines.append(f"  {reason}: {self.rejected[reason]}")
                lines.extend(f"    e.g. {example}" for example in self.examples[reason])
        return "\n".join(lines)


def _parse(line: str) -> tuple[dict[str, Any] | None, str, str]:
    """(row, "", "") for a usable line, else (None, reason, detail)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        return None, "bad_json", str(error)
    if not isinstance(row, dict):
        return None, "bad_json", f"a JSON {type(row).__name__}, not an object"
    missing = [name for name in REQUIRED_FIELDS if name not in row]
    if missing:
        return None, "missing_field", f"no {', '.join(missing)}"
    if not isinstance(row["response"], str):
        return None, "missing_field", f"response is a {type(row['response']).__name__}, not a string"
    return row, "", ""


def validate_traces(path: str | Path, samples: Iterable[dict[str, Any]], *, max_examples: int = 3
                    ) -> tuple[list[dict[str, Any]], ValidationReport]:
    """The valid traces of the JSON-lines file ``path`` (module docstring), normalised and in
    file order: ``user_id``/``item_id`` as the sample's strings, ``rating`` the sample's true
    rating, then the line's other keys. Raises FileNotFoundError naming a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file {path}: give a JSON-lines file of traces")
    known = {sample_key(s): s for s in samples}
    report = ValidationReport(str(path), max_examples=max_examples)
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            report.lines += 1
            row, reason, detail = _parse(line)
            if row is None:
                report.reject(reason, number, detail)
                continue
            key = sample_key(row)
            sample = known.get(key)
            if sample is None:
                report.reject("unknown_sample", number, f"user {key[0]!r}, item {key[1]!r} is "
                              "not a sample of this split")
                continue
            verdict = judge(row["response"], int(sample["rating"]))
            if verdict != OK:
                report.reject(_VERDICT_REASON[verdict], number,
                              f"user {key[0]!r}, item {key[1]!r}, true rating {sample['rating']}")
                continue
            if key in seen:
                report.reject("duplicate", number, f"user {key[0]!r}, item {key[1]!r} again "
                              "(the first trace is kept)")
                continue
            seen.add(key)
            records.append({**row, "user_id": key[0], "item_id": key[1],
                            "rating": int(sample["rating"])})
            report.kept += 1
    return records, report


def load_traces(path: str | Path, samples: Iterable[dict[str, Any]]
                ) -> tuple[dict[tuple[str, str], str], dict[str, int]]:
    """Valid traces of ``path`` keyed by (user_id, item_id), and ``ValidationReport.counts()``."""
    records, report = validate_traces(path, samples)
    return {sample_key(r): r["response"] for r in records}, report.counts()


def sft_responses(records: Sequence[dict[str, Any]], source: str) -> dict[int, str]:
    """The warm start's response per record index: the built-in template trace of every record
    (``source == "template"``), else the valid trace of ``source`` (a trace file) for each
    record that has one; the file's counts are printed."""
    if source == "template":
        return {i: template_trace(record) for i, record in enumerate(records)}
    loaded, counts = load_traces(source, records)
    print(f"[reczero] traces from {source}: {counts}")
    return {i: loaded[sample_key(record)] for i, record in enumerate(records)
            if sample_key(record) in loaded}


def write_traces(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` as JSON lines (parent directories made); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
