"""MovieLens readers.

- MovieLens-100k: RecBole atomic files (``ml-100k.inter``, ``ml-100k.item``; the default source is
  the copy inside the installed ``recbole`` wheel) or the GroupLens files (``u.data``, ``u.item``).
- MovieLens-1M: ``ratings.dat``, ``movies.dat``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from reczero_jax.data.sources.common import (
    DataError,
    Interaction,
    ReadReport,
    Skip,
    SourceTable,
    TableBuilder,
    clean_text,
    item_features,
    parse_identifier,
    parse_rating,
    parse_timestamp,
    read_delimited,
    read_lines,
    require_file,
)

# GroupLens ml-100k genre flags, in u.item column order (the same list as u.genre).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
def _atomic_rows(
    path: Path, needed: tuple[str, ...], report: ReadReport, role: str
) -> Iterator[tuple[str, dict[str, str]]]:
    """RecBole atomic file: a tab-separated header of "name:type" fields, then rows."""
    lines = read_lines(path, "utf-8", report, role)
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


def _read_recbole_100k(directory: Path, builder: TableBuilder) -> None:
    report = builder.report
    item_path = require_file(directory / "ml-100k.item", "MovieLens item file", "RecBole layout")
    for where, row in _atomic_rows(
        item_path, ("item_id", "movie_title", "release_year", "class"), report, "items"
    ):
        builder.add_item(
            where,
            lambda row=row: (
                parse_identifier(row, "item_id"),
                item_features(
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
        user_id=parse_identifier({"user_id": user}, "user_id"),
        item_id=parse_identifier({"item_id": item}, "item_id"),
        rating=parse_rating(rating),
        timestamp=parse_timestamp(timestamp),
    )


def _read_grouplens_100k(directory: Path, builder: TableBuilder) -> None:
    report = builder.report
    hint = "GroupLens ml-100k layout: u.data and u.item side by side"
    item_path = require_file(directory / "u.item", "MovieLens item file", hint)
    genres = ML100K_GENRES
    if (directory / "u.genre").is_file():
        genres = tuple(
            text.split("|")[0]
            for _, text in read_lines(directory / "u.genre", "latin-1", report, "items")
        )
    # GroupLens files are ISO-8859-1 (titles such as "Misérables, Les").
    for where, fields in read_delimited(item_path, "|", 5 + len(genres), "latin-1", report, "items"):
        flags = fields[5:]

        def parse(fields=fields, flags=flags):
            if any(flag not in ("0", "1") for flag in flags):
                raise Skip("malformed line", f"genre flags {flags} are not 0/1")
            categories = [name for name, flag in zip(genres, flags, strict=True) if flag == "1"]
            return parse_identifier({"item_id": fields[0]}, "item_id"), item_features(
                title=clean_text(fields[1]), categories=categories
            )

        builder.add_item(where, parse)
    data_path = require_file(directory / "u.data", "MovieLens ratings file", hint)
    for where, fields in read_delimited(data_path, "\t", 4, "latin-1", report, "interactions"):
        builder.add_interaction(where, lambda fields=fields: _plain_interaction(*fields))


def read_movielens_100k(source: str | Path | None, report: ReadReport) -> SourceTable:
    """MovieLens-100k from ``source`` (a directory holding ``ml-100k.inter`` or ``u.data``);
    None reads the copy in the installed ``recbole`` wheel."""
    if source is None:
        from reczero_jax.assets import movielens100k_dir

        source = movielens100k_dir()
    directory = Path(source)
    builder = TableBuilder("movielens-100k", report)
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
    movies = require_file(directory / "movies.dat", "MovieLens-1M movies file", hint)
    ratings = require_file(directory / "ratings.dat", "MovieLens-1M ratings file", hint)
    builder = TableBuilder("movielens-1m", report)
    for where, fields in read_delimited(movies, "::", 3, "latin-1", report, "items"):
        builder.add_item(
            where,
            lambda fields=fields: (
                parse_identifier({"item_id": fields[0]}, "item_id"),
                item_features(title=clean_text(fields[1]), categories=fields[2].split("|")),
            ),
        )
    for where, fields in read_delimited(ratings, "::", 4, "latin-1", report, "interactions"):
        builder.add_interaction(where, lambda fields=fields: _plain_interaction(*fields))
    return builder.finish()

