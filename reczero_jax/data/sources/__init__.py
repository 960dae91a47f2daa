"""Raw rating files -> one interactions table (``SourceTable``): ``read_source(dataset, source)``.

One module per format users actually have (``READERS`` maps the ``--dataset`` names to them):

- ``movielens``: MovieLens-100k (RecBole atomic or GroupLens files; by default the copy inside
  the installed ``recbole`` wheel) and MovieLens-1M;
- ``amazon``: Amazon Reviews 2018 and 2023 (reviews + ``meta_`` files);
- ``yelp``: the Yelp Open Dataset (review + business files);
- ``table``: processed tables in PAPER.md's "Data" column layout.

``common`` holds what they share: ``Interaction``, ``SourceTable``, ``ReadReport`` (records read,
rejected by reason with examples, and cleaned), ``DataError``, field parsing, file access. Adding
a dataset: one module with a ``read_<name>(source, report, ...)`` function and one ``READERS``
line. The authors' verl parquet files are ready prompts, not interactions: their reader is
``reczero_jax.data.verl_parquet``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reczero_jax.data.sources import amazon, movielens, table, yelp
from reczero_jax.data.sources.common import (
    ON_ERROR,
    DataError,
    Interaction,
    ReadReport,
    SourceTable,
)


@dataclass(frozen=True)
class Reader:
    """``read(source, report, **options)``: ``options`` names the keyword arguments of
    ``read_source`` it takes; ``source_optional``: it has a default source."""

    read: Callable[..., SourceTable]
    options: tuple[str, ...] = ()
    source_optional: bool = False


READERS = {
    "movielens-100k": Reader(movielens.read_movielens_100k, source_optional=True),
    "movielens-1m": Reader(movielens.read_movielens_1m),
    "amazon": Reader(amazon.read_amazon, options=("meta",)),
    "yelp": Reader(yelp.read_yelp),
    "table": Reader(table.read_table, options=("allow_pickle",)),
}
DATASETS = tuple(READERS)

__all__ = ["DATASETS", "ON_ERROR", "READERS", "DataError", "Interaction", "ReadReport",
           "SourceTable", "read_source"]  # fmt: skip


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
    reader = READERS.get(dataset)
    if reader is None:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    if source is None and not reader.source_optional:
        raise ValueError(f"--source PATH is required for dataset {dataset!r}")
    options = {"meta": meta, "allow_pickle": allow_pickle}
    return reader.read(source, report, **{name: options[name] for name in reader.options})
