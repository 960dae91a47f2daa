"""Raw rating files -> one interactions table (``SourceTable``).

Readers, one per format users actually have:

- MovieLens-100k: RecBole atomic files (``ml-100k.inter``, ``ml-100k.item``; the default source is
  the copy inside the installed ``recbole`` wheel) or the GroupLens files (``u.data``, ``u.item``).
- MovieLens-1M: ``ratings.dat``, ``movies.dat``.
- Amazon Reviews: the 2018 per-category files (``Digital_Music.json[.gz]`` + ``meta_...``) and the
  2023 files (``Digital_Music.jsonl[.gz]`` + ``meta_...``); the format is recognised per line.
- Yelp Open Dataset: ``yelp_academic_dataset_review.json`` + ``..._business.json``.
- Processed tables (parquet, JSON lines, or pickle behind ``allow_pickle``) in the column layout
  of PAPER.md's "Data" section (one row per interaction, item features repeated on every row).
- The authors' verl parquet files (``read_verl_parquet``): ready prompts, not interactions; they
  become samples directly (``reczero_jax.data.verl``), with no histories to build.

Every problem is either fatal (a missing file or column) or one record skipped and counted in
``ReadReport`` by reason; with ``on_error="fail"`` the first skip raises ``DataError`` naming the
file and line instead. An optional text field that is empty is left out of the record (the rating
is kept) and counted in ``ReadReport.cleaned``.
"""

from __future__ import annotations

import gzip
import json
import pickle
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

ON_ERROR = ("skip", "fail")
RATING_SCALE = (1, 5)
EXAMPLES_PER_REASON = 3
DATASETS = ("movielens-100k", "movielens-1m", "amazon", "yelp", "table")

# GroupLens ml-100k genre flags, in u.item column order (the same list as u.genre).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
ITEM_FEATURES = ("title", "categories", "brand", "price", "description")
# PAPER.md "Data": the Reason4Rec processed tables.
TABLE_REQUIRED = ("user_id", "item_id", "title", "ratings", "unixReviewTime")
TABLE_OPTIONAL = ("reviews", "summary", "categories", "brand", "price", "description")


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


class _Skip(Exception):
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
        raise _Skip("rating is not a number", f"rating {value!r}") from None
    low, high = RATING_SCALE
    if not number.is_integer() or not low <= number <= high:
        raise _Skip(
            f"rating outside the integer {low}..{high} scale", f"rating {value!r}"
        ) from None
    return int(number)


def parse_timestamp(value: Any) -> int:
    """Unix seconds as a non-negative integer."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _Skip("timestamp is not a number", f"timestamp {value!r}") from None
    if not number.is_integer() or number < 0:
        raise _Skip("timestamp is not a non-negative integer", f"timestamp {value!r}")
    return int(number)


def parse_datetime(value: Any) -> int:
    """Yelp's "YYYY-MM-DD HH:MM:SS" (taken as UTC) to unix seconds."""
    try:
        moment = datetime.strptime(str(value), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        raise _Skip("date is not YYYY-MM-DD HH:MM:SS", f"date {value!r}") from None
    return int(moment.timestamp())


def _identifier(record: Mapping, key: str) -> str:
    value = record.get(key)
    if value is None or not str(value).strip():
        raise _Skip(f"missing {key}", f"no value for {key!r}")
    return str(value).strip()


def _text(value: Any) -> str | None:
    """Stripped text; a list of strings (Amazon descriptions) joined by spaces; None when empty."""
    if isinstance(value, list | tuple):
        value = " ".join(str(v).strip() for v in value if v is not None and str(v).strip())
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _categories(value: Any) -> list[str] | str | None:
    if isinstance(value, list | tuple):
        names = [str(v).strip() for v in value if v is not None and str(v).strip()]
        return names or None
    return _text(value)


def _item_features(**features: Any) -> dict[str, Any]:
    """The present ``ITEM_FEATURES`` in that order (absent or empty ones are left out)."""
    return {key: features[key] for key in ITEM_FEATURES if features.get(key) not in (None, "", [])}


# ----------------------------------------------------------------------------- file access


def _require_file(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} ({hint})")
    return path


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _lines(path: Path, encoding: str, report: ReadReport, role: str) -> Iterator[tuple[str, str]]:
    """("file:line", text) for every non-blank line; undecodable lines are counted and skipped."""
    with _open_binary(path) as handle:
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


def _json_lines(path: Path, report: ReadReport, role: str) -> Iterator[tuple[str, dict]]:
    for where, text in _lines(path, "utf-8", report, role):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            report.reject_line(role, "malformed line", where, f"not JSON ({error.msg})")
            continue
        if not isinstance(record, dict):
            report.reject_line(role, "malformed line", where, "a JSON value that is not an object")
            continue
        yield where, record


def _delimited(
    path: Path, sep: str, columns: int, encoding: str, report: ReadReport, role: str
) -> Iterator[tuple[str, list[str]]]:
    for where, text in _lines(path, encoding, report, role):
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


class _TableBuilder:
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
        """``parse()`` returns an Interaction or raises _Skip."""
        self.report.read["interactions"] += 1
        try:
            interaction = parse()
        except _Skip as skip:
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
        """``parse()`` returns (item_id, features) or raises _Skip; the first record wins."""
        self.report.read["items"] += count
        try:
            item_id, features = parse()
        except _Skip as skip:
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


# ----------------------------------------------------------------------------- MovieLens


def _atomic_rows(
    path: Path, needed: tuple[str, ...], report: ReadReport, role: str
) -> Iterator[tuple[str, dict[str, str]]]:
    """RecBole atomic file: a tab-separated header of "name:type" fields, then rows."""
    lines = _lines(path, "utf-8", report, role)
    header_where, header = next(lines, (f"{path}:1", ""))
    names = [column.split(":")[0] for column in header.split("\t")]
    missing = [name for name in needed if name not in names]
    if missing:
        raise DataError(f"{header_where}: header lacks column(s) {missing}; found {names}")
    for where, text in lines:
        fields = text.split("\t")
        if len(fields) != len(names):
            report.reject_line(
                role, "malformed line", where, f"{len(fields)} fields, header has {len(names)}"
            )
            continue
        yield where, dict(zip(names, fields, strict=True))


def _year_title(title: str, year: str) -> str:
    """RecBole splits "Toy Story (1995)" into title and year; join them back as GroupLens has it."""
    title, year = title.strip(), year.strip()
    return f"{title} ({year})" if year.isdigit() else title


def _read_recbole_100k(directory: Path, builder: _TableBuilder) -> None:
    report = builder.report
    item_path = _require_file(directory / "ml-100k.item", "MovieLens item file", "RecBole layout")
    for where, row in _atomic_rows(
        item_path, ("item_id", "movie_title", "release_year", "class"), report, "items"
    ):
        builder.add_item(
            where,
            lambda row=row: (
                _identifier(row, "item_id"),
                _item_features(
                    title=_year_title(row["movie_title"], row["release_year"]),
                    categories=row["class"].split(),
                ),
            ),
        )
    inter_path = directory / "ml-100k.inter"
    needed = ("user_id", "item_id", "rating", "timestamp")
    for where, row in _atomic_rows(inter_path, needed, report, "interactions"):
        builder.add_interaction(where, lambda row=row: _plain_interaction(*map(row.get, needed)))


def _plain_interaction(user, item, rating, timestamp) -> Interaction:
    return Interaction(
        user_id=_identifier({"user_id": user}, "user_id"),
        item_id=_identifier({"item_id": item}, "item_id"),
        rating=parse_rating(rating),
        timestamp=parse_timestamp(timestamp),
    )


def _read_grouplens_100k(directory: Path, builder: _TableBuilder) -> None:
    report = builder.report
    hint = "GroupLens ml-100k layout: u.data and u.item side by side"
    item_path = _require_file(directory / "u.item", "MovieLens item file", hint)
    genres = ML100K_GENRES
    if (directory / "u.genre").is_file():
        genres = tuple(
            text.split("|")[0]
            for _, text in _lines(directory / "u.genre", "latin-1", report, "items")
        )
    # GroupLens files are ISO-8859-1 (titles such as "Misérables, Les").
    for where, fields in _delimited(item_path, "|", 5 + len(genres), "latin-1", report, "items"):
        flags = fields[5:]

        def parse(fields=fields, flags=flags):
            if any(flag not in ("0", "1") for flag in flags):
                raise _Skip("malformed line", f"genre flags {flags} are not 0/1")
            categories = [name for name, flag in zip(genres, flags, strict=True) if flag == "1"]
            return _identifier({"item_id": fields[0]}, "item_id"), _item_features(
                title=_text(fields[1]), categories=categories
            )

        builder.add_item(where, parse)
    data_path = _require_file(directory / "u.data", "MovieLens ratings file", hint)
    for where, fields in _delimited(data_path, "\t", 4, "latin-1", report, "interactions"):
        builder.add_interaction(where, lambda fields=fields: _plain_interaction(*fields))


def read_movielens_100k(source: str | Path | None, report: ReadReport) -> SourceTable:
    """MovieLens-100k from ``source`` (a directory holding ``ml-100k.inter`` or ``u.data``);
    None reads the copy in the installed ``recbole`` wheel."""
    if source is None:
        from reczero_jax.assets import movielens100k_dir

        source = movielens100k_dir()
    directory = Path(source)
    builder = _TableBuilder("movielens-100k", report)
    if (directory / "ml-100k.inter").is_file():
        _read_recbole_100k(directory, builder)
    elif (directory / "u.data").is_file():
        _read_grouplens_100k(directory, builder)
    else:
        raise FileNotFoundError(
            f"{directory} holds neither ml-100k.inter (RecBole atomic files) nor u.data "
            "(GroupLens files): pass --source DIR pointing at one of them, or leave --source "
            "out to use the copy inside the recbole wheel"
        )
    return builder.finish()


def read_movielens_1m(source: str | Path, report: ReadReport) -> SourceTable:
    """MovieLens-1M: ``ratings.dat`` (UserID::MovieID::Rating::Timestamp) and ``movies.dat``
    (MovieID::Title::Genres, genres separated by "|"), both ISO-8859-1."""
    directory = Path(source)
    hint = "pass --source DIR holding the ml-1m files ratings.dat and movies.dat"
    movies = _require_file(directory / "movies.dat", "MovieLens-1M movies file", hint)
    ratings = _require_file(directory / "ratings.dat", "MovieLens-1M ratings file", hint)
    builder = _TableBuilder("movielens-1m", report)
    for where, fields in _delimited(movies, "::", 3, "latin-1", report, "items"):
        builder.add_item(
            where,
            lambda fields=fields: (
                _identifier({"item_id": fields[0]}, "item_id"),
                _item_features(title=_text(fields[1]), categories=fields[2].split("|")),
            ),
        )
    for where, fields in _delimited(ratings, "::", 4, "latin-1", report, "interactions"):
        builder.add_interaction(where, lambda fields=fields: _plain_interaction(*fields))
    return builder.finish()


# ----------------------------------------------------------------------------- Amazon


def _amazon_review(record: Mapping) -> Interaction:
    """A 2018 review (reviewerID, asin, overall, unixReviewTime, reviewText, summary) or a 2023
    review (user_id, parent_asin, rating, timestamp in milliseconds, text, title)."""
    if "reviewerID" in record:
        return Interaction(
            user_id=_identifier(record, "reviewerID"),
            item_id=_identifier(record, "asin"),
            rating=parse_rating(record.get("overall")),
            timestamp=parse_timestamp(record.get("unixReviewTime")),
            review=_text(record.get("reviewText")),
            summary=_text(record.get("summary")),
        )
    if "user_id" in record:
        item_key = "parent_asin" if record.get("parent_asin") else "asin"
        return Interaction(
            user_id=_identifier(record, "user_id"),
            item_id=_identifier(record, item_key),
            rating=parse_rating(record.get("rating")),
            timestamp=parse_timestamp(record.get("timestamp")) // 1000,
            review=_text(record.get("text")),
            summary=_text(record.get("title")),
        )
    raise _Skip(
        "not an Amazon review", f"no reviewerID (2018) or user_id (2023) in keys {sorted(record)}"
    )


def _amazon_item(record: Mapping) -> tuple[str, dict[str, Any]]:
    """2018 metadata (asin, title, category, brand, price, description) or 2023 metadata
    (parent_asin, title, categories or main_category, store, price, description)."""
    if "parent_asin" in record:
        categories = _categories(record.get("categories")) or _categories(
            record.get("main_category")
        )
        return _identifier(record, "parent_asin"), _item_features(
            title=_text(record.get("title")),
            categories=categories,
            brand=_text(record.get("store")),
            price=_price(record.get("price")),
            description=_text(record.get("description")),
        )
    return _identifier(record, "asin"), _item_features(
        title=_text(record.get("title")),
        categories=_categories(record.get("category")),
        brand=_text(record.get("brand")),
        price=_price(record.get("price")),
        description=_text(record.get("description")),
    )


def _price(value: Any) -> float | str | None:
    """A number as a float; a string as given (Amazon 2018 writes "$12.99"); "None" is absent."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = _text(value)
    return None if text in (None, "None") else text


def _amazon_files(source: Path, meta: Path | None) -> tuple[list[Path], list[Path]]:
    """Review and metadata files. A directory: every ``meta_*`` file is metadata, every other
    ``*.json[l][.gz]`` file reviews. A file: it holds reviews; metadata is ``meta`` or the
    ``meta_<name>`` file beside it."""
    hint = (
        "pass --source DIR holding e.g. Digital_Music.json.gz and meta_Digital_Music.json.gz, "
        "or --source REVIEWS_FILE (with meta_<name> beside it or --meta META_FILE)"
    )
    suffixes = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.name.endswith(suffixes))
        reviews = [p for p in files if not p.name.startswith("meta_")]
        metas = [meta] if meta else [p for p in files if p.name.startswith("meta_")]
    else:
        reviews = [_require_file(source, "Amazon reviews file", hint)]
        metas = [meta or source.with_name(f"meta_{source.name}")]
    if not reviews:
        raise FileNotFoundError(f"no Amazon review file (*.json[l][.gz]) in {source} ({hint})")
    if not metas:
        raise FileNotFoundError(f"no Amazon metadata file (meta_*) in {source} ({hint})")
    for path in metas:
        _require_file(path, "Amazon metadata file", hint)
    return reviews, metas


def read_amazon(source: str | Path, report: ReadReport, meta: str | Path | None = None):
    """Amazon Reviews 2018 or 2023 (JSON lines, optionally gzipped), reviews joined to metadata
    on ``asin`` (2018) or ``parent_asin`` (2023)."""
    reviews, metas = _amazon_files(Path(source), Path(meta) if meta else None)
    builder = _TableBuilder("amazon", report, REVIEW_TEXTS)
    for path in metas:
        for where, record in _json_lines(path, report, "items"):
            builder.add_item(where, lambda record=record: _amazon_item(record))
    for path in reviews:
        for where, record in _json_lines(path, report, "interactions"):
            builder.add_interaction(where, lambda record=record: _amazon_review(record))
    return builder.finish()


# ----------------------------------------------------------------------------- Yelp


def _yelp_item(record: Mapping) -> tuple[str, dict[str, Any]]:
    """business.json: name, categories ("Mexican, Burgers"), attributes.RestaurantsPriceRange2
    (1-4, shown as "$".."$$$$")."""
    attributes = record.get("attributes") or {}
    level = str(attributes.get("RestaurantsPriceRange2", "")).strip()
    categories = _text(record.get("categories"))
    return _identifier(record, "business_id"), _item_features(
        title=_text(record.get("name")),
        categories=[c.strip() for c in categories.split(",") if c.strip()] if categories else None,
        price="$" * int(level) if level in ("1", "2", "3", "4") else None,
    )


def _yelp_review(record: Mapping) -> Interaction:
    return Interaction(
        user_id=_identifier(record, "user_id"),
        item_id=_identifier(record, "business_id"),
        rating=parse_rating(record.get("stars")),
        timestamp=parse_datetime(record.get("date")),
        review=_text(record.get("text")),
    )


def _single(directory: Path, suffix: str, hint: str) -> Path:
    found = sorted(directory.glob(f"*{suffix}"))
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({[p.name for p in found]})"
        raise FileNotFoundError(f"{what} matching *{suffix} in {directory} ({hint})")
    return found[0]


def read_yelp(source: str | Path, report: ReadReport) -> SourceTable:
    """Yelp Open Dataset: ``*review.json`` joined to ``*business.json`` on business_id."""
    directory = Path(source)
    hint = (
        "pass --source DIR holding yelp_academic_dataset_review.json and "
        "yelp_academic_dataset_business.json"
    )
    if not directory.is_dir():
        raise FileNotFoundError(f"Yelp source directory not found: {directory} ({hint})")
    business, review = (
        _single(directory, "business.json", hint),
        _single(directory, "review.json", hint),
    )
    builder = _TableBuilder("yelp", report, {"review": "review text"})
    for where, record in _json_lines(business, report, "items"):
        builder.add_item(where, lambda record=record: _yelp_item(record))
    for where, record in _json_lines(review, report, "interactions"):
        builder.add_interaction(where, lambda record=record: _yelp_review(record))
    return builder.finish()


# ----------------------------------------------------------------------------- processed tables


PICKLE_REFUSAL = (
    "refusing to unpickle {path}: loading a pickle runs whatever code the file holds. Pass "
    "--allow-pickle (allow_pickle=True) only for a file you trust, or convert it to parquet."
)


def _check_columns(path: Path, columns) -> None:
    missing = [column for column in TABLE_REQUIRED if column not in columns]
    if missing:
        raise DataError(
            f"{path}: no column(s) {missing}; a processed table needs {list(TABLE_REQUIRED)} "
            f"and may have {list(TABLE_OPTIONAL)} (PAPER.md, Data); found {sorted(columns)}"
        )


def _table_rows(path: Path, report: ReadReport, allow_pickle: bool):
    """(where, row dict) for every row of a parquet, JSON-lines or (opted-in) pickle table."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        _check_columns(path, table.schema_arrow.names)
        number = 0
        for batch in table.iter_batches(batch_size=65536):
            for row in batch.to_pylist():
                number += 1
                yield f"{path}: row {number}", row
    elif name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        yield from _json_lines(path, report, "interactions")
    elif name.endswith((".pkl", ".pickle")):
        if not allow_pickle:
            raise PermissionError(PICKLE_REFUSAL.format(path=path))
        with open(path, "rb") as handle:
            try:
                table = pickle.load(handle)  # noqa: S301 -- explicit opt-in above
            except ModuleNotFoundError as error:
                raise DataError(
                    f"{path}: the pickle needs module {error.name!r} (e.g. a pandas DataFrame); "
                    "convert it to parquet where that module is installed"
                ) from None
        rows = table.to_dict("records") if hasattr(table, "to_dict") else table
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: the pickle holds {type(table).__name__}, not rows")
        _check_columns(path, rows[0].keys() if rows else TABLE_REQUIRED)
        for number, row in enumerate(rows, 1):
            yield f"{path}: row {number}", row
    else:
        raise DataError(
            f"{path}: unknown table format; use .parquet, .jsonl/.json (JSON lines) or "
            ".pkl with --allow-pickle"
        )


def _table_interaction(row: Mapping) -> Interaction:
    return Interaction(
        user_id=_identifier(row, "user_id"),
        item_id=_identifier(row, "item_id"),
        rating=parse_rating(row.get("ratings")),
        timestamp=parse_timestamp(row.get("unixReviewTime")),
        review=_text(row.get("reviews")),
        summary=_text(row.get("summary")),
    )


def read_table(source: str | Path, report: ReadReport, allow_pickle: bool = False) -> SourceTable:
    """A processed table with PAPER.md's columns: required ``TABLE_REQUIRED``, optional
    ``TABLE_OPTIONAL``; other columns (Yelp's city, state, stars, review_count) are not used."""
    path = _require_file(
        Path(source), "table", "pass --source FILE.parquet|.jsonl|.pkl (with --allow-pickle)"
    )
    builder = _TableBuilder("table", report, REVIEW_TEXTS)
    for where, row in _table_rows(path, report, allow_pickle):
        missing = [column for column in TABLE_REQUIRED if column not in row]
        if missing:
            report.reject_line(
                "interactions", "missing column", where, f"no {missing}; columns: {sorted(row)}"
            )
            continue
        builder.add_item(
            where,
            lambda row=row: (
                _identifier(row, "item_id"),
                _item_features(
                    title=_text(row.get("title")),
                    categories=_categories(row.get("categories")),
                    brand=_text(row.get("brand")),
                    price=_price(row.get("price")),
                    description=_text(row.get("description")),
                ),
            ),
            count=False,  # every row repeats its item's features; items_read counts item files
        )
        builder.add_interaction(where, lambda row=row: _table_interaction(row))
    return builder.finish()


# ----------------------------------------------------------------------------- verl parquet

VERL_DATASET = "verl-parquet"
VERL_REQUIRED = ("prompt", "reward_model")  # data_source, ability, extra_info are optional
CHAT_ROLES = ("system", "user", "assistant")
# The fallback prediction for an unparseable answer is the user's average rating. A row that
# gives no average (neither a column, nor extra_info, nor its prompt text) gets the midpoint of
# the rating scale, the constant prediction that is never off by more than 2.
DEFAULT_AVG_RATING = (RATING_SCALE[0] + RATING_SCALE[1]) / 2
# Where a row may state its averages, in order: extra_info keys, then top-level columns (the
# authors' later scripts write user_avg / item_avg columns), then the prompt's own field.
AVG_KEYS = {
    "user_avg_rating": ("user_avg_rating", "user_avg"),
    "item_avg_rating": ("item_avg_rating", "target_item_avg_rating", "item_avg"),
}
AVG_IN_PROMPT = {
    name: re.compile(rf"(?<![A-Za-z_]){field}:\s*([0-9]+(?:\.[0-9]+)?)")
    for name, field in (("user_avg_rating", "user_avg_rating"),
                        ("item_avg_rating", "target_item_avg_rating"))
}
SPLIT_WORDS = {"train": "train", "val": "validation", "valid": "validation",
               "validation": "validation", "dev": "validation", "test": "test"}


@dataclass
class VerlTable:
    """Rows of verl parquet files as sample records, per split (``samples.SPLITS`` names), in
    file and row order; ``files``: rows read per file."""

    records: dict[str, list[dict[str, Any]]]
    report: ReadReport
    files: dict[str, int]


def _split_word(text: Any) -> str | None:
    """"train" / "validation" / "test" from a file stem or an extra_info.split value: the first
    word (split on ``_-. ``) that names a split, e.g. "music_train" -> train, "val" -> validation."""
    for word in re.split(r"[_\-. ]+", str(text).lower()):
        if word in SPLIT_WORDS:
            return SPLIT_WORDS[word]
    return None


def _chat_messages(value: Any) -> list[dict[str, str]]:
    """The prompt column: a non-empty list of {"role", "content"} messages (verl applies the
    chat template to it)."""
    if not isinstance(value, list | tuple) or not value:
        raise _Skip("prompt is not a non-empty list of chat messages", f"prompt {value!r:.120}")
    messages = []
    for message in value:
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise _Skip(
                "prompt message without a role and string content",
                f"message {message!r:.120}; need {{'role': one of {CHAT_ROLES}, 'content': str}}",
            )
        if not content.strip():
            raise _Skip("prompt message with empty content", f"{role} message {content!r}")
        messages.append({"role": role, "content": content})
    return messages


def _ground_truth(reward_model: Any) -> int:
    """reward_model.ground_truth as an integer rating: a number, a numeric string, or the
    authors' nested {"ground_truth": "4"}; reward_model.style, when given, must be "rule"."""
    if not isinstance(reward_model, Mapping):
        raise _Skip("reward_model is not a mapping", f"reward_model {reward_model!r:.120}")
    style = reward_model.get("style")
    if style not in (None, "rule"):
        raise _Skip("reward_model.style is not 'rule'", f"style {style!r} (only rule rewards)")
    truth = reward_model.get("ground_truth")
    if isinstance(truth, Mapping):
        truth = truth.get("ground_truth")
    if truth is None or (isinstance(truth, str) and not truth.strip()):
        raise _Skip("no reward_model.ground_truth", f"reward_model {reward_model!r:.120}")
    return parse_rating(truth)


def _average(name: str, row: Mapping, extra: Mapping, messages, notes: list[str]) -> float:
    """The row's ``name`` average (``AVG_KEYS`` order, then the prompt text), else
    ``DEFAULT_AVG_RATING``; each fallback adds a note (counted once the row is kept)."""
    for source, label in ((extra, "extra_info"), (row, "column")):
        for key in AVG_KEYS[name]:
            value = source.get(key)
            if value is not None:
                try:
                    return float(value)
                except (TypeError, ValueError):
                    raise _Skip(f"{name} is not a number", f"{label} {key} {value!r}") from None
    found = AVG_IN_PROMPT[name].findall(messages[-1]["content"])
    if found:
        notes.append(f"{name} not in the row: read from the prompt text")
        return float(found[-1])
    notes.append(f"{name} not in the row or its prompt: {DEFAULT_AVG_RATING} (scale midpoint)")
    return DEFAULT_AVG_RATING


def _verl_record(row: Mapping, file_split: str | None, notes: list[str]) -> dict[str, Any]:
    """One verl row -> its sample record plus "split": the scalars of every sample (ids from
    extra_info or columns, "" when absent; timestamp 0 when absent), the chat messages as
    ``prompt_messages``, both averages, and data_source, ability, extra_info as given."""
    messages = _chat_messages(row.get("prompt"))
    rating = _ground_truth(row.get("reward_model"))
    extra = row.get("extra_info")
    if extra is not None and not isinstance(extra, Mapping):
        raise _Skip("extra_info is not a mapping", f"extra_info {extra!r:.120}")
    extra = extra or {}
    row_split = _split_word(extra["split"]) if extra.get("split") is not None else None
    split = file_split or row_split
    if split is None:
        raise _Skip(
            "no split", "neither the file name nor extra_info.split names train/val/test: "
            "rename the file (e.g. train.parquet) or fill extra_info.split",
        )
    if file_split and row_split and row_split != file_split:
        notes.append("extra_info.split differs from the file name's split (file name used)")

    def identifier(key: str) -> str:
        value = extra.get(key, row.get(key))
        return "" if value is None else str(value).strip()

    timestamp = extra.get("timestamp", extra.get("unixReviewTime"))
    return {
        "split": split,
        "user_id": identifier("user_id"),
        "item_id": identifier("item_id"),
        "rating": rating,
        "timestamp": 0 if timestamp is None else parse_timestamp(timestamp),
        "prompt_messages": messages,
        "user_avg_rating": _average("user_avg_rating", row, extra, messages, notes),
        "item_avg_rating": _average("item_avg_rating", row, extra, messages, notes),
        "data_source": row.get("data_source"),
        "ability": row.get("ability"),
        "extra_info": dict(extra),
    }


def read_verl_parquet(sources: Sequence[str | Path], report: ReadReport) -> VerlTable:
    """The authors' verl parquet files -> sample records per split.

    Columns: ``prompt`` (a list of chat messages, in their files one user message holding the
    whole pre-formatted prompt), ``reward_model`` ({"style": "rule", "ground_truth": rating}),
    and optionally ``data_source``, ``ability``, ``extra_info`` (a dict: split, index, maybe
    user/item ids, timestamp and averages) and any other column (e.g. ``user_avg``). A file
    without ``prompt`` or ``reward_model`` is fatal; a bad row is skipped and counted by reason.
    A row's split comes from its file's name (``train.parquet``, ``music_val.parquet``), else
    from ``extra_info.split``.
    """
    import pyarrow.parquet as pq

    records: dict[str, list[dict[str, Any]]] = {}
    files: dict[str, int] = {}
    for source in sources:
        path = _require_file(Path(source), "verl parquet file", "pass --source FILE.parquet ...")
        try:
            table = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises several types for a file that is not parquet
            raise DataError(f"{path}: not a parquet file ({error})") from None
        missing = [c for c in VERL_REQUIRED if c not in table.schema_arrow.names]
        if missing:
            raise DataError(
                f"{path}: no column(s) {missing}; the verl layout has {list(VERL_REQUIRED)} and "
                f"optionally data_source, ability, extra_info; found {table.schema_arrow.names}"
            )
        file_split = _split_word(path.stem)
        number = 0
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                report.read["rows"] += 1
                notes: list[str] = []
                try:
                    record = _verl_record(row, file_split, notes)
                except _Skip as skip:
                    report.reject("rows", skip.reason, f"{path}: row {number}", skip.detail)
                    continue
                for note in notes:
                    report.clean(note)
                records.setdefault(record.pop("split"), []).append(record)
        files[str(path)] = number
    return VerlTable(records, report, files)


# ----------------------------------------------------------------------------- entry point


def read_source(
    dataset: str,
    source: str | Path | None = None,
    *,
    on_error: str = "skip",
    meta: str | Path | None = None,
    allow_pickle: bool = False,
) -> SourceTable:
    """Read ``dataset`` (one of ``DATASETS``) from ``source`` into a SourceTable."""
    report = ReadReport(on_error=on_error)
    if dataset == "movielens-100k":
        return read_movielens_100k(source, report)
    if source is None:
        raise ValueError(f"--source PATH is required for dataset {dataset!r}")
    if dataset == "movielens-1m":
        return read_movielens_1m(source, report)
    if dataset == "amazon":
        return read_amazon(source, report, meta)
    if dataset == "yelp":
        return read_yelp(source, report)
    if dataset == "table":
        return read_table(source, report, allow_pickle)
    raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
