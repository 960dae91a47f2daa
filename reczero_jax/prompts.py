"""Think-before-Recommendation prompts: the four-step instruction and the four input fields.

A sample record (see ``reczero_jax.data``) becomes a prompt in one of three layouts:

- ``"chat"``: ``[system: INSTRUCTION, user: fields]`` rendered by the tokenizer's own chat template
  with the generation prompt (works for any instruct model that has a system role);
- ``"user"``: one user turn holding ``INSTRUCTION``, a blank line, then the fields, for chat
  templates that reject a system role;
- ``"raw"``: the authors' single pre-formatted Qwen ChatML string (see ``build_raw_prompt``).

The fields block (``render_fields``) is four fields separated by blank lines::

    user_history:
    1. {title}, {rating:.1f};
    Title: .. | Categories: .. | Brand: .. | Price: .. | Summary: .. | Description: .. | Review: ..
    2. ...

    user_avg_rating: {mean:.2f}

    target_item:
    Title: .. | Categories: .. | Brand: .. | Price: .. | Description: ..
        | Ratings: [..] | Reviews: [..] | Summaries: [..]        (all on one line)

    target_item_avg_rating: {mean:.2f}

A feature the record lacks (absent, None, empty) is left out with its label, never printed empty.

A token budget (``encode_prompt(..., max_prompt_tokens=...)``) is met by changing the content,
never by cutting token ids, so the template always stays whole. Review texts are cut first
(longest first), then the oldest history entries are dropped; see ``encode_prompt``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reczero_jax.config import LAYOUTS

INSTRUCTION = """\
You predict how a user will rate an item on a scale from 1 to 5. Think before you recommend: \
work through the four steps below and write each one inside its own pair of tags. Open and \
close every tag exactly once, in this order.

1. <analyze user> ... </analyze user>: summarise this user's preferences as their history shows \
them: what they rate high, what they rate low, and how generous their ratings are overall.
2. <analyze item> ... </analyze item>: give the target item's name on the first line. Then write \
one line starting with [pos] on what this user may like about the item, and one line starting \
with [neg] on what this user may dislike about it.
3. <match> ... </match>: weigh the user's preferences from step 1 against the [pos] and [neg] \
aspects from step 2 and reason your way to a rating.
4. <rate> ... </rate>: write only the predicted rating, a number from 1 to 5, and nothing else.

The shape of the answer:
<analyze user>the user's preferences</analyze user>
<analyze item>the item's name
[pos] what the user may like
[neg] what the user may dislike</analyze item>
<match>how the two fit together</match>
<rate>the rating</rate>

The input has four fields: user_history (the user's latest interactions, oldest first, each with \
the rating the user gave), user_avg_rating (the mean of all the user's earlier ratings), \
target_item (the item's features, then the latest ratings and reviews other users gave it) and \
target_item_avg_rating (the mean of all its earlier ratings)."""

MESSAGES_KEY = "prompt_messages"  # a sample with ready chat messages (see encode_prompt)
# How a sample's ready messages become its prompt (``_encode_messages``): "verbatim", the first
# message's content tokenised as is (the authors' verl rl_dataset: their content is already a
# whole ChatML string); "template", the messages through the tokenizer's chat template.
FORMAT_KEY = "prompt_format"
PROMPT_FORMATS = ("verbatim", "template")
CHAT_TURN = "<|im_start|>"  # a content that starts with it is a whole ChatML prompt

SUMMARY_CHARS = 200  # PAPER.md: the user's review summary is cut at 200 characters
DESCRIPTION_CHARS = 400  # PAPER.md: item descriptions are cut at 400 characters
REVIEW_CHARS = 400  # PAPER.md: review texts are cut at 400 characters (our budget lowers it)


@dataclass(frozen=True)
class EncodedPrompt:
    """A tokenised prompt: ``ids`` (token ids, template included), ``trimmed`` (whether review text
    was cut below ``REVIEW_CHARS`` or history entries were dropped to meet the budget) and
    ``text`` (the exact string that was tokenised)."""

    ids: list[int]
    trimmed: bool
    text: str


# ----------------------------------------------------------------------------- field rendering


def _clean(value: Any) -> str:
    """One line of text: every run of whitespace (newlines included) becomes one space."""
    return " ".join(str(value).split())


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, Sequence):
        return any(_present(v) for v in value)
    return True


def _cut(value: Any, limit: int) -> str:
    return _clean(value)[:limit].rstrip()


def _categories(value: Any) -> str:
    """Categories as one string: a str as given, a list of str joined with ", "."""
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return ", ".join(_clean(v) for v in value if v.strip())
    raise TypeError(
        f"categories must be a str or a list of str, got {value!r}: "
        "flatten nested category paths in the data pipeline"
    )


def _price(value: Any) -> str:
    """A numeric price with 2 decimals; a string price (e.g. Amazon's "$12.99") as given."""
    if isinstance(value, int | float):
        return f"{value:.2f}"
    return _clean(value)


def _rating(value: Any) -> str:
    return f"{float(value):.1f}"


def _joined(parts: Iterable[tuple[str, str]]) -> str:
    return " | ".join(f"{label}: {text}" for label, text in parts if text)


def _fixed_features(item: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Title | Categories | Brand | Price: the features history entries and the target share."""
    parts = []
    if _present(item.get("title")):
        parts.append(("Title", _clean(item["title"])))
    if _present(item.get("categories")):
        parts.append(("Categories", _categories(item["categories"])))
    if _present(item.get("brand")):
        parts.append(("Brand", _clean(item["brand"])))
    if _present(item.get("price")):
        parts.append(("Price", _price(item["price"])))
    return parts


def _text_field(entry: Mapping[str, Any], key: str, limit: int) -> str:
    return _cut(entry[key], limit) if limit > 0 and _present(entry.get(key)) else ""


def _user_history_entry(k: int, entry: Mapping[str, Any], max_review_chars: int) -> str:
    """``k. {title}, {rating:.1f};`` then the features line. A missing title falls back to the
    item id in the numbered line (and is left out of the features line)."""
    label = _clean(entry["title"]) if _present(entry.get("title")) else f"item {entry['item_id']}"
    features = _fixed_features(entry) + [
        ("Summary", _text_field(entry, "summary", SUMMARY_CHARS)),
        ("Description", _text_field(entry, "description", DESCRIPTION_CHARS)),
        ("Review", _text_field(entry, "review", max_review_chars)),
    ]
    return f"{k}. {label}, {_rating(entry['rating'])};\n{_joined(features)}"


def _text_list(entries: Sequence[Mapping[str, Any]], key: str, limit: int) -> str:
    """A JSON list of one text per entry (``""`` for an entry without it, so positions line up
    with ``Ratings``); empty string when no entry has the text."""
    if limit <= 0 or not any(_present(e.get(key)) for e in entries):
        return ""
    return json.dumps([_text_field(e, key, limit) for e in entries], ensure_ascii=False)


def _target_item(sample: Mapping[str, Any], history: Sequence[Mapping], max_review_chars: int):
    item = sample.get("item") or {}
    ratings = "[" + ", ".join(_rating(e["rating"]) for e in history) + "]" if history else ""
    features = _fixed_features(item) + [
        ("Description", _text_field(item, "description", DESCRIPTION_CHARS)),
        ("Ratings", ratings),
        ("Reviews", _text_list(history, "review", max_review_chars)),
        ("Summaries", _text_list(history, "summary", SUMMARY_CHARS)),
    ]
    return _joined(features) or "(none)"


def _required(sample: Mapping[str, Any], key: str) -> Any:
    if key not in sample or sample[key] is None:
        raise ValueError(
            f"sample for user {sample.get('user_id')!r}, item {sample.get('item_id')!r} has no "
            f"{key!r}: prompts need user_history, item_history, user_avg_rating and "
            "item_avg_rating (build samples with reczero_jax.data)"
        )
    return sample[key]


def render_fields(
    sample: Mapping[str, Any],
    *,
    max_review_chars: int = REVIEW_CHARS,
    max_history: int | None = None,
) -> str:
    """The four input fields of PAPER.md, separated by blank lines (layout in the module docstring).

    ``max_review_chars`` cuts every review text (user and item histories) to that many characters;
    0 leaves reviews out. ``max_history`` keeps only the most recent that many entries of each
    history (None keeps all). Summaries are cut at 200 characters, descriptions at 400. Ratings are
    printed with one decimal, the two averages with two.
    """
    user_history = list(_required(sample, "user_history"))
    item_history = list(_required(sample, "item_history"))
    if max_history is not None:
        if max_history < 0:
            raise ValueError(f"max_history must be None or >= 0, got {max_history}")
        user_history = user_history[-max_history:] if max_history else []
        item_history = item_history[-max_history:] if max_history else []
    history = "\n".join(
        _user_history_entry(k, entry, max_review_chars) for k, entry in enumerate(user_history, 1)
    )
    user_avg = float(_required(sample, "user_avg_rating"))
    item_avg = float(_required(sample, "item_avg_rating"))
    return (
        f"user_history:\n{history or '(none)'}\n\n"
        f"user_avg_rating: {user_avg:.2f}\n\n"
        f"target_item:\n{_target_item(sample, item_history, max_review_chars)}\n\n"
        f"target_item_avg_rating: {item_avg:.2f}"
    )


# ----------------------------------------------------------------------------- layouts


def _check_layout(layout: str, allowed: Sequence[str]) -> None:
    if layout not in allowed:
        raise ValueError(f"unknown prompt layout {layout!r}: use one of {', '.join(allowed)}")


def _messages(fields: str, layout: str) -> list[dict[str, str]]:
    if layout == "chat":
        return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": fields}]
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{fields}"}]


def _raw(fields: str) -> str:
    return (
        f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n"
        f"<|im_start|>user\n{fields}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def build_messages(sample: Mapping[str, Any], *, layout: str = "chat", **render) -> list[dict]:
    """Chat messages for ``tokenizer.apply_chat_template``.

    ``layout="chat"``: ``[{"role": "system", "content": INSTRUCTION}, {"role": "user", "content":
    fields}]``; ``layout="user"``: one user message, ``INSTRUCTION + "\\n\\n" + fields``.
    ``render`` goes to ``render_fields`` (``max_review_chars``, ``max_history``).
    """
    _check_layout(layout, ("chat", "user"))
    return _messages(render_fields(sample, **render), layout)


def build_raw_prompt(sample: Mapping[str, Any], **render) -> str:
    """The authors' single pre-formatted Qwen ChatML string::

        <|im_start|>system\\n{INSTRUCTION}<|im_end|>\\n
        <|im_start|>user\\n{fields}<|im_end|>\\n
        <|im_start|>assistant\\n

    (shown on three lines, one string). It equals the ``"chat"`` layout through any ChatML
    template (Qwen2/2.5, SmolLM2); only tokenizers that know ``<|im_start|>``/``<|im_end|>`` as
    special tokens should get it. ``render`` goes to ``render_fields``.
    """
    return _raw(render_fields(sample, **render))


# ----------------------------------------------------------------------------- tokenising


def _prompt_text(sample, tokenizer, layout: str, **render) -> str:
    fields = render_fields(sample, **render)
    if layout == "raw":
        return _raw(fields)
    return tokenizer.apply_chat_template(
        _messages(fields, layout), add_generation_prompt=True, tokenize=False
    )


def _tokenize(text: str, tokenizer) -> list[int]:
    # The template text already holds every special token it needs (BOS included where the
    # template writes one), so the tokenizer must not add its own.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _largest_fitting(lo: int, hi: int, fits) -> int:
    """Largest ``x`` in ``[lo, hi]`` with ``fits(x)`` by bisection, given ``fits(lo)`` holds and
    ``fits`` (nearly) always holds below a threshold and fails above it. The answer is either
    ``lo`` or an ``x`` for which ``fits(x)`` was checked."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _longest_review(sample: Mapping[str, Any]) -> int:
    reviews = [
        len(_clean(e["review"]))
        for e in [*sample["user_history"], *sample["item_history"]]
        if _present(e.get("review"))
    ]
    return min(max(reviews, default=0), REVIEW_CHARS)


def encode_prompt(
    sample: Mapping[str, Any], tokenizer, *, max_prompt_tokens: int, layout: str = "chat"
) -> EncodedPrompt:
    """Render and tokenise one sample so that it holds at most ``max_prompt_tokens`` tokens.

    Layouts ``"chat"``/``"user"`` go through ``tokenizer.apply_chat_template(messages,
    add_generation_prompt=True)``; ``"raw"`` tokenises ``build_raw_prompt``'s string.

    Over budget, the content shrinks; the token ids are never cut, so the template stays whole.
    Keeping history entries counts for more than keeping review text:
      1. with every entry kept, lower one cap on review length shared by all reviews of both
         histories (so the longest reviews are cut first; cap 0 leaves reviews out);
      2. if even cap 0 is over budget, keep only the most recent ``n`` entries of each history
         (oldest dropped first), ``n`` as large as fits, then raise the review cap again as far as
         it fits with those ``n`` entries.
    Each step is a binary search over the cap (0..400) or ``n`` (0..10) in which every candidate
    is rendered and tokenised, so a trimmed prompt costs at most about 15 tokenizer calls.

    Raises ValueError when even the minimal prompt (no history entries) exceeds the budget.

    A sample with ``prompt_messages`` (ready chat messages, e.g. from the authors' verl parquet)
    is not rendered from fields: see ``_encode_messages``.
    """
    _check_layout(layout, LAYOUTS)
    if max_prompt_tokens <= 0:
        raise ValueError(f"max_prompt_tokens must be positive, got {max_prompt_tokens}")
    if MESSAGES_KEY in sample:
        return _encode_messages(sample, tokenizer, max_prompt_tokens)

    def encode(max_history: int | None, max_review_chars: int) -> tuple[str, list[int]]:
        text = _prompt_text(
            sample, tokenizer, layout, max_history=max_history, max_review_chars=max_review_chars
        )
        return text, _tokenize(text, tokenizer)

    text, ids = encode(None, REVIEW_CHARS)
    if len(ids) <= max_prompt_tokens:
        return EncodedPrompt(ids=ids, trimmed=False, text=text)

    def fits(max_history: int | None, max_review_chars: int) -> bool:
        return len(encode(max_history, max_review_chars)[1]) <= max_prompt_tokens

    entries = max(len(_required(sample, "user_history")), len(_required(sample, "item_history")))
    keep = entries
    if not fits(entries, 0):
        minimal = len(encode(0, 0)[1])
        if minimal > max_prompt_tokens:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens} is too small for this prompt: even with no "
                f"history entries it needs {minimal} tokens (user {sample.get('user_id')!r}, "
                f"item {sample.get('item_id')!r}); raise max_prompt_tokens to at least {minimal}"
            )
        keep = _largest_fitting(0, entries - 1, lambda n: fits(n, 0))
    cap = _largest_fitting(0, _longest_review(sample), lambda c: fits(keep, c))
    text, ids = encode(keep, cap)
    return EncodedPrompt(ids=ids, trimmed=True, text=text)


def messages_format(messages: Sequence[Mapping[str, str]]) -> str:
    """The ``PROMPT_FORMATS`` entry ready ``messages`` need: "verbatim" when there is one message
    and its content is already a whole ChatML prompt (starts with ``CHAT_TURN``, as the authors'
    ``make_prefix`` strings: system turn, user turn, opened assistant turn), else "template"."""
    if len(messages) == 1 and messages[0]["content"].lstrip().startswith(CHAT_TURN):
        return "verbatim"
    return "template"


def _encode_messages(sample: Mapping[str, Any], tokenizer, max_prompt_tokens: int) -> EncodedPrompt:
    """A sample that carries its own chat messages (``MESSAGES_KEY``: the authors' verl parquet
    rows, ``reczero_jax.data.verl``) is rendered as its ``FORMAT_KEY`` says (when absent, as
    ``messages_format`` finds), whatever the layout: "verbatim", the one message's content
    tokenised as is, as the authors' verl does; "template", the tokenizer's chat template over
    the messages with the generation prompt. Its text is fixed, so a prompt over budget is an
    error, never trimmed."""
    messages = list(sample[MESSAGES_KEY])
    how = sample.get(FORMAT_KEY) or messages_format(messages)
    if how == "verbatim":
        if len(messages) != 1:
            raise ValueError(f"a verbatim prompt is one message, got {len(messages)} (user "
                             f"{sample.get('user_id')!r}, item {sample.get('item_id')!r})")
        text = messages[0]["content"]
    elif how == "template":
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        raise ValueError(f"{FORMAT_KEY}={how!r}: use one of {', '.join(PROMPT_FORMATS)}")
    ids = _tokenize(text, tokenizer)
    if len(ids) > max_prompt_tokens:
        raise ValueError(
            f"the prompt of user {sample.get('user_id')!r}, item {sample.get('item_id')!r} is "
            f"{len(ids)} tokens, over max_prompt_tokens={max_prompt_tokens}; a verbatim prompt "
            "cannot be trimmed: raise max_prompt_tokens"
        )
    return EncodedPrompt(ids=ids, trimmed=False, text=text)


def encode_prompts(
    samples: Iterable[Mapping[str, Any]], tokenizer, max_prompt_tokens: int, *, layout: str = "chat"
) -> tuple[list[EncodedPrompt], int]:
    """``encode_prompt`` over many samples; returns the prompts and how many were trimmed."""
    prompts = [
        encode_prompt(s, tokenizer, max_prompt_tokens=max_prompt_tokens, layout=layout)
        for s in samples
    ]
    return prompts, sum(p.trimmed for p in prompts)
