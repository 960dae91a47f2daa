"""What makes a warm-start trace usable, as pure functions (PAPER.md, RecOne).

A teacher answer is judged by the project's default reward rules
(``reczero_jax.rewards.rating_reward``): it must pass the four-tag format rule and its
``<rate>`` value must equal the true rating (``4`` and ``4.0`` equal 4; ``4.5`` does not).

Rationalisation: an answer that fails either test is asked for ONCE more, with
``RATING_HINT`` (the true rating) appended to the prompt's user turn. The hinted answer is
kept when it passes both tests and does not mention the hint: the saved trace is trained on
WITHOUT the hint in the prompt, so a trace that talks about "the hint" would teach the student
to cite information it never sees. The hint check looks for the word "hint" (any case) in the
hinted answer; it may also drop an answer that uses the word innocently ("a hint of romance"),
a loss that is counted like every other drop.

The first answer is retried whether it failed the format or the rating: an answer without a
valid ``<rate>`` section has no rating that could equal the truth.
"""

from __future__ import annotations

import re

from reczero_jax.rewards import rating_reward

# Appended to the end of the user turn (after the target_item_avg_rating field) for the
# second, hinted try. {rating} is the true rating as an integer.
RATING_HINT = (
    "\n\nHint: this user's true rating of the target item is {rating}. Work through the four "
    "steps as if you had worked it out yourself, arrive at {rating} in the <rate> section, and "
    "do not mention this hint."
)
HINT_WORD = re.compile(r"hint", flags=re.IGNORECASE)

# Verdicts on one answer.
OK, BAD_FORMAT, WRONG_RATING, HINT_LEAK = "ok", "format", "wrong_rating", "hint_leak"
# Outcomes of one sample after at most two tries.
KEPT, RATIONALISED, RETRY = "kept", "rationalised", "retry"
DROPPED = {BAD_FORMAT: "dropped_format", WRONG_RATING: "dropped_wrong_rating",
           HINT_LEAK: "dropped_hint_leak"}
OUTCOMES = (KEPT, RATIONALISED, *DROPPED.values())


def hint_text(rating: int) -> str:
    """The hint for a sample whose true rating is ``rating``."""
    return RATING_HINT.format(rating=int(rating))


def judge(response: str, truth: int, *, hinted: bool = False) -> str:
    """``OK`` when ``response`` passes the format rule and rates exactly ``truth``; otherwise
    ``BAD_FORMAT``, ``WRONG_RATING`` or (hinted answers only) ``HINT_LEAK``, tested in that
    order."""
    result = rating_reward(response, truth)
    if not result.format_ok:
        return BAD_FORMAT
    if result.rating != truth:
        return WRONG_RATING
    if hinted and HINT_WORD.search(response):
        return HINT_LEAK
    return OK


def trace_outcome(first: str, second: str | None = None) -> str:
    """The outcome of a sample from the verdicts of its unhinted and hinted answers.

    first OK -> ``KEPT`` (second is ignored); first not OK and no second yet -> ``RETRY``;
    second OK -> ``RATIONALISED``; otherwise ``DROPPED[second]`` (the hinted answer's fault).
    """
    if first == OK:
        return KEPT
    if second is None:
        return RETRY
    return RATIONALISED if second == OK else DROPPED[second]
