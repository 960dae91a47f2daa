"""``reczero compare``: this project against transformers (PyTorch) on one checkpoint.

Both sides load the same Hugging Face directory in float32 (transformers with eager attention,
ours with ``models.hf.from_pretrained``) and see the same token ids:

* logits: the plain forward of every prompt; ours on prompts left-padded to one length,
  transformers on each prompt alone; |diff| over every real prompt position and the vocabulary.
* log-probs: of our greedy responses, ours through the training forward
  (``policy.response_logprobs``, shared prompt), transformers on prompt + response.
* greedy generation: ``sampling.generate(temperature=0)`` against
  ``model.generate(do_sample=False)``, both stopping at the checkpoint's EOS ids. Tokens are
  compared up to each sequence's first divergence. At a divergence, the gap between
  transformers' logits of its token and of ours must lie within twice the logits tolerance: a
  near-tie, which rounding may break either way. One side stopping where the other goes on
  (EOS against a token) is no near-tie (an infinite gap).
* rewards: of the greedy responses and of ``PROBES`` (hand-written answers, valid and broken), by
  our host reward (``rewards.rating_reward``), our jitted token reward (``rewards.TokenRewardFn``,
  byte-level tokenizers) and ``authors_reward``, a plain re-statement of the authors' rules
  (PAPER.md, "Reward"); all three must agree exactly. Our reward is deliberately stricter than
  the authors' ``float()`` on inputs no probe holds (``nan``, ``1_0``, non-ASCII digits or
  whitespace; see ``rewards.host``).
* GRPO: one batch of up to ``GRPO_PROMPTS`` prompts x G responses: each prompt's greedy
  response and the first G - 1 ``PROBES`` answers (a valid one and, from G = 3, a broken one,
  so rewards differ inside every group).
  Ours: ``grpo.group_advantages`` and ``Trainer.grpo_loss_and_grads``; theirs: ``torch_grpo``,
  written here: advantages (r - mean) / (unbiased std + 1e-6), PPO clipped surrogate, token mean
  over all response tokens, one update per rollout (ratio exp(logp - stop_grad(logp)) = 1, so the
  loss value is -mean advantage per token and the gradient is the real test).

Tolerances (``TOLERANCES``; ``--tolerance-scale`` multiplies all of them): logits and log-probs
max |diff| 1e-3 (fp32), advantages max |diff| 1e-5, loss and gradient norm relative difference
1e-4 and 1e-3 (|a - b| / max(|a|, |b|, 1e-6)), the largest logit gap at a greedy divergence
2e-3; reward mismatches: none. Exit status 0 when every check holds, 1 when one does not, 2 for
bad input. ``compare`` measures with the tolerances as they are; ``scale_tolerances`` and
``verdict`` judge its checks at any scale without measuring again.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reczero_jax.config import LAYOUTS

# divergence_gap: twice the logits tolerance (each side's logit of either token may be off by it).
TOLERANCES = {"logits": 1e-3, "logp": 1e-3, "advantages": 1e-5, "loss": 1e-4, "grad_norm": 1e-3,
              "divergence_gap": 2e-3}
RELATIVE_FLOOR = 1e-6
GRPO_PROMPTS = 2
CLIP_EPS = 0.2
STD_EPS = 1e-6
AUTHORS_TAGS = ("analyze user", "analyze item", "match", "rate")

BUILTIN_PROMPTS = (
    "A user rated Toy Story 5, Heat 4 and Casino 2. How would they rate Fargo (1996), 1 to 5?",
    "Rate the movie Jumanji (1995) from 1 to 5 for someone who loves adventure films.",
    "A listener gave jazz albums 4 and 5 stars and pop albums 2. Predict their rating of "
    "Kind of Blue.",
    "What is the capital of France?",
    "Write a haiku about a cat who watches the rain fall on a quiet city street at night.",
    "User history: Sense and Sensibility 4.0; Emma 5.0; Die Hard 1.0. Target: Persuasion. "
    "Give a rating.",
    "Summarise in one sentence why people enjoy science fiction novels.",
    "Explain briefly what a recommender system does.",
)
BUILTIN_RATINGS = (4, 3, 5, 2, 1, 5, 3, 4)


def _answer(user: str, item: str, match: str, rate: str) -> str:
    return (f"<analyze user>{user}</analyze user>\n<analyze item>{item}</analyze item>\n"
            f"<match>{match}</match>\n<rate>{rate}</rate>")


ITEM = "Heat\n[pos] the cast\n[neg] its length"
# (response text, true rating): well-formed answers first (GRPO groups take them in order).
PROBES = (
    (_answer("likes crime films", ITEM, "a good fit", "4"), 4),
    ("<analyze user>likes crime films</analyze user>\n<rate>4</rate>", 4),
    (_answer("likes dramas", ITEM, "a weak fit", "2"), 4),
    (_answer("likes dramas", ITEM, "fits", "4.5"), 3),
    (_answer("picky", ITEM, "fits", " 1 \n"), 5),
    (_answer("likes dramas", ITEM, "fits", "5.0"), 5),
    (_answer("likes dramas", ITEM, "fits", "4 stars"), 4),
    (_answer("likes dramas", ITEM, "fits", "four"), 4),
    (_answer("likes dramas", ITEM, "fits", "6"), 5),
    (_answer("  \n ", ITEM, "fits", "3"), 3),
    (_answer("likes dramas", ITEM, "fits", "3") + "<rate>3</rate>", 3),
    ("<analyze item>Heat</analyze item><analyze user>x</analyze user><match>y</match>"
     "<rate>3</rate>", 3),
    ("<analyze user>x</analyze user><analyze item>Heat</analyze item></match>y<match>"
     "<rate>3</rate>", 3),
)


# ----------------------------------------------------------------------------- the authors' rules


def authors_reward(text: str, truth: float) -> float:
    """PAPER.md's reward, re-stated plainly: -1 unless each of the 8 tags occurs exactly once,
    the opening tags are in the order user, item, match, rate, the first three sections are
    non-empty after ``strip()`` and the rate section is a number (``float()``) in [1, 5]; then
    1 + (1 - |pred - truth| / 2)."""
    if any(text.count(f"<{tag}>") != 1 or text.count(f"</{tag}>") != 1 for tag in AUTHORS_TAGS):
        return -1.0
    starts = [text.find(f"<{tag}>") for tag in AUTHORS_TAGS]
    if starts != sorted(starts):
        return -1.0
    sections = [re.search(f"<{tag}>(.*?)</{tag}>", text, re.DOTALL) for tag in AUTHORS_TAGS]
    if any(found is None or not found.group(1).strip() for found in sections):
        return -1.0
    try:
        prediction = float(sections[-1].group(1).strip())
    except ValueError:
        return -1.0
    if not 1 <= prediction <= 5:
        return -1.0
    return 1.0 + (1.0 - abs(prediction - truth) / 2)


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Check:
    """One table row: ``value`` against ``tolerance`` (value <= tolerance passes); rows without
    a tolerance are information (``text`` shown instead of the value when given)."""

    name: str
    value: float
    tolerance: float | None = None
    text: str | None = None

    @property
    def ok(self) -> bool:
        return self.tolerance is None or bool(self.value <= self.tolerance)


def scale_tolerances(checks: Sequence[Check], scale: float) -> list[Check]:
    """``checks`` with every tolerance multiplied by ``scale`` (>= 0; 0 demands equality)."""
    if not scale >= 0:
        raise ValueError(f"the tolerance scale must be >= 0; got {scale}")
    return [check if check.tolerance is None
            else dataclasses.replace(check, tolerance=check.tolerance * scale)
            for check in checks]


def verdict(checks: Sequence[Check]) -> tuple[int, str]:
    """(exit status, last line): 0 and "result: PASS" when every check holds, else 1 and
    "result: FAIL (<the failing checks>)"."""
    failed = [check.name for check in checks if not check.ok]
    return (1, f"result: FAIL ({'; '.join(failed)})") if failed else (0, "result: PASS")


def format_table(checks: Sequence[Check]) -> str:
    width = max(len(check.name) for check in checks) + 2
    lines = [f"{'check':<{width}}{'value':>22}  {'tolerance':>10}  status"]
    for check in checks:
        value = check.text if check.text is not None else f"{check.value:.3g}"
        tolerance = "" if check.tolerance is None else f"{check.tolerance:.3g}"
        status = "" if check.tolerance is None else ("ok" if check.ok else "FAIL")
        lines.append(f"{check.name:<{width}}{value:>22}  {tolerance:>10}  {status}".rstrip())
    return "\n".join(lines)


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), RELATIVE_FLOOR)


# ----------------------------------------------------------------------------- inputs


def load_prompts(tokenizer, data: str | Path | None, split: str, n: int, max_prompt_tokens: int,
                 layout: str) -> tuple[list[list[int]], list[int], str]:
    """(prompt token ids, true ratings, description): the first ``n`` samples of ``split``
    under ``data`` rendered by ``prompts.encode_prompt``, or the built-in prompts as one
    user turn through the tokenizer's chat template."""
    from reczero_jax import prompts

    if data is not None:
        from reczero_jax.data import load_split

        records = load_split(data, split)
        chosen = [records[i] for i in range(min(n, len(records)))]
        encoded = [prompts.encode_prompt(r, tokenizer, max_prompt_tokens=max_prompt_tokens,
                                         layout=layout).ids for r in chosen]
        return encoded, [int(r["rating"]) for r in chosen], f"{len(chosen)} {split} samples of {data}"
    texts = BUILTIN_PROMPTS[:n]
    encoded = []
    for text in texts:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
        encoded.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return encoded, list(BUILTIN_RATINGS[:n]), f"{len(texts)} built-in prompts"


# ----------------------------------------------------------------------------- the torch side


def torch_logits(model, ids: Sequence[int]):
    """transformers' logits [T, V] (float32 numpy) of one unpadded sequence."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def torch_greedy(model, prompt: Sequence[int], max_new_tokens: int, eos_ids, pad_id: int):
    """(greedy tokens, logits [steps, V]) of ``model.generate`` on one unpadded prompt."""
    import torch

    out = model.generate(torch.tensor([list(prompt)]), attention_mask=torch.ones(1, len(prompt),
                                                                               dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids),
                         pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].numpy(), torch.stack(out.logits)[:, 0].float().numpy()


def torch_group_advantages(rewards, group_size: int):
    """rewards [B, G] -> (r - mean) / (unbiased std + 1e-6) per group; 0 for a constant group."""
    import torch

    rewards = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1, group_size)
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + STD_EPS)
    constant = (rewards.max(1, keepdim=True).values == rewards.min(1, keepdim=True).values)
    return torch.where(constant, torch.zeros_like(advantages), advantages)


def torch_grpo_loss(model, prompt_ids, prompt_mask, responses, response_mask, advantages, *,
                    old_logp=None, clip_eps: float = CLIP_EPS, temperature: float = 1.0,
                    ref_model=None, kl_coef: float = 0.0):
    """The GRPO loss in plain torch on a transformers causal LM -> (loss, clip_fraction, logp).

    prompt_ids, prompt_mask: [B, P] (left padded); responses, response_mask: [B, G, R];
    advantages: [B, G]; old_logp: [B, G, R] or None (on-policy: the current log-probs
    detached, the paper's single update). Each prompt is repeated G times and run with its
    response; positions count the prompt's real tokens from 0. With M the response tokens,

        ratio = exp(logp - old_logp),  l = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)
        loss  = sum_M (l + kl_coef * k3) / |M|,  k3 = clip(exp(d) - d - 1, -10, 10), d = ref - logp

    (k3 only when ``kl_coef`` is non-zero, ``ref`` the log-probs under ``ref_model``).
    clip_fraction: the share of M where clipping zeroes the gradient.
    """
    import torch

    batch, group, length = responses.shape
    prompt_length = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids.repeat_interleave(group, 0),
                     responses.reshape(batch * group, length)], dim=1)
    mask = torch.cat([prompt_mask.repeat_interleave(group, 0),
                      torch.ones(batch * group, length, dtype=prompt_mask.dtype)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    targets = responses.reshape(batch * group, length, 1).long()

    def response_logp(lm):
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        scaled = logits[:, prompt_length - 1:-1].float() / temperature
        return torch.log_softmax(scaled, dim=-1).gather(-1, targets)[..., 0]

    logp = response_logp(model)
    old = logp.detach() if old_logp is None else old_logp.reshape(batch * group, length)
    adv = advantages.reshape(batch * group, 1).float()
    ratio = torch.exp(logp - old)
    token_loss = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if kl_coef:
        with torch.no_grad():
            ref = response_logp(ref_model)
        # verl's low_var_kl: k3, clamped to [-10, 10]
        k3 = torch.exp(ref - logp) - (ref - logp) - 1
        token_loss = token_loss + kl_coef * k3.clamp(-10, 10)
    is_token = response_mask.reshape(batch * group, length) != 0
    count = is_token.sum().clamp(min=1)
    loss = torch.where(is_token, token_loss, 0.0).sum() / count
    clipped = ((adv > 0) & (ratio > 1 + clip_eps)) | ((adv < 0) & (ratio < 1 - clip_eps))
    clip_fraction = (clipped & is_token).sum() / count
    return loss, clip_fraction.detach(), logp.detach().reshape(batch, group, length)


def torch_grpo(model, prompts: Sequence[Sequence[int]], responses: np.ndarray, mask: np.ndarray,
               advantages) -> tuple[float, float]:
    """(loss, gradient norm) of ``torch_grpo_loss`` on-policy (ratio = exp(logp - logp.detach()))
    for token-id prompts (left-padded here) and responses, mask [B, G, R], advantages [B, G]."""
    import torch

    length = max(len(prompt) for prompt in prompts)
    prompt_ids = torch.zeros(len(prompts), length, dtype=torch.long)
    prompt_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        prompt_ids[row, length - len(prompt):] = torch.tensor(list(prompt))
        prompt_mask[row, length - len(prompt):] = 1
    model.zero_grad(set_to_none=True)
    loss, _, _ = torch_grpo_loss(model, prompt_ids, prompt_mask, torch.as_tensor(responses),
                                 torch.as_tensor(mask), torch.as_tensor(advantages))
    loss.backward()
    squares = sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None)
    return loss.item(), float(squares ** 0.5)


# ----------------------------------------------------------------------------- comparisons


@functools.cache
def _jitted():
    """(forward, response_logprobs) wrapped in ``nnx.jit`` once per process, so repeated
    comparisons reuse one compilation cache."""
    from flax import nnx

    from reczero_jax.policy import response_logprobs

    return nnx.jit(lambda model, ids, mask: model(ids, attention_mask=mask)), nnx.jit(
        response_logprobs)


def our_greedy(ours, ids, mask, max_new_tokens: int, eos_ids, pad_id: int):
    """(tokens [B, R], lengths [B]) of ``sampling.generate`` at temperature 0."""
    import jax

    from reczero_jax.sampling import generate

    out = generate(ours, ids, mask, num_samples=1, max_new_tokens=max_new_tokens,
                   temperature=0.0, eos_ids=eos_ids, pad_id=pad_id, rng=jax.random.key(0))
    return np.asarray(out.tokens)[:, 0], np.asarray(out.lengths)[:, 0]


def compare_logits(ours, theirs, prompts, pad_id: int) -> list[Check]:
    """Ours on every prompt left-padded to the longest (one compiled shape), theirs unpadded."""
    from reczero_jax.data.padding import left_pad

    forward = _jitted()[0]
    ids, mask = left_pad(prompts, max(map(len, prompts)), pad_id)
    worst, total, count = 0.0, 0.0, 0
    for row, prompt in enumerate(prompts):
        mine = np.asarray(forward(ours, ids[row:row + 1], mask[row:row + 1]))[0, -len(prompt):]
        diff = np.abs(mine - torch_logits(theirs, prompt))
        worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.size
    positions = sum(map(len, prompts))
    return [Check(f"logits max |diff| ({positions} positions)", worst, TOLERANCES["logits"]),
            Check("logits mean |diff|", total / count)]


def compare_logprobs(ours, theirs, ids, mask, prompts, tokens, lengths) -> list[Check]:
    mine = np.asarray(_jitted()[1](ours, ids, mask, tokens[:, None]))[:, 0]
    diffs = []
    for row, prompt in enumerate(prompts):
        response = tokens[row, :lengths[row]]
        logits = torch_logits(theirs, [*prompt, *response])[len(prompt) - 1:-1]
        shifted = logits - logits.max(-1, keepdims=True)
        theirs_logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        theirs_logp = np.take_along_axis(theirs_logp, response[:, None], -1)[:, 0]
        diffs.append(np.abs(mine[row, :lengths[row]] - theirs_logp))
    diff = np.concatenate(diffs)
    return [Check(f"log-probs max |diff| ({diff.size} response tokens)", float(diff.max()),
                  TOLERANCES["logp"]),
            Check("log-probs mean |diff|", float(diff.mean()))]


def compare_greedy(theirs, prompts, tokens, lengths, max_new_tokens: int, eos_ids,
                   pad_id: int) -> list[Check]:
    agreed = total = identical = 0
    gaps = []  # per divergence: transformers' logit of its token minus that of ours
    for row, prompt in enumerate(prompts):
        expected, logits = torch_greedy(theirs, prompt, max_new_tokens, eos_ids, pad_id)
        mine = tokens[row, :lengths[row]]
        common = min(len(mine), len(expected))
        differ = np.flatnonzero(mine[:common] != expected[:common])
        prefix = int(differ[0]) if differ.size else common
        agreed, total = agreed + prefix, total + len(expected)
        if prefix == len(expected) == len(mine):
            identical += 1
        elif prefix < common:
            gaps.append(float(logits[prefix, expected[prefix]] - logits[prefix, mine[prefix]]))
        else:  # one side stopped where the other went on: EOS against a token, not a near-tie
            gaps.append(float("inf"))
    return [
        Check("greedy tokens agreeing (to 1st divergence)", agreed / total,
              text=f"{agreed}/{total} ({agreed / total:.3f})"),
        Check("greedy sequences identical", identical, text=f"{identical}/{len(prompts)}"),
        Check("greedy divergences", len(gaps)),
        Check("largest logit gap at a divergence", max(gaps, default=0.0),
              TOLERANCES["divergence_gap"]),
    ]


def token_reward_for(tokenizer, eos_ids):
    """Our jitted token reward for ``tokenizer`` (responses end at ``eos_ids``), or None for a
    tokenizer that is not byte-level BPE (then only the host reward is compared)."""
    from reczero_jax.rewards import TokenRewardFn

    try:
        return TokenRewardFn(tokenizer, eos_ids=eos_ids)
    except ValueError:
        return None


def host_rewards(texts: Sequence[str], truths: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(our host rewards, the authors' rewards) of response texts."""
    from reczero_jax.rewards import rating_reward

    pairs = list(zip(texts, truths, strict=True))
    return (np.array([rating_reward(text, y).reward for text, y in pairs]),
            np.array([authors_reward(text, y) for text, y in pairs]))


def compare_rewards(token_reward, decode, responses, truths) -> list[Check]:
    """Host, token (when ``token_reward`` is given) and authors' rewards of ``responses`` (token
    id lists) scored as the text ``decode`` gives."""
    host, authors = host_rewards([decode(list(r)) for r in responses], truths)
    mismatches = host != authors
    if token_reward is not None:
        lengths = np.array([len(r) for r in responses])
        ids = np.zeros((len(responses), lengths.max()), np.int32)  # right-padded
        for row, response in enumerate(responses):
            ids[row, :len(response)] = response
        device = np.asarray(token_reward(ids, lengths, np.array(truths, np.float32))[0])
        mismatches |= device != host
    which = "host, token, authors'" if token_reward is not None else "host, authors'; no token"
    return [Check(f"rewards compared ({which})", len(host),
                  text=f"{len(host)} (valid format: {int((authors > -1).sum())})"),
            Check("reward mismatches", int(mismatches.sum()), 0)]


def grpo_responses(greedy: Sequence[np.ndarray], probes: Sequence[Sequence[int]],
                   group_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(responses [B, G, R] right-padded with ``pad_id``, lengths [B, G]): for each prompt its
    greedy response, then the first G - 1 probe answers."""
    rows = [[list(response), *map(list, probes[:group_size - 1])] for response in greedy]
    lengths = np.array([[len(r) for r in row] for row in rows], np.int32)
    responses = np.full((*lengths.shape, lengths.max()), pad_id, np.int32)
    for b, row in enumerate(rows):
        for g, response in enumerate(row):
            responses[b, g, :len(response)] = response
    return responses, lengths


def compare_grpo(ours, theirs, decode, prompts, truths, greedy, probes, *, group_size: int,
                 pad_id: int) -> list[Check]:
    import jax.numpy as jnp
    import optax

    from reczero_jax import grpo
    from reczero_jax.config import GRPOConfig, OptimConfig
    from reczero_jax.data.padding import left_pad
    from reczero_jax.mesh import single_device_mesh
    from reczero_jax.train.step import Rollout, Trainer

    prompts, truths = prompts[:GRPO_PROMPTS], truths[:GRPO_PROMPTS]
    responses, lengths = grpo_responses(greedy[:GRPO_PROMPTS], probes, group_size, pad_id)
    length = responses.shape[-1]
    ids, mask = left_pad(prompts, max(map(len, prompts)), pad_id)
    flat = [responses[b, g, :lengths[b, g]] for b in range(len(prompts)) for g in range(group_size)]
    host, authors = host_rewards([decode(list(r)) for r in flat], np.repeat(truths, group_size))
    response_mask = (np.arange(length) < lengths[..., None]).astype(np.float32)

    advantages = grpo.group_advantages(jnp.asarray(host, jnp.float32), group_size)
    rollout = Rollout(
        prompt_ids=jnp.asarray(ids), prompt_mask=jnp.asarray(mask),
        responses=jnp.asarray(responses), response_mask=jnp.asarray(response_mask),
        old_logp=jnp.zeros(responses.shape, jnp.float32),
        rewards=jnp.asarray(host.reshape(-1, group_size), jnp.float32),
        advantages=advantages.reshape(-1, group_size),
        format_ok=jnp.asarray(host > -1).reshape(-1, group_size),
        ratings=jnp.zeros(lengths.shape, jnp.float32), lengths=jnp.asarray(lengths))
    trainer = Trainer(ours, single_device_mesh(), OptimConfig(),
                      GRPOConfig(group_size=group_size, max_new_tokens=length, clip_eps=CLIP_EPS),
                      gradients_only=True)
    loss, grads = trainer.grpo_loss_and_grads(rollout)
    loss, grad_norm = float(loss), float(optax.tree.norm(grads))

    their_advantages = torch_group_advantages(authors, group_size)
    their_loss, their_norm = torch_grpo(theirs, prompts, responses, response_mask, their_advantages)
    advantage_diff = float(np.abs(np.asarray(advantages).reshape(-1, group_size)
                                  - their_advantages.numpy()).max())
    return [
        Check(f"GRPO batch: {len(prompts)} prompts x {group_size} responses", 0,
              text=f"{int(response_mask.sum())} tokens"),
        Check("GRPO advantages max |diff|", advantage_diff, TOLERANCES["advantages"]),
        Check("GRPO loss ours / torch", loss, text=f"{loss:.6g} / {their_loss:.6g}"),
        Check("GRPO loss relative diff", relative_difference(loss, their_loss),
              TOLERANCES["loss"]),
        Check("GRPO grad norm ours / torch", grad_norm, text=f"{grad_norm:.6g} / {their_norm:.6g}"),
        Check("GRPO grad norm relative diff", relative_difference(grad_norm, their_norm),
              TOLERANCES["grad_norm"]),
    ]


# ----------------------------------------------------------------------------- driver


def compare(model_dir: str | Path, *, data: str | Path | None = None, split: str = "test",
            n: int = 8, max_new_tokens: int = 64, group_size: int = 4,
            max_prompt_tokens: int = 2048, layout: str = "chat", log=print) -> list[Check]:
    """Every check of the module docstring on the checkpoint ``model_dir``; ``log`` gets one
    line per stage (inputs, versions, timings)."""
    import jax
    import transformers

    try:
        import torch
    except ModuleNotFoundError:
        raise ValueError("reczero compare runs the transformers side on torch, which is not "
                         "installed: pip install -e '.[dev]' (torch==2.13.0, CPU build)") from None

    from reczero_jax.data.padding import default_pad_id, left_pad
    from reczero_jax.models.hf import check_model_dir, from_pretrained, stop_token_ids

    check_model_dir(model_dir, "--model")
    if n < 1 or max_new_tokens < 1 or group_size < 2:
        raise ValueError("need n >= 1, max_new_tokens >= 1, group_size >= 2")
    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with jax.default_matmul_precision("highest"):
        ours = from_pretrained(model_dir)
        prompts, truths, described = load_prompts(tokenizer, data, split, n, max_prompt_tokens,
                                                  layout)
        pad_id, eos_ids = default_pad_id(tokenizer), stop_token_ids(ours.config, tokenizer)
        log(f"inputs: {described}, {min(map(len, prompts))}..{max(map(len, prompts))} tokens; "
            f"greedy {max_new_tokens} new tokens; GRPO group {group_size}")
        log(f"reference: transformers {transformers.__version__}, torch {torch.__version__} (cpu, "
            f"fp32, eager attention); ours: jax {jax.__version__} ({jax.default_backend()}, fp32)")
        log(f"loaded in {time.perf_counter() - start:.1f} s")
        checks = timed("logits", log, compare_logits, ours, theirs, prompts, pad_id)
        ids, mask = left_pad(prompts, max(map(len, prompts)), pad_id)
        tokens, lengths = timed("our greedy generation", log, our_greedy, ours, ids, mask,
                                max_new_tokens, eos_ids, pad_id)
        checks += timed("log-probs", log, compare_logprobs, ours, theirs, ids, mask, prompts,
                        tokens, lengths)
        checks += timed("greedy (transformers)", log, compare_greedy, theirs, prompts, tokens,
                        lengths, max_new_tokens, eos_ids, pad_id)
        greedy = [tokens[row, :lengths[row]] for row in range(len(prompts))]
        probes = [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in PROBES]
        token_reward = token_reward_for(tokenizer, eos_ids)
        decode = tokenizer.decode if token_reward is None else token_reward.decode
        checks += timed("rewards", log, compare_rewards, token_reward, decode, greedy + probes,
                        truths + [y for _, y in PROBES])
        checks += timed("GRPO", log, compare_grpo, ours, theirs, decode, prompts, truths, greedy,
                        probes, group_size=group_size, pad_id=pad_id)
    log(f"compared in {time.perf_counter() - start:.1f} s")
    return checks


def timed(stage: str, log, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, logging its wall time (compilation included)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    log(f"  {stage}: {time.perf_counter() - start:.1f} s")
    return result


def register(subparsers) -> None:
    """Add ``reczero compare`` to the ``reczero`` parser."""
    parser = subparsers.add_parser(
        "compare",
        help="compare this project with transformers (torch) on one checkpoint",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, required=True,
                        help="Hugging Face checkpoint directory with its tokenizer files")
    parser.add_argument("--data", type=Path,
                        help="a prepared dataset (reczero data prepare --out DIR); default: "
                        "built-in prompts")
    parser.add_argument("--split", default="test", help="split of --data (default test)")
    parser.add_argument("--n", type=int, default=8, help="prompts compared (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--group-size", type=int, default=4, help="GRPO responses per prompt")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048,
                        help="prompt budget for --data samples (see reczero_jax.prompts)")
    parser.add_argument("--layout", choices=LAYOUTS, default="chat",
                        help="prompt layout for --data samples")
    parser.add_argument("--tolerance-scale", type=_non_negative, default=1.0,
                        help="multiply every tolerance (0: demand exact equality)")
    parser.set_defaults(func=run_compare)


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: demand exact equality); got {text}")
    return value


def run_compare(args: argparse.Namespace) -> int:
    """Print the table; 0 if every check holds, 1 if one fails, 2 for bad input."""
    try:
        checks = compare(args.model, data=args.data, split=args.split, n=args.n,
                         max_new_tokens=args.max_new_tokens, group_size=args.group_size,
                         max_prompt_tokens=args.max_prompt_tokens, layout=args.layout)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    checks = scale_tolerances(checks, args.tolerance_scale)
    status, result = verdict(checks)
    print(format_table(checks))
    print(result)
    return status
