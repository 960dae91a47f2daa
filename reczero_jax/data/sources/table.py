"""Processed tables (parquet, JSON lines, or pickle behind ``allow_pickle``) in the column layout
of PAPER.md's "Data" section: one row per interaction, item features repeated on every row."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

from reczero_jax.data.sources.common import (
    REVIEW_TEXTS,
    DataError,
    Interaction,
    ReadReport,
    SourceTable,
    TableBuilder,
    clean_text,
    item_features,
    parse_categories,
    parse_identifier,
    parse_price,
    parse_rating,
    parse_timestamp,
    read_json_lines,
    require_file,
)

# PAPER.md "Data": the Reason4Rec processed tables.
TABLE_REQUIRED = ("user_id", "item_id", "title", "ratings", "unixReviewTime")
TABLE_OPTIONAL = ("reviews", "summary", "categories", "brand", "price", "description")


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
        yield from read_json_lines(path, report, "interactions")
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
        user_id=parse_identifier(row, "user_id"),
        item_id=parse_identifier(row, "item_id"),
        rating=parse_rating(row.get("ratings")),
        timestamp=parse_timestamp(row.get("unixReviewTime")),
        review=clean_text(row.get("reviews")),
        summary=clean_text(row.get("summary")),
    )


def read_table(source: str | Path, report: ReadReport, allow_pickle: bool = False) -> SourceTable:
    """A processed table with PAPER.md's columns: required ``TABLE_REQUIRED``, optional
    ``TABLE_OPTIONAL``; other columns (Yelp's city, state, stars, review_count) are not used."""
    path = require_file(
        Path(source), "table", "pass --source FILE.parquet|.jsonl|.pkl (with --allow-pickle)"
    )
    builder = TableBuilder("table", report, REVIEW_TEXTS)
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
                parse_identifier(row, "item_id"),
                item_features(
                    title=clean_text(row.get("title")),
                    categories=parse_categories(row.get("categories")),
                    brand=clean_text(row.get("brand")),
                    price=parse_price(row.get("price")),
                    description=clean_text(row.get("description")),
                ),
            ),
            count=False,  # every row repeats its item's features; items_read counts item files
        )
        builder.add_interaction(where, lambda row=row: _table_interaction(row))
    return builder.finish()
