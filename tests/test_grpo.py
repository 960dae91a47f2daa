"""GRPO pure functions against closed forms, hand-worked cases and micro-batch accumulation."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reczero_jax import grpo


def _close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


# ---------------------------------------------------------------- advantages


def test_grpo_advantage_hand_case():
    adv = grpo.group_advantages(jnp.array([2.0, 0.0, 1.0, 1.0]), group_size=2)
    # group 1: mean 1, unbiased std sqrt((1 + 1) / 1); group 2: identical rewards
    a = 1.0 / (math.sqrt(2.0) + 1e-6)
    _close(adv, [a, -a, 0.0, 0.0])


def test_grpo_advantage_uses_unbiased_std():
    rewards = np.random.default_rng(0).normal(size=24).astype(np.float32)
    grouped = rewards.reshape(3, 8)
    std = grouped.std(axis=1, ddof=1, keepdims=True)
    want = (grouped - grouped.mean(axis=1, keepdims=True)) / (std + 1e-6)
    _close(grpo.group_advantages(jnp.asarray(rewards), 8), want.reshape(-1), tol=1e-5)


@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
@pytest.mark.parametrize("value", [0.1, 1.0 / 3.0, 1.7, -1.0, 2.0])
def test_identical_rewards_give_exactly_zero(estimator, value):
    rewards = jnp.concatenate([jnp.full((8,), value), jnp.array([0.0, 2, 1, 1, 0, 2, 1, 0.5])])
    adv = np.asarray(grpo.group_advantages(rewards, 8, estimator))
    assert np.all(adv[:8] == 0.0)
    assert np.any(adv[8:] != 0.0)


def test_drgrpo_is_centred_reward():
    rewards = np.array([2.0, 0.0, 0.5, -1.0, 1.5, 1.5], np.float32)
    want = rewards.reshape(2, 3) - rewards.reshape(2, 3).mean(1, keepdims=True)
    _close(grpo.group_advantages(jnp.asarray(rewards), 3, "drgrpo"), want.reshape(-1))


def test_rloo_leave_one_out():
    _close(grpo.group_advantages(jnp.array([2.0, 0.0, 1.0]), 3, "rloo"), [1.5, -1.5, 0.0])
    rewards = np.random.default_rng(1).uniform(-1, 2, size=16).astype(np.float32)
    adv = np.asarray(grpo.group_advantages(jnp.asarray(rewards), 4, "rloo"))
    for i, r in enumerate(rewards):
        group = rewards[(i // 4) * 4 : (i // 4) * 4 + 4]
        others = (group.sum() - r) / 3
        assert adv[i] == pytest.approx(r - others, abs=1e-6)
        assert adv[i] == pytest.approx(4 / 3 * (r - group.mean()), abs=1e-6)


def test_advantage_errors_are_readable():
    with pytest.raises(ValueError, match="does not divide"):
        grpo.group_advantages(jnp.zeros(10), 4)
    with pytest.raises(ValueError, match="grpo, drgrpo, rloo"):
        grpo.group_advantages(jnp.zeros(8), 4, "ppo")
    with pytest.raises(ValueError, match="1-D"):
        grpo.group_advantages(jnp.zeros((2, 4)), 4)
    with pytest.raises(ValueError, match=">= 2"):
        grpo.group_advantages(jnp.zeros(4), 1)


# ---------------------------------------------------------------- clipped surrogate

RATIOS = np.array([0.5, 0.9, 1.0, 1.1, 1.5], np.float32)


def _surrogate_and_grad(ratios, advantage, clip_eps=0.2, clip_eps_high=None):
    """Per-token loss and d loss / d logp for one sequence with the given ratios."""
    old_logp = jnp.full((1, ratios.size), -2.0)
    logp = old_logp + jnp.log(jnp.asarray(ratios))[None]
    adv = jnp.array([advantage])

    def total(lp):
        loss, _, _ = grpo.clipped_surrogate(lp, old_logp, adv, clip_eps, clip_eps_high)
        return loss.sum()

    loss, _, clipped = grpo.clipped_surrogate(logp, old_logp, adv, clip_eps, clip_eps_high)
    return np.asarray(loss[0]), np.asarray(jax.grad(total)(logp)[0]), np.asarray(clipped[0])


def test_clip_positive_advantage_cuts_high_side():
    loss, grad, clipped = _surrogate_and_grad(RATIOS, 1.0)
    _close(loss, [-0.5, -0.9, -1.0, -1.1, -1.2])
    _close(grad, [-0.5, -0.9, -1.0, -1.1, 0.0])  # d(-r A)/d logp = -r A unless clipped
    assert clipped.tolist() == [False, False, False, False, True]


def test_clip_negative_advantage_cuts_low_side():
    loss, grad, clipped = _surrogate_and_grad(RATIOS, -2.0)
    _close(loss, [1.6, 1.8, 2.0, 2.2, 3.0])
    _close(grad, [0.0, 1.8, 2.0, 2.2, 3.0])
    assert clipped.tolist() == [True, False, False, False, False]


def test_asymmetric_clip():
    ratios = np.array([0.75, 1.25, 1.3], np.float32)
    loss, grad, clipped = _surrogate_and_grad(ratios, 1.0, clip_eps=0.2, clip_eps_high=0.28)
    _close(loss, [-0.75, -1.25, -1.28])
    _close(grad, [-0.75, -1.25, 0.0])
    loss, grad, clipped = _surrogate_and_grad(ratios, -1.0, clip_eps=0.2, clip_eps_high=0.28)
    _close(loss, [0.8, 1.25, 1.3])
    _close(grad, [0.0, 1.25, 1.3])
    _, grad_sym, _ = _surrogate_and_grad(ratios, 1.0, clip_eps=0.2)
    _close(grad_sym, [-0.75, 0.0, 0.0])


def test_zero_advantage_has_no_gradient_and_no_clip():
    loss, grad, clipped = _surrogate_and_grad(RATIOS, 0.0)
    assert np.all(loss == 0) and np.all(grad == 0) and not clipped.any()


def test_clip_eps_validated():
    with pytest.raises(ValueError, match="clip_eps"):
        grpo.clipped_surrogate(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros(1), 1.0)


# ---------------------------------------------------------------- aggregation

VALUES = jnp.array([[1.0, 2, 3, 4], [5, 6, 0, 0], [7, 7, 7, 7]])
MASK = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # row 3 is padding


def test_token_mean_by_hand():
    terms = grpo.masked_aggregate(VALUES, MASK, "token-mean")
    _close([terms.numerator, terms.denominator, terms.value], [11.0, 4.0, 11 / 4])


def test_seq_mean_token_mean_by_hand():
    terms = grpo.masked_aggregate(VALUES, MASK.astype(bool), "seq-mean-token-mean")
    _close([terms.numerator, terms.denominator, terms.value], [2.0 + 5.0, 2.0, 3.5])


def test_seq_mean_token_sum_norm_by_hand():
    terms = grpo.masked_aggregate(VALUES, MASK, "seq-mean-token-sum-norm")
    _close([terms.numerator, terms.denominator], [11.0, 2 * 4])  # default length T = 4
    terms = grpo.masked_aggregate(VALUES, MASK, "seq-mean-token-sum-norm", max_response_len=8)
    _close(terms.value, 11 / 16)


@pytest.mark.parametrize("agg", grpo.LOSS_AGGREGATIONS)
def test_masked_positions_cannot_leak(agg):
    poisoned = VALUES.at[0, 3].set(jnp.nan).at[2].set(jnp.inf)
    _close(
        grpo.masked_aggregate(poisoned, MASK, agg).value,
        grpo.masked_aggregate(VALUES, MASK, agg).value,
    )


def test_empty_mask_gives_zero_loss():
    assert float(grpo.masked_aggregate(VALUES, jnp.zeros_like(MASK)).value) == 0.0


def test_aggregation_errors():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        grpo.masked_aggregate(VALUES, MASK, "mean")
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        grpo.masked_aggregate(VALUES, MASK[:, :3])
    with pytest.raises(ValueError, match="at least one"):
        grpo.combine([])


# ---------------------------------------------------------------- policy loss


def test_policy_loss_and_metrics_by_hand():
    old_logp = jnp.zeros((2, 3))
    ratios = jnp.array([[1.5, 1.0, 0.5], [0.5, 2.0, 9.0]])
    mask = jnp.array([[1.0, 1, 1], [1, 1, 0]])
    terms, metrics = grpo.policy_loss(jnp.log(ratios), old_logp, jnp.array([1.0, -1.0]), mask)
    # seq 1 (A=+1): -min(1.5, 1.2), -1, -0.5; seq 2 (A=-1): -min(-0.5, -0.8), 2
    _close(terms.value, (-1.2 - 1.0 - 0.5 + 0.8 + 2.0) / 5)
    _close(metrics["clip_fraction"], 2 / 5)
    _close(metrics["ratio_mean"], (1.5 + 1.0 + 0.5 + 0.5 + 2.0) / 5)
    _close([metrics["ratio_min"], metrics["ratio_max"]], [0.5, 2.0])
    k3 = [r - math.log(r) - 1 for r in (1.5, 1.0, 0.5, 0.5, 2.0)]
    _close(metrics["approx_kl"], sum(k3) / 5)


def test_policy_loss_on_policy_gradient_is_advantage_weighted_score():
    """With old_logp = stop_gradient(logp), d loss / d logp = -A / |M| on every masked token."""
    logp = jnp.array([[-1.0, -2.0], [-0.5, -3.0]])
    mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    adv = jnp.array([2.0, -1.0])
    grad = jax.grad(lambda lp: grpo.policy_loss(lp, jax.lax.stop_gradient(lp), adv, mask)[0].value)(
        logp
    )
    _close(grad, [[-2 / 3, -2 / 3], [1 / 3, 0.0]])


# ---------------------------------------------------------------- KL


def test_kl_values_by_hand():
    logp, ref = jnp.array([[-1.0, -3.0]]), jnp.array([[-2.0, -1.0]])
    _close(grpo.kl_penalty(logp, ref, "k1"), [[1.0, -2.0]])
    _close(grpo.kl_penalty(logp, ref, "k2"), [[0.5, 2.0]])
    _close(grpo.kl_penalty(logp, ref, "k3"), [[math.exp(-1) + 1 - 1, math.exp(2) - 2 - 1]])


def test_k3_nonnegative_and_zero_at_equality():
    key1, key2 = jax.random.split(jax.random.key(0))
    logp = jax.random.normal(key1, (16, 32)) * 3
    ref = jax.random.normal(key2, (16, 32)) * 3
    assert float(grpo.kl_penalty(logp, ref, "k3").min()) >= 0.0
    assert np.all(np.asarray(grpo.kl_penalty(logp, logp, "k3")) == 0.0)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        grpo.kl_penalty(logp, ref, "k4")


def test_k3_is_clipped_at_10_like_verl_low_var_kl():
    """verl's low_var_kl clamps each token's k3 to [-10, 10]: where pi_ref >> pi (d = 20,
    exp(d) - d - 1 ~ 5e8) the value is 10 and the token gives no gradient; below the clip
    nothing changes."""
    logp, ref = jnp.array([[-21.0, -3.0]]), jnp.array([[-1.0, -1.0]])
    _close(grpo.kl_penalty(logp, ref, "k3"), [[10.0, math.exp(2) - 2 - 1]])
    grad = jax.grad(lambda lp: grpo.kl_penalty(lp, ref, "k3").sum())(logp)
    _close(grad, [[0.0, 1.0 - math.exp(2)]])


def test_kl_estimators_in_expectation():
    """Exact expectations over a 5-way categorical pi_theta: the docstring's claims."""
    ref_logits = jnp.array([0.3, -1.0, 2.0, 0.0, 0.5])
    theta = jnp.array([1.0, 0.2, -0.5, 0.7, -1.2])
    ref_logp = jax.nn.log_softmax(ref_logits)
    support = jnp.arange(5)

    def expected_loss_grad(kind):
        # sum_y pi(y) * grad_theta k(y), the samples y held fixed
        probs = jax.nn.softmax(theta)
        per_sample = jax.jacobian(
            lambda t: grpo.kl_penalty(
                jax.nn.log_softmax(t)[support][None], ref_logp[support][None], kind
            )[0]
        )(theta)
        return probs @ per_sample

    def reverse_kl(t):
        lp = jax.nn.log_softmax(t)
        return (jnp.exp(lp) * (lp - ref_logp)).sum()

    def forward_kl(t):
        return (jnp.exp(ref_logp) * (ref_logp - jax.nn.log_softmax(t))).sum()

    probs = jax.nn.softmax(theta)
    logp = jax.nn.log_softmax(theta)
    for kind in ("k1", "k3"):  # unbiased values
        _close(probs @ grpo.kl_penalty(logp[None], ref_logp[None], kind)[0], reverse_kl(theta))
    _close(expected_loss_grad("k1"), jnp.zeros(5))
    _close(expected_loss_grad("k2"), jax.grad(reverse_kl)(theta))
    _close(expected_loss_grad("k3"), jax.grad(forward_kl)(theta))


# ---------------------------------------------------------------- log-probs, SFT, entropy


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_logprobs_match_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 4, 11)).astype(np.float32) * 4
    targets = rng.integers(0, 11, size=(3, 4))
    for temperature in (1.0, 0.7):
        want = np.take_along_axis(
            _np_log_softmax(logits.astype(np.float64) / temperature), targets[..., None], -1
        )[..., 0]
        got = grpo.token_logprobs(jnp.asarray(logits), jnp.asarray(targets), temperature)
        assert got.dtype == jnp.float32
        _close(got, want, tol=1e-5)
    bf16 = grpo.token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert bf16.dtype == jnp.float32
    with pytest.raises(ValueError, match="temperature"):
        grpo.token_logprobs(jnp.asarray(logits), jnp.asarray(targets), 0.0)
    with pytest.raises(ValueError, match="disagree"):
        grpo.token_logprobs(jnp.asarray(logits), jnp.asarray(targets[:, :3]))


def test_sft_loss_by_hand():
    target_logp = jnp.array([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = jnp.array([[0, 1, 1], [1, 0, 0]])  # prompt positions are 0
    terms = grpo.sft_loss(target_logp, mask)
    _close([terms.numerator, terms.denominator, terms.value], [9.0, 3.0, 3.0])


def test_entropy():
    logits = jnp.stack([jnp.zeros((2, 6)), jnp.array([[50.0, 0, 0, 0, 0, 0]] * 2)])
    _close(grpo.token_entropy(logits), [[math.log(6)] * 2, [0.0] * 2], tol=1e-5)
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(2, 3, 7)).astype(np.float32)
    lp = _np_log_softmax(raw.astype(np.float64))
    per_token = -(np.exp(lp) * lp).sum(-1)
    mask = np.array([[1, 1, 0], [0, 1, 0]])
    _close(
        grpo.entropy_from_logits(jnp.asarray(raw), jnp.asarray(mask)),
        per_token[mask == 1].mean(),
        tol=1e-5,
    )


# ---------------------------------------------------------------- accumulation invariance

N, T, D, V = 8, 6, 5, 13


@functools.cache
def _toy_batch():
    """A toy policy logits = x @ w and a batch with ragged response masks and a padding row."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(N, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    w_old = w + 0.3 * rng.normal(size=(D, V)).astype(np.float32)  # off-policy: some tokens clip
    targets = jnp.asarray(rng.integers(0, V, size=(N, T)))
    lengths = np.array([6, 1, 3, 4, 0, 2, 5, 6])
    mask = jnp.asarray(np.arange(T)[None] < lengths[:, None], jnp.float32)
    rewards = jnp.asarray(rng.uniform(0.0, 2.0, size=N), jnp.float32)
    logprobs = jax.jit(grpo.token_logprobs)
    batch = {
        "x": x,
        "targets": targets,
        "mask": mask,
        "old_logp": logprobs(x @ w_old, targets),
        "ref_logp": logprobs(x @ (w - 0.2), targets),
        "adv": grpo.group_advantages(rewards, 4),
    }
    return w, batch


def _loss_terms(w, b, agg):
    """Policy loss + 0.1 * k3 KL + SFT term, all with the same aggregation's denominator."""
    logp = grpo.token_logprobs(b["x"] @ w, b["targets"])
    pg, _ = grpo.policy_loss(
        logp, b["old_logp"], b["adv"], b["mask"], 0.2, 0.28, agg, max_response_len=T
    )
    kl = grpo.masked_aggregate(grpo.kl_penalty(logp, b["ref_logp"]), b["mask"], agg, T)
    return grpo.LossTerms(pg.numerator + 0.1 * kl.numerator, pg.denominator)


@functools.partial(jax.jit, static_argnames=("agg", "splits"))
def _full_and_accumulated(w, batch, agg, splits):
    """Full-batch loss and gradient, and the same from `splits` contiguous micro-batches
    (a scan summing numerators, their gradients and denominators, as a train step would)."""
    full_loss, full_grad = jax.value_and_grad(lambda p: _loss_terms(p, batch, agg).value)(w)
    micro = jax.tree.map(lambda a: a.reshape(splits, N // splits, *a.shape[1:]), batch)

    def accumulate(carry, b):
        num, grad = jax.value_and_grad(lambda p: _loss_terms(p, b, agg).numerator)(w)
        terms = grpo.LossTerms(num, _loss_terms(w, b, agg).denominator)
        return jax.tree.map(jnp.add, carry, grad), terms

    grad_sum, terms = jax.lax.scan(accumulate, jnp.zeros_like(w), micro)
    total = grpo.LossTerms(terms.numerator.sum(), terms.denominator.sum())
    naive_mean = jax.vmap(lambda n, d: grpo.LossTerms(n, d).value)(*terms).mean()
    return full_loss, full_grad, total.value, grad_sum / total.denominator, naive_mean


@pytest.mark.parametrize("agg", grpo.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("splits", [2, 4])
def test_accumulation_invariance(agg, splits):
    w, batch = _toy_batch()
    full_loss, full_grad, acc_loss, acc_grad, naive_mean = _full_and_accumulated(
        w, batch, agg, splits
    )
    _close(acc_loss, full_loss)
    _close(acc_grad, full_grad)
    # a plain mean of per-micro-batch losses differs, so the comparison can tell
    assert abs(float(naive_mean) - float(full_loss)) > 1e-4


def test_toy_batch_clips_some_tokens():
    w, batch = _toy_batch()
    logp = grpo.token_logprobs(batch["x"] @ w, batch["targets"])
    _, metrics = grpo.policy_loss(logp, batch["old_logp"], batch["adv"], batch["mask"], 0.2, 0.28)
    assert 0.0 < float(metrics["clip_fraction"]) < 1.0


def test_sft_accumulation_invariance():
    w, batch = _toy_batch()

    @jax.jit
    def sft(p, b):
        return grpo.sft_loss(grpo.token_logprobs(b["x"] @ p, b["targets"]), b["mask"])

    full_loss, full_grad = jax.value_and_grad(lambda p: sft(p, batch).value)(w)
    micro = [jax.tree.map(lambda a, k=k: a[3 * k : 3 * k + 3], batch) for k in range(3)][:2]
    micro.append(jax.tree.map(lambda a: a[6:], batch))  # uneven split: 3, 3, 2 rows
    total = grpo.combine([sft(w, b) for b in micro])
    numerator_grad = jax.jit(jax.grad(lambda p, b: sft(p, b).numerator))
    grad = sum(numerator_grad(w, b) for b in micro)
    _close(total.value, full_loss)
    _close(grad / total.denominator, full_grad)
