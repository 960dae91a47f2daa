"""Think-before-Recommendation prompts: golden rendering, missing fields, chat template, budget."""

import os
import re
from pathlib import Path

import pytest

from reczero_jax.prompts import (
    INSTRUCTION,
    build_messages,
    build_raw_prompt,
    encode_prompt,
    encode_prompts,
    render_fields,
)

GOLDEN = Path(__file__).parent / "golden" / "prompt_amazon_raw.txt"

# A hand-made Amazon-like sample: every kind of feature, one entry missing brand and price,
# a review with a newline, a description over the 400-character cut.
AMAZON_SAMPLE = {
    "user_id": "A1",
    "item_id": "B9",
    "rating": 4,
    "timestamp": 1_500_000_000,
    "dataset": "amazon-music",
    "split": "test",
    "item": {
        "title": "Blue Train",
        "categories": ["CDs & Vinyl", "Jazz"],
        "brand": "Blue Note",
        "price": 12.5,
        "description": "Hard bop classic. " * 30,
    },
    "user_history": [
        {
            "item_id": "B1",
            "title": "Kind of Blue",
            "rating": 5,
            "timestamp": 1_400_000_000,
            "categories": ["CDs & Vinyl", "Jazz"],
            "brand": "Columbia",
            "price": "$9.99",
            "summary": "Timeless",
            "description": "Modal jazz landmark.",
            "review": "Every track is perfect.\nBuy it.",
        },
        {
            "item_id": "B2",
            "title": "Thriller",
            "rating": 2,
            "timestamp": 1_450_000_000,
            "categories": "CDs & Vinyl",
            "summary": "Not for me",
            "review": "Too much pop for my taste.",
        },
    ],
    "item_history": [
        {
            "user_id": "A7",
            "rating": 5,
            "timestamp": 1_300_000_000,
            "review": "A must.",
            "summary": "Great",
        },
        {"user_id": "A8", "rating": 3, "timestamp": 1_350_000_000, "review": 'Good "but" long.'},
    ],
    "user_avg_rating": 3.5,
    "item_avg_rating": 13 / 3,
}

# MovieLens has titles and genres only: no brand, price, description, review or summary.
MOVIELENS_SAMPLE = {
    "user_id": "1",
    "item_id": "50",
    "rating": 5,
    "timestamp": 900,
    "item": {"title": "Star Wars (1977)", "categories": ["Action", "Sci-Fi"]},
    "user_history": [
        {
            "item_id": "1",
            "title": "Toy Story (1995)",
            "rating": 4,
            "timestamp": 100,
            "categories": ["Animation", "Comedy"],
        },
        {
            "item_id": "2",
            "title": "GoldenEye (1995)",
            "rating": 3,
            "timestamp": 200,
            "categories": ["Action"],
        },
    ],
    "item_history": [
        {"user_id": "7", "rating": 5, "timestamp": 300},
        {"user_id": "8", "rating": 4, "timestamp": 400, "review": None, "summary": ""},
    ],
    "user_avg_rating": 3.5,
    "item_avg_rating": 4.5,
}


def test_golden_raw_prompt():
    text = build_raw_prompt(AMAZON_SAMPLE)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text, encoding="utf-8")
        pytest.skip(f"rewrote {GOLDEN}")
    assert text == GOLDEN.read_text(encoding="utf-8"), (
        "prompt format changed: if deliberate, rerun with UPDATE_GOLDEN=1 and review the diff"
    )


def test_text_fields_cut_to_paper_lengths():
    sample = {
        **AMAZON_SAMPLE,
        "user_history": [
            {
                **AMAZON_SAMPLE["user_history"][0],
                "summary": "s" * 300,
                "description": "d" * 900,
                "review": "r" * 900,
            }
        ],
    }
    fields = render_fields(sample)
    assert re.search(r"Summary: (s+) \|", fields).group(1) == "s" * 200
    assert re.search(r"Description: (d+) \|", fields).group(1) == "d" * 400
    assert re.search(r"Review: (r+)\n", fields).group(1) == "r" * 400
    target_description = re.search(r"target_item:\n.*Description: ([^|]*) \|", fields).group(1)
    assert len(target_description) <= 400 and "Hard bop classic." in target_description


def test_missing_fields_are_left_out():
    fields = render_fields(MOVIELENS_SAMPLE)
    assert fields == (
        "user_history:\n"
        "1. Toy Story (1995), 4.0;\n"
        "Title: Toy Story (1995) | Categories: Animation, Comedy\n"
        "2. GoldenEye (1995), 3.0;\n"
        "Title: GoldenEye (1995) | Categories: Action\n"
        "\n"
        "user_avg_rating: 3.50\n"
        "\n"
        "target_item:\n"
        "Title: Star Wars (1977) | Categories: Action, Sci-Fi | Ratings: [5.0, 4.0]\n"
        "\n"
        "target_item_avg_rating: 4.50"
    )


def test_missing_title_and_bad_categories():
    entry = {k: v for k, v in MOVIELENS_SAMPLE["user_history"][0].items() if k != "title"}
    fields = render_fields({**MOVIELENS_SAMPLE, "user_history": [entry]})
    assert "1. item 1, 4.0;\nCategories: Animation, Comedy\n" in fields
    nested = {**MOVIELENS_SAMPLE, "item": {"title": "X", "categories": [["Books", "Jazz"]]}}
    with pytest.raises(TypeError, match="categories"):
        render_fields(nested)


def test_bad_input_names_the_problem():
    no_avg = {k: v for k, v in MOVIELENS_SAMPLE.items() if k != "user_avg_rating"}
    with pytest.raises(ValueError, match="user_avg_rating"):
        render_fields(no_avg)
    with pytest.raises(ValueError, match="layout"):
        build_messages(MOVIELENS_SAMPLE, layout="raw")


def test_messages_layouts():
    fields = render_fields(AMAZON_SAMPLE)
    assert build_messages(AMAZON_SAMPLE) == [
        {"role": "system", "content": INSTRUCTION},
        {"role": "user", "content": fields},
    ]
    (single,) = build_messages(AMAZON_SAMPLE, layout="user")
    assert single == {"role": "user", "content": INSTRUCTION + "\n\n" + fields}


def test_instruction_names_every_tag_in_order():
    tags = ["<analyze user>", "<analyze item>", "[pos]", "[neg]", "<match>", "<rate>"]
    positions = [INSTRUCTION.index(tag) for tag in tags]
    assert positions == sorted(positions)
    for tag in ["</analyze user>", "</analyze item>", "</match>", "</rate>"]:
        assert tag in INSTRUCTION


def test_chat_template_with_smollm2(smollm2_tokenizer):
    prompt = encode_prompt(AMAZON_SAMPLE, smollm2_tokenizer, max_prompt_tokens=10_000)
    assert not prompt.trimmed
    fields = render_fields(AMAZON_SAMPLE)
    assert prompt.text.startswith(f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n")
    assert f"<|im_start|>user\n{fields}<|im_end|>\n" in prompt.text
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert "SmolLM" not in prompt.text  # the template's default system prompt is replaced
    reference = smollm2_tokenizer.apply_chat_template(
        build_messages(AMAZON_SAMPLE), add_generation_prompt=True, tokenize=True
    )
    assert prompt.ids == list(reference["input_ids"])
    im_start = smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompt.ids.count(im_start) == 3


def test_raw_layout_equals_chatml_template(smollm2_tokenizer):
    # SmolLM2's template is ChatML, so the authors' raw string must tokenise identically.
    raw = encode_prompt(AMAZON_SAMPLE, smollm2_tokenizer, max_prompt_tokens=10_000, layout="raw")
    chat = encode_prompt(AMAZON_SAMPLE, smollm2_tokenizer, max_prompt_tokens=10_000)
    assert raw.text == build_raw_prompt(AMAZON_SAMPLE) == chat.text
    assert raw.ids == chat.ids
    user = encode_prompt(AMAZON_SAMPLE, smollm2_tokenizer, max_prompt_tokens=10_000, layout="user")
    assert "<|im_start|>system" in user.text  # SmolLM2 adds its default system turn
    assert user.text.endswith(
        f"{INSTRUCTION}\n\n{render_fields(AMAZON_SAMPLE)}<|im_end|>\n<|im_start|>assistant\n"
    )


# ----------------------------------------------------------------------------- token budget

WORDS = "melody rhythm brass solo tempo groove chorus verse bridge encore ".split()


def _review(tag: str, n_chars: int) -> str:
    """A review starting with ``tag`` and made of distinct words, ``n_chars`` long."""
    text = tag
    i = 0
    while len(text) < n_chars:
        text += " " + WORDS[i % len(WORDS)]
        i += 1
    text = text[:n_chars]
    return text if not text.endswith(" ") else text[:-1] + "x"  # the renderer strips ends


def _long_sample() -> dict:
    # Review lengths independent of age, so "longest first" and "oldest first" differ.
    user_lengths = [60, 390, 120, 300, 80, 350, 200, 90, 250, 150]
    item_lengths = [380, 70, 260, 110, 330, 100, 210, 400, 140, 50]
    return {
        **AMAZON_SAMPLE,
        "user_history": [
            {
                "item_id": f"U{k}",
                "title": f"Album U{k:02d}",
                "rating": 1 + k % 5,
                "timestamp": 1000 + k,
                "categories": ["Jazz"],
                "summary": f"summary U{k:02d}",
                "review": _review(f"ureview{k:02d}", n),
            }
            for k, n in enumerate(user_lengths)
        ],
        "item_history": [
            {
                "user_id": f"V{k}",
                "rating": 1 + (k * 3) % 5,
                "timestamp": 1000 + k,
                "review": _review(f"ireview{k:02d}", n),
            }
            for k, n in enumerate(item_lengths)
        ],
    }


def _n_tokens(tokenizer, sample: dict, **render) -> int:
    """Prompt length through the tokenizer's own chat template (independent of encode_prompt)."""
    messages = build_messages(sample, **render)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"])


def _reviews_in(text: str, sample: dict) -> dict[str, str]:
    """For each review of ``sample``: "whole", "cut" or "gone" in ``text``."""
    state = {}
    for entry in sample["user_history"] + sample["item_history"]:
        review = entry["review"]
        tag = review.split()[0]
        state[tag] = "whole" if review in text else "cut" if tag in text else "gone"
    return state


def test_budget_trimming(smollm2_tokenizer):
    sample = _long_sample()
    tok = smollm2_tokenizer
    full = encode_prompt(sample, tok, max_prompt_tokens=100_000)
    assert not full.trimmed and all(s == "whole" for s in _reviews_in(full.text, sample).values())
    assert encode_prompt(sample, tok, max_prompt_tokens=len(full.ids)) == full

    # Slightly over budget: every entry kept, only the longest reviews cut.
    slight = encode_prompt(sample, tok, max_prompt_tokens=len(full.ids) - 40)
    assert slight.trimmed and len(slight.ids) <= len(full.ids) - 40
    state = _reviews_in(slight.text, sample)
    assert state["ireview07"] == "cut" and state["ureview01"] == "cut"  # 400 and 390 chars
    assert state["ireview09"] == state["ureview00"] == "whole"  # 50 and 60 chars
    assert "gone" not in state.values()
    assert all(f"Album U{k:02d}" in slight.text for k in range(10))
    lengths = {
        e["review"].split()[0]: len(e["review"])
        for e in sample["user_history"] + sample["item_history"]
    }
    # One cap for all: any review kept whole is no longer than any review that was cut.
    whole = [lengths[t] for t, s in state.items() if s == "whole"]
    cut = [lengths[t] for t, s in state.items() if s == "cut"]
    assert max(whole) <= min(cut)

    # No room for reviews, but every entry still fits.
    no_reviews = _n_tokens(tok, sample, max_review_chars=0)
    bare = encode_prompt(sample, tok, max_prompt_tokens=no_reviews + 30)
    assert bare.trimmed and no_reviews <= len(bare.ids) <= no_reviews + 30
    assert all(f"Album U{k:02d}" in bare.text for k in range(10))
    assert len(re.findall(r"^\d+\. Album", bare.text, flags=re.M)) == 10

    # Tighter: the oldest entries go, the most recent stay, from both histories.
    tight_budget = len(bare.ids) - 200
    tight = encode_prompt(sample, tok, max_prompt_tokens=tight_budget)
    assert tight.trimmed and len(tight.ids) <= tight_budget
    kept = [k for k in range(10) if f"Album U{k:02d}" in tight.text]
    assert kept and kept[0] > 0 and kept == list(range(kept[0], 10))
    ratings = re.search(r"Ratings: \[([^\]]*)\]", tight.text).group(1).split(", ")
    assert len(ratings) == len(kept)  # item history cut to the same most recent entries
    # As many entries as fit: one more would be over budget even without reviews.
    assert _n_tokens(tok, sample, max_history=len(kept) + 1, max_review_chars=0) > tight_budget

    # The minimal prompt (no history entries) fits exactly; one token less is impossible.
    minimal = _n_tokens(tok, sample, max_history=0, max_review_chars=0)
    smallest = encode_prompt(sample, tok, max_prompt_tokens=minimal)
    assert len(smallest.ids) == minimal and "user_history:\n(none)" in smallest.text
    assert "Ratings" not in smallest.text
    with pytest.raises(ValueError, match=rf"max_prompt_tokens={minimal - 1}.*{minimal}"):
        encode_prompt(sample, tok, max_prompt_tokens=minimal - 1)

    # The raw layout meets the budget the same way.
    raw = encode_prompt(sample, tok, max_prompt_tokens=tight_budget, layout="raw")
    assert raw.trimmed and raw.ids == tight.ids


def test_encode_prompts_counts_trimmed(smollm2_tokenizer):
    long_sample = _long_sample()
    short = encode_prompt(AMAZON_SAMPLE, smollm2_tokenizer, max_prompt_tokens=100_000)
    budget = len(short.ids) + 10
    prompts, n_trimmed = encode_prompts(
        [AMAZON_SAMPLE, long_sample, MOVIELENS_SAMPLE], smollm2_tokenizer, budget
    )
    assert n_trimmed == 1
    assert [p.trimmed for p in prompts] == [False, True, False]
    assert all(len(p.ids) <= budget for p in prompts)
