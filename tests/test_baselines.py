"""Classic baselines: hand-computed means, the MF loss formula, MF on synthetic low-rank data,
the markdown table, and the baselines on MovieLens-100k's chronological test split."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from reczero_jax.baselines import (
    MFConfig,
    evaluate_baselines,
    fit_baselines,
    fit_biased_mf,
    markdown_table,
    mf_loss,
    score,
)

TINY_MF = MFConfig(dim=2, steps=20)


def rec(user, item, rating, user_avg=3.0, item_avg=3.0):
    return {
        "user_id": user,
        "item_id": item,
        "rating": rating,
        "user_avg_rating": user_avg,
        "item_avg_rating": item_avg,
    }


# mu = 14 / 4 = 3.5; users u1: (5 + 3) / 2 = 4, u2: (4 + 2) / 2 = 3;
# items i1: (5 + 4) / 2 = 4.5, i2: 3, i3: 2.
TRAIN = [rec("u1", "i1", 5), rec("u1", "i2", 3), rec("u2", "i1", 4), rec("u2", "i3", 2)]
# (u1, i3), an unseen user u3 with i1, u2 with an unseen item i4.
EVAL = [
    rec("u1", "i3", 2, user_avg=4.5, item_avg=1.5),
    rec("u3", "i1", 5, user_avg=2.0, item_avg=4.0),
    rec("u2", "i4", 1, user_avg=3.0, item_avg=2.5),
]
TRUTH = np.array([2.0, 5.0, 1.0])


@pytest.fixture(scope="module")
def tiny_predictors():
    return fit_baselines(TRAIN, TINY_MF)


@pytest.mark.parametrize(
    ("name", "expected", "fallback"),
    [
        ("global_mean", [3.5, 3.5, 3.5], [False, False, False]),
        ("user_mean", [4.0, 3.5, 3.0], [False, True, False]),
        ("item_mean", [2.0, 4.5, 3.5], [False, False, True]),
        ("user_history_avg", [4.5, 2.0, 3.0], [False, False, False]),
        ("item_history_avg", [1.5, 4.0, 2.5], [False, False, False]),
    ],
)
def test_mean_baselines_by_hand(tiny_predictors, name, expected, fallback):
    predictor = tiny_predictors[name]
    np.testing.assert_allclose(predictor.predict(EVAL), expected)
    np.testing.assert_array_equal(predictor.fallback(EVAL), fallback)
    error = np.array(expected) - TRUTH
    metrics = score(predictor, EVAL)
    assert metrics["mae"] == pytest.approx(np.abs(error).mean())
    assert metrics["rmse"] == pytest.approx(math.sqrt((error**2).mean()))
    assert metrics["n"] == 3 and metrics["n_fallback"] == sum(fallback)
    assert metrics["parse_rate"] == metrics["format_rate"] == 1.0


def test_evaluate_baselines_item_mean_accuracies_by_hand():
    results = evaluate_baselines(TRAIN, EVAL, TINY_MF)
    assert set(results) == {
        "global_mean", "user_mean", "item_mean", "biased_mf", "user_history_avg",
        "item_history_avg",
    }  # fmt: skip
    item = results["item_mean"]  # predictions 2, 4.5, 3.5 against 2, 5, 1
    assert item["mae"] == pytest.approx((0 + 0.5 + 2.5) / 3)
    assert item["exact_accuracy"] == pytest.approx(1 / 3)  # round(4.5) = 4 (half to even)
    assert item["within_one_accuracy"] == pytest.approx(2 / 3)


def test_mf_loss_matches_formula():
    params = {
        "user_bias": jnp.array([0.5, -0.25]),
        "item_bias": jnp.array([0.1, 0.0, -0.3]),
        "user_factors": jnp.array([[1.0, 0.0], [0.5, 2.0]]),
        "item_factors": jnp.array([[0.2, 0.4], [-1.0, 1.0], [0.0, 0.5]]),
    }
    users, items, ratings = jnp.array([0, 1, 1]), jnp.array([0, 1, 2]), jnp.array([4.0, 2.0, 5.0])
    mean, l2 = 3.0, 0.1
    expected = 0.0
    for u, i, r in zip([0, 1, 1], [0, 1, 2], [4.0, 2.0, 5.0], strict=True):
        p, q = np.array(params["user_factors"][u]), np.array(params["item_factors"][i])
        bu, bi = float(params["user_bias"][u]), float(params["item_bias"][i])
        residual = r - (mean + bu + bi + p @ q)
        expected += residual**2 + l2 * (p @ p + q @ q + bu**2 + bi**2)
    loss = mf_loss(params, users, items, ratings, mean, l2)
    assert float(loss) == pytest.approx(expected / 3, rel=1e-6)


@pytest.fixture(scope="module")
def low_rank():
    """60 users x 50 items, r = 3 + b_u + b_i + p_u . q_i (rank 2, within [1, 5]); 60% of the
    cells are train, the rest held out."""
    rng = np.random.default_rng(0)
    n_users, n_items = 60, 50
    user_bias, item_bias = rng.uniform(-0.5, 0.5, n_users), rng.uniform(-0.5, 0.5, n_items)
    user_factors, item_factors = rng.normal(0, 0.7, (n_users, 2)), rng.normal(0, 0.7, (n_items, 2))
    full = 3 + user_bias[:, None] + item_bias[None, :] + user_factors @ item_factors.T
    full = np.clip(full, 1, 5)
    train, held_out = [], []
    for u in range(n_users):
        for i in range(n_items):
            record = rec(f"u{u}", f"i{i}", float(full[u, i]))
            (train if rng.random() < 0.6 else held_out).append(record)
    return train, held_out


def test_mf_recovers_low_rank_ratings(low_rank):
    train, held_out = low_rank
    config = MFConfig(dim=4, steps=400, learning_rate=0.05, l2=1e-4)
    results = evaluate_baselines(train, held_out, config)
    mf = results["biased_mf"]
    best_mean = min(results[name]["rmse"] for name in ("global_mean", "user_mean", "item_mean"))
    assert mf["n_fallback"] == 0
    assert mf["rmse"] < 0.5 * results["global_mean"]["rmse"]
    assert mf["rmse"] < 0.7 * best_mean  # the interaction term matters, not only the biases


def test_mf_is_seeded_and_its_loss_falls(low_rank):
    train, _ = low_rank
    config = MFConfig(dim=3, steps=50, learning_rate=0.05)
    first, again = fit_biased_mf(train, config), fit_biased_mf(train, config)
    np.testing.assert_array_equal(first.user_factors, again.user_factors)
    np.testing.assert_array_equal(first.losses, again.losses)
    assert first.losses.shape == (50,) and first.losses[-1] < 0.5 * first.losses[0]
    other_seed = fit_biased_mf(train, MFConfig(dim=3, steps=50, learning_rate=0.05, seed=1))
    assert not np.array_equal(first.user_factors, other_seed.user_factors)


def test_mf_unseen_user_or_item_gets_zero_bias_and_factors(tiny_predictors):
    model = tiny_predictors["biased_mf"]
    item_i1 = model.item_bias[model.items.positions["i1"]]
    user_u2 = model.user_bias[model.users.positions["u2"]]
    prediction = model.predict(EVAL[1:])  # (unseen u3, i1) and (u2, unseen i4)
    expected = np.clip([model.mean + item_i1, model.mean + user_u2], 1, 5)
    np.testing.assert_allclose(prediction, expected)  # no p_u . q_i term
    np.testing.assert_array_equal(model.fallback(EVAL), [False, True, True])
    assert model.mean == pytest.approx(3.5)


def test_mf_predictions_are_clipped_to_the_scale():
    train = [rec("u", "i", 5), rec("u", "j", 5), rec("v", "i", 5), rec("v", "j", 1)]
    model = fit_biased_mf(train, MFConfig(dim=2, steps=300, learning_rate=0.1, l2=0.0))
    raw = model.mean + model.user_bias[:, None] + model.item_bias[None, :]
    raw = raw + model.user_factors @ model.item_factors.T
    grid = [rec(u, i, 3) for u in ("u", "v") for i in ("i", "j")]
    predicted = model.predict(grid)
    np.testing.assert_allclose(predicted, np.clip(raw.ravel(), 1, 5))
    assert predicted.min() >= 1 and predicted.max() <= 5


def test_bad_records_are_named_errors():
    with pytest.raises(KeyError, match="record 1 has no 'item_id'"):
        fit_baselines([rec("u", "i", 4), {"user_id": "u", "rating": 3}], TINY_MF)
    with pytest.raises(ValueError, match="outside \\[1, 5\\].*record 0, value 0"):
        fit_baselines([rec("u", "i", 0)], TINY_MF)
    with pytest.raises(ValueError, match="train split is empty"):
        fit_baselines([], TINY_MF)
    with pytest.raises(ValueError, match="at least one evaluation record"):
        evaluate_baselines(TRAIN, [], TINY_MF)
    history = fit_baselines(TRAIN, TINY_MF)["user_history_avg"]
    with pytest.raises(KeyError, match="record 0 has no 'user_avg_rating'"):
        history.predict([{"user_id": "u", "item_id": "i", "rating": 3}])
    with pytest.raises(ValueError, match="dim >= 1"):
        MFConfig(dim=0)


def test_markdown_table():
    results = {
        "global_mean": {"mae": 1.0, "rmse": 1.23456, "n": 943},
        "zero-shot LLM": {"mae": 0.87654, "n": 10, "parse_rate": 0.5},
    }
    table = markdown_table(results, columns=("mae", "rmse", "n"))
    lines = table.splitlines()
    assert lines[0] == "| name | mae | rmse | n |"
    assert lines[1] == "|---|---:|---:|---:|"
    assert lines[2] == "| global_mean | 1.0000 | 1.2346 | 943 |"
    assert lines[3] == "| zero-shot LLM | 0.8765 | - | 10 |"
    assert len(lines) == 4 and table.endswith("\n")
    with pytest.raises(ValueError, match="at least one column"):
        markdown_table(results, columns=())


# ----------------------------------------------------------------------------- MovieLens-100k


@pytest.fixture(scope="module")
def movielens():
    """MovieLens-100k samples (per-user chronological split). Train records carry only the
    fields the fitted baselines read (building full histories for 94k targets is slow); the
    test records are full samples."""
    from reczero_jax.data.samples import build_samples
    from reczero_jax.data.sources import read_source

    sample_set = build_samples(read_source("movielens-100k"))
    interactions = sample_set.index.table.interactions
    train = [
        {"user_id": it.user_id, "item_id": it.item_id, "rating": it.rating}
        for it in (interactions[k] for k in sample_set.splits["train"])
    ]
    return train, list(sample_set.samples("test"))


def test_movielens_baselines(movielens):
    train, test = movielens
    results = evaluate_baselines(train, test)
    print("\nMovieLens-100k test split\n" + markdown_table(results))
    glob, user, mf = results["global_mean"], results["user_mean"], results["biased_mf"]
    assert all(metrics["n"] == len(test) for metrics in results.values())
    assert mf["rmse"] < glob["rmse"] - 0.1 and mf["mae"] < glob["mae"] - 0.1
    assert user["rmse"] < glob["rmse"] and user["mae"] < glob["mae"]
    train_users = {r["user_id"] for r in train}
    train_items = {r["item_id"] for r in train}
    unseen_users = sum(r["user_id"] not in train_users for r in test)
    unseen_either = sum(
        r["user_id"] not in train_users or r["item_id"] not in train_items for r in test
    )
    assert user["n_fallback"] == unseen_users
    assert mf["n_fallback"] == unseen_either
