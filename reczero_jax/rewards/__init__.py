"""RecZero's rule-based reward, on text (host reference) and on token ids (inside jit).

* ``rating_reward(text, y) -> RewardResult(reward, format_ok, rating)``: the authors' rules,
  documented in ``reczero_jax.rewards.host``; ``get_reward(name)`` gives any variant
  (``rating``, ``exact``, ``think_answer``, ``answer_only``).
* ``TokenRewardFn(tokenizer, kind="rating")``: the same rules on response token ids of a
  byte-level BPE tokenizer, jittable (``reczero_jax.rewards.device``).
* ``rating_metrics``: MAE, RMSE and accuracies that count parse failures;
  ``bootstrap_intervals`` / ``bootstrap_difference``: their bootstrap confidence intervals.
"""

from reczero_jax.rewards.byte_table import TokenBytes
from reczero_jax.rewards.device import TokenRewardFn
from reczero_jax.rewards.host import (
    VARIANTS,
    RewardResult,
    RewardVariant,
    get_reward,
    get_variant,
    rating_reward,
)
from reczero_jax.rewards.metrics import (
    bootstrap_difference,
    bootstrap_intervals,
    prediction_errors,
    rating_metrics,
)

__all__ = [
    "VARIANTS",
    "RewardResult",
    "RewardVariant",
    "TokenBytes",
    "TokenRewardFn",
    "bootstrap_difference",
    "bootstrap_intervals",
    "get_reward",
    "get_variant",
    "prediction_errors",
    "rating_metrics",
    "rating_reward",
]
