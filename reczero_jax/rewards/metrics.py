"""Rating-prediction metrics that count parse failures instead of hiding them.

The authors' logging scored an unparseable answer as the true rating (error 0). Here a parse
failure (a prediction that is None, NaN or infinite) is scored with a fallback prediction, the
user's average rating clipped to the scale [1, 5], passed per sample, and is never counted as
correct in the accuracies. Parsed predictions are scored as given; pass
``rating if format_ok else None`` to score format failures with the fallback too.
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
    fallback = np.broadcast_to(np.asarray(fallback, dtype=np.float64), truth.shape)
    format_ok = np.asarray(format_ok, dtype=bool)
    n = len(truth)
    if n == 0:
        raise ValueError("rating_metrics needs at least one sample")
    if not (predicted.shape == truth.shape == format_ok.shape == (n,)):
        raise ValueError(
            f"predictions {predicted.shape}, ground_truths {truth.shape} and format_ok "
            f"{format_ok.shape} must be one-dimensional and of the same length"
        )
    if not np.all(np.isfinite(fallback)):
        raise ValueError("fallback predictions must be finite (use the global mean rating "
                         "for users without history)")
    parsed = np.isfinite(predicted)
    scored = np.where(parsed, predicted, np.clip(fallback, RATING_MIN, RATING_MAX))
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
