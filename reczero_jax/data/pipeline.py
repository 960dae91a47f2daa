"""grain input pipeline: sample records -> tokenised, left-padded, bucketed per-process batches.

Order of work for each epoch (the same in every process, from the same seed)::

    record indices 0..N-1 -> seeded shuffle (a new permutation each epoch) -> global batches of
    ``global_batch_size`` indices -> each process: read and tokenise the global batch
    (``prompts.encode_prompt``), pad every row on the left to the smallest bucket that holds the
    longest prompt of the GLOBAL batch, keep its own rows
    ``[process_index * local, (process_index + 1) * local)``, local = global / process_count.

Every process tokenises the whole global batch so that all of them choose the same padded length
without talking to each other: ``jax.make_array_from_process_local_data`` needs one shape. The
processes' rows are disjoint and together cover each global batch.

A batch (numpy, local batch size B, padded length P, one of ``buckets``):
    prompt_ids [B, P] int32, left-padded with ``pad_id``; prompt_mask [B, P] int32 (1 = token);
    rating [B] int32; user_avg_rating [B] float32; item_avg_rating [B] float32;
    record_index [B] int64 (position in the source); trimmed [B] bool (``encode_prompt`` cut the
    prompt to fit ``max_prompt_tokens``); valid [B] bool (False only for the repeated rows that
    fill the last, short global batch when ``drop_remainder=False``).

The iterator is grain's ``DatasetIterator``: ``get_state()`` returns a small dict and
``set_state(state)`` on a fresh iterator of the same pipeline continues exactly from there.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from tqdm.auto import tqdm

from reczero_jax import prompts
from reczero_jax.data.padding import PROMPT_BUCKETS, bucket_length, default_pad_id, left_pad


def length_buckets(max_prompt_tokens: int, smallest: int = 256) -> tuple[int, ...]:
    """Padded lengths: ``padding.PROMPT_BUCKETS`` from ``smallest`` up to the first that holds
    ``max_prompt_tokens``, the sampler's buckets, so it keeps a batch's length as it is; e.g.
    6000 -> (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144)."""
    if max_prompt_tokens < 1 or smallest < 1:
        raise ValueError("max_prompt_tokens and smallest must be positive")
    largest = bucket_length(max_prompt_tokens)
    return (*(b for b in PROMPT_BUCKETS if smallest <= b < largest), largest)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(
        f"a prompt of {length} tokens is longer than the largest bucket {max(buckets)}: "
        "make the largest bucket at least max_prompt_tokens"
    )


def read_records(source: Sequence[dict], indices: Sequence[int]) -> list[dict]:
    """Records at ``indices``, in one batched read where the source supports it."""
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(list(indices)))
    return [source[index] for index in indices]


@dataclasses.dataclass(frozen=True)
class BatchEncoder:
    """One global batch of record indices -> this process's padded batch (module docstring)."""

    source: Sequence[dict]
    tokenizer: Any
    max_prompt_tokens: int
    buckets: tuple[int, ...]
    layout: str
    pad_id: int
    global_batch_size: int
    process_index: int
    process_count: int

    def __call__(self, indices: list[int]) -> dict[str, np.ndarray]:
        valid = np.arange(self.global_batch_size) < len(indices)
        # The last global batch may be short: fill it with its own rows again, marked invalid.
        indices = [indices[i % len(indices)] for i in range(self.global_batch_size)]
        records = read_records(self.source, indices)
        encoded = [
            prompts.encode_prompt(
                record, self.tokenizer, max_prompt_tokens=self.max_prompt_tokens, layout=self.layout
            )
            for record in records
        ]
        length = bucket_for(max(len(prompt.ids) for prompt in encoded), self.buckets)
        local = self.global_batch_size // self.process_count
        rows = slice(self.process_index * local, (self.process_index + 1) * local)
        ids, mask = left_pad([prompt.ids for prompt in encoded[rows]], length, self.pad_id)
        mine = records[rows]
        return {
            "prompt_ids": ids,
            "prompt_mask": mask,
            "rating": np.array([r["rating"] for r in mine], dtype=np.int32),
            "user_avg_rating": np.array([r["user_avg_rating"] for r in mine], dtype=np.float32),
            "item_avg_rating": np.array([r["item_avg_rating"] for r in mine], dtype=np.float32),
            "record_index": np.array(indices[rows], dtype=np.int64),
            "trimmed": np.array([prompt.trimmed for prompt in encoded[rows]], dtype=bool),
            "valid": valid[rows],
        }


def make_pipeline(
    source: Sequence[dict],
    tokenizer,
    *,
    global_batch_size: int,
    max_prompt_tokens: int,
    seed: int = 0,
    num_epochs: int | None = 1,
    shuffle: bool = True,
    buckets: Sequence[int] | None = None,
    layout: str = "chat",
    drop_remainder: bool = True,
    pad_id: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_threads: int = 1,
    prefetch: int = 2,
) -> grain.IterDataset:
    """The batches of ``source`` (sample dicts, e.g. ``load_split(DIR, "train")``) for this
    process; ``iter()`` of the result is the checkpointable iterator (module docstring).

    ``num_epochs=None`` repeats forever. ``process_index``/``process_count`` default to
    ``jax.process_index()``/``jax.process_count()``; ``global_batch_size`` must divide by
    ``process_count``. ``buckets`` defaults to ``length_buckets(max_prompt_tokens)``.
    ``read_threads`` > 1 tokenises batches in parallel threads (the tokenizer must be thread-safe).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    if len(source) == 0:
        raise ValueError("the source holds no records")
    buckets = tuple(sorted(buckets or length_buckets(max_prompt_tokens)))
    if buckets[-1] < max_prompt_tokens:
        raise ValueError(f"the largest bucket {buckets[-1]} is below {max_prompt_tokens=}")
    encoder = BatchEncoder(
        source=source,
        tokenizer=tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        buckets=buckets,
        layout=layout,
        pad_id=default_pad_id(tokenizer) if pad_id is None else pad_id,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    dataset = grain.MapDataset.range(len(source))
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)
    dataset = dataset.batch(global_batch_size, drop_remainder=drop_remainder, batch_fn=list)
    return dataset.map(encoder).to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    )


def prompt_length_stats(
    source: Sequence[dict],
    tokenizer,
    *,
    max_prompt_tokens: int,
    sample_size: int | None = 2000,
    layout: str = "chat",
    seed: int = 0,
    percentiles: Sequence[float] = (50, 90, 95, 99),
) -> dict[str, Any]:
    """Prompt token lengths (after ``encode_prompt``'s trimming to ``max_prompt_tokens``) over a
    seeded random subset of ``sample_size`` records (None: all): count, mean, percentiles, max,
    and how many prompts were trimmed."""
    indices = list(range(len(source)))
    if sample_size is not None and sample_size < len(indices):
        indices = sorted(random.Random(seed).sample(indices, sample_size))
    lengths, trimmed = [], 0
    with tqdm(total=len(indices), desc="tokenising prompts", unit=" prompts", leave=False) as bar:
        for start in range(0, len(indices), 256):
            for record in read_records(source, indices[start : start + 256]):
                prompt = prompts.encode_prompt(
                    record, tokenizer, max_prompt_tokens=max_prompt_tokens, layout=layout
                )
                lengths.append(len(prompt.ids))
                trimmed += prompt.trimmed
                bar.update()
    values = np.array(lengths)
    return {
        "count": len(lengths),
        "of": len(source),
        "mean": float(values.mean()),
        **{f"p{p:g}": float(np.percentile(values, p)) for p in percentiles},
        "max": int(values.max()),
        "trimmed": trimmed,
    }
