"""Token rows -> fixed-length int32 arrays with an attention mask, and the pad id to use.

The one home of padding for every consumer: the rollout pipeline (prompts, left-padded so that
generation continues at the right edge), SFT batches (prompt + response, right-padded), the
teacher and ``reczero compare``; and of the padded lengths (buckets) that keep the number of
compiled shapes small: ``PROMPT_BUCKETS``, shared by the data pipeline and the sampler so a
prompt is padded once (a pipeline batch's length is a bucket, which the sampler keeps), and
``RESPONSE_BUCKETS``, the lengths the GRPO update trims a rollout's responses to. Depends on
numpy alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# 2^k and 3 2^(k-1): two shapes per octave, at most 1/3 padding beyond the longest row
# (6,000 tokens -> 6,144; 3,000 -> 3,072).
PROMPT_BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144,
                  8192)
# One update compile per power of two up to grpo.max_new_tokens.
RESPONSE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket_length(length: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    """Smallest bucket >= length; beyond the largest, the next multiple of it."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    return -(-length // buckets[-1]) * buckets[-1]


def _padded(rows: Sequence[Sequence[int]], length: int, pad_id: int, left: bool):
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for row, tokens in enumerate(rows):
        if len(tokens) > length:
            raise ValueError(f"row {row} has {len(tokens)} tokens, more than the length {length}")
        if len(tokens):
            columns = slice(length - len(tokens), length) if left else slice(0, len(tokens))
            ids[row, columns] = tokens
            mask[row, columns] = 1
    return ids, mask


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int):
    """``rows`` right-aligned in a [len(rows), length] int32 array; returns (ids, mask)."""
    return _padded(rows, length, pad_id, left=True)


def right_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int):
    """``rows`` left-aligned in a [len(rows), length] int32 array; returns (ids, mask)."""
    return _padded(rows, length, pad_id, left=False)


def default_pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its end-of-sequence token (the mask marks padding)."""
    for pad_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad_id is not None:
            return int(pad_id)
    raise ValueError("the tokenizer has neither a pad nor an eos token: pass pad_id")
