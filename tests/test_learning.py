"""GRPO learns: after an SFT warm start that teaches the four-tag format with random ratings,
the real token reward over GRPO steps teaches the rating, and the mean reward rises.

The task: a prompt is its key token repeated (2 to 4 times, left padded); key ``a`` means the
true rating is 1, key ``b`` means 5. SFT responses are the templated four-tag answer
``<analyze user>x</analyze user><analyze item>x</analyze item><match>x</match><rate>k</rate>``
with k uniform in 1..5, whatever the key, so after SFT the format holds and the rating is a
guess. A well-formatted answer scores 2 - |k - y| / 2: a guess, and also the best rating that
ignores the key (3), averages 1.0; only a policy that reads the key reaches 2.

The vocabulary is a 21-token byte-level BPE (the eight tags are single tokens), so that a
2-layer decoder of width 64 learns in a few hundred cheap steps; ``TokenRewardFn`` reads it
like any byte-level tokenizer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from reczero_jax import lora
from reczero_jax.config import GRPOConfig, OptimConfig
from reczero_jax.mesh import single_device_mesh
from reczero_jax.models import Decoder, ModelConfig
from reczero_jax.rewards import TokenRewardFn
from reczero_jax.train.step import Trainer, rollout

TAGS = ("<analyze user>", "</analyze user>", "<analyze item>", "</analyze item>", "<match>",
        "</match>", "<rate>", "</rate>")
KEY_RATINGS = {"a": 1, "b": 5}
PROMPT_LENGTH = 4
SFT_STEPS, SFT_BATCH, SFT_LR = 100, 16, 1e-2
GRPO_STEPS, GRPO_PROMPTS, GRPO_LR = 150, 8, 1e-3
# LoRA (rank 16, alpha 16) on the seven projections and the LM head: twice the steps, the
# same LR and margin. The reward idles near 1.0, takes off, then stays at 2 unless the step is
# too large: at alpha 32 (twice the update) it collapsed to 0.9 after reaching 2 under one
# rounding (XLA's CPU kernels at -O0) and not under the default one; at LR 3e-3 by step 100.
# Alpha 16 took off near step 190 and held under both (last 20 steps 1.99).
LORA_STEPS, LORA_LR, LORA_RANK, LORA_ALPHA = 300, 1e-3, 16, 16.0
LORA_TARGETS = (*lora.TARGETS, "lm_head")
WINDOW = 20  # steps averaged at each end of the reward curve
MARGIN = 0.5


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE over the characters 1-5, a-e, x, with the tags as added tokens."""
    chars = "12345abcdex"
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "eos_token": "<eos>"})
    tokenizer.add_tokens(list(TAGS))
    return tokenizer


def templated_response(tokenizer, rating: int) -> list[int]:
    sections = [TAGS[0], "x", TAGS[1], TAGS[2], "x", TAGS[3], TAGS[4], "x", TAGS[5],
                TAGS[6], str(rating), TAGS[7], tokenizer.eos_token]
    return tokenizer.convert_tokens_to_ids(sections)


def sample_prompts(tokenizer, rng, count):
    """prompt ids / mask [count, PROMPT_LENGTH] (the key 2-4 times, left padded), ratings."""
    keys = rng.choice(list(KEY_RATINGS), count)
    real = rng.integers(2, PROMPT_LENGTH + 1, count)
    mask = (np.arange(PROMPT_LENGTH) >= PROMPT_LENGTH - real[:, None]).astype(np.int32)
    key_ids = np.array(tokenizer.convert_tokens_to_ids(list(keys)))
    ids = np.where(mask == 1, key_ids[:, None], tokenizer.pad_token_id).astype(np.int32)
    return ids, mask, np.array([KEY_RATINGS[k] for k in keys], np.float32)


def warm_start(trainer, tokenizer, rng):
    """SFT on templated responses with ratings drawn uniformly, ignoring the key."""
    for _ in range(SFT_STEPS):
        ids, mask, _ = sample_prompts(tokenizer, rng, SFT_BATCH)
        responses = np.array([templated_response(tokenizer, k) for k in rng.integers(1, 6, SFT_BATCH)])
        metrics = trainer.sft_step(np.concatenate([ids, responses], axis=1),
                                   np.concatenate([mask, np.ones_like(responses)], axis=1),
                                   np.concatenate([np.zeros_like(mask), np.ones_like(responses)],
                                                  axis=1))
    return metrics


@pytest.fixture(scope="module")
def warm_started():
    """The tokenizer, the SFT'd model (graph and host state: each test builds its own device
    copy, since updates donate their buffers), the prompt RNG after SFT, and the SFT metrics."""
    tokenizer = tiny_tokenizer()
    config = ModelConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=64,
                         intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, eos_token_id=tokenizer.eos_token_id)
    rng = np.random.default_rng(0)
    sft = Trainer(Decoder(config, rngs=nnx.Rngs(0)), single_device_mesh(),
                  OptimConfig(learning_rate=SFT_LR))
    metrics = warm_start(sft, tokenizer, rng)
    graph, state = nnx.split(sft.model)
    return tokenizer, graph, jax.device_get(state), rng.bit_generator.state, metrics


def grpo_curve(warm_started, learning_rate: float, steps: int, adapters=None):
    """Rewards and format rates of ``steps`` GRPO steps from the warm start (with LoRA
    ``adapters`` = (rank, alpha, targets): the adapters alone train, the SFT'd weights frozen)."""
    tokenizer, graph, state, rng_state, _ = warm_started
    model = nnx.merge(graph, jax.tree.map(jnp.asarray, state))
    if adapters is not None:
        rank, alpha, targets = adapters
        lora.add_lora(model, rank=rank, alpha=alpha, targets=targets)
    rng = np.random.default_rng()
    rng.bit_generator.state = rng_state
    grpo_config = GRPOConfig(group_size=8, max_new_tokens=len(templated_response(tokenizer, 3)))
    trainer = Trainer(model, single_device_mesh(), OptimConfig(learning_rate=learning_rate),
                      grpo_config)
    reward_fn = TokenRewardFn(tokenizer)
    rewards, format_rates = [], []
    for step in range(steps):
        ids, mask, ratings = sample_prompts(tokenizer, rng, GRPO_PROMPTS)
        scored = rollout(trainer.model, reward_fn, ids, mask, ratings, jax.random.key(step),
                         grpo_config, eos_ids=(tokenizer.eos_token_id,),
                         pad_id=tokenizer.pad_token_id)
        metrics = trainer.grpo_step(scored)
        rewards.append(float(metrics["reward_mean"]))
        format_rates.append(float(metrics["format_rate"]))
    windows = np.array(rewards).reshape(-1, 10).mean(axis=1)
    first, last = np.mean(rewards[:WINDOW]), np.mean(rewards[-WINDOW:])
    print(f"\nmean reward per 10 GRPO steps ({GRPO_PROMPTS} prompts x {grpo_config.group_size} "
          f"samples each, LR {learning_rate}, LoRA {adapters}):")
    print(" ".join(f"{w:.2f}" for w in windows))
    print(f"first {WINDOW} steps {first:.3f}, last {WINDOW} steps {last:.3f}, format rate first "
          f"{np.mean(format_rates[:WINDOW]):.3f} last {np.mean(format_rates[-WINDOW:]):.3f}")
    return first, last, np.mean(format_rates[:WINDOW])


@pytest.mark.slow
def test_mean_reward_rises_over_grpo_steps(warm_started):
    tokenizer, _, _, _, sft_metrics = warm_started
    # The loss floor is the rating's entropy, log 5, spread over the response's tokens.
    response_length = len(templated_response(tokenizer, 3))
    assert sft_metrics["loss"] < 1.2 * np.log(5) / response_length
    first, last, first_format_rate = grpo_curve(warm_started, GRPO_LR, GRPO_STEPS)
    assert first_format_rate > 0.9  # the warm start taught the format
    assert last - first > MARGIN
    assert last > 1.5  # beyond any rating that ignores the key (at most 1.0 on average)


def rating_logit_caps(tokenizer, state) -> dict[str, float]:
    """With the final norm (g) and LM head (rows w) frozen, the most the logits of neighbouring
    ratings i, j can differ: the head reads g * x / rms(x), |x / rms(x)| = sqrt(d), so by
    Cauchy-Schwarz logit_i - logit_j <= sqrt(d) |g * (w_i - w_j)|."""
    g, head = state["final_norm"][...], state["lm_head"][...]
    rows = head[:, tokenizer.convert_tokens_to_ids(list("12345"))].T
    return {f"{i + 1}-{i + 2}": float(np.sqrt(g.size) * np.linalg.norm(g * (rows[i] - rows[i + 1])))
            for i in range(4)}


@pytest.mark.slow
def test_mean_reward_rises_with_lora_on_the_projections_and_the_head(warm_started):
    """LoRA (rank 16, alpha 16) on the seven projections and the LM head, from the same warm
    start, rises by full fine-tuning's margin. The head's adapter is what lets it: with the
    final norm and LM head frozen, one rating token's logit can rise above another's by at
    most sqrt(d) |g * (w_i - w_j)| (the hidden state is RMS-normalised): 1.55 nats between "5"
    and "4" after this SFT, printed here, so adapters on the projections alone level off
    near 1.45 (README, LoRA). With the head adapted (its rows w + s A B move) the reward
    reaches 2, as full fine-tuning's does."""
    tokenizer, _, state, _, _ = warm_started
    caps = rating_logit_caps(tokenizer, state)
    print("\nlargest logit gap a frozen head would allow, per pair of ratings (nats): "
          + ", ".join(f"{pair} {cap:.2f}" for pair, cap in caps.items()))
    first, last, first_format_rate = grpo_curve(warm_started, LORA_LR, LORA_STEPS,
                                                adapters=(LORA_RANK, LORA_ALPHA, LORA_TARGETS))
    assert first_format_rate > 0.9
    assert last - first > MARGIN
    assert last > 1.5  # beyond any rating that ignores the key (at most 1.0 on average)
