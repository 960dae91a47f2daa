"""Leak-free Think-before-Recommendation samples and their chronological splits.

Every interaction of a ``SourceTable`` is a candidate target. For a target (user u, item i,
time t), with L = ``history_len`` (10):

- ``user_history``: u's interactions with timestamp < t (strictly), the most recent L, oldest
  first; ``user_avg_rating``: the mean rating over ALL of u's interactions with timestamp < t.
- ``item_history``: i's interactions by users other than u with timestamp < t, the most recent L,
  oldest first; ``item_avg_rating``: the mean over ALL of those.

Histories draw on every interaction before t, whatever split it lands in; ties in time are not
"before" (nothing at the target's own second is shown). A target is kept only if both histories
are non-empty and together hold at least ``min_history_total`` (5) entries. Kept targets are split:

- ``per-user`` (default): for each user, in time order, the last kept target is ``test``, the one
  before it ``validation``, the rest ``train`` (a user with one kept target has only ``test``);
- ``global-time``: kept targets in time order, cut at two timestamps so that about
  ``validation_fraction`` and ``test_fraction`` of them fall in ``validation`` and ``test``
  (targets at the same second stay in the same split).

Equal timestamps are ordered by read order, so splits are deterministic.

Sample record (the contract ``reczero_jax.prompts`` and the pipeline read); a dict with:
    user_id: str, item_id: str, rating: int (1..5), timestamp: int (unix seconds),
    item: dict, the target item's fixed features, only those the dataset has, of
        {title: str, categories: list[str] | str, brand: str, price: float | str,
         description: str},
    user_history: list (oldest first, at most L) of dicts {item_id, title, rating, timestamp,
        and where the dataset has them: categories, brand, price, description, summary, review}
        (summary and review are the user's own text on that item),
    item_history: list (oldest first, at most L) of dicts {user_id, rating, timestamp, and where
        available: review, summary},
    user_avg_rating: float, item_avg_rating: float (as above),
    dataset: str, split: str ("train" | "validation" | "test").
Optional fields the dataset lacks are absent (never empty strings).
"""

from __future__ import annotations

import bisect
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from reczero_jax.data.sources import Interaction, SourceTable

SPLITS = ("train", "validation", "test")
SPLIT_MODES = ("per-user", "global-time")
DROP_NO_USER_HISTORY = "no earlier interaction by the user"
DROP_NO_ITEM_HISTORY = "no earlier interaction with the item by another user"
DROP_TOO_FEW = "fewer than {n} history entries in total"


@dataclass(frozen=True)
class SampleConfig:
    """How targets become samples and splits (module docstring). ``max_samples`` caps a split
    at a seeded random subset (kept in time order), e.g. ``{"train": 16000, "test": 1000}``."""

    history_len: int = 10
    min_history_total: int = 5
    split_mode: str = "per-user"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    max_samples: tuple[tuple[str, int], ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(f"split_mode must be one of {SPLIT_MODES}, got {self.split_mode!r}")
        if self.history_len < 1 or self.min_history_total < 2:
            raise ValueError(
                "history_len must be >= 1 and min_history_total >= 2 (both histories non-empty)"
            )
        if not (0 <= self.validation_fraction and 0 <= self.test_fraction) or (
            self.validation_fraction + self.test_fraction >= 1
        ):
            raise ValueError("validation_fraction and test_fraction must be >= 0 and sum below 1")
        for split, count in self.max_samples:
            if split not in SPLITS or count < 1:
                raise ValueError(
                    f"max_samples entry {split}={count}: use a split of {SPLITS}, N>=1"
                )


@dataclass
class _Timeline:
    """One user's or one item's interactions in time order, with prefix sums of the ratings."""

    indices: list[int] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    rating_sums: list[int] = field(default_factory=lambda: [0])

    def append(self, index: int, interaction: Interaction) -> None:
        self.indices.append(index)
        self.times.append(interaction.timestamp)
        self.rating_sums.append(self.rating_sums[-1] + interaction.rating)

    def count_before(self, time: int) -> int:
        return bisect.bisect_left(self.times, time)


@dataclass(frozen=True)
class _Target:
    """What a target's histories hold, without building them: counts and rating sums."""

    user_count: int
    user_sum: int
    item_count: int
    item_sum: int


class InteractionIndex:
    """Per-user and per-item timelines of a SourceTable, for O(log n) history look-ups."""

    def __init__(self, table: SourceTable):
        self.table = table
        interactions = table.interactions
        self.order = sorted(range(len(interactions)), key=lambda k: (interactions[k].timestamp, k))
        self.users: dict[str, _Timeline] = defaultdict(_Timeline)
        self.items: dict[str, _Timeline] = defaultdict(_Timeline)
        pairs: dict[tuple[str, str], _Timeline] = defaultdict(_Timeline)
        for k in self.order:
            interaction = interactions[k]
            self.users[interaction.user_id].append(k, interaction)
            self.items[interaction.item_id].append(k, interaction)
            pairs[interaction.user_id, interaction.item_id].append(k, interaction)
        # A user's own earlier ratings of the same item are excluded from the item's history;
        # only pairs rated more than once can have any.
        self.repeated_pairs = {key: line for key, line in pairs.items() if len(line.indices) > 1}

    def target(self, k: int) -> _Target:
        interaction = self.table.interactions[k]
        user = self.users[interaction.user_id]
        item = self.items[interaction.item_id]
        user_count = user.count_before(interaction.timestamp)
        item_count = item.count_before(interaction.timestamp)
        item_sum = item.rating_sums[item_count]
        own = self.repeated_pairs.get((interaction.user_id, interaction.item_id))
        if own is not None:
            own_count = own.count_before(interaction.timestamp)
            item_count -= own_count
            item_sum -= own.rating_sums[own_count]
        return _Target(user_count, user.rating_sums[user_count], item_count, item_sum)

    def user_history(self, k: int, length: int) -> list[int]:
        """Indices of the user's most recent ``length`` interactions before k's time, oldest
        first."""
        interaction = self.table.interactions[k]
        user = self.users[interaction.user_id]
        end = user.count_before(interaction.timestamp)
        return user.indices[max(0, end - length) : end]

    def item_history(self, k: int, length: int) -> list[int]:
        """Indices of the item's most recent ``length`` interactions by other users before k's
        time, oldest first."""
        interaction = self.table.interactions[k]
        item = self.items[interaction.item_id]
        end = item.count_before(interaction.timestamp)
        if (interaction.user_id, interaction.item_id) not in self.repeated_pairs:
            return item.indices[max(0, end - length) : end]  # no earlier own rating to skip
        picked = []
        for position in range(end - 1, -1, -1):
            other = item.indices[position]
            if self.table.interactions[other].user_id != interaction.user_id:
                picked.append(other)
                if len(picked) == length:
                    break
        return picked[::-1]


def drop_reason(target: _Target, config: SampleConfig) -> str | None:
    """Why a target is not kept (None: kept)."""
    if target.user_count == 0:
        return DROP_NO_USER_HISTORY
    if target.item_count == 0:
        return DROP_NO_ITEM_HISTORY
    shown = min(target.user_count, config.history_len) + min(target.item_count, config.history_len)
    if shown < config.min_history_total:
        return DROP_TOO_FEW.format(n=config.min_history_total)
    return None


def _split_per_user(kept: list[int], table: SourceTable) -> dict[str, list[int]]:
    by_user: dict[str, list[int]] = defaultdict(list)
    for k in kept:  # kept is in time order, so each user's list is too
        by_user[table.interactions[k].user_id].append(k)
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    for targets in by_user.values():
        splits["test"].append(targets[-1])
        if len(targets) > 1:
            splits["validation"].append(targets[-2])
        splits["train"].extend(targets[:-2])
    return splits


def _split_global_time(
    kept: list[int], table: SourceTable, config: SampleConfig
) -> dict[str, list[int]]:
    times = [table.interactions[k].timestamp for k in kept]

    def cut(fraction_before: float) -> int:
        position = min(round(len(kept) * fraction_before), len(kept))
        # Move the cut back to the first target at that second: one second, one split.
        return bisect.bisect_left(times, times[position]) if position < len(kept) else position

    train_end = cut(1 - config.validation_fraction - config.test_fraction)
    validation_end = cut(1 - config.test_fraction)
    return {
        "train": kept[:train_end],
        "validation": kept[train_end:validation_end],
        "test": kept[validation_end:],
    }


@dataclass(frozen=True)
class TargetParts:
    """A kept target's history interaction indices (oldest first) and mean ratings."""

    user_history: list[int]
    item_history: list[int]
    user_avg_rating: float
    item_avg_rating: float


def _review_text(interaction: Interaction) -> dict[str, str]:
    """The interaction's review summary and text, only those it has."""
    fields = {"summary": interaction.summary, "review": interaction.review}
    return {key: value for key, value in fields.items() if value is not None}


@dataclass
class SampleSet:
    """Targets per split (interaction indices in time order) over an InteractionIndex, with the
    counts of what was kept, dropped and capped. ``samples(split)`` builds the records lazily."""

    index: InteractionIndex
    config: SampleConfig
    splits: dict[str, list[int]]
    dropped: Counter
    available: dict[str, int]

    def parts(self, k: int) -> TargetParts:
        """Target interaction ``k``'s history indices and averages."""
        length = self.config.history_len
        target = self.index.target(k)
        return TargetParts(
            user_history=self.index.user_history(k, length),
            item_history=self.index.item_history(k, length),
            user_avg_rating=target.user_sum / target.user_count,
            item_avg_rating=target.item_sum / target.item_count,
        )

    def user_entry(self, j: int) -> dict[str, Any]:
        """Interaction ``j`` as a ``user_history`` entry."""
        table = self.index.table
        interaction = table.interactions[j]
        return {
            "item_id": interaction.item_id,
            **table.items[interaction.item_id],  # title always, other features where present
            "rating": interaction.rating,
            "timestamp": interaction.timestamp,
            **_review_text(interaction),
        }

    def item_entry(self, j: int) -> dict[str, Any]:
        """Interaction ``j`` as an ``item_history`` entry."""
        interaction = self.index.table.interactions[j]
        return {
            "user_id": interaction.user_id,
            "rating": interaction.rating,
            "timestamp": interaction.timestamp,
            **_review_text(interaction),
        }

    def sample(self, k: int, split: str) -> dict[str, Any]:
        """The sample record (module docstring) for target interaction ``k``."""
        table = self.index.table
        interaction = table.interactions[k]
        parts = self.parts(k)
        return {
            "user_id": interaction.user_id,
            "item_id": interaction.item_id,
            "rating": interaction.rating,
            "timestamp": interaction.timestamp,
            "item": dict(table.items[interaction.item_id]),
            "user_history": [self.user_entry(j) for j in parts.user_history],
            "item_history": [self.item_entry(j) for j in parts.item_history],
            "user_avg_rating": parts.user_avg_rating,
            "item_avg_rating": parts.item_avg_rating,
            "dataset": table.dataset,
            "split": split,
        }

    def samples(self, split: str) -> Iterator[dict[str, Any]]:
        for k in self.splits[split]:
            yield self.sample(k, split)

    def report(self) -> dict[str, Any]:
        table = self.index.table
        return {
            "dataset": table.dataset,
            **table.report.to_dict(),
            "interactions_kept": len(table.interactions),
            "users": len(self.index.users),
            "items": len(self.index.items),
            "targets_dropped": dict(self.dropped),
            "samples_available": dict(self.available),
            "samples": {name: len(targets) for name, targets in self.splits.items()},
        }


def build_samples(table: SourceTable, config: SampleConfig | None = None) -> SampleSet:
    """Keep, filter and split every target of ``table`` (module docstring)."""
    config = config or SampleConfig()
    index = InteractionIndex(table)
    kept, dropped = [], Counter()
    for k in index.order:
        reason = drop_reason(index.target(k), config)
        if reason is None:
            kept.append(k)
        else:
            dropped[reason] += 1
    if config.split_mode == "per-user":
        splits = _split_per_user(kept, table)
    else:
        splits = _split_global_time(kept, table, config)
    order = {k: position for position, k in enumerate(index.order)}
    for name in SPLITS:
        splits[name].sort(key=order.__getitem__)
    available = {name: len(targets) for name, targets in splits.items()}
    rng = random.Random(config.seed)
    for name, count in config.max_samples:
        if count < len(splits[name]):
            splits[name] = sorted(rng.sample(splits[name], count), key=order.__getitem__)
    return SampleSet(index, config, splits, dropped, available)
