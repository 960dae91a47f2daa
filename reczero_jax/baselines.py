"""Classic rating-prediction baselines, scored with the same metrics as the LLM.

Protocol (the usual one for rating prediction): every fitted baseline learns from the targets
of the TRAIN split only (their ``user_id``, ``item_id`` and ``rating``) and is scored on the
targets of another split. With the per-user chronological split, other users' train targets
may be later in time than a test target; that is the standard leave-last-out protocol, not a
per-target leak-free fit. Two baselines read the sample itself instead and are leak-free by
construction: its ``user_avg_rating`` and ``item_avg_rating`` (means over everything strictly
before the target, see ``reczero_jax.data.samples``).

Baselines (``fit_baselines`` keys), with mu the mean train rating:

* ``global_mean``:      r_hat = mu
* ``user_mean``:        r_hat = mean train rating of the user, mu for a user unseen in train
* ``item_mean``:        r_hat = mean train rating of the item, mu for an item unseen in train
* ``biased_mf``:        r_hat = clip(mu + b_u + b_i + p_u . q_i, 1, 5), fitted with optax Adam;
  an unseen user or item has zero bias and zero factors (``fit_biased_mf``)
* ``user_history_avg``: r_hat = the sample's ``user_avg_rating``
* ``item_history_avg``: r_hat = the sample's ``item_avg_rating``

A predictor has ``predict(records) -> float64 [n]`` and ``fallback(records) -> bool [n]``, the
records for which it lacked the user or the item in train and fell back (counted in the
metrics as ``n_fallback``). Records are the sample dicts of ``reczero_jax.data``; only the
fields a baseline reads are required.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from reczero_jax.rewards import rating_metrics
from reczero_jax.rewards.host import RATING_MAX, RATING_MIN

Record = Mapping[str, Any]
TABLE_COLUMNS = ("mae", "rmse", "exact_accuracy", "within_one_accuracy", "n", "n_fallback")


class Predictor(Protocol):
    def predict(self, records: Sequence[Record]) -> np.ndarray: ...

    def fallback(self, records: Sequence[Record]) -> np.ndarray: ...


def _field(records: Sequence[Record], key: str) -> list[Any]:
    """``record[key]`` for every record; a missing key is an error naming the record."""
    values = []
    for position, record in enumerate(records):
        if key not in record:
            raise KeyError(
                f"record {position} has no {key!r} field (has: {', '.join(sorted(record))}); "
                "baselines read the sample records of reczero_jax.data"
            )
        values.append(record[key])
    return values


def _ids(records: Sequence[Record], key: str) -> list[str]:
    return [str(value) for value in _field(records, key)]


def _ratings(records: Sequence[Record], key: str = "rating") -> np.ndarray:
    """Float64 [n] of ``record[key]``; each must be a number in [1, 5]."""
    values = np.asarray(_field(records, key), dtype=np.float64)
    bad = np.flatnonzero(~((values >= RATING_MIN) & (values <= RATING_MAX)))
    if bad.size:
        raise ValueError(
            f"{bad.size} records have {key!r} outside [{RATING_MIN}, {RATING_MAX}] "
            f"(first: record {bad[0]}, value {values[bad[0]]}); ratings are on the 1-5 scale"
        )
    return values


class IdIndex:
    """Dense indices 0..n-1 for the ids seen in train, in first-seen order."""

    def __init__(self, ids: Iterable[str]):
        self.positions: dict[str, int] = {}
        for value in ids:
            self.positions.setdefault(value, len(self.positions))

    def __len__(self) -> int:
        return len(self.positions)

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """int64 [n] index per id, -1 for an id not seen in train."""
        return np.array([self.positions.get(value, -1) for value in ids], dtype=np.int64)


@dataclass(frozen=True)
class GlobalMean:
    """r_hat = mu, the mean train rating."""

    mean: float

    def predict(self, records: Sequence[Record]) -> np.ndarray:
        return np.full(len(records), self.mean)

    def fallback(self, records: Sequence[Record]) -> np.ndarray:
        return np.zeros(len(records), dtype=bool)


@dataclass(frozen=True)
class GroupMean:
    """r_hat = mean train rating of the record's ``key`` (user_id or item_id), else mu."""

    key: str
    index: IdIndex
    means: np.ndarray  # float64 [len(index)]
    global_mean: float

    @classmethod
    def fit(cls, key: str, ids: Sequence[str], ratings: np.ndarray, global_mean: float):
        index = IdIndex(ids)
        positions = index.lookup(ids)
        counts = np.bincount(positions, minlength=len(index))
        sums = np.bincount(positions, weights=ratings, minlength=len(index))
        return cls(key, index, sums / counts, global_mean)

    def predict(self, records: Sequence[Record]) -> np.ndarray:
        positions = self.index.lookup(_ids(records, self.key))
        return np.where(positions >= 0, self.means[positions], self.global_mean)

    def fallback(self, records: Sequence[Record]) -> np.ndarray:
        return self.index.lookup(_ids(records, self.key)) < 0


@dataclass(frozen=True)
class HistoryAverage:
    """r_hat = the sample's own ``field`` (user_avg_rating or item_avg_rating)."""

    field: str

    def predict(self, records: Sequence[Record]) -> np.ndarray:
        return _ratings(records, self.field)

    def fallback(self, records: Sequence[Record]) -> np.ndarray:
        return np.zeros(len(records), dtype=bool)


@dataclass(frozen=True)
class MFConfig:
    """Biased matrix factorisation: ``dim`` factors per user and item, ``steps`` full-batch
    Adam steps at ``learning_rate``, L2 weight ``l2``, factors drawn from
    N(0, ``init_scale``^2) with ``seed``. The defaults were chosen on the MovieLens-100k
    validation split."""

    dim: int = 16
    steps: int = 200
    learning_rate: float = 0.03
    l2: float = 0.15
    init_scale: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.dim < 1 or self.steps < 1:
            raise ValueError(f"MFConfig needs dim >= 1 and steps >= 1; got {self}")
        if self.learning_rate <= 0 or self.l2 < 0 or self.init_scale < 0:
            raise ValueError(
                f"MFConfig needs learning_rate > 0, l2 >= 0 and init_scale >= 0; got {self}"
            )


def mf_loss(params: dict[str, jax.Array], users, items, ratings, mean, l2) -> jax.Array:
    """Mean over the n train ratings (users, items: int [n]; ratings: float [n]) of

        (r - mu - b_u - b_i - p_u . q_i)^2 + l2 * (|p_u|^2 + |q_i|^2 + b_u^2 + b_i^2)

    with params ``user_bias`` [U], ``item_bias`` [I], ``user_factors`` [U, d],
    ``item_factors`` [I, d]. The penalty is per observation (as in SGD training), so an
    often-rated user or item is held back no more than its data warrants.
    """
    user_bias = params["user_bias"][users]
    item_bias = params["item_bias"][items]
    user_factors = params["user_factors"][users]
    item_factors = params["item_factors"][items]
    predicted = mean + user_bias + item_bias + jnp.sum(user_factors * item_factors, axis=-1)
    penalty = (
        jnp.sum(user_factors**2, axis=-1)
        + jnp.sum(item_factors**2, axis=-1)
        + user_bias**2
        + item_bias**2
    )
    return jnp.mean((ratings - predicted) ** 2 + l2 * penalty)


@dataclass(frozen=True)
class BiasedMF:
    """A fitted ``mf_loss`` model (numpy arrays) and its training loss per step."""

    mean: float
    users: IdIndex
    items: IdIndex
    user_bias: np.ndarray  # [U]
    item_bias: np.ndarray  # [I]
    user_factors: np.ndarray  # [U, d]
    item_factors: np.ndarray  # [I, d]
    losses: np.ndarray  # [steps]

    def predict(self, records: Sequence[Record]) -> np.ndarray:
        """clip(mu + b_u + b_i + p_u . q_i, 1, 5); an unseen side contributes zero."""
        users = self.users.lookup(_ids(records, "user_id"))
        items = self.items.lookup(_ids(records, "item_id"))
        known_user, known_item = users >= 0, items >= 0
        user_bias = np.where(known_user, self.user_bias[users], 0.0)
        item_bias = np.where(known_item, self.item_bias[items], 0.0)
        interaction = np.where(
            known_user & known_item,
            np.sum(self.user_factors[users] * self.item_factors[items], axis=-1),
            0.0,
        )
        return np.clip(self.mean + user_bias + item_bias + interaction, RATING_MIN, RATING_MAX)

    def fallback(self, records: Sequence[Record]) -> np.ndarray:
        users = self.users.lookup(_ids(records, "user_id"))
        items = self.items.lookup(_ids(records, "item_id"))
        return (users < 0) | (items < 0)


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate", "l2"))
def _train_mf(params, data, mean, *, steps: int, learning_rate: float, l2: float):
    """``steps`` full-batch Adam steps on ``mf_loss`` in one ``lax.scan``; returns the params
    and the loss [steps] before each step. Module-level so that fits of the same shapes and
    settings (any seed) share one compilation."""
    optimizer = optax.adam(learning_rate)

    def step(state, _):
        params, opt_state = state
        loss, grads = jax.value_and_grad(mf_loss)(params, *data, mean, l2)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), length=steps)
    return params, losses


def fit_biased_mf(train_records: Sequence[Record], config: MFConfig | None = None) -> BiasedMF:
    """Fit ``mf_loss`` on the train records with full-batch Adam (one jitted ``lax.scan``);
    mu is fixed at the mean train rating, biases start at zero."""
    config = config or MFConfig()
    train_records = list(train_records)
    ratings = _ratings(train_records)
    if ratings.size == 0:
        raise ValueError("fit_biased_mf needs at least one train record")
    user_ids, item_ids = _ids(train_records, "user_id"), _ids(train_records, "item_id")
    users, items = IdIndex(user_ids), IdIndex(item_ids)
    mean = float(ratings.mean())
    user_key, item_key = jax.random.split(jax.random.key(config.seed))
    params = {
        "user_bias": jnp.zeros(len(users)),
        "item_bias": jnp.zeros(len(items)),
        "user_factors": config.init_scale * jax.random.normal(user_key, (len(users), config.dim)),
        "item_factors": config.init_scale * jax.random.normal(item_key, (len(items), config.dim)),
    }
    data = (
        jnp.asarray(users.lookup(user_ids), dtype=jnp.int32),
        jnp.asarray(items.lookup(item_ids), dtype=jnp.int32),
        jnp.asarray(ratings, dtype=jnp.float32),
    )
    params, losses = _train_mf(
        params, data, mean, steps=config.steps, learning_rate=config.learning_rate, l2=config.l2
    )
    fitted = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    return BiasedMF(mean=mean, users=users, items=items, losses=np.asarray(losses), **fitted)


def fit_baselines(
    train_records: Sequence[Record], mf_config: MFConfig | None = None
) -> dict[str, Predictor]:
    """Every baseline of the module docstring, fitted on ``train_records`` (a split's targets)."""
    train_records = list(train_records)
    ratings = _ratings(train_records)
    if ratings.size == 0:
        raise ValueError("fit_baselines needs at least one train record; the train split is empty")
    mean = float(ratings.mean())
    return {
        "global_mean": GlobalMean(mean),
        "user_mean": GroupMean.fit("user_id", _ids(train_records, "user_id"), ratings, mean),
        "item_mean": GroupMean.fit("item_id", _ids(train_records, "item_id"), ratings, mean),
        "biased_mf": fit_biased_mf(train_records, mf_config),
        "user_history_avg": HistoryAverage("user_avg_rating"),
        "item_history_avg": HistoryAverage("item_avg_rating"),
    }


def score(predictor: Predictor, eval_records: Sequence[Record]) -> dict[str, float]:
    """``rating_metrics`` of one predictor on ``eval_records`` plus ``n_fallback``. A baseline
    always gives a finite number, so parse and format rates are 1 and the metric's parse-failure
    fallback (set to the predictions themselves) is never used."""
    truth = _ratings(eval_records)
    predictions = predictor.predict(eval_records)
    metrics = rating_metrics(
        predictions=predictions,
        ground_truths=truth,
        fallback=predictions,
        format_ok=np.ones(len(truth), dtype=bool),
    )
    metrics["n_fallback"] = int(predictor.fallback(eval_records).sum())
    return metrics


def evaluate_baselines(
    train_records: Sequence[Record],
    eval_records: Sequence[Record],
    mf_config: MFConfig | None = None,
) -> dict[str, dict[str, float]]:
    """{baseline name: metrics} for every baseline fitted on ``train_records`` and scored on
    ``eval_records`` (a validation or test split)."""
    eval_records = list(eval_records)
    if not eval_records:
        raise ValueError("evaluate_baselines needs at least one evaluation record")
    predictors = fit_baselines(train_records, mf_config)
    return {name: score(predictor, eval_records) for name, predictor in predictors.items()}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    return str(value)


def markdown_table(
    results: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = TABLE_COLUMNS
) -> str:
    """A markdown table, one row per name of ``results`` (in its order), one column per entry of
    ``columns``; floats get 4 decimals and a metric a row lacks shows as "-" (so LLM rows and
    baseline rows, which have different metrics, share one table)."""
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    lines = [
        "| name | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, metrics in results.items():
        cells = [_cell(metrics.get(column)) for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
