"""Amazon Reviews: the 2018 per-category files (``Digital_Music.json[.gz]`` + ``meta_...``) and
the 2023 files (``Digital_Music.jsonl[.gz]`` + ``meta_...``); the format is recognised per line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reczero_jax.data.sources.common import (
    REVIEW_TEXTS,
    Interaction,
    ReadReport,
    Skip,
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


def _amazon_review(record: Mapping) -> Interaction:
    """A 2018 review (reviewerID, asin, overall, unixReviewTime, reviewText, summary) or a 2023
    review (user_id, parent_asin, rating, timestamp in milliseconds, text, title)."""
    if "reviewerID" in record:
        return Interaction(
            user_id=parse_identifier(record, "reviewerID"),
            item_id=parse_identifier(record, "asin"),
            rating=parse_rating(record.get("overall")),
            timestamp=parse_timestamp(record.get("unixReviewTime")),
            review=clean_text(record.get("reviewText")),
            summary=clean_text(record.get("summary")),
        )
    if "user_id" in record:
        item_key = "parent_asin" if record.get("parent_asin") else "asin"
        return Interaction(
            user_id=parse_identifier(record, "user_id"),
            item_id=parse_identifier(record, item_key),
            rating=parse_rating(record.get("rating")),
            timestamp=parse_timestamp(record.get("timestamp")) // 1000,
            review=clean_text(record.get("text")),
            summary=clean_text(record.get("title")),
        )
    raise Skip(
        "not an Amazon review", f"no reviewerID (2018) or user_id (2023) in keys {sorted(record)}"
    )


def _amazon_item(record: Mapping) -> tuple[str, dict[str, Any]]:
    """2018 metadata (asin, title, category, brand, price, description) or 2023 metadata
    (parent_asin, title, categories or main_category, store, price, description)."""
    if "parent_asin" in record:
        categories = parse_categories(record.get("categories")) or parse_categories(
            record.get("main_category")
        )
        return parse_identifier(record, "parent_asin"), item_features(
            title=clean_text(record.get("title")),
            categories=categories,
            brand=clean_text(record.get("store")),
            price=parse_price(record.get("price")),
            description=clean_text(record.get("description")),
        )
    return parse_identifier(record, "asin"), item_features(
        title=clean_text(record.get("title")),
        categories=parse_categories(record.get("category")),
        brand=clean_text(record.get("brand")),
        price=parse_price(record.get("price")),
        description=clean_text(record.get("description")),
    )



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
        reviews = [require_file(source, "Amazon reviews file", hint)]
        metas = [meta or source.with_name(f"meta_{source.name}")]
    if not reviews:
        raise FileNotFoundError(f"no Amazon review file (*.json[l][.gz]) in {source} ({hint})")
    if not metas:
        raise FileNotFoundError(f"no Amazon metadata file (meta_*) in {source} ({hint})")
    for path in metas:
        require_file(path, "Amazon metadata file", hint)
    return reviews, metas


def read_amazon(source: str | Path, report: ReadReport, meta: str | Path | None = None):
    """Amazon Reviews 2018 or 2023 (JSON lines, optionally gzipped), reviews joined to metadata
    on ``asin`` (2018) or ``parent_asin`` (2023)."""
    reviews, metas = _amazon_files(Path(source), Path(meta) if meta else None)
    builder = TableBuilder("amazon", report, REVIEW_TEXTS)
    for path in metas:
        for where, record in read_json_lines(path, report, "items"):
            builder.add_item(where, lambda record=record: _amazon_item(record))
    for path in reviews:
        for where, record in read_json_lines(path, report, "interactions"):
            builder.add_interaction(where, lambda record=record: _amazon_review(record))
    return builder.finish()
