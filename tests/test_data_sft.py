"""SFT examples and batches (data.sft) and the train subset (data.subset)."""

import numpy as np
import pytest

from reczero_jax import prompts
from reczero_jax.config import DataSection
from reczero_jax.data.sft import sft_batch, sft_examples
from reczero_jax.data.subset import take_subset

SAMPLE = {"user_id": "u1", "item_id": "i1", "rating": 4, "user_avg_rating": 3.5,
          "item_avg_rating": 4.0, "item": {"title": "Toy Story (1995)"},
          "user_history": [{"item_id": "i0", "title": "Heat (1995)", "rating": 5}],
          "item_history": [{"user_id": "u0", "rating": 4}]}
SHORT = "<analyze user>likes films</analyze user>\n<rate>4</rate>"
LONG = "<analyze user>" + "a long thought " * 60 + "</analyze user>\n<rate>4</rate>"


def encode(text, tokenizer):
    return tokenizer.encode(text, add_special_tokens=False)


def test_traces_over_the_budget_are_dropped_and_counted_never_cut(smollm2_tokenizer, capsys):
    budget = len(encode(SHORT, smollm2_tokenizer)) + 1  # the short trace and its eos fit exactly
    assert len(encode(LONG, smollm2_tokenizer)) + 1 > budget
    examples = sft_examples([SAMPLE, SAMPLE], {0: LONG, 1: SHORT}, smollm2_tokenizer,
                            max_prompt_tokens=512, layout="chat", max_response_tokens=budget)
    prompt = prompts.encode_prompt(SAMPLE, smollm2_tokenizer, max_prompt_tokens=512).ids
    # Only the short trace is kept, whole, with its end-of-turn token.
    assert examples == [(prompt + encode(SHORT, smollm2_tokenizer)
                         + [smollm2_tokenizer.eos_token_id], len(prompt))]
    assert "dropped 1 of 2 traces longer than sft.max_response_tokens" in capsys.readouterr().out


def test_no_trace_fitting_is_an_error_naming_the_setting(smollm2_tokenizer):
    with pytest.raises(ValueError, match="all 1 traces are longer than sft.max_response_tokens"):
        sft_examples([SAMPLE], {0: LONG}, smollm2_tokenizer, max_prompt_tokens=512,
                     layout="chat", max_response_tokens=16)
    with pytest.raises(ValueError, match="no trace matched"):
        sft_examples([SAMPLE], {}, smollm2_tokenizer, max_prompt_tokens=512, layout="chat",
                     max_response_tokens=16)


def test_sft_batch_is_right_padded_with_the_loss_on_the_response():
    examples = [([1, 2, 3, 4, 5], 2), ([6, 7, 8], 1), ([9, 10], 1)]
    ids, mask, loss_mask = sft_batch(examples, index=3, batch_size=2, length=8, pad_id=0, seed=1)
    again = sft_batch(examples, index=3, batch_size=2, length=8, pad_id=0, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((ids, mask, loss_mask), again, strict=True))
    assert ids.shape == mask.shape == loss_mask.shape == (2, 8) and ids.dtype == np.int32
    for row in range(2):
        tokens, prompt_length = next(e for e in examples if e[0][0] == ids[row, 0])
        n = len(tokens)
        assert ids[row, :n].tolist() == tokens and not ids[row, n:].any()
        assert mask[row].tolist() == [1] * n + [0] * (8 - n)
        assert loss_mask[row].tolist() == [0] * prompt_length + [1] * (n - prompt_length) + [
            0] * (8 - n)


def test_train_samples_default_to_a_seeded_random_subset_in_split_order():
    records = [{"index": i} for i in range(100)]
    assert DataSection().subset == "random"
    chosen = [r["index"] for r in take_subset(records, 10, DataSection().subset, seed=0)]
    assert chosen == sorted(chosen) and len(set(chosen)) == 10
    assert chosen != list(range(10))  # not the earliest records
    assert chosen == [r["index"] for r in take_subset(records, 10, "random", seed=0)]
    assert chosen != [r["index"] for r in take_subset(records, 10, "random", seed=1)]
    assert take_subset(records, 10, "first") == records[:10]
    assert take_subset(records, 0, "random") == take_subset(records, 500, "random") == records


def test_unknown_subset_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match="data.subset='latest': use one of random, first"):
        take_subset([{}], 1, "latest")
