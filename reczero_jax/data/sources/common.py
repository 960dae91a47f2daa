"""What every source reader shares: the record types, field parsing, file access, table
assembly and the read report.

Every problem is either fatal (a missing file or column) or one record skipped and counted in
``ReadReport`` by reason; with ``on_error="fail"`` the first skip raises ``DataError`` naming the
file and line instead. An optional text field that is empty is left out of the record (the rating
is kept) and counted in ``ReadReport.cleaned``. A reader's parse function raises ``Skip`` for an
unusable record; ``TableBuilder`` turns it into a counted rejection.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

ON_ERROR = ("skip", "fail")
RATING_SCALE = (1, 5)
EXAMPLES_PER_REASON = 3
ITEM_FEATURES = ("title", "categories", "brand", "price", "description")


class DataError(ValueError):
    """A record that cannot be read, raised under ``on_error="fail"``."""


@dataclass(frozen=True, slots=True)
class Interaction:
    """One rating: ``timestamp`` in unix seconds; ``review``/``summary`` None where absent."""

    user_id: str
    item_id: str
    rating: int
    timestamp: int
    review: str | None = None
    summary: str | None = None


@dataclass
class ReadReport:
    """What a reader saw. ``read``: records read per file role ("interactions", "items"), bad
    ones included; ``rejected``: records dropped, by reason ("<role>: <reason>"); ``cleaned``:
    empty optional fields left out of kept records; ``examples``: the first few
    "file:line: detail" messages per reason, so a user can look at the offending lines."""

    on_error: str = "skip"
    read: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    cleaned: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")

    def reject(self, role: str, reason: str, where: str, detail: str) -> None:
        """Count one dropped record, or raise under ``on_error="fail"``."""
        if self.on_error == "fail":
            raise DataError(
                f"{where}: {reason}: {detail} "
                "(pass --on-error skip / on_error='skip' to skip and count such records)"
            )
        key = f"{role}: {reason}"
        self.rejected[key] += 1
        shown = self.examples.setdefault(key, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(f"{where}: {detail}")

    def reject_line(self, role: str, reason: str, where: str, detail: str) -> None:
        """A line that never became a record (undecodable, malformed): read and rejected."""
        self.read[role] += 1
        self.reject(role, reason, where, detail)

    def clean(self, what: str) -> None:
        self.cleaned[what] += 1

    def to_dict(self) -> dict:
        return {
            "interactions_read": self.read["interactions"],
            "items_read": self.read["items"],
            "rejected": dict(self.rejected),
            "cleaned": dict(self.cleaned),
            "examples": self.examples,
        }


@dataclass
class SourceTable:
    """Interactions in read order, the items' fixed features (``ITEM_FEATURES`` keys the source
    has) by item id, and the report of what was read and skipped."""

    dataset: str
    interactions: list[Interaction]
    items: dict[str, dict[str, Any]]
    report: ReadReport


class Skip(Exception):
    """One record is unusable; carries the reason for ``ReadReport.reject``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- field parsing


def parse_rating(value: Any) -> int:
    """An integer rating on ``RATING_SCALE``; "4", 4, 4.0 pass, 4.5 / 0 / "four" are skipped."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise Skip("rating is not a number", f"rating {value!r}") from None
    low, high = RATING_SCALE
    if not number.is_integer() or not low <= number <= high:
        raise Skip(
            f"rating outside the integer {low}..{high} scale", f"rating {value!r}"
        ) from None
    return int(number)


def parse_timestamp(value: Any) -> int:
    """Unix seconds as a non-negative integer."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise Skip("timestamp is not a number", f"timestamp {value!r}") from None
    if not number.is_integer() or number < 0:
        raise Skip("timestamp is not a non-negative integer", f"timestamp {value!r}")
    return int(number)


def parse_datetime(value: Any) -> int:
    """Yelp's "YYYY-MM-DD HH:MM:SS" (taken as UTC) to unix seconds."""
    try:
        moment = datetime.strptime(str(value), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        raise Skip("date is not YYYY-MM-DD HH:MM:SS", f"date {value!r}") from None
    return int(moment.timestamp())


def parse_identifier(record: Mapping, key: str) -> str:
    value = record.get(key)
    if value is None or not str(value).strip():
        raise Skip(f"missing {key}", f"no value for {key!r}")
    return str(value).strip()


def clean_text(value: Any) -> str | None:
    """Stripped text; a list of strings (Amazon descriptions) joined by spaces; None when empty."""
    if isinstance(value, list | tuple):
        value = " ".join(str(v).strip() for v in value if v is not None and str(v).strip())
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def parse_categories(value: Any) -> list[str] | str | None:
    if isinstance(value, list | tuple):
        names = [str(v).strip() for v in value if v is not None and str(v).strip()]
        return names or None
    return clean_text(value)


def item_features(**features: Any) -> dict[str, Any]:
    """The present ``ITEM_FEATURES`` in that order (absent or empty ones are left out)."""
    return {key: features[key] for key in ITEM_FEATURES if features.get(key) not in (None, "", [])}



def parse_price(value: Any) -> float | str | None:
    """A number as a float; a string as given (Amazon 2018 writes "$12.99"); "None" is absent."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = clean_text(value)
    return None if text in (None, "None") else text


# ----------------------------------------------------------------------------- file access


def require_file(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} ({hint})")
    return path


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_lines(path: Path, encoding: str, report: ReadReport, role: str) -> Iterator[tuple[str, str]]:
    """("file:line", text) for every non-blank line; undecodable lines are counted and skipped."""
    with open_binary(path) as handle:
        bar = tqdm(handle, desc=f"reading {path.name}", unit=" lines", leave=False)
        for number, raw in enumerate(bar, 1):
            where = f"{path}:{number}"
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as error:
                report.reject_line(
                    role,
                    f"bad encoding (not {encoding})",
                    where,
                    f"{error.reason} at byte {error.start}; re-encode the file as {encoding}",
                )
                continue
            if text.strip():
                yield where, text.rstrip("\r\n")


def read_json_lines(path: Path, report: ReadReport, role: str) -> Iterator[tuple[str, dict]]:
    for where, text in read_lines(path, "utf-8", report, role):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            report.reject_line(role, "malformed line", where, f"not JSON ({error.msg})")
            continue
        if not isinstance(record, dict):
            report.reject_line(role, "malformed line", where, "a JSON value that is not an object")
            continue
        yield where, record


def read_delimited(
    path: Path, sep: str, columns: int, encoding: str, report: ReadReport, role: str
) -> Iterator[tuple[str, list[str]]]:
    for where, text in read_lines(path, encoding, report, role):
        fields = text.split(sep)
        if len(fields) != columns:
            report.reject_line(
                role,
                "malformed line",
                where,
                f"{len(fields)} fields separated by {sep!r}, expected {columns}",
            )
            continue
        yield where, fields


# ----------------------------------------------------------------------------- table assembly


REVIEW_TEXTS = {"review": "review text", "summary": "review summary"}


class TableBuilder:
    """Collects interactions and items; drops duplicate (user, item, time) rows and ratings of
    items without a title, counting both. ``text_fields`` (Interaction attribute -> label) are
    the texts the format has: a kept interaction without one is counted in ``cleaned``."""

    def __init__(
        self, dataset: str, report: ReadReport, text_fields: Mapping[str, str] | None = None
    ):
        self.dataset, self.report = dataset, report
        self.text_fields = text_fields or {}
        self.interactions: list[Interaction] = []
        self.items: dict[str, dict[str, Any]] = {}
        self._where: list[str] = []
        self._seen: set[tuple[str, str, int]] = set()

    def add_interaction(self, where: str, parse) -> None:
        """``parse()`` returns an Interaction or raises Skip."""
        self.report.read["interactions"] += 1
        try:
            interaction = parse()
        except Skip as skip:
            self.report.reject("interactions", skip.reason, where, skip.detail)
            return
        key = (interaction.user_id, interaction.item_id, interaction.timestamp)
        if key in self._seen:
            self.report.reject(
                "interactions",
                "duplicate (user, item, timestamp)",
                where,
                f"user {key[0]!r} item {key[1]!r} at {key[2]} already read (first kept)",
            )
            return
        self._seen.add(key)
        self.interactions.append(interaction)
        self._where.append(where)

    def add_item(self, where: str, parse, count: bool = True) -> None:
        """``parse()`` returns (item_id, features) or raises Skip; the first record wins."""
        self.report.read["items"] += count
        try:
            item_id, features = parse()
        except Skip as skip:
            self.report.reject("items", skip.reason, where, skip.detail)
            return
        if item_id in self.items:
            if self.items[item_id] != features:
                self.report.clean("item with differing duplicate features (first kept)")
            return
        self.items[item_id] = features

    def finish(self) -> SourceTable:
        kept = []
        for interaction, where in zip(self.interactions, self._where, strict=True):
            if self.items.get(interaction.item_id, {}).get("title"):
                kept.append(interaction)
                for name, label in self.text_fields.items():
                    if getattr(interaction, name) is None:
                        self.report.clean(f"empty {label} (left out)")
            else:
                self.report.reject(
                    "interactions",
                    "item has no title (no item record)",
                    where,
                    f"item {interaction.item_id!r}",
                )
        used = {interaction.item_id for interaction in kept}
        items = {item_id: features for item_id, features in self.items.items() if item_id in used}
        return SourceTable(self.dataset, kept, items, self.report)

