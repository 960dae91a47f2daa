"""The GRPO loss and gradients of our trainer against the same loss in plain torch on the
transformers model (``reczero_jax.compare.torch_grpo_loss``): tiny random Qwen2, fp32,
left-padded prompts, G responses per prompt with masks of different lengths.

Gradients are compared for every parameter, torch's named by the HF tensor names of
``reczero_jax.models.hf.PARAM_TABLE`` and brought to our layout by the same table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from reczero_jax import grpo
from reczero_jax.compare import torch_grpo_loss
from reczero_jax.config import GRPOConfig, OptimConfig
from reczero_jax.mesh import single_device_mesh
from reczero_jax.models import from_pretrained
from reczero_jax.models.hf import PARAM_TABLE
from reczero_jax.policy import response_logprobs
from reczero_jax.train.step import Rollout, Trainer
from tests.helpers import HF_TINY, make_torch_model

B, G, P, R = 2, 3, 10, 7
TOLERANCE = 1e-4
CLIP_EPS = 0.2
KL_COEF = 0.05


def make_batch(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompt_mask = np.ones((B, P), np.int32)
    prompt_mask[1, :4] = 0  # the second prompt is 6 tokens, left padded
    lengths = np.array([[R, 3, 5], [1, R, 4]], np.int32)
    return dict(
        prompt_ids=rng.integers(3, HF_TINY["vocab_size"], (B, P)).astype(np.int32),
        prompt_mask=prompt_mask,
        responses=rng.integers(3, HF_TINY["vocab_size"], (B, G, R)).astype(np.int32),
        response_mask=(np.arange(R) < lengths[..., None]).astype(np.float32),
        advantages=rng.standard_normal((B, G)).astype(np.float32),
        lengths=lengths,
    )


def as_rollout(batch, old_logp) -> Rollout:
    # The loss reads the advantages; rewards, format and ratings are only logged.
    return jax.tree.map(jnp.asarray, Rollout(
        prompt_ids=batch["prompt_ids"], prompt_mask=batch["prompt_mask"],
        responses=batch["responses"], response_mask=batch["response_mask"], old_logp=old_logp,
        rewards=np.zeros((B, G), np.float32), advantages=batch["advantages"],
        format_ok=np.ones((B, G), bool), ratings=np.full((B, G), 3.0, np.float32),
        lengths=batch["lengths"]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(policy, reference) as transformers models and their save_pretrained directories."""
    found = []
    for seed in (0, 1):
        model = make_torch_model("qwen2-bias-untied", seed=seed)
        path = tmp_path_factory.mktemp(f"qwen2_seed{seed}")
        model.save_pretrained(path)
        found.append((model, path))
    return found


def torch_loss_and_grads(checkpoints, batch, old_logp=None, kl_coef=0.0):
    (policy, _), (reference, _) = checkpoints
    policy.zero_grad(set_to_none=True)
    tensors = {name: torch.as_tensor(value) for name, value in batch.items() if name != "lengths"}
    loss, clip_fraction, logp = torch_grpo_loss(
        policy, **tensors, old_logp=None if old_logp is None else torch.as_tensor(old_logp),
        clip_eps=CLIP_EPS, ref_model=reference, kl_coef=kl_coef)
    loss.backward()
    grads = {name: param.grad.numpy().copy() for name, param in policy.named_parameters()}
    return float(loss.detach()), float(clip_fraction), logp.numpy(), grads


def our_loss_and_grads(checkpoints, batch, old_logp=None, kl_coef=0.0):
    (_, policy_dir), (_, reference_dir) = checkpoints
    # updates_per_rollout > 1 makes the step use the rollout's old log-probs.
    config = GRPOConfig(group_size=G, max_new_tokens=R, clip_eps=CLIP_EPS, kl_coef=kl_coef,
                        updates_per_rollout=1 if old_logp is None else 2)
    trainer = Trainer(from_pretrained(policy_dir), single_device_mesh(), OptimConfig(), config,
                      reference=from_pretrained(reference_dir) if kl_coef else None)
    stored = np.zeros((B, G, R), np.float32) if old_logp is None else old_logp
    loss, grads = trainer.grpo_loss_and_grads(as_rollout(batch, stored))
    logp = response_logprobs(trainer.model, jnp.asarray(batch["prompt_ids"]),
                             jnp.asarray(batch["prompt_mask"]), jnp.asarray(batch["responses"]))
    flat = lambda x: jnp.asarray(x).reshape(B * G, R)  # noqa: E731
    _, metrics = grpo.policy_loss(flat(logp), flat(logp if old_logp is None else old_logp),
                                  jnp.asarray(batch["advantages"]).reshape(-1),
                                  flat(batch["response_mask"]), CLIP_EPS)
    return float(loss), float(metrics["clip_fraction"]), np.asarray(logp), grads


def assert_gradients_match(ours, theirs) -> float:
    """Every parameter's gradient, mapped through PARAM_TABLE; returns the largest |diff|."""
    table = {entry.path: entry for entry in PARAM_TABLE}
    compared, worst = set(), 0.0
    for path, variable in nnx.to_flat_state(ours):
        entry, our_grads = table[path], np.asarray(variable.get_value())
        per_layer = our_grads if entry.stacked else [our_grads]
        for name, our_grad in zip(entry.names(len(per_layer)), per_layer, strict=True):
            diff = float(np.max(np.abs(our_grad - entry.to_ours(theirs[name], our_grad.shape))))
            assert diff < TOLERANCE, f"{name}: max |grad diff| {diff:.2e}"
            worst = max(worst, diff)
            compared.add(name)
    assert compared == set(theirs), f"torch parameters not compared: {set(theirs) - compared}"
    return worst


def check_parity(checkpoints, old_logp=None, kl_coef=0.0, label=""):
    batch = make_batch()
    loss, clip_fraction, logp, grads = our_loss_and_grads(checkpoints, batch, old_logp, kl_coef)
    t_loss, t_clip_fraction, t_logp, t_grads = torch_loss_and_grads(checkpoints, batch, old_logp,
                                                                    kl_coef)
    np.testing.assert_allclose(logp, t_logp, atol=TOLERANCE)
    assert abs(loss - t_loss) < TOLERANCE
    # The gradient must be far from zero, or matching it would show nothing.
    assert max(float(np.abs(g).max()) for g in t_grads.values()) > 1e-2
    worst = assert_gradients_match(grads, t_grads)
    print(f"{label}: loss ours {loss:.6f} torch {t_loss:.6f} (|diff| {abs(loss - t_loss):.1e}), "
          f"max |grad diff| {worst:.1e}, clip fraction {clip_fraction:.3f} / {t_clip_fraction:.3f}")
    return clip_fraction, t_clip_fraction


def test_on_policy_loss_and_gradients_match_torch(checkpoints):
    clip_fraction, t_clip_fraction = check_parity(checkpoints, label="on-policy")
    assert clip_fraction == t_clip_fraction == 0.0  # ratio exactly 1


def test_off_policy_clipped_loss_and_gradients_match_torch(checkpoints):
    current = torch_loss_and_grads(checkpoints, make_batch())[2]
    # Old log-probs 0.3 nats off on average: many ratios fall outside [0.8, 1.2].
    noise = np.random.default_rng(1).normal(0.0, 0.3, current.shape).astype(np.float32)
    clip_fraction, t_clip_fraction = check_parity(checkpoints, old_logp=current + noise,
                                                  label="off-policy")
    num_tokens = make_batch()["response_mask"].sum()
    assert clip_fraction > 0.1 and t_clip_fraction > 0.1
    assert abs(clip_fraction - t_clip_fraction) <= 1 / num_tokens  # at most one token flips


def test_k3_kl_penalty_loss_and_gradients_match_torch(checkpoints):
    check_parity(checkpoints, kl_coef=KL_COEF, label=f"on-policy + {KL_COEF} k3 KL")
