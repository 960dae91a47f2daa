"""Log-probabilities of sampled responses under the policy: the training forward.

Shapes: B prompts, G responses per prompt, P prompt length (left padded), R response length,
V vocab, d model width, c positions per log-prob chunk.

The shared-prompt forward runs each prompt once, then the G responses of its group against
the prompt's keys and values (``Decoder.forward(..., prefix=...)``); gradients flow back into
the prompt pass through those keys and values. It equals the naive forward, which repeats the
prompt G times and runs each prompt + response sequence on its own, and does 1/G of the
prompt work.

Log-probs and entropies come from the final hidden states through ``token_stats``, which
never needs the [B, G, R, V] float32 logits when ``chunk`` > 0: the positions go through the
LM head c at a time (``lax.scan``), each chunk's log-softmax keeps only the chosen token's
log-prob and the entropy, and the body is rematerialised (``jax.checkpoint``), so the backward
pass recomputes one chunk's logits from its hidden states instead of keeping them all.
Live logits: [B, G, c, V] instead of [B, G, R, V].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from reczero_jax.grpo import token_entropy, token_logprobs
from reczero_jax.mesh import constrain
from reczero_jax.models.decoder import (
    Decoder,
    KVCache,
    Prefix,
    causal_mask,
    positions_from_mask,
)


class TokenStats(NamedTuple):
    """Per position, float32: log softmax(logits / temperature) at the target token, and the
    entropy of softmax(logits / temperature)."""

    logp: jax.Array
    entropy: jax.Array


def response_hidden(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array,
                    responses: jax.Array, *, shared_prompt: bool = True) -> jax.Array:
    """Final-normed hidden states [B, G, R, d] whose LM head predicts each response token,
    from the prompt and earlier tokens (position 0: the prompt's last position).

    prompt_ids, prompt_mask: [B, P]; responses: [B, G, R]. Tokens after a response's end may
    hold anything: they only influence later (masked) positions.
    """
    batch, group, length = responses.shape
    prompt_lengths = prompt_mask.astype(jnp.int32).sum(axis=-1)
    if not shared_prompt:
        ids = jnp.concatenate([jnp.repeat(prompt_ids, group, axis=0),
                               responses.reshape(batch * group, length)], axis=1)
        mask = jnp.concatenate([jnp.repeat(prompt_mask, group, axis=0),
                                jnp.ones((batch * group, length), prompt_mask.dtype)], axis=1)
        hidden = sequence_hidden(model, ids, mask)[:, prompt_ids.shape[1] - 1:-1]
        return hidden.reshape(batch, group, length, -1)
    prompt_hidden, kv = model.forward(prompt_ids[:, None],
                                      positions_from_mask(prompt_mask)[:, None],
                                      causal_mask(prompt_mask)[:, None], return_kv=True)
    prefix = Prefix(KVCache(kv.k[:, :, 0], kv.v[:, :, 0]), prompt_mask.astype(bool))
    positions = prompt_lengths[:, None, None] + jnp.arange(length - 1)
    positions = jnp.broadcast_to(positions, (batch, group, length - 1))
    self_mask = jnp.broadcast_to(causal_mask(jnp.ones((length - 1,), bool)),
                                 (batch, group, length - 1, length - 1))
    hidden, _ = model.forward(responses[:, :, :-1], positions, self_mask, prefix=prefix)
    first = prompt_hidden[:, :, -1:]  # [B, 1, 1, d]: predicts every response's token 0
    first = jnp.broadcast_to(first, (batch, group, 1, hidden.shape[-1]))
    # Keep the batch sharding through the concatenation: without it XLA may split the LM
    # head's contraction over the model width instead and all-reduce whole logits.
    return constrain(jnp.concatenate([first.astype(hidden.dtype), hidden], axis=2),
                     model.mesh, ("batch", None, None, None), model.axis_rules)


def sequence_hidden(model: Decoder, input_ids: jax.Array, attention_mask: jax.Array
                    ) -> jax.Array:
    """The plain causal forward's final-normed hidden states [B, T, d] (``Decoder.__call__``
    before the LM head). input_ids, attention_mask: [B, T], left padding."""
    hidden, _ = model.forward(input_ids[:, None], positions_from_mask(attention_mask)[:, None],
                              causal_mask(attention_mask)[:, None])
    return hidden[:, 0]


def token_stats(model: Decoder, hidden: jax.Array, targets: jax.Array, *,
                temperature: float = 1.0, chunk: int = 0) -> TokenStats:
    """Log-prob of ``targets`` [..., T] and entropy at each position, from ``hidden``
    [..., T, d] through the model's LM head: ``grpo.token_logprobs`` and ``grpo.token_entropy``
    of its logits.

    ``chunk`` = 0 builds the [..., T, V] float32 logits at once. ``chunk`` = c > 0 scans
    ceil(T / c) chunks of c positions (T padded with positions that are dropped), each a
    ``jax.checkpoint``: the forward keeps only each chunk's hidden states, the backward
    recomputes the chunk's logits. Same values either way (per position, the same maths).
    """
    if chunk < 0:
        raise ValueError(f"grpo.logprob_chunk must be >= 0 (0: unchunked); got {chunk}")

    def stats(h, t):
        logits = model.logits(h)
        return TokenStats(token_logprobs(logits, t, temperature),
                          token_entropy(logits, temperature))

    length = targets.shape[-1]
    if chunk == 0 or chunk >= length:
        return stats(hidden, targets)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    lead = targets.shape[:-1]
    hidden = jnp.pad(hidden, [(0, 0)] * len(lead) + [(0, pad), (0, 0)])
    targets = jnp.pad(targets, [(0, 0)] * len(lead) + [(0, pad)])
    # [..., n c, d] -> [n, ..., c, d]: the scan runs over the chunk axis.
    hidden = jnp.moveaxis(hidden.reshape(*lead, chunks, chunk, hidden.shape[-1]), -3, 0)
    targets = jnp.moveaxis(targets.reshape(*lead, chunks, chunk), -2, 0)
    body = jax.checkpoint(stats, prevent_cse=False)
    _, out = jax.lax.scan(lambda carry, xs: (carry, body(*xs)), None, (hidden, targets))
    return TokenStats(*(jnp.moveaxis(x, 0, -2).reshape(*lead, chunks * chunk)[..., :length]
                        for x in out))


def response_logits(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array,
                    responses: jax.Array, *, shared_prompt: bool = True) -> jax.Array:
    """Logits [B, G, R, V] (float32) predicting each response token (``response_hidden``
    through the LM head): the whole tensor, for tests and tools; training uses
    ``token_stats``."""
    return model.logits(response_hidden(model, prompt_ids, prompt_mask, responses,
                                        shared_prompt=shared_prompt))


def response_logprobs(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array,
                      responses: jax.Array, *, temperature: float = 1.0,
                      shared_prompt: bool = True, chunk: int = 0) -> jax.Array:
    """log softmax(logits / temperature) at each response token: [B, G, R] float32."""
    hidden = response_hidden(model, prompt_ids, prompt_mask, responses,
                             shared_prompt=shared_prompt)
    return token_stats(model, hidden, responses, temperature=temperature, chunk=chunk).logp
