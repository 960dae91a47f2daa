"""Yelp Open Dataset: ``yelp_academic_dataset_review.json`` + ``..._business.json``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reczero_jax.data.sources.common import (
    Interaction,
    ReadReport,
    SourceTable,
    TableBuilder,
    clean_text,
    item_features,
    parse_datetime,
    parse_identifier,
    parse_rating,
    read_json_lines,
)


def _yelp_item(record: Mapping) -> tuple[str, dict[str, Any]]:
    """business.json: name, categories ("Mexican, Burgers"), attributes.RestaurantsPriceRange2
    (1-4, shown as "$".."$$$$")."""
    attributes = record.get("attributes") or {}
    level = str(attributes.get("RestaurantsPriceRange2", "")).strip()
    categories = clean_text(record.get("categories"))
    return parse_identifier(record, "business_id"), item_features(
        title=clean_text(record.get("name")),
        categories=[c.strip() for c in categories.split(",") if c.strip()] if categories else None,
        price="$" * int(level) if level in ("1", "2", "3", "4") else None,
    )


def _yelp_review(record: Mapping) -> Interaction:
    return Interaction(
        user_id=parse_identifier(record, "user_id"),
        item_id=parse_identifier(record, "business_id"),
        rating=parse_rating(record.get("stars")),
        timestamp=parse_datetime(record.get("date")),
        review=clean_text(record.get("text")),
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
    builder = TableBuilder("yelp", report, {"review": "review text"})
    for where, record in read_json_lines(business, report, "items"):
        builder.add_item(where, lambda record=record: _yelp_item(record))
    for where, record in read_json_lines(review, report, "interactions"):
        builder.add_interaction(where, lambda record=record: _yelp_review(record))
    return builder.finish()
