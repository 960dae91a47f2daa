"""Readers on the hand-written raw files in tests/data (real formats, broken lines included)."""

import json
import pickle
from pathlib import Path

import pytest

from reczero_jax.data.sources import DataError, read_source

DATA = Path(__file__).parent / "data"


def rejected(table, role="interactions"):
    """Rejection counts of one file role, keyed by reason without the role prefix."""
    prefix = f"{role}: "
    return {k[len(prefix) :]: v for k, v in table.report.rejected.items() if k.startswith(prefix)}


def test_amazon_2018_reviews_and_metadata():
    table = read_source("amazon", DATA / "amazon2018")
    report = table.report
    assert rejected(table) == {
        "malformed line": 2,  # truncated JSON; a JSON array
        "rating outside the integer 1..5 scale": 2,  # 6.0 and 4.5
        "duplicate (user, item, timestamp)": 1,
        "missing reviewerID": 1,
        "bad encoding (not utf-8)": 1,
        "item has no title (no item record)": 2,  # unknown asin; metadata with an empty title
    }
    assert rejected(table, "items") == {"malformed line": 1}
    # 34 non-blank review lines, 8 metadata lines: every one is read, kept or counted
    assert report.read["interactions"] == 34 == 25 + sum(rejected(table).values())
    assert report.read["items"] == 8
    assert len(table.interactions) == 25
    assert report.cleaned == {
        "empty review text (left out)": 1,
        "empty review summary (left out)": 1,
    }
    # every example names its file and line
    for examples in report.examples.values():
        assert all("Digital_Music.json" in example for example in examples)
    raw_lines = (DATA / "amazon2018" / "Digital_Music.json").read_bytes().split(b"\n")
    bad_line = next(n for n, line in enumerate(raw_lines, 1) if b"\xe9" in line)
    encoding_example = report.examples["interactions: bad encoding (not utf-8)"][0]
    assert f"Digital_Music.json:{bad_line}:" in encoding_example

    first = table.interactions[0]
    assert (first.user_id, first.item_id, first.rating, first.timestamp) == (
        "U1", "B0001", 1, 1_400_000_000,
    )  # fmt: skip
    assert first.review == "U1 on Kind of Blue: review text number 0." and first.summary
    assert table.items["B0002"] == {
        "title": "Blue Train",
        "categories": ["CDs & Vinyl", "Jazz"],
        "brand": "Blue Note",
        "price": "$10.99",
        "description": "A classic Blue Note record. Remastered.",
    }
    assert set(table.items) == {"B0001", "B0002", "B0003", "B0004", "B0005"}
    empty_text = [i for i in table.interactions if i.review is None]
    assert [(i.user_id, i.item_id) for i in empty_text] == [("U3", "B0002")]


def test_amazon_2018_fail_mode_names_file_and_line():
    with pytest.raises(DataError, match=r"meta_Digital_Music\.json:8: malformed line"):
        read_source("amazon", DATA / "amazon2018", on_error="fail")


def test_amazon_2023_format():
    table = read_source("amazon", DATA / "amazon2023" / "All_Beauty.jsonl")
    assert rejected(table) == {
        "rating outside the integer 1..5 scale": 1,
        "not an Amazon review": 1,
    }
    assert len(table.interactions) == 12
    first = table.interactions[0]
    # parent_asin is the item; millisecond timestamps become seconds; review title = summary
    assert (first.user_id, first.item_id, first.timestamp) == ("AGU1", "B0001", 1_400_000_000)
    assert (first.review, first.summary) == ("text 00", "headline 00")
    # no categories -> main_category; store -> brand; a null price is left out
    assert table.items["B0001"] == {
        "title": "Beauty product 0", "categories": "All Beauty", "brand": "Store 0", "price": 5.5,
    }  # fmt: skip
    assert "price" not in table.items["B0002"]
    assert table.items["B0002"]["description"] == "Description 1."


def test_amazon_missing_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Amazon review file"):
        read_source("amazon", tmp_path)
    reviews = tmp_path / "Books.json"
    reviews.write_text("")
    with pytest.raises(FileNotFoundError, match="metadata file not found: .*meta_Books.json"):
        read_source("amazon", reviews)


def test_yelp_reviews_and_businesses():
    table = read_source("yelp", DATA / "yelp")
    assert rejected(table) == {
        "date is not YYYY-MM-DD HH:MM:SS": 1,
        "rating outside the integer 1..5 scale": 1,
        "malformed line": 1,
    }
    assert table.report.cleaned == {"empty review text (left out)": 1}
    assert len(table.interactions) == 12
    assert table.interactions[0].timestamp == 1_551_441_600  # 2019-03-01 12:00:00 UTC
    assert table.items == {
        "bizA": {"title": "Taco Town", "categories": ["Mexican", "Restaurants"], "price": "$"},
        "bizB": {"title": "Burger Barn", "categories": ["Burgers", "Restaurants"]},
        "bizC": {"title": "Noodle Nook"},
    }


def test_yelp_missing_directory():
    with pytest.raises(FileNotFoundError, match="Yelp source directory not found"):
        read_source("yelp", DATA / "no-such-dir")


def check_music_table(table):
    assert rejected(table) == {
        "missing column": 1,
        "duplicate (user, item, timestamp)": 1,
        "rating is not a number": 1,
        "timestamp is not a number": 1,
    }
    assert table.report.cleaned == {"empty review text (left out)": 1}
    assert len(table.interactions) == 17
    assert table.items["m2"] == {
        "title": "Album 2", "categories": "Digital Music", "brand": "Band 2", "price": "$12.00",
        "description": "Album number 2.",
    }  # fmt: skip
    assert table.items["m1"]["categories"] == ["Digital Music", "Rock"]


def test_table_json_lines():
    table = read_source("table", DATA / "table" / "music.jsonl")
    check_music_table(table)
    assert "music.jsonl:3" in table.report.examples["interactions: missing column"][0]


def test_table_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DATA / "table" / "music.jsonl").read_text().splitlines()]
    # parquet columns hold one type: write the mixed ones as text, the way pandas would
    for row in rows:
        for key in ("ratings", "unixReviewTime", "price", "categories"):
            row[key] = None if key not in row else str(row[key])
    path = tmp_path / "music.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    table = read_source("table", path)
    assert len(table.interactions) == 17
    assert rejected(table)["rating is not a number"] == 2  # "abc" and the missing (null) rating


def test_table_parquet_without_required_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"user_id": "u", "item_id": "i", "ratings": 3}]), path)
    with pytest.raises(DataError, match=r"no column\(s\) \['title', 'unixReviewTime'\]"):
        read_source("table", path)


def test_pickle_needs_opt_in(tmp_path):
    rows = [json.loads(line) for line in (DATA / "table" / "music.jsonl").read_text().splitlines()]
    path = tmp_path / "music.pkl"
    path.write_bytes(pickle.dumps(rows))
    with pytest.raises(PermissionError, match="runs whatever code"):
        read_source("table", path)
    check_music_table(read_source("table", path, allow_pickle=True))


def test_grouplens_100k_files():
    table = read_source("movielens-100k", DATA / "grouplens100k")
    assert rejected(table) == {
        "rating outside the integer 1..5 scale": 1,
        "malformed line": 1,  # spaces instead of tabs
        "item has no title (no item record)": 1,
    }
    assert rejected(table, "items") == {"malformed line": 1}
    # u.item is ISO-8859-1; genres come from the 0/1 flags in GroupLens' genre order
    assert table.items["2"] == {
        "title": "Misérables, Les (1995)",
        "categories": ["Drama", "Musical"],
    }
    assert table.items["1"]["categories"] == ["Animation", "Children's", "Comedy"]
    assert len(table.interactions) == 12


def test_movielens_1m_files():
    table = read_source("movielens-1m", DATA / "ml-1m")
    assert rejected(table) == {"malformed line": 1, "timestamp is not a non-negative integer": 1}
    assert table.items["2"] == {
        "title": "Jumanji (1995)", "categories": ["Adventure", "Children's", "Fantasy"],
    }  # fmt: skip
    assert len(table.interactions) == 12


def test_movielens_wheel_default():
    table = read_source("movielens-100k")
    assert len(table.interactions) == 100_000 and not table.report.rejected
    assert len(table.items) == 1682
    # RecBole splits "Toy Story (1995)" into title and year; the reader joins them back
    assert table.items["1"] == {
        "title": "Toy Story (1995)", "categories": ["Animation", "Children's", "Comedy"],
    }  # fmt: skip


def test_missing_sources_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither ml-100k.inter"):
        read_source("movielens-100k", tmp_path)
    with pytest.raises(FileNotFoundError, match="ratings.dat"):
        read_source("movielens-1m", tmp_path)
    with pytest.raises(ValueError, match="--source PATH is required"):
        read_source("yelp")
    with pytest.raises(ValueError, match="unknown dataset"):
        read_source("netflix", tmp_path)
