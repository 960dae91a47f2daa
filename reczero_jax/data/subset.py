"""The records a run uses out of a split: all, the first ``limit``, or a seeded random
``limit`` (in split order)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from reczero_jax.config import DATA_SUBSETS


def take_subset(records: Sequence[dict], limit: int, how: str = "first", seed: int = 0
                ) -> list[dict]:
    """``limit`` <= 0 or >= len(records): every record. Else ``how="first"``: the first
    ``limit`` (for splits made in time order, the earliest); ``how="random"``: a ``seed``-ed
    random ``limit`` of them, kept in split order."""
    if how not in DATA_SUBSETS:
        raise ValueError(f"data.subset={how!r}: use one of {', '.join(DATA_SUBSETS)}")
    count = len(records)
    if 0 < limit < count:
        chosen = range(limit) if how == "first" else sorted(
            random.Random(seed).sample(range(count), limit))
    else:
        chosen = range(count)
    return [records[i] for i in chosen]
