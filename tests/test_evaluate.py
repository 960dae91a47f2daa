"""Greedy evaluation: metrics against hand-computed rows (parse failures scored by the
user-average fallback), the history-length breakdown, and one evaluate() run on a tiny model."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

from reczero_jax.config import load_config
from reczero_jax.data import load_split
from reczero_jax.data.padding import default_pad_id
from reczero_jax.data.pipeline import make_pipeline
from reczero_jax.data.samples import SampleConfig
from reczero_jax.data.tfds_builder import SourceConfig, prepare
from reczero_jax.evaluate import (
    REPORT_COLUMNS,
    EvalSettings,
    by_history_length,
    evaluate,
    score_rows,
)
from reczero_jax.models import Decoder, ModelConfig
from reczero_jax.rewards import TokenRewardFn
from reczero_jax.sampling import generate


def row(rating, prediction, user_avg, format_ok, history_length):
    return {"rating": rating, "prediction": prediction, "user_avg_rating": user_avg,
            "format_ok": format_ok, "history_length": history_length}


# Scored prediction p (the fallback clip(user_avg, 1, 5) when the prediction is None) and
# error p - y, by hand:
ROWS = [
    row(4, 4.0, 3.5, True, 2),     # p 4.0, error  0.0: exact, within one
    row(2, 3.6, 2.0, True, 5),     # p 3.6, error  1.6: round(3.6) = 4, not within one
    row(5, None, 4.2, False, 8),   # p 4.2, error -0.8: a parse failure is never "correct"
    row(1, None, 0.5, False, 12),  # p 1.0 (clipped), error 0.0: still not correct
    row(3, 2.5, 3.0, False, 10),   # p 2.5, error -0.5: round half to even = 2; within one
]


def test_score_rows_by_hand():
    metrics = score_rows(ROWS)
    assert metrics["n"] == 5 and metrics["n_parse_failures"] == 2
    assert metrics["mae"] == pytest.approx((0 + 1.6 + 0.8 + 0 + 0.5) / 5)
    assert metrics["rmse"] == pytest.approx(math.sqrt((1.6**2 + 0.8**2 + 0.5**2) / 5))
    assert metrics["parse_rate"] == pytest.approx(3 / 5)
    assert metrics["format_rate"] == pytest.approx(2 / 5)
    assert metrics["exact_accuracy"] == pytest.approx(1 / 5)
    assert metrics["within_one_accuracy"] == pytest.approx(2 / 5)


def test_by_history_length_by_hand():
    table = by_history_length(ROWS)
    assert list(table) == ["0-3", "4-6", "7-9", "10+"]
    assert [table[b]["n"] for b in table] == [1, 1, 1, 2]  # every row in exactly one bin
    assert table["0-3"]["mae"] == 0.0 and table["4-6"]["mae"] == pytest.approx(1.6)
    assert table["7-9"]["mae"] == pytest.approx(0.8) and table["7-9"]["parse_rate"] == 0.0
    # 10+: the rows of 12 and 10 entries; errors 0.0 (fallback) and -0.5.
    ten_plus = table["10+"]
    assert ten_plus["mae"] == pytest.approx(0.25) and ten_plus["parse_rate"] == 0.5
    assert ten_plus["exact_accuracy"] == 0.0 and ten_plus["within_one_accuracy"] == 0.5


def test_by_history_length_leaves_out_empty_bins():
    assert list(by_history_length([row(3, 3.0, 3.0, True, 11)])) == ["10+"]


@pytest.fixture(scope="module")
def test_records(tmp_path_factory):
    samples = SampleConfig(max_samples=(("train", 1), ("validation", 1), ("test", 5)))
    out = tmp_path_factory.mktemp("ml100k")
    prepare(SourceConfig.for_dataset("movielens-100k", samples=samples), out)
    split = load_split(out, "test")
    return [split[i] for i in range(len(split))]


def test_evaluate_on_a_tiny_model(smollm2_tokenizer, test_records):
    config = ModelConfig(model_type="llama", vocab_size=len(smollm2_tokenizer), hidden_size=32,
                         intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, tie_word_embeddings=True,
                         eos_token_id=smollm2_tokenizer.eos_token_id)
    model = Decoder(config, rngs=nnx.Rngs(0))
    max_new_tokens = 6
    # Five records in batches of two: the last batch is padded with a repeated row.
    report = evaluate(model, smollm2_tokenizer, test_records,
                      reward_fn=TokenRewardFn(smollm2_tokenizer), max_prompt_tokens=512,
                      max_new_tokens=max_new_tokens, batch_size=2)
    metrics, rows = report["metrics"], report["rows"]

    assert set(REPORT_COLUMNS) <= set(metrics)
    assert {"seconds", "latency_seconds", "requests_per_second", "tokens_per_second",
            "by_history_length"} <= set(metrics)
    assert metrics["n"] == len(rows) == len(test_records) == 5
    assert [(r["user_id"], r["item_id"]) for r in rows] == [
        (r["user_id"], r["item_id"]) for r in test_records]
    generated = [r["generated_tokens"] for r in rows]
    assert all(1 <= g <= max_new_tokens for g in generated)
    assert metrics["tokens_per_request"] == pytest.approx(np.mean(generated))
    assert metrics["tokens_per_second"] == pytest.approx(sum(generated) / metrics["seconds"])
    assert metrics["requests_per_second"] == pytest.approx(5 / metrics["seconds"])
    assert metrics["latency_seconds"] == pytest.approx(metrics["seconds"] / 3)  # 3 batches
    assert sum(b["n"] for b in metrics["by_history_length"].values()) == 5

    # The metrics are the rows' scores, a failed parse scored with the user's average.
    scored = [r["prediction"] if r["prediction"] is not None
              else min(max(r["user_avg_rating"], 1.0), 5.0) for r in rows]
    assert metrics["mae"] == pytest.approx(
        np.mean([abs(p - r["rating"]) for p, r in zip(scored, rows, strict=True)]))
    assert metrics["parse_rate"] == pytest.approx(
        np.mean([r["prediction"] is not None for r in rows]))


def test_a_runs_evaluation_settings_come_from_its_config():
    config = load_config(None, ["data.layout=raw", "train.reward=think_answer",
                                "data.max_prompt_tokens=300", "train.eval_max_new_tokens=40",
                                "train.eval_batch_size=4"])
    assert EvalSettings.of_run(config) == EvalSettings(
        layout="raw", reward="think_answer", max_prompt_tokens=300, max_new_tokens=40,
        batch_size=4)
    # Overrides given (e.g. `reczero eval --run --max-new-tokens 9`) win; None keeps the run's.
    overridden = EvalSettings.of_run(config, max_new_tokens=9, batch_size=None)
    assert (overridden.max_new_tokens, overridden.batch_size) == (9, 4)


def test_evaluate_stops_at_generation_config_eos(smollm2_tokenizer, test_records):
    """Evaluation stops at the union of config.json's, generation_config.json's and the
    tokenizer's EOS ids: B, named by the generation config alone, ends row 0 at step 2."""
    config = ModelConfig(model_type="llama", vocab_size=len(smollm2_tokenizer), hidden_size=32,
                         intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, tie_word_embeddings=True)  # config.json names no EOS
    records, max_new_tokens = test_records[:2], 6
    batch = next(iter(make_pipeline(records, smollm2_tokenizer, global_batch_size=2,
                                    max_prompt_tokens=512, shuffle=False,
                                    drop_remainder=False)))
    free = np.asarray(generate(Decoder(config, rngs=nnx.Rngs(0)), batch["prompt_ids"],
                               batch["prompt_mask"], num_samples=1, eos_ids=(),
                               max_new_tokens=max_new_tokens, temperature=0.0,
                               pad_id=default_pad_id(smollm2_tokenizer),
                               rng=jax.random.key(0)).tokens[:, 0])
    stop = int(free[0, 2])
    with_generation_eos = Decoder(dataclasses.replace(config, generation_eos_token_ids=(stop,)),
                                  rngs=nnx.Rngs(0))  # the same weights
    rows = evaluate(with_generation_eos, smollm2_tokenizer, records,
                    reward_fn=TokenRewardFn(smollm2_tokenizer), max_prompt_tokens=512,
                    max_new_tokens=max_new_tokens, batch_size=2)["rows"]
    for row, tokens in zip(rows, free, strict=True):
        hits = np.flatnonzero(np.isin(tokens, [stop, smollm2_tokenizer.eos_token_id]))
        assert row["generated_tokens"] == (hits[0] + 1 if hits.size else max_new_tokens)
    assert rows[0]["generated_tokens"] <= 3
