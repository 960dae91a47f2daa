"""Samples and splits on MovieLens-100k from the recbole wheel, checked against an independent
reading of the raw file (plain loops and numpy, not the package's index)."""

import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from reczero_jax.assets import movielens100k_dir
from reczero_jax.data.samples import (
    DROP_NO_ITEM_HISTORY,
    DROP_NO_USER_HISTORY,
    DROP_TOO_FEW,
    SPLITS,
    SampleConfig,
    build_samples,
)
from reczero_jax.data.sources import read_source

DATA = Path(__file__).parent / "data"
L, MIN_TOTAL = 10, 5


@pytest.fixture(scope="module")
def raw():
    """ml-100k.inter and ml-100k.item read with str.split: rows (user, item, rating, time, line)."""
    directory = movielens100k_dir()
    lines = (directory / "ml-100k.inter").read_text().splitlines()[1:]
    rows = []
    for number, line in enumerate(lines):
        user, item, rating, time = line.split("\t")
        rows.append((user, item, int(float(rating)), int(float(time)), number))
    titles = {}
    for line in (directory / "ml-100k.item").read_text().splitlines()[1:]:
        item, title, year, _ = line.split("\t")
        titles[item] = f"{title} ({year})" if year.isdigit() else title
    return rows, titles


@pytest.fixture(scope="module")
def sample_set():
    return build_samples(read_source("movielens-100k"))


@pytest.fixture(scope="module")
def kept_by_numpy(raw):
    """Independent keep/drop decision for every row: counts of earlier ratings by numpy."""
    rows, _ = raw
    users = np.array([int(r[0]) for r in rows])
    items = np.array([int(r[1]) for r in rows])
    times = np.array([r[3] for r in rows])
    assert len({(u, i) for u, i in zip(users, items, strict=True)}) == len(rows)  # pairs unique

    def earlier(groups):
        counts = np.zeros(len(rows), dtype=np.int64)
        for group in np.unique(groups):
            members = np.flatnonzero(groups == group)
            group_times = np.sort(times[members])
            counts[members] = np.searchsorted(group_times, times[members], side="left")
        return counts

    # with unique (user, item) pairs, "the item's earlier ratings by others" = all earlier ratings
    n_user, n_item = earlier(users), earlier(items)
    shown = np.minimum(n_user, L) + np.minimum(n_item, L)
    return n_user, n_item, (n_user > 0) & (n_item > 0) & (shown >= MIN_TOTAL)


def test_filter_counts_match_independent_count(sample_set, kept_by_numpy):
    n_user, n_item, kept = kept_by_numpy
    report = sample_set.report()
    assert sum(report["samples"].values()) == kept.sum()
    assert report["targets_dropped"] == {
        DROP_NO_USER_HISTORY: int((n_user == 0).sum()),
        DROP_NO_ITEM_HISTORY: int(((n_user > 0) & (n_item == 0)).sum()),
        DROP_TOO_FEW.format(n=MIN_TOTAL): int(((n_user > 0) & (n_item > 0) & ~kept).sum()),
    }


def test_per_user_split_sizes_and_order(sample_set, raw, kept_by_numpy):
    rows, _ = raw
    kept = kept_by_numpy[2]
    kept_per_user = defaultdict(list)
    for row, keep in zip(rows, kept, strict=True):
        if keep:
            kept_per_user[row[0]].append((row[3], row[4]))
    splits = sample_set.splits
    interactions = sample_set.index.table.interactions
    assert len(splits["test"]) == len(kept_per_user)
    assert len(splits["validation"]) == sum(len(v) >= 2 for v in kept_per_user.values())
    assert len(splits["train"]) == kept.sum() - len(splits["test"]) - len(splits["validation"])
    # each user's test target is their latest kept target, validation the one before
    for split, position in (("test", -1), ("validation", -2)):
        for k in splits[split]:
            interaction = interactions[k]
            latest = sorted(kept_per_user[interaction.user_id])[position]
            assert latest == (interaction.timestamp, k)  # read order = line order here
    # splits are disjoint and each is in time order
    all_targets = [k for split in SPLITS for k in splits[split]]
    assert len(set(all_targets)) == len(all_targets)
    for split in SPLITS:
        keys = [(interactions[k].timestamp, k) for k in splits[split]]
        assert keys == sorted(keys)


def check_sample_against_raw(sample, rows_by_user, rows_by_item, titles):
    """Recompute one sample's histories and averages with plain loops over the raw rows."""
    user, item, time = sample["user_id"], sample["item_id"], sample["timestamp"]
    user_before = sorted((r for r in rows_by_user[user] if r[3] < time), key=lambda r: (r[3], r[4]))
    item_before = sorted(
        (r for r in rows_by_item[item] if r[3] < time and r[0] != user), key=lambda r: (r[3], r[4])
    )
    assert sample["user_avg_rating"] == pytest.approx(
        sum(r[2] for r in user_before) / len(user_before), abs=1e-12
    )
    assert sample["item_avg_rating"] == pytest.approx(
        sum(r[2] for r in item_before) / len(item_before), abs=1e-12
    )
    expected_user = [(r[1], titles[r[1]], r[2], r[3]) for r in user_before[-L:]]
    got_user = [
        (e["item_id"], e["title"], e["rating"], e["timestamp"]) for e in sample["user_history"]
    ]
    assert got_user == expected_user
    expected_item = [(r[0], r[2], r[3]) for r in item_before[-L:]]
    got_item = [(e["user_id"], e["rating"], e["timestamp"]) for e in sample["item_history"]]
    assert got_item == expected_item


def test_histories_and_averages_match_raw_file(sample_set, raw):
    rows, titles = raw
    rows_by_user, rows_by_item = defaultdict(list), defaultdict(list)
    for row in rows:
        rows_by_user[row[0]].append(row)
        rows_by_item[row[1]].append(row)
    rng = random.Random(7)
    for split, count in (("train", 300), ("validation", 100), ("test", 100)):
        for k in rng.sample(sample_set.splits[split], count):
            sample = sample_set.sample(k, split)
            assert sample["split"] == split and sample["dataset"] == "movielens-100k"
            assert titles[sample["item_id"]] == sample["item"]["title"]
            check_sample_against_raw(sample, rows_by_user, rows_by_item, titles)


def test_no_history_entry_at_or_after_target_time(sample_set):
    rng = random.Random(3)
    targets = {split: sample_set.splits[split] for split in ("validation", "test")}
    targets["train"] = rng.sample(sample_set.splits["train"], 5000)
    checked = 0
    for split, ks in targets.items():
        for k in ks:
            sample = sample_set.sample(k, split)
            history = sample["user_history"] + sample["item_history"]
            assert all(entry["timestamp"] < sample["timestamp"] for entry in history)
            assert all(e["user_id"] != sample["user_id"] for e in sample["item_history"])
            assert sample["user_history"] and sample["item_history"]
            assert len(sample["user_history"]) + len(sample["item_history"]) >= MIN_TOTAL
            assert max(len(sample["user_history"]), len(sample["item_history"])) <= L
            checked += 1
    assert checked == 5000 + len(targets["validation"]) + len(targets["test"])


def test_global_time_split_cuts_at_timestamps(sample_set):
    table = sample_set.index.table
    sample_set = build_samples(table, SampleConfig(split_mode="global-time"))
    times = {
        split: [table.interactions[k].timestamp for k in sample_set.splits[split]]
        for split in SPLITS
    }
    assert max(times["train"]) < min(times["validation"])
    assert max(times["validation"]) < min(times["test"])
    total = sum(len(t) for t in times.values())
    assert abs(len(times["test"]) - 0.1 * total) < 0.01 * total
    assert abs(len(times["validation"]) - 0.1 * total) < 0.01 * total


def test_max_samples_takes_a_seeded_subset_in_time_order(sample_set):
    config = SampleConfig(max_samples=(("train", 500), ("test", 50)), seed=1)
    capped = build_samples(sample_set.index.table, config)
    assert len(capped.splits["train"]) == 500 and len(capped.splits["test"]) == 50
    assert capped.splits["validation"] == sample_set.splits["validation"]
    assert set(capped.splits["train"]) <= set(sample_set.splits["train"])
    assert capped.available["train"] == len(sample_set.splits["train"])
    order = {k: n for n, k in enumerate(sample_set.index.order)}
    assert capped.splits["train"] == sorted(capped.splits["train"], key=order.__getitem__)
    again = build_samples(sample_set.index.table, config)
    assert again.splits == capped.splits


def test_repeated_rating_of_an_item_is_not_in_its_own_item_history():
    """In the table file user t3 rates m1 twice; the later target must not see the earlier one
    in the item history, nor count it in the item average."""
    table = read_source("table", DATA / "table" / "music.jsonl")
    sample_set = build_samples(table, SampleConfig(min_history_total=2))
    repeats = [
        k
        for k, interaction in enumerate(table.interactions)
        if (interaction.user_id, interaction.item_id, interaction.review) == ("t3", "m1", None)
    ]
    assert len(repeats) == 1
    sample = sample_set.sample(repeats[0], "test")
    others = [i for i in table.interactions if i.item_id == "m1" and i.user_id != "t3"]
    assert [e["user_id"] for e in sample["item_history"]] == [i.user_id for i in others]
    assert sample["item_avg_rating"] == sum(i.rating for i in others) / len(others)
    # the user's own earlier rating of m1 is in the user history (with the item's features)
    assert [e["item_id"] for e in sample["user_history"]].count("m1") == 1
    entry = next(e for e in sample["user_history"] if e["item_id"] == "m1")
    assert entry["brand"] == "Band 1" and entry["review"] == "review 13"


def test_sample_config_rejects_bad_values():
    with pytest.raises(ValueError, match="split_mode"):
        SampleConfig(split_mode="random")
    with pytest.raises(ValueError, match="sum below 1"):
        SampleConfig(validation_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="max_samples entry"):
        SampleConfig(max_samples=(("dev", 3),))
