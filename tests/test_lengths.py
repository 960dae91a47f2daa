"""The update's lengths: chunked log-probs (policy.token_stats) equal the unchunked ones in
values and gradients; updates trimmed to the generated length equal the untrimmed ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reczero_jax import mesh as meshlib
from reczero_jax.config import GRPOConfig, OptimConfig
from reczero_jax.policy import token_stats
from reczero_jax.train.step import Trainer
from tests.helpers import TINY, assert_trees_close, fake_rollout, tiny_model

EXACT = 1e-6


def test_chunked_token_stats_equal_unchunked_in_values_and_gradients():
    """7 positions in chunks of 3 (the last one padded), at temperature 0.7."""
    model = tiny_model()
    graphdef, params = nnx.split(model)
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(2, 3, 7, TINY.hidden_size).astype(np.float32))
    targets = jnp.asarray(rng.randint(0, TINY.vocab_size, (2, 3, 7)).astype(np.int32))
    weights = jnp.asarray(rng.randn(2, 2, 3, 7).astype(np.float32))

    def objective(params, hidden, chunk):
        stats = token_stats(nnx.merge(graphdef, params), hidden, targets, temperature=0.7,
                            chunk=chunk)
        return (weights[0] * stats.logp + weights[1] * stats.entropy).sum(), stats

    grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True),
                   static_argnums=2)
    (_, whole), whole_grads = grad(params, hidden, 0)
    (_, chunked), chunked_grads = grad(params, hidden, 3)
    assert chunked.logp.shape == (2, 3, 7)
    assert_trees_close(chunked, whole, atol=EXACT)
    assert float(jnp.abs(whole_grads[1]).max()) > 1e-2
    assert_trees_close(chunked_grads, whole_grads, atol=EXACT)
    with pytest.raises(ValueError, match="logprob_chunk must be >= 0"):
        token_stats(model, hidden, targets, chunk=-1)


def _loss_and_grads(config: GRPOConfig, rollout=None):
    model = tiny_model()
    trainer = Trainer(model, meshlib.make_mesh(1, 1, 1), OptimConfig(), config,
                      reference=tiny_model(seed=1))
    return trainer.grpo_loss_and_grads(rollout or fake_rollout())


def test_chunked_grpo_loss_equals_unchunked_with_kl_and_entropy_terms():
    """Policy log-probs, the KL reference's, the entropy bonus and metric all go through the
    chunks."""
    config = GRPOConfig(kl_coef=0.1, entropy_coef=0.01, temperature=0.7)
    whole = _loss_and_grads(config)
    chunked = _loss_and_grads(GRPOConfig(**{**vars(config), "logprob_chunk": 4}))
    np.testing.assert_allclose(chunked[0], whole[0], atol=EXACT)
    assert_trees_close(chunked[1], whole[1], atol=EXACT)


def test_chunked_sft_step_equals_unchunked():
    rng = np.random.RandomState(0)
    ids = rng.randint(4, TINY.vocab_size, (4, 15))
    loss_mask = np.zeros((4, 15), np.int32)
    loss_mask[:, 9:] = 1
    results = []
    for chunk in (0, 4):
        trainer = Trainer(tiny_model(), meshlib.make_mesh(1, 1, 1),
                          OptimConfig(learning_rate=1e-3), GRPOConfig(logprob_chunk=chunk))
        metrics = trainer.sft_step(ids, np.ones_like(ids), loss_mask)
        results.append((metrics["loss"], metrics["grad_norm"], trainer.params))
    np.testing.assert_allclose(results[1][0], results[0][0], atol=EXACT)
    np.testing.assert_allclose(results[1][1], results[0][1], atol=EXACT)
    assert_trees_close(results[1][2], results[0][2], atol=EXACT)


def _long_rollout(length=130, longest=60):
    """fake_rollout's prompts with responses of ``length`` positions, the longest sample
    ``longest`` tokens."""
    base = fake_rollout()
    rng = np.random.RandomState(1)
    batch, group = base.lengths.shape
    lengths = rng.randint(1, longest + 1, (batch, group)).astype(np.int32)
    lengths[0, 0] = longest
    responses = rng.randint(4, TINY.vocab_size, (batch, group, length)).astype(np.int32)
    mask = (np.arange(length) < lengths[..., None]).astype(np.float32)
    return base._replace(responses=jnp.asarray(responses), response_mask=jnp.asarray(mask),
                         old_logp=jnp.zeros((batch, group, length)),
                         lengths=jnp.asarray(lengths))


def test_update_trimmed_to_the_generated_length_equals_the_untrimmed_one():
    """130 positions, the longest response 60 tokens: the update runs over 64 with the same
    loss and gradients; seq-mean-token-sum-norm still divides by max_new_tokens = 130."""
    config = GRPOConfig(max_new_tokens=130, loss_agg="seq-mean-token-sum-norm",
                        entropy_coef=0.01)
    trainer = Trainer(tiny_model(), meshlib.make_mesh(1, 1, 1), OptimConfig(), config)
    full = _long_rollout()
    trimmed = trainer.trimmed(full)
    assert trimmed.responses.shape[-1] == trimmed.response_mask.shape[-1] == 64
    assert trimmed.old_logp.shape[-1] == 64
    whole_loss, whole_grads = trainer.grpo_loss_and_grads(full)
    loss, grads = trainer.grpo_loss_and_grads(trimmed)
    assert abs(float(whole_loss)) > 0  # the entropy bonus makes it non-zero on-policy
    np.testing.assert_allclose(loss, whole_loss, atol=EXACT)
    assert_trees_close(grads, whole_grads, atol=EXACT)
    # A batch already at its bucket is kept; grpo_step updates on the trimmed batch (what the
    # update computes on it is checked above, so it is not compiled here).
    assert trainer.trimmed(trimmed) is trimmed
    shapes = []
    trainer.grpo_update = lambda params, opt, batch, *inputs: (
        shapes.append(batch.responses.shape) or (params, opt, {}))
    trainer.grpo_step(full)
    assert shapes == [(4, 2, 64)]
