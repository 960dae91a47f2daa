"""The reward computed inside jit from response token ids: the ``host`` rules, on bytes.

Pipeline for a batch ``ids [N, R]`` (vectorised over the batch, no host round trip):

1. Byte stream ``[N, L]``: the tokens' bytes packed one after another (special tokens add
   their text; ids outside the table, positions ``>= response_length`` and a terminating EOS
   add nothing; zeros after the text). Position ``p`` belongs to token
   ``r = #{tokens ending at or before p}``, a running sum over a histogram of the tokens'
   end positions.
2. Tag matching: bytes packed four to a ``uint32`` word, so every tag (at most 16 bytes) is
   four masked word comparisons per position. Tag counts and first positions follow.
3. The answer section is the last non-overlapping lazy match of ``open(.*?)close``: with
   ``o_last`` the last opening tag before the last closing tag, that match closes at the
   first closing tag after ``o_last`` and opens at the first opening tag after the last
   closing tag before ``o_last``.
4. The number grammar runs as a DFA over the answer section's bytes (``lax.while_loop``,
   one byte of every row per step, until every row has finished or been rejected), keeping
   the first 9 significant digits ``m`` (an int32, trailing zeros dropped) and the decimal
   exponent ``q``; the rating is ``m * 10**q`` in float32. ``exact`` hits when the section
   is an in-range number with one non-zero digit (so its value is that digit) equal to ``y``.

The variant (tags, order rule, answer score) enters as data, so one compiled kernel serves
every variant of a tokenizer and batch shape.

Exactness (checked by tests/test_rewards.py):

* format_ok, the range test ``1 <= value <= 5`` and the hit of ``exact`` are decided on the
  decimal digits, so they equal the host's exact-decimal rules for every input (``exact``:
  for the integer ground truths of the rating scale; a non-integer ``y`` never hits here).
* rating is correctly rounded to float32 when ``s`` has at most 7 significant digits and
  ``|q| <= 10`` (``m`` and ``10**|q|`` are then float32 numbers and one IEEE multiply or
  divide rounds once), and so equals ``np.float32(float(s))`` bit for bit when moreover
  ``|q| <= 8`` (where rounding through float64 first cannot differ). Every realistic rating,
  "4", "4.5", "3.75", "+4", "4e0", ".5e1", is in this class. Otherwise (more digits, larger
  or smaller magnitudes) it is within 2 float32 ulps, with digits past the 9th significant one
  dropped (a relative error below 1e-9); values beyond float32's range become inf, and values
  below its normal range may flush to 0.
* reward is ``1 + (1 - |rating - y| / 2)`` in float32: bit-equal to the host's float64 value
  when the rating is a float32 number (4.5, 3.75), within 1e-6 otherwise.

The stream needs up to ``R * max_token_bytes`` positions (Qwen2's longest token has 128
bytes) although text averages 3 to 5 bytes a token. So the kernel scores the batch on a
stream of ``R * fast_bytes_per_token`` positions, and only when some response outgrows it
(``lax.cond``) rescores the batch on the full stream, a few rows at a time so that it needs
no more memory than the fast stream. Exact either way; under ``vmap`` both branches run.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from reczero_jax.rewards.byte_table import TokenBytes
from reczero_jax.rewards.host import (
    EXACT_HIT,
    EXACT_MISS,
    FORMAT_BONUS,
    FORMAT_PENALTY,
    RewardVariant,
    get_variant,
)

_ASCII_WHITESPACE = tuple(b" \t\n\r\x0b\x0c")
_SIGNIFICANT_DIGITS = 9  # 10**9 - 1 still fits an int32
_EXPONENT_DIGITS = 7  # larger decimal exponents saturate at 10**7 (beyond any stream length)
_POW10_INT = np.array([10**k for k in range(_SIGNIFICANT_DIGITS + 1)], dtype=np.int32)
_POW10_F32 = np.array([10.0**k for k in range(39)] + [np.inf], dtype=np.float32)
_SECTIONS = 4  # section slots: 0-2 reasoning, 3 the answer
_TAG_WORDS = 4  # tags of up to 16 bytes


class _VariantData(NamedTuple):
    """A reward variant as arrays: the input that lets one compiled kernel serve every variant.

    Tags in slot order ``open_0, close_0, ..., open_3, close_3``: ``words`` and ``masks``
    uint32 ``[8, 4]`` hold each tag's bytes four to a word (little-endian) and which of those
    bytes belong to it; ``open_lengths`` int32 ``[4]``; ``active`` bool ``[4]`` marks the
    slots in use (reasoning sections fill slots 0.. in order, slot 3 holds the answer, and an
    inactive slot 3 means the whole response is the answer); ``sequential`` and
    ``exact_match`` are bool scalars (see ``RewardVariant``).
    """

    words: np.ndarray
    masks: np.ndarray
    open_lengths: np.ndarray
    active: np.ndarray
    sequential: np.ndarray
    exact_match: np.ndarray

    @classmethod
    def of(cls, variant: RewardVariant) -> _VariantData:
        slots: list[tuple[str, str] | None] = [None] * _SECTIONS
        if variant.sections:
            *reasoning, answer = variant.sections
            if len(reasoning) >= _SECTIONS:
                raise ValueError(f"{variant.name}: at most {_SECTIONS - 1} reasoning sections")
            slots[: len(reasoning)] = reasoning
            slots[-1] = answer
        words = np.zeros((2 * _SECTIONS, _TAG_WORDS), np.uint32)
        masks = np.zeros_like(words)
        for slot, pair in enumerate(slots):
            for side, tag in enumerate(pair or ()):
                data = tag.encode("ascii")
                if len(data) > 4 * _TAG_WORDS:
                    raise ValueError(f"tag {tag!r} is longer than {4 * _TAG_WORDS} bytes")
                padded = data.ljust(4 * _TAG_WORDS, b"\0")
                present = bytes(0xFF if i < len(data) else 0 for i in range(4 * _TAG_WORDS))
                words[2 * slot + side] = np.frombuffer(padded, "<u4")
                masks[2 * slot + side] = np.frombuffer(present, "<u4")
        return cls(
            words=words,
            masks=masks,
            open_lengths=np.array([len(p[0]) if p else 0 for p in slots], np.int32),
            active=np.array([p is not None for p in slots]),
            sequential=np.array(variant.sequential),
            exact_match=np.array(variant.exact_match),
        )


def _byte_stream(flat, offsets, token_lengths, ids, length: int) -> jax.Array:
    """``[N, L]`` int32: each row's token bytes packed from position 0, zeros after them."""
    ends = jnp.cumsum(token_lengths, axis=1)
    pos = jnp.arange(length, dtype=jnp.int32)
    # The token holding byte p is token r = #{tokens whose bytes end at or before p}: a
    # histogram of the end positions, summed up to p. Ends past the stream land in bin L.
    ends_at = jax.vmap(lambda e: jnp.zeros(length + 1, jnp.int32).at[e].add(1))(
        jnp.minimum(ends, length)
    )
    owner = jnp.minimum(jnp.cumsum(ends_at[:, :length], axis=1), ids.shape[1] - 1)
    owner_ids = jnp.clip(jnp.take_along_axis(ids, owner, axis=1), 0, offsets.shape[0] - 1)
    within = pos[None, :] - jnp.take_along_axis(ends - token_lengths, owner, axis=1)
    stream = jnp.take(flat, offsets[owner_ids] + within, mode="clip").astype(jnp.int32)
    return jnp.where(pos[None, :] < ends[:, -1:], stream, 0)


def _tag_hits(stream: jax.Array, words: jax.Array, masks: jax.Array) -> jax.Array:
    """bool ``[N, T, L]``: where each of the ``T`` tags starts in the stream ``[N, L]``."""
    length = stream.shape[1]
    padded = jnp.pad(stream.astype(jnp.uint32), ((0, 0), (0, 4 * _TAG_WORDS)))
    hits = jnp.ones((stream.shape[0], words.shape[0], length), dtype=bool)
    for k in range(_TAG_WORDS):
        word = sum(padded[:, 4 * k + i : 4 * k + i + length] << (8 * i) for i in range(4))
        hits &= (word[:, None, :] & masks[None, :, k, None]) == words[None, :, k, None]
    return hits


def _first(mask: jax.Array, default) -> jax.Array:
    """First index along the last axis where ``mask`` holds, ``default`` where it never does."""
    length = mask.shape[-1]
    found = jnp.min(jnp.where(mask, jnp.arange(length), length), axis=-1)
    return jnp.where(found < length, found, default)


def _last(mask: jax.Array) -> jax.Array:
    """Last index along the last axis where ``mask`` holds, -1 where it never does."""
    return jnp.max(jnp.where(mask, jnp.arange(mask.shape[-1]), -1), axis=-1)


def _answer_section(open_hits, close_hits, open_length):
    """``(found, start, end)`` per row of the last non-overlapping lazy ``open(.*?)close``."""
    pos = jnp.arange(open_hits.shape[-1])[None, :]
    last_open = _last(open_hits & (pos < _last(close_hits)[:, None]))
    end = _first(close_hits & (pos > last_open[:, None]), open_hits.shape[-1])
    previous_close = _last(close_hits & (pos < last_open[:, None]))
    start = _first(open_hits & (pos > previous_close[:, None]), open_hits.shape[-1])
    return last_open >= 0, start + open_length, end


def _structure_ok(stream, hits, variant: _VariantData) -> jax.Array:
    """Tag counts, order and non-empty reasoning sections, per row (bool ``[N]``)."""
    active_tags = jnp.repeat(variant.active, 2)
    counts_ok = jnp.all((jnp.sum(hits, axis=2) == 1) | ~active_tags, axis=1)
    first = _first(hits, stream.shape[1])  # [N, 8]
    opens, closes = first[:, 0::2], first[:, 1::2]
    # before[i, j]: tag i must come before tag j. Sequential: every earlier tag in use. The
    # authors' rule: earlier opening tags, and each section's opening tag before its closing.
    tag = np.arange(2 * _SECTIONS)
    is_open = tag % 2 == 0
    earlier = tag[:, None] < tag[None, :]
    opens_ordered = earlier & is_open[:, None] & is_open[None, :]
    own_section = (tag[None, :] == tag[:, None] + 1) & is_open[:, None]
    before = jnp.where(variant.sequential, earlier, opens_ordered | own_section)
    before &= active_tags[:, None] & active_tags[None, :]
    ordered = jnp.all(~before | (first[:, :, None] < first[:, None, :]), axis=(1, 2))
    pos = jnp.arange(stream.shape[1])[None, None, :]
    content_start = (opens + variant.open_lengths)[:, :, None]
    in_section = (pos >= content_start) & (pos < closes[:, :, None])
    non_whitespace = ~jnp.isin(stream, jnp.array(_ASCII_WHITESPACE))
    non_empty = jnp.any(in_section & non_whitespace[:, None, :], axis=2)
    reasoning = variant.active & (jnp.arange(_SECTIONS) < _SECTIONS - 1)
    return counts_ok & ordered & jnp.all(non_empty | ~reasoning, axis=1)


# The number grammar as a DFA over byte classes. States:
_LEAD, _SIGN, _INT, _INT_DOT, _DOT, _FRAC, _EXP, _EXP_SIGN, _EXP_INT, _TRAIL, _REJECT = range(11)
_WS, _DIGIT, _POINT, _PLUS_MINUS, _E, _OTHER = range(6)  # byte classes
_TRANSITIONS = np.full((11, 6), _REJECT, dtype=np.int32)
for _state, _moves in {
    _LEAD: {_WS: _LEAD, _DIGIT: _INT, _POINT: _DOT, _PLUS_MINUS: _SIGN},
    _SIGN: {_DIGIT: _INT, _POINT: _DOT},
    _INT: {_WS: _TRAIL, _DIGIT: _INT, _POINT: _INT_DOT, _E: _EXP},
    _INT_DOT: {_WS: _TRAIL, _DIGIT: _FRAC, _E: _EXP},
    _DOT: {_DIGIT: _FRAC},
    _FRAC: {_WS: _TRAIL, _DIGIT: _FRAC, _E: _EXP},
    _EXP: {_DIGIT: _EXP_INT, _PLUS_MINUS: _EXP_SIGN},
    _EXP_SIGN: {_DIGIT: _EXP_INT},
    _EXP_INT: {_WS: _TRAIL, _DIGIT: _EXP_INT},
    _TRAIL: {_WS: _TRAIL},
}.items():
    for _byte_class, _next in _moves.items():
        _TRANSITIONS[_state, _byte_class] = _next
_ACCEPTING = np.zeros(11, dtype=bool)
_ACCEPTING[[_INT, _INT_DOT, _FRAC, _EXP_INT, _TRAIL]] = True
_BYTE_CLASS = np.full(256, _OTHER, dtype=np.int32)
_BYTE_CLASS[list(_ASCII_WHITESPACE)] = _WS
_BYTE_CLASS[list(b"0123456789")] = _DIGIT
_BYTE_CLASS[ord(".")] = _POINT
_BYTE_CLASS[list(b"+-")] = _PLUS_MINUS
_BYTE_CLASS[list(b"eE")] = _E


def _parse_number(stream_bytes: jax.Array, start: jax.Array, end: jax.Array):
    """Grammar, value and exact range test of the number in ``bytes[start:end]`` per row.

    Runs the grammar's DFA over the section, one byte of every row per step, until every row
    has finished or been rejected. Mantissa digits are counted from 0; ``z`` is the index of
    the first non-zero one, so the value is ``0.d_z d_(z+1)... * 10**(int_digits - z + exp)``.
    Returns ``(valid [N] bool, value [N] f32, in_range [N] bool, leading [N] int32,
    single_digit [N] bool)``: where ``in_range``, the value is exactly ``leading`` iff
    ``single_digit`` (no other non-zero digit).
    """
    rows = stream_bytes.shape[0]
    zeros = jnp.zeros((rows,), jnp.int32)
    transitions, byte_class = jnp.asarray(_TRANSITIONS), jnp.asarray(_BYTE_CLASS)
    init = {
        "step": jnp.int32(0),
        "state": zeros + _LEAD,
        "negative": zeros.astype(bool),
        "exp_negative": zeros.astype(bool),
        "digits": zeros,  # mantissa digits so far
        "int_digits": zeros,  # of which before the point
        "z": zeros - 1,
        "last_nonzero": zeros - 1,
        "leading": zeros,
        "significand": zeros,  # digits from z on, at most _SIGNIFICANT_DIGITS of them
        "significand_digits": zeros,
        "exp_value": zeros,  # saturates at 10**_EXPONENT_DIGITS
    }
    steps = jnp.max(end - start, initial=0)

    def running(carry):
        return (carry["step"] < steps) & jnp.any(
            (carry["step"] < end - start) & (carry["state"] != _REJECT)
        )

    def step(carry):
        c = dict(carry)
        active = (c["step"] < end - start) & (c["state"] != _REJECT)
        position = jnp.clip(start + c["step"], 0, stream_bytes.shape[1] - 1)
        byte = jnp.take_along_axis(stream_bytes, position[:, None], axis=1)[:, 0]
        state = jnp.where(active, transitions[c["state"], byte_class[byte]], c["state"])
        digit = byte - ord("0")
        entered = active & (state != c["state"])
        is_digit = byte_class[byte] == _DIGIT
        mantissa_digit = active & ((state == _INT) | (state == _FRAC)) & is_digit
        exponent_digit = active & (state == _EXP_INT) & is_digit
        first_nonzero = mantissa_digit & (digit != 0) & (c["z"] < 0)
        z = jnp.where(first_nonzero, c["digits"], c["z"])
        significant = mantissa_digit & (z >= 0)
        keep = significant & (c["significand_digits"] < _SIGNIFICANT_DIGITS)
        c["negative"] |= entered & (state == _SIGN) & (byte == ord("-"))
        c["exp_negative"] |= entered & (state == _EXP_SIGN) & (byte == ord("-"))
        c["int_digits"] += mantissa_digit & (state == _INT)
        c["last_nonzero"] = jnp.where(mantissa_digit & (digit != 0), c["digits"], c["last_nonzero"])
        c["leading"] = jnp.where(first_nonzero, digit, c["leading"])
        c["significand"] = jnp.where(keep, c["significand"] * 10 + digit, c["significand"])
        c["significand_digits"] += keep
        c["digits"] += mantissa_digit
        c["z"] = z
        c["exp_value"] = jnp.where(
            exponent_digit,
            jnp.minimum(c["exp_value"] * 10 + digit, 10**_EXPONENT_DIGITS),
            c["exp_value"],
        )
        c["state"] = state
        c["step"] = c["step"] + 1
        return c

    c = lax.while_loop(running, step, init)
    valid = jnp.asarray(_ACCEPTING)[c["state"]]
    is_zero = c["z"] < 0
    z = jnp.maximum(c["z"], 0)
    kept = jnp.clip(c["last_nonzero"] - z + 1, 0, _SIGNIFICANT_DIGITS)
    pow10 = jnp.asarray(_POW10_INT)
    significand = c["significand"] // pow10[jnp.clip(c["significand_digits"] - kept, 0, None)]
    exponent = jnp.where(c["exp_negative"], -c["exp_value"], c["exp_value"])
    magnitude_exp = c["int_digits"] - z + exponent
    value = _scale(significand.astype(jnp.float32), magnitude_exp - kept)
    value = jnp.where(is_zero, 0.0, value)
    value = jnp.where(c["negative"], -value, value)
    leading = c["leading"]
    single_digit = c["last_nonzero"] == z
    in_range = (
        ~is_zero
        & ~c["negative"]
        & (magnitude_exp == 1)
        & ((leading <= 4) | ((leading == 5) & single_digit))
    )
    return valid, value, in_range, leading, single_digit


def _scale(significand: jax.Array, scale_exp: jax.Array) -> jax.Array:
    """``significand * 10**scale_exp`` in float32: one rounding for ``|scale_exp| <= 10``."""
    pow10 = jnp.asarray(_POW10_F32)
    up = significand * pow10[jnp.clip(scale_exp, 0, 39)]
    down_first = jnp.clip(-scale_exp, 0, 30)
    down_rest = jnp.clip(-scale_exp - 30, 0, 39)
    down = significand / pow10[down_first] / pow10[down_rest]
    return jnp.where(scale_exp >= 0, up, down)


def _score(stream, total, ground_truths, variant: _VariantData):
    """(reward, format_ok, rating) of each row of a byte stream ``[N, L]`` of ``total`` bytes."""
    hits = _tag_hits(stream, variant.words, variant.masks)
    structure = _structure_ok(stream, hits, variant)
    tagged, start, end = _answer_section(hits[:, -2], hits[:, -1], variant.open_lengths[-1])
    whole_text = ~variant.active[-1]
    tagged = tagged | whole_text
    start = jnp.where(whole_text, 0, start)
    end = jnp.where(whole_text, total, end)
    valid, value, in_range, leading, single_digit = _parse_number(stream, start, end)
    valid &= tagged
    format_ok = structure & valid & in_range
    hit = single_digit & (leading.astype(jnp.float32) == ground_truths)
    exact_score = jnp.where(hit, EXACT_HIT, EXACT_MISS)
    graded_score = 1.0 - jnp.abs(value - ground_truths) / 2.0
    answer_score = jnp.where(variant.exact_match, exact_score, graded_score)
    reward = jnp.where(format_ok, FORMAT_BONUS + answer_score, FORMAT_PENALTY)
    return reward.astype(jnp.float32), format_ok, jnp.where(valid, value, jnp.nan)


def _without_terminating_eos(ids, lengths, eos_ids):
    """``lengths`` less one where a response's last token (``ids[length - 1]``) is an EOS."""
    last = jnp.take_along_axis(ids, jnp.clip(lengths - 1, 0, ids.shape[1] - 1)[:, None], axis=1)
    ends_with_eos = (lengths > 0) & jnp.any(last == eos_ids[None, :], axis=1)
    return lengths - ends_with_eos.astype(lengths.dtype)


@partial(jax.jit, static_argnames=("fast_length", "full_length"))
def _token_reward(table, variant, eos_ids, ids, lengths, ground_truths, fast_length,
                  full_length):
    """The kernel behind ``TokenRewardFn``: the token table, the variant and the EOS ids are
    inputs, so it is compiled once per tokenizer, batch shape and pair of stream lengths."""
    flat, offsets, token_byte_counts = table
    vocab_size = token_byte_counts.shape[0]
    lengths = _without_terminating_eos(ids, lengths, eos_ids)
    in_table = (ids >= 0) & (ids < vocab_size)
    in_response = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    token_lengths = jnp.where(
        in_table & in_response, token_byte_counts[jnp.clip(ids, 0, vocab_size - 1)], 0
    )
    rows = (ids, token_lengths, jnp.sum(token_lengths, axis=1), ground_truths)

    def score(length, rows):
        ids, token_lengths, total, ground_truths = rows
        stream = _byte_stream(flat, offsets, token_lengths, ids, length)
        return _score(stream, total, ground_truths, variant)

    if fast_length >= full_length:
        return score(full_length, rows)
    fast = score(fast_length, rows)

    def full():
        # A few rows at a time, so the full stream needs no more memory than the fast one.
        def one_row(row):
            scored = score(full_length, jax.tree.map(lambda x: x[None], row))
            return jax.tree.map(lambda x: x[0], scored)

        rows_at_once = max(1, ids.shape[0] * fast_length // full_length)
        return lax.map(one_row, rows, batch_size=rows_at_once)

    # The fast path stays outside the conditional, so that the usual case runs as plain
    # fused code; the full path runs only when some response outgrows the fast stream.
    return lax.cond(jnp.max(rows[2]) <= fast_length, lambda: fast, full)


class TokenRewardFn:
    """``fn(response_ids [N, R], response_lengths [N], ground_truths [N])`` ->
    ``(reward [N] f32, format_ok [N] bool, rating [N] f32, NaN where none)``.

    Equals ``reczero_jax.rewards.get_reward(kind)`` applied to ``fn.decode(ids[:length])``
    (float exactness: module docstring). Jittable, vmappable, and partitionable over the batch
    axis. Built once per tokenizer and variant; ValueError for a tokenizer that is not
    byte-level BPE or an unknown ``kind``.

    ``eos_ids``: the ids that end a response (the sampler's, ``models.stop_token_ids``);
    default the tokenizer's EOS. The sampler's lengths count the EOS that ended a response,
    so a response whose last token (``ids[length - 1]``) is one of them is scored without it;
    any other special token is part of the text (``byte_table``).

    ``fast_bytes_per_token``: stream positions per token on the fast path (module docstring);
    a batch whose text needs more takes the exact full-length path.
    """

    def __init__(self, tokenizer, kind: str = "rating", fast_bytes_per_token: int = 8, *,
                 eos_ids: Sequence[int] | None = None):
        if fast_bytes_per_token < 1:
            raise ValueError(f"fast_bytes_per_token must be >= 1, got {fast_bytes_per_token}")
        self.variant = get_variant(kind)
        self.token_bytes = TokenBytes.from_tokenizer(tokenizer)
        if eos_ids is None:
            eos_ids = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.fast_bytes_per_token = min(fast_bytes_per_token, self.token_bytes.max_token_bytes)
        table = self.token_bytes
        self._table = tuple(jnp.asarray(a) for a in (table.flat, table.offsets, table.lengths))
        self._variant_data = jax.tree.map(jnp.asarray, _VariantData.of(self.variant))
        self._eos_ids = jnp.asarray(self.eos_ids, dtype=jnp.int32).reshape(-1)

    def decode(self, token_ids) -> str:
        """The text the reward scores of the response ``token_ids`` (``ids[:length]``): token
        bytes joined, UTF-8 decoded with replacement, a terminating EOS left out."""
        token_ids = [int(i) for i in token_ids]
        if token_ids and token_ids[-1] in self.eos_ids:
            token_ids = token_ids[:-1]
        return self.token_bytes.decode(token_ids)

    def __call__(self, response_ids, response_lengths, ground_truths):
        ids = jnp.asarray(response_ids, dtype=jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"response_ids must be [N, R], got shape {ids.shape}")
        return _token_reward(
            self._table,
            self._variant_data,
            self._eos_ids,
            ids,
            jnp.asarray(response_lengths, dtype=jnp.int32),
            jnp.asarray(ground_truths, dtype=jnp.float32),
            fast_length=ids.shape[1] * self.fast_bytes_per_token,
            full_length=ids.shape[1] * self.token_bytes.max_token_bytes,
        )
