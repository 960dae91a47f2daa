"""grain pipeline over real samples (MovieLens-100k) with the real prompts and SmolLM2 tokenizer."""

import numpy as np
import pytest

from reczero_jax import prompts
from reczero_jax.data.padding import left_pad
from reczero_jax.data.pipeline import (
    bucket_for,
    bucket_length,
    length_buckets,
    make_pipeline,
    prompt_length_stats,
)
from reczero_jax.data.samples import build_samples
from reczero_jax.data.sources import read_source

BUDGET = 1024


@pytest.fixture(scope="module")
def records():
    """48 validation samples of MovieLens-100k (a plain list is a grain source too)."""
    sample_set = build_samples(read_source("movielens-100k"))
    return list(sample_set.samples("validation"))[:48]


def batches(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def pipeline(records, tokenizer, **options):
    defaults = dict(global_batch_size=8, max_prompt_tokens=BUDGET, seed=5, process_index=0)
    return make_pipeline(records, tokenizer, **{**defaults, "process_count": 1, **options})


def test_same_seed_same_order(records, smollm2_tokenizer):
    first = batches(iter(pipeline(records, smollm2_tokenizer)), 3)
    second = batches(iter(pipeline(records, smollm2_tokenizer)), 3)
    assert_same(first, second)
    other = batches(iter(pipeline(records, smollm2_tokenizer, seed=6)), 3)
    order = np.concatenate([b["record_index"] for b in first])
    assert not np.array_equal(order, np.concatenate([b["record_index"] for b in other]))
    assert len(set(order.tolist())) == len(order)  # a permutation: no record twice in an epoch


def test_batch_contents_left_padded_to_a_bucket(records, smollm2_tokenizer):
    batch = next(iter(pipeline(records, smollm2_tokenizer)))
    buckets = length_buckets(BUDGET)
    expected = [
        prompts.encode_prompt(records[i], smollm2_tokenizer, max_prompt_tokens=BUDGET).ids
        for i in batch["record_index"]
    ]
    assert batch["prompt_ids"].shape == (8, bucket_for(max(map(len, expected)), buckets))
    assert batch["prompt_ids"].dtype == np.int32 and batch["prompt_mask"].dtype == np.int32
    for row, ids in enumerate(expected):
        mask = batch["prompt_mask"][row]
        assert mask.sum() == len(ids) and mask[-len(ids) :].all()  # real tokens at the right
        assert batch["prompt_ids"][row][mask == 1].tolist() == ids
        assert (batch["prompt_ids"][row][mask == 0] == smollm2_tokenizer.pad_token_id).all()
    picked = [records[i] for i in batch["record_index"]]
    assert batch["rating"].tolist() == [r["rating"] for r in picked]
    np.testing.assert_allclose(batch["user_avg_rating"], [r["user_avg_rating"] for r in picked])
    assert batch["user_avg_rating"].dtype == np.float32
    assert batch["valid"].all() and not batch["trimmed"].any()


def test_restored_iterator_continues_exactly(records, smollm2_tokenizer):
    # 48 records, batch 8: 6 batches per epoch; save inside the second epoch
    dataset = pipeline(records, smollm2_tokenizer, num_epochs=2)
    iterator = iter(dataset)
    batches(iterator, 7)
    state = iterator.get_state()
    expected = batches(iterator, 5)  # the rest of the second epoch
    with pytest.raises(StopIteration):
        next(iterator)
    restored = iter(pipeline(records, smollm2_tokenizer, num_epochs=2))
    restored.set_state(state)
    assert_same(batches(restored, 5), expected)


def test_epochs_reshuffle_and_cover(records, smollm2_tokenizer):
    seen = [b["record_index"] for b in iter(pipeline(records, smollm2_tokenizer, num_epochs=2))]
    first, second = np.concatenate(seen[:6]), np.concatenate(seen[6:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(48))
    assert not np.array_equal(first, second)


def test_two_processes_get_disjoint_shares_covering_the_data(records, smollm2_tokenizer):
    whole = list(iter(pipeline(records, smollm2_tokenizer)))
    shares = [
        list(iter(pipeline(records, smollm2_tokenizer, process_index=p, process_count=2)))
        for p in (0, 1)
    ]
    indices = [np.concatenate([b["record_index"] for b in share]) for share in shares]
    assert not set(indices[0].tolist()) & set(indices[1].tolist())
    assert sorted(np.concatenate(indices).tolist()) == list(range(48))
    for step, batch in enumerate(whole):
        first, second = shares[0][step], shares[1][step]
        # same padded length in both processes; their rows stacked are the single-process batch
        assert (
            first["prompt_ids"].shape
            == second["prompt_ids"].shape
            == (4, batch["prompt_ids"].shape[1])
        )
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])


def test_last_short_batch_kept_with_valid_mask(records, smollm2_tokenizer):
    source = records[:10]
    seen = list(
        iter(pipeline(source, smollm2_tokenizer, global_batch_size=4, drop_remainder=False))
    )
    assert len(seen) == 3
    assert seen[-1]["valid"].tolist() == [True, True, False, False]
    valid = np.concatenate([b["record_index"][b["valid"]] for b in seen])
    assert sorted(valid.tolist()) == list(range(10))
    dropped = list(iter(pipeline(source, smollm2_tokenizer, global_batch_size=4)))
    assert len(dropped) == 2


def test_over_budget_prompts_are_trimmed_into_the_last_bucket(records, smollm2_tokenizer):
    batch = next(iter(pipeline(records, smollm2_tokenizer, max_prompt_tokens=700)))
    assert batch["prompt_ids"].shape[1] == bucket_length(700) == 768  # the sampler's bucket
    assert batch["trimmed"].all() and (batch["prompt_mask"].sum(1) <= 700).all()


def test_prompt_length_stats(records, smollm2_tokenizer):
    stats = prompt_length_stats(
        records, smollm2_tokenizer, max_prompt_tokens=BUDGET, sample_size=12
    )
    lengths = [
        len(prompts.encode_prompt(r, smollm2_tokenizer, max_prompt_tokens=BUDGET).ids)
        for r in records
    ]
    assert stats["count"] == 12 and stats["of"] == 48 and stats["trimmed"] == 0
    assert min(lengths) <= stats["p50"] <= stats["p90"] <= stats["max"] <= max(lengths)


def test_pipeline_arguments_are_checked(records, smollm2_tokenizer):
    with pytest.raises(ValueError, match="multiple of the process count"):
        pipeline(records, smollm2_tokenizer, global_batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="process_index 2"):
        pipeline(records, smollm2_tokenizer, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="largest bucket"):
        pipeline(records, smollm2_tokenizer, buckets=(256, 512))


def test_buckets_and_left_pad():
    assert length_buckets(6000) == (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144)
    assert length_buckets(512) == (256, 384, 512)
    # The sampler keeps a pipeline batch's length: prompts are padded once.
    for max_prompt_tokens in (300, 3000, 6000):
        assert all(bucket_length(b) == b for b in length_buckets(max_prompt_tokens))
    assert bucket_for(257, (256, 512)) == 512 and bucket_for(256, (256, 512)) == 256
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        bucket_for(513, (256, 512))
    ids, mask = left_pad([[5, 6], [7], []], 4, pad_id=0)
    assert ids.tolist() == [[0, 0, 5, 6], [0, 0, 0, 7], [0, 0, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
