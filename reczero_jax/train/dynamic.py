"""DAPO's dynamic sampling ("filter groups", ``grpo.dynamic_sampling``): a GRPO step samples
round after round of prompts until ``train.prompts_per_step`` of its groups are informative
(``grpo.informative_groups``: their rewards, or format flags, not all equal) or
``grpo.max_sampling_rounds`` rounds ran, then updates on exactly ``prompts_per_step`` groups:
the informative ones first in the order drawn, filled up, when rounds ran out, with dropped
ones (``grpo.filled_selection``). A group of equal rewards has zero advantage, so a filled-up
group moves the policy by no policy-gradient term (by the ``format`` metric, a group of equal
format flags may still have reward spread, and then does); the batch keeps its shape, so the
jitted update is not compiled again and the batch still splits over the mesh.

Shapes: B_k prompts in round k, G samples per prompt, P_k round k's prompt length (a
``data.padding.PROMPT_BUCKETS`` length, so rounds may differ), R = ``grpo.max_new_tokens``.

Several processes: the rewards are gathered to every process (``distributed.to_host``), so
each computes the same selection; the rows are then gathered on device from the global arrays
(``_gathered``), no batch passes through one host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reczero_jax import distributed, grpo
from reczero_jax.config import GRPOConfig
from reczero_jax.train.step import Rollout

# A round's scored rollout (B_k groups) and its prompts' true ratings [B_k].
Round = tuple[Rollout, jax.Array]


class Sampled(NamedTuple):
    """The batch a step updates on and how it was drawn.

    ``scored``: [B, G, ...] (prompts [B, max_k P_k]); ``truths``: [B], its prompts' ratings;
    ``counts``: ``groups_kept`` (informative groups in the batch), ``groups_dropped`` (the
    sampled groups not kept: zero spread, or informative beyond the B needed),
    ``sampling_rounds`` and ``prompts_consumed`` (sum_k B_k = kept + dropped).
    """

    scored: Rollout
    truths: jax.Array
    counts: dict[str, int]


def group_values(scored: Rollout, metric: str) -> jax.Array:
    """The per-sample values [B, G] whose spread makes a group informative: ``reward`` (the
    rewards) or ``format`` (the format flags), ``config.SAMPLING_METRICS``."""
    return scored.rewards if metric == "reward" else scored.format_ok


def sample_informative(sample_round: Callable[[int], Round], prompts: int, config: GRPOConfig,
                       pad_id: int) -> Sampled:
    """Rounds ``sample_round(0)``, ``sample_round(1)``, ... (each draws fresh prompts, samples
    and scores them) until ``prompts`` informative groups (by ``config.dynamic_sampling_metric``)
    were drawn or ``config.max_sampling_rounds`` rounds ran; the ``prompts`` groups to update on
    (``grpo.filled_selection``), their prompts left-padded with ``pad_id`` to the longest
    round's."""
    rounds, flags = [], []
    for round_index in range(config.max_sampling_rounds):
        rounds.append(sample_round(round_index))
        values = group_values(rounds[-1][0], config.dynamic_sampling_metric)
        flags.append(grpo.informative_groups(distributed.to_host(values)))
        if sum(int(f.sum()) for f in flags) >= prompts:
            break
    informative = np.concatenate(flags)
    rows = grpo.filled_selection(informative, prompts)
    kept = int(informative[rows].sum())
    scored, truths = _gathered(rounds, rows, pad_id)
    return Sampled(scored, truths, {
        "groups_kept": kept, "groups_dropped": len(informative) - kept,
        "sampling_rounds": len(rounds), "prompts_consumed": len(informative)})


def left_padded_prompts(scored: Rollout, length: int, pad_id: int) -> Rollout:
    """``scored`` with its prompts [B, P] left-padded to [B, length] (ids ``pad_id``, mask 0):
    the prompt stays right-aligned, where generation continued, and positions come from the
    mask (``policy``), so the update computes the same log-probs."""
    pad = ((0, 0), (length - scored.prompt_ids.shape[1], 0))
    return scored._replace(prompt_ids=jnp.pad(scored.prompt_ids, pad, constant_values=pad_id),
                           prompt_mask=jnp.pad(scored.prompt_mask, pad))


@functools.partial(jax.jit, static_argnums=2)
def _gathered(rounds: Sequence[Round], rows, pad_id: int) -> Round:
    """Rows ``rows`` [B] of the rounds concatenated along the prompt axis, their prompts first
    left-padded to the longest round's; on device (a collective of global arrays)."""
    longest = max(scored.prompt_ids.shape[1] for scored, _ in rounds)
    rounds = [(left_padded_prompts(scored, longest, pad_id), truths) for scored, truths in rounds]
    return jax.tree.map(lambda *parts: jnp.concatenate(parts)[rows], *rounds)
