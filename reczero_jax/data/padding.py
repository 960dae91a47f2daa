"""Token rows -> fixed-length int32 arrays with an attention mask, and the pad id to use.

The one home of padding for every consumer: the rollout pipeline (prompts, left-padded so that
generation continues at the right edge), SFT batches (prompt + response, right-padded), the
teacher and ``reczero compare``. Depends on numpy alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
