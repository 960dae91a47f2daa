"""The RecZero rule-based reward on response text: the readable reference for every variant.

Rules of the default ``rating`` variant (the authors' code; PAPER.md, "Reward"):

* each of ``<analyze user>``, ``</analyze user>``, ``<analyze item>``, ``</analyze item>``,
  ``<match>``, ``</match>``, ``<rate>``, ``</rate>`` occurs exactly once (``str.count``);
* the opening tags occur in the order user, item, match, rate;
* every section closes after it opens (the authors read a section with the regex
  ``<tag>(.*?)</tag>``, which finds nothing otherwise), and the first three sections hold
  something besides ASCII whitespace;
* the ``<rate>`` section, with ASCII whitespace stripped, is a number (grammar below) with
  ``1 <= value <= 5``.

``reward = (+1 if format_ok else -1) + (answer score if format_ok else 0)``, where the answer
score is ``1 - |rating - y| / 2`` (graded, so a valid answer earns ``2 - |rating - y| / 2`` in
[0, 2]) or, for ``exact``, ``+2`` if the rating equals ``y`` else ``-1.5``: the authors'
``float(pred) == float(gt)`` (their rounding is commented out), so ``"4.0"`` hits 4 and ``"3.6"``
misses it, taken on the exact decimal value like the range test.

The text is the response as the authors decode it: a special token inside it (say
``<|endoftext|>`` in ``<rate>4<|endoftext|></rate>``) is its own text, so that ``<rate>``
section is no number (``reczero_jax.rewards.byte_table``).

``rating`` is the number in the answer section whether or not the format holds (None when the
section is missing or holds no number). Like the authors' logging it is read from the LAST
non-overlapping ``<rate>(.*?)</rate>`` match; when the format holds there is only one.

Number grammar, a deliberate tightening of Python's ``float()``: after stripping ASCII
whitespace (`` \\t\\n\\r\\x0b\\x0c``, what ``bytes.strip`` removes), the whole section must be
``[+-]?(digits[.digits?] | .digits)([eE][+-]?digits)?`` with ASCII digits. ``float()`` would
also take surrounding Unicode whitespace, ``_`` separators, ``inf``/``nan`` and non-ASCII
digits; all of those are format failures here. The range test and the match of ``exact``
use the exact decimal value (``decimal.Decimal``), not its binary64 rounding, so a string such
as ``"5.0000000000000000001"`` (which ``float()`` rounds to 5.0) is out of range and
``"4.0000000000000000001"`` misses 4; the two differ only for 16+ significant digits within
1e-15 of the scale's ends or of the integer ``y``. "Non-empty" likewise
means "holds a byte other than ASCII whitespace": a section of only ``\\u00a0`` or ``\\u3000``
counts as non-empty (``str.strip`` would empty it). Both choices make the rules a function of
the response's bytes, which the jitted token reward (``reczero_jax.rewards.device``) needs.

Variants (the paper's ablations), by config name:

* ``rating``: the above (default).
* ``exact``: the same format rule, exact-match answer score.
* ``think_answer``: ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` each exactly once
  and in exactly that order (each section closed before the next opens), a think section that
  is not ASCII-whitespace only, and a number in [1, 5] in the answer section; graded score.
* ``answer_only``: the whole response, ASCII whitespace stripped, is a number in [1, 5];
  graded score.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import NamedTuple

ASCII_WHITESPACE = " \t\n\r\x0b\x0c"
NUMBER_PATTERN = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
RATING_MIN, RATING_MAX = 1, 5
FORMAT_BONUS = 1.0
FORMAT_PENALTY = -1.0
EXACT_HIT, EXACT_MISS = 2.0, -1.5


class RewardResult(NamedTuple):
    """One response's reward, whether its format holds, and its rating (None if none)."""

    reward: float
    format_ok: bool
    rating: float | None


@dataclass(frozen=True)
class RewardVariant:
    """The format rule and answer score of one reward variant.

    ``sections``: (open, close) tag pairs in their required order; the last one holds the
    answer and the others must be non-empty. Empty: the whole response is the answer.
    ``sequential``: every tag in order (each section closed before the next opens); otherwise
    only the opening tags are ordered and each section closes after it opens (the authors').
    ``exact_match``: answer score +2 / -1.5 on ``rating == y``; otherwise graded.
    """

    name: str
    sections: tuple[tuple[str, str], ...]
    sequential: bool
    exact_match: bool

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(tag for pair in self.sections for tag in pair)


_FOUR_STEPS = (
    ("<analyze user>", "</analyze user>"),
    ("<analyze item>", "</analyze item>"),
    ("<match>", "</match>"),
    ("<rate>", "</rate>"),
)
VARIANTS = {
    "rating": RewardVariant("rating", _FOUR_STEPS, sequential=False, exact_match=False),
    "exact": RewardVariant("exact", _FOUR_STEPS, sequential=False, exact_match=True),
    "think_answer": RewardVariant(
        "think_answer",
        (("<think>", "</think>"), ("<answer>", "</answer>")),
        sequential=True,
        exact_match=False,
    ),
    "answer_only": RewardVariant("answer_only", (), sequential=False, exact_match=False),
}


def get_variant(name: str) -> RewardVariant:
    """The variant registered under ``name``; a ValueError lists the known names."""
    if name not in VARIANTS:
        raise ValueError(f"unknown reward {name!r}: choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]


def parse_number(section: str) -> str | None:
    """The section with ASCII whitespace stripped if it is a number by the grammar, else None."""
    core = section.strip(ASCII_WHITESPACE)
    return core if NUMBER_PATTERN.fullmatch(core) else None


def exact_value(number: str) -> Decimal | None:
    """The exact decimal value of a grammar number; None when its exponent is beyond
    ``decimal``'s limits (|exponent| > ~1e18), which puts it far outside the rating scale."""
    try:
        return Decimal(number)
    except InvalidOperation:
        return None


def answer_section(text: str, variant: RewardVariant) -> str | None:
    """The content of the last non-overlapping ``open(.*?)close`` match (the whole text for
    ``answer_only``), or None when there is no match."""
    if not variant.sections:
        return text
    open_tag, close_tag = variant.sections[-1]
    pattern = re.escape(open_tag) + "(.*?)" + re.escape(close_tag)
    matches = re.findall(pattern, text, flags=re.DOTALL)
    return matches[-1] if matches else None


def structure_ok(text: str, variant: RewardVariant) -> bool:
    """Tag counts, tag order and non-empty reasoning sections (not the answer's number)."""
    if any(text.count(tag) != 1 for tag in variant.tags):
        return False
    opens = [text.find(open_tag) for open_tag, _ in variant.sections]
    closes = [text.find(close_tag) for _, close_tag in variant.sections]
    if variant.sequential:
        order = [position for pair in zip(opens, closes, strict=True) for position in pair]
        if order != sorted(order):
            return False
    elif opens != sorted(opens) or any(c < o for o, c in zip(opens, closes, strict=True)):
        return False
    reasoning = zip(variant.sections[:-1], opens, closes, strict=False)
    return all(
        text[start + len(open_tag) : end].strip(ASCII_WHITESPACE)
        for (open_tag, _), start, end in reasoning
    )


def score_text(text: str, ground_truth: float, variant: RewardVariant) -> RewardResult:
    """The reward of one response text under ``variant`` for the true rating ``ground_truth``."""
    section = answer_section(text, variant)
    number = None if section is None else parse_number(section)
    rating = None if number is None else float(number)
    value = None if number is None else exact_value(number)
    format_ok = (
        value is not None and RATING_MIN <= value <= RATING_MAX and structure_ok(text, variant)
    )
    if not format_ok:
        return RewardResult(FORMAT_PENALTY, False, rating)
    if variant.exact_match:
        answer_score = EXACT_HIT if value == Decimal(float(ground_truth)) else EXACT_MISS
    else:
        answer_score = 1.0 - abs(rating - ground_truth) / 2
    return RewardResult(FORMAT_BONUS + answer_score, True, rating)


def get_reward(name: str = "rating") -> Callable[[str, float], RewardResult]:
    """The host reward function ``fn(text, ground_truth) -> RewardResult`` of a variant."""
    return partial(score_text, variant=get_variant(name))


def rating_reward(text: str, ground_truth: float) -> RewardResult:
    """The default RecZero reward (four tagged steps, graded answer score) of one response."""
    return score_text(text, ground_truth, VARIANTS["rating"])
