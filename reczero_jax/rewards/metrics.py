"""Rating-prediction metrics that count parse failures instead of hiding them.

The authors' logging scored an unparseable answer as the true rating (error 0). Here a parse
failure (a prediction that is None, NaN or infinite) is scored with a fallback prediction, the
user's average rating clipped to the scale [1, 5], passed per sample, and is never counted as
correct in the accuracies. Parsed predictions are scored as given; pass
``rating if format_ok else None`` to score format failures with the fallback too.

Confidence intervals (``bootstrap_intervals``, ``bootstrap_difference``): percentile
bootstrap over samples, on the errors ``prediction_errors`` gives (the same fallback rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reczero_jax.rewards.host import RATING_MAX, RATING_MIN


def _as_float_array(values: Sequence[float | None] | np.ndarray) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def rating_metrics(
    predictions: Sequence[float | None] | np.ndarray,
    ground_truths: Sequence[float] | np.ndarray,
    fallback: Sequence[float] | np.ndarray | float,
    format_ok: Sequence[bool] | np.ndarray,
) -> dict[str, float]:
    """Metrics over ``n`` samples, with ``p_i`` the prediction, or ``clip(fallback_i, 1, 5)``
    when prediction ``i`` failed to parse, and ``y_i`` the truth:

    * ``mae = mean |p_i - y_i|``, ``rmse = sqrt(mean (p_i - y_i)**2)``;
    * ``exact_accuracy``: parsed and ``round(prediction) == y`` (half to even, like Python);
    * ``within_one_accuracy``: parsed and ``|prediction - y| <= 1``;
    * ``parse_rate`` (finite prediction), ``format_rate`` (mean of ``format_ok``), ``n``,
      ``n_parse_failures``.
    """
    predicted = _as_float_array(predictions)
    truth = np.asarray(ground_truths, dtype=np.float64)
    format_ok = np.asarray(format_ok, dtype=bool)
    n = len(truth)
    if n == 0:
        raise ValueError("rating_metrics needs at least one sample")
    if not (predicted.shape == truth.shape == format_ok.shape == (n,)):
        raise ValueError(
            f"predictions {predicted.shape}, ground_truths {truth.shape} and format_ok "
            f"{format_ok.shape} must be one-dimensional and of the same length"
        )
    parsed = np.isfinite(predicted)
    scored = scored_predictions(predicted, fallback)
    error = scored - truth
    return {
        "n": n,
        "n_parse_failures": int(n - parsed.sum()),
        "parse_rate": float(parsed.mean()),
        "format_rate": float(format_ok.mean()),
        "mae": float(np.mean(np.abs(error))),
        "rmse": float(np.sqrt(np.mean(error**2))),
        "exact_accuracy": float(np.mean(parsed & (np.round(scored) == truth))),
        "within_one_accuracy": float(np.mean(parsed & (np.abs(error) <= 1))),
    }


def scored_predictions(predictions: Sequence[float | None] | np.ndarray,
                       fallback: Sequence[float] | np.ndarray | float) -> np.ndarray:
    """The predictions scored [n] (float64): each prediction, or where it failed to parse
    (None, NaN, infinite) ``clip(fallback_i, 1, 5)``."""
    predicted = _as_float_array(predictions)
    fallback = np.broadcast_to(np.asarray(fallback, dtype=np.float64), predicted.shape)
    if not np.all(np.isfinite(fallback)):
        raise ValueError("fallback predictions must be finite (use the global mean rating "
                         "for users without history)")
    return np.where(np.isfinite(predicted), predicted, np.clip(fallback, RATING_MIN, RATING_MAX))


def prediction_errors(
    predictions: Sequence[float | None] | np.ndarray,
    ground_truths: Sequence[float] | np.ndarray,
    fallback: Sequence[float] | np.ndarray | float,
) -> np.ndarray:
    """Signed errors ``p_i - y_i`` [n] of ``scored_predictions`` (the fallback rule of
    ``rating_metrics``): ``mae = mean |e|``, ``rmse = sqrt(mean e**2)``."""
    truth = np.asarray(ground_truths, dtype=np.float64)
    scored = scored_predictions(predictions, fallback)
    if scored.shape != truth.shape:
        raise ValueError(f"predictions {scored.shape} and ground_truths {truth.shape} must "
                         "be of the same length")
    return scored - truth


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """int [resamples, n]: each row n draws with replacement from 0..n-1 (numpy's PCG64 with
    ``seed``, so the same (n, resamples, seed) gives the same rows)."""
    if n < 1 or resamples < 1:
        raise ValueError(f"a bootstrap needs n >= 1 samples and resamples >= 1; got {n=}, "
                         f"{resamples=}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def bootstrap_intervals(errors: Sequence[float] | np.ndarray, *, resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap ``level`` intervals of MAE and RMSE from errors [n]
    (``prediction_errors``): ``resamples`` times draw n samples with replacement, compute
    ``mean |e|`` and ``sqrt(mean e**2)`` of the draw; each interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of those values.
    Returns ``{"mae": (low, high), "rmse": (low, high)}``."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 1:
        raise ValueError(f"errors must be one-dimensional [n], got shape {errors.shape}")
    drawn = errors[_resample_indices(len(errors), resamples, seed)]  # [resamples, n]
    return {"mae": _percentiles(np.abs(drawn).mean(axis=1), level),
            "rmse": _percentiles(np.sqrt((drawn**2).mean(axis=1)), level)}


def bootstrap_difference(errors: Sequence[float] | np.ndarray,
                         reference: Sequence[float] | np.ndarray, *, resamples: int = 1000,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Paired percentile-bootstrap ``level`` interval of ``MAE(errors) - MAE(reference)``,
    both [n] on the same samples (each draw takes the same samples from both): below zero
    as a whole, ``errors`` is better than ``reference`` at that level."""
    errors, reference = (np.asarray(e, dtype=np.float64) for e in (errors, reference))
    if errors.shape != reference.shape or errors.ndim != 1:
        raise ValueError(f"errors {errors.shape} and reference {reference.shape} must be "
                         "one-dimensional, of the same samples")
    rows = _resample_indices(len(errors), resamples, seed)
    return _percentiles(np.abs(errors[rows]).mean(axis=1) - np.abs(reference[rows]).mean(axis=1),
                        level)
