"""GRPO maths as pure functions: advantages, clipped policy loss, KL penalties, SFT loss,
and dynamic sampling's choice of informative groups.

Shapes: N sequences (prompts x group size, each group's G samples contiguous), T token
positions, V vocabulary entries. ``mask`` is [N, T]; a non-zero entry marks a response token
(bool or float 0/1); every other position is ignored, even if it holds NaN.

Losses return ``LossTerms(numerator, denominator)`` with loss = numerator / denominator. The
denominator depends only on the mask, never on the parameters, so gradient accumulation over
micro-batches split along N is exact:

    loss  = sum_k num_k / sum_k den_k
    grad  = sum_k grad(num_k) / sum_k den_k

``combine`` sums a list of terms; after a ``lax.scan`` over micro-batches sum the stacked
fields instead (``LossTerms(t.numerator.sum(), t.denominator.sum())``). Terms built with the
same mask, aggregation and ``max_response_len`` share their denominator, so a KL penalty or an
entropy bonus joins the policy loss by adding numerators:
``LossTerms(pg.numerator + beta * kl.numerator, pg.denominator)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reczero_jax.config import ESTIMATORS, KL_KINDS, LOSS_AGGREGATIONS

K3_CLIP = 10.0  # verl's low_var_kl clamps each token's k3 to [-10, 10]
STD_EPS = 1e-6


class LossTerms(NamedTuple):
    """A loss as numerator / denominator (scalars), so micro-batches add up exactly."""

    numerator: jax.Array
    denominator: jax.Array

    @property
    def value(self) -> jax.Array:
        """numerator / max(denominator, 1): every non-empty denominator is >= 1 (a count, or
        N * max_response_len), so the floor only turns an empty batch into loss 0, not NaN."""
        return self.numerator / jnp.maximum(self.denominator, 1.0)


def combine(terms: Sequence[LossTerms]) -> LossTerms:
    """Full-batch terms from per-micro-batch terms: sum numerators, sum denominators."""
    if not terms:
        raise ValueError("combine() needs at least one LossTerms; got an empty sequence")
    return LossTerms(sum(t.numerator for t in terms), sum(t.denominator for t in terms))


def _choice_error(what: str, got: str, known: Sequence[str]) -> ValueError:
    return ValueError(f"unknown {what} {got!r}; known: {', '.join(known)}")


def group_advantages(rewards: jax.Array, group_size: int, estimator: str = "grpo") -> jax.Array:
    """Per-sample advantages from rewards [N] -> float32 [N].

    Samples n*G .. n*G + G-1 form group n (G = ``group_size``, must divide N, >= 2). With
    m_g the group's mean and s_g its unbiased standard deviation
    sqrt(sum_i (r_i - m_g)^2 / (G - 1)):

    - ``grpo``:   A_i = (r_i - m_g) / (s_g + 1e-6)            (the paper's)
    - ``drgrpo``: A_i = r_i - m_g                              (Dr. GRPO: no std division)
    - ``rloo``:   A_i = r_i - (sum_{j != i} r_j) / (G - 1)     (= G / (G - 1) * (r_i - m_g))

    A group whose rewards are all equal gets exactly zero advantage under every estimator
    (rounding in the mean would otherwise leave ~1e-8, which grpo's 1e-6 floor blows up).
    """
    if estimator not in ESTIMATORS:
        raise _choice_error("advantage estimator", estimator, ESTIMATORS)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N]; got shape {rewards.shape}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to compare samples; got {group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide the number of rewards {rewards.shape[0]}; "
            "pass all G samples of every prompt, contiguous"
        )
    grouped = rewards.astype(jnp.float32).reshape(-1, group_size)
    mean = grouped.mean(axis=1, keepdims=True)
    if estimator == "grpo":
        std = grouped.std(axis=1, ddof=1, keepdims=True)
        adv = (grouped - mean) / (std + STD_EPS)
    elif estimator == "drgrpo":
        adv = grouped - mean
    else:
        others_mean = (grouped.sum(axis=1, keepdims=True) - grouped) / (group_size - 1)
        adv = grouped - others_mean
    constant = grouped.max(axis=1, keepdims=True) == grouped.min(axis=1, keepdims=True)
    return jnp.where(constant, 0.0, adv).reshape(-1)


def informative_groups(values) -> np.ndarray:
    """Whether each group's values [B, G] (rewards, or format flags) are not all equal -> bool
    [B]. A group of equal values has zero advantage under every estimator
    (``group_advantages``), so it moves the policy by no policy-gradient term: DAPO's dynamic
    sampling drops it. Host (numpy) values: the selection they decide must be the same in
    every process."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be [B, G] (prompts x samples); got shape {values.shape}")
    return values.max(axis=1) != values.min(axis=1)


def filled_selection(informative, count: int) -> np.ndarray:
    """Row indices [count] (int32) into groups drawn in order, whose flags ``informative`` [N]
    say which have spread: the first ``count`` informative ones in the order drawn, then, when
    fewer than ``count`` are, the uninformative ones in the order drawn to fill up (zero
    advantage: they keep the batch's shape without moving the policy)."""
    informative = np.asarray(informative, dtype=bool)
    if informative.ndim != 1 or not 0 < count <= informative.shape[0]:
        raise ValueError(f"cannot select {count} groups out of {informative.shape} drawn; draw "
                         "at least as many groups as are selected")
    order = np.concatenate([np.flatnonzero(informative), np.flatnonzero(~informative)])
    return order[:count].astype(np.int32)


def masked_aggregate(
    values: jax.Array,
    mask: jax.Array,
    agg: str = "token-mean",
    max_response_len: int | None = None,
) -> LossTerms:
    """Reduce per-token values [N, T] over the tokens where ``mask`` != 0 into LossTerms.

    With M the set of masked tokens, M_n those of sequence n, and S the sequences with
    |M_n| > 0 (all-zero mask rows are padding and do not count):

    - ``token-mean``:              sum_M v / |M|                                (the paper's)
    - ``seq-mean-token-mean``:     sum_{n in S} (sum_{M_n} v / |M_n|) / |S|
    - ``seq-mean-token-sum-norm``: sum_M v / (|S| * max_response_len)           (Dr. GRPO)

    ``max_response_len`` (default T) is the configured generation limit, a constant so the
    normaliser does not depend on response lengths. Split micro-batches along N, never T.
    """
    if agg not in LOSS_AGGREGATIONS:
        raise _choice_error("loss aggregation", agg, LOSS_AGGREGATIONS)
    if values.shape != mask.shape or values.ndim != 2:
        raise ValueError(
            f"values and mask must both be [N, T]; got {values.shape} and {mask.shape}"
        )
    if max_response_len is not None and max_response_len < 1:
        raise ValueError(f"max_response_len must be >= 1; got {max_response_len}")
    is_token = mask != 0
    token_values = jnp.where(is_token, values.astype(jnp.float32), 0.0)
    tokens_per_seq = is_token.sum(axis=1).astype(jnp.float32)
    num_seqs = (tokens_per_seq > 0).sum().astype(jnp.float32)
    if agg == "token-mean":
        return LossTerms(token_values.sum(), tokens_per_seq.sum())
    if agg == "seq-mean-token-mean":
        seq_means = token_values.sum(axis=1) / jnp.maximum(tokens_per_seq, 1.0)
        return LossTerms(seq_means.sum(), num_seqs)
    length = values.shape[1] if max_response_len is None else max_response_len
    return LossTerms(token_values.sum(), num_seqs * length)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` [N, T] over the masked tokens (0 when none is): a metric."""
    return masked_aggregate(values, mask, "token-mean").value


def clipped_surrogate(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PPO clipped surrogate per token -> (loss [N, T], ratio [N, T], clipped [N, T] bool).

        ratio = exp(logp - old_logp)
        loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)

    with A = advantages[n] broadcast over T, eps_low = ``clip_eps`` and eps_high =
    ``clip_eps_high`` (default ``clip_eps``; larger values give DAPO's asymmetric "clip
    higher"). ``clipped`` marks the tokens where the clipped branch is the minimum, so the
    gradient is zero: A > 0 and ratio > 1 + eps_high, or A < 0 and ratio < 1 - eps_low.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    concrete = isinstance(clip_eps, int | float) and isinstance(eps_high, int | float)
    if concrete and not (0.0 <= clip_eps < 1.0 and eps_high >= 0.0):
        raise ValueError(
            f"need 0 <= clip_eps < 1 and clip_eps_high >= 0; got {clip_eps}, {clip_eps_high}"
        )
    if logp.shape != old_logp.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(
            "logp and old_logp must be [N, T] and advantages [N]; got "
            f"{logp.shape}, {old_logp.shape}, {advantages.shape}"
        )
    adv = advantages[:, None].astype(jnp.float32)
    ratio = jnp.exp(logp.astype(jnp.float32) - old_logp.astype(jnp.float32))
    loss = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high) * adv)
    clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
    return loss, ratio, clipped


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    agg: str = "token-mean",
    max_response_len: int | None = None,
) -> tuple[LossTerms, dict[str, jax.Array]]:
    """Clipped policy-gradient loss: ``clipped_surrogate`` reduced by ``masked_aggregate``.

    logp, old_logp, mask: [N, T]; advantages: [N]. Returns (LossTerms, metrics), where the
    metrics are scalars over this call's masked tokens (not accumulable across micro-batches;
    average them per micro-batch if needed), computed without gradient:

    - ``clip_fraction``: fraction of tokens whose gradient is zeroed by clipping
    - ``ratio_mean`` / ``ratio_min`` / ``ratio_max``: spread of pi / pi_old (1 on-policy);
      min/max are +inf/-inf when no token is masked
    - ``approx_kl``: k3 estimate of KL(pi_old || pi), masked mean of
      exp(logp - old_logp) - (logp - old_logp) - 1 (per token clipped to 10, as
      ``kl_penalty``'s k3)
    """
    token_loss, ratio, clipped = clipped_surrogate(
        logp, old_logp, advantages, clip_eps, clip_eps_high
    )
    terms = masked_aggregate(token_loss, mask, agg, max_response_len)
    is_token = mask != 0
    ratio = jax.lax.stop_gradient(ratio)
    old_kl = kl_penalty(jax.lax.stop_gradient(old_logp), jax.lax.stop_gradient(logp), "k3")
    metrics = {
        "clip_fraction": masked_mean(clipped.astype(jnp.float32), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_min": jnp.where(is_token, ratio, jnp.inf).min(),
        "ratio_max": jnp.where(is_token, ratio, -jnp.inf).max(),
        "approx_kl": masked_mean(old_kl, mask),
    }
    return terms, metrics


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str = "k3") -> jax.Array:
    """Per-token estimate [N, T] of KL(pi || pi_ref) from tokens sampled from pi.

    With d = ref_logp - logp (= log pi_ref(y) / pi(y)):

    - ``k1`` = -d = logp - ref_logp                    unbiased for the KL, high variance
    - ``k2`` = d^2 / 2                                 biased, low variance
    - ``k3`` = clip(exp(d) - d - 1, -10, 10)            unbiased (before the clip) and always
      >= 0: verl's "low_var_kl", clipped to [-10, 10] as there (the authors' verl), since
      exp(d) is unbounded where pi_ref >> pi; a clipped token gets no gradient

    As a loss (samples fixed, gradient through logp), what counts is the expected gradient:

    - k1: grad k1 = grad log pi, and E_pi[grad log pi] = sum_y grad pi(y) = grad 1 = 0, so
      it does not pull pi towards pi_ref at all, however far apart they are; it only adds
      noise. The true gradient E_pi[(log pi - log pi_ref) grad log pi] comes from the
      sampling distribution, which a loss on fixed samples cannot see. Use k1 as a reward
      penalty or a metric, not as a loss.
    - k2: grad k2 = (log pi - log pi_ref) grad log pi, whose expectation is exactly
      grad KL(pi || pi_ref).
    - k3: grad k3 = (1 - pi_ref / pi) grad log pi, whose expectation is grad KL(pi_ref || pi)
      (the forward KL); it agrees with the reverse-KL gradient to first order near pi_ref.
    """
    if kind not in KL_KINDS:
        raise _choice_error("KL estimator", kind, KL_KINDS)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp shapes differ: {logp.shape} vs {ref_logp.shape}")
    log_ratio = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -K3_CLIP, K3_CLIP)


def _scaled_logits(logits: jax.Array, temperature: float) -> jax.Array:
    if isinstance(temperature, int | float) and temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return logits.astype(jnp.float32) / temperature


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature)[targets] in float32: logits [N, T, V], targets
    [N, T] int -> [N, T].

    Position t's logits must score targets[:, t] (the next token: the caller shifts). Use the
    sampler's temperature so the log-probs are those of the distribution that was sampled.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits [N, T, V] and targets [N, T] disagree: {logits.shape} vs {targets.shape}"
        )
    scaled = _scaled_logits(logits, temperature)
    picked = jnp.take_along_axis(scaled, targets[..., None].astype(jnp.int32), axis=-1)
    return picked[..., 0] - jax.nn.logsumexp(scaled, axis=-1)


def sft_loss(target_logp: jax.Array, mask: jax.Array) -> LossTerms:
    """Next-token cross-entropy on response tokens: target_logp, mask [N, T] ->
    LossTerms(-sum_M log p(target), |M|) (token-mean; prompt positions are masked out)."""
    return masked_aggregate(-target_logp, mask, "token-mean")


def token_entropy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Entropy of softmax(logits / temperature) per position in float32: [N, T, V] -> [N, T].

    H = -sum_v p_v log p_v
    """
    log_probs = jax.nn.log_softmax(_scaled_logits(logits, temperature), axis=-1)
    return -(jnp.exp(log_probs) * log_probs).sum(axis=-1)


def entropy_from_logits(logits: jax.Array, mask: jax.Array, temperature: float = 1.0
                        ) -> jax.Array:
    """Masked mean entropy of softmax(logits / temperature) over response tokens (a metric):
    logits [N, T, V], mask [N, T] -> scalar. For an entropy bonus, aggregate ``token_entropy``
    like the policy loss."""
    return masked_mean(token_entropy(logits, temperature), mask)
