"""Log-probabilities of sampled responses under the policy: the training forward.

Shapes: B prompts, G responses per prompt, P prompt length (left padded), R response length,
V vocab.

The shared-prompt forward runs each prompt once, then the G responses of its group against
the prompt's keys and values (``Decoder.forward(..., prefix=...)``); gradients flow back into
the prompt pass through those keys and values. It equals the naive forward, which repeats the
prompt G times and runs each prompt + response sequence on its own, and does 1/G of the
prompt work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reczero_jax.grpo import token_logprobs
from reczero_jax.models.decoder import (
    Decoder,
    KVCache,
    Prefix,
    causal_mask,
    positions_from_mask,
)


def response_logits(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array,
                    responses: jax.Array, *, shared_prompt: bool = True) -> jax.Array:
    """Logits [B, G, R, V] predicting each response token, from the prompt and earlier tokens.

    prompt_ids, prompt_mask: [B, P]; responses: [B, G, R]. Tokens after a response's end may
    hold anything: they only influence logits at later (masked) positions.
    """
    batch, group, length = responses.shape
    prompt_lengths = prompt_mask.astype(jnp.int32).sum(axis=-1)
    if not shared_prompt:
        ids = jnp.concatenate([jnp.repeat(prompt_ids, group, axis=0),
                               responses.reshape(batch * group, length)], axis=1)
        mask = jnp.concatenate([jnp.repeat(prompt_mask, group, axis=0),
                                jnp.ones((batch * group, length), prompt_mask.dtype)], axis=1)
        logits = model(ids, attention_mask=mask)[:, prompt_ids.shape[1] - 1:-1]
        return logits.reshape(batch, group, length, -1)
    prompt_hidden, kv = model.forward(prompt_ids[:, None],
                                      positions_from_mask(prompt_mask)[:, None],
                                      causal_mask(prompt_mask)[:, None], return_kv=True)
    prefix = Prefix(KVCache(kv.k[:, :, 0], kv.v[:, :, 0]), prompt_mask.astype(bool))
    first = model.logits(prompt_hidden[:, 0, -1])  # [B, V]: predicts every response's token 0
    positions = prompt_lengths[:, None, None] + jnp.arange(length - 1)
    positions = jnp.broadcast_to(positions, (batch, group, length - 1))
    self_mask = jnp.broadcast_to(causal_mask(jnp.ones((length - 1,), bool)),
                                 (batch, group, length - 1, length - 1))
    hidden, _ = model.forward(responses[:, :, :-1], positions, self_mask, prefix=prefix)
    first = jnp.broadcast_to(first[:, None, None], (batch, group, 1, first.shape[-1]))
    return jnp.concatenate([first, model.logits(hidden)], axis=2)


def response_logprobs(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array,
                      responses: jax.Array, *, temperature: float = 1.0,
                      shared_prompt: bool = True) -> jax.Array:
    """log softmax(logits / temperature) at each response token: [B, G, R] float32."""
    logits = response_logits(model, prompt_ids, prompt_mask, responses,
                             shared_prompt=shared_prompt)
    return token_logprobs(logits, responses, temperature)
