"""RecOne's warm-start SFT data: (prompt, response) records -> right-padded token batches.

    examples = sft_examples(records, responses, tokenizer, max_prompt_tokens=..., layout=...,
                            max_response_tokens=...)
    ids, mask, loss_mask = sft_batch(examples, index, batch_size, length, pad_id, seed)

An example is ``(prompt ids + response ids + [eos], prompt length)``: the prompt is encoded by
``prompts.encode_prompt`` exactly as the rollout pipeline encodes it, so SFT and GRPO see the
same prompt. A response that does not fit ``max_response_tokens`` (its eos included) is dropped
and counted, never cut: a cut trace would teach an answer without its closing ``</rate>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from reczero_jax import prompts
from reczero_jax.data.padding import right_pad


def sft_examples(records: Sequence[dict], responses: Mapping[int, str], tokenizer, *,
                 max_prompt_tokens: int, layout: str, max_response_tokens: int
                 ) -> list[tuple[list[int], int]]:
    """(prompt + response + eos ids, prompt length) for each ``responses`` entry (record index
    -> response text), in record order; responses longer than ``max_response_tokens`` with the
    eos are dropped and the count printed. Raises ValueError when no example is left."""
    examples, too_long = [], 0
    for index in sorted(responses):
        answer = tokenizer.encode(responses[index], add_special_tokens=False)
        answer = [*answer, tokenizer.eos_token_id]
        if len(answer) > max_response_tokens:
            too_long += 1
            continue
        prompt = prompts.encode_prompt(records[index], tokenizer,
                                       max_prompt_tokens=max_prompt_tokens, layout=layout).ids
        examples.append((prompt + answer, len(prompt)))
    if too_long:
        print(f"[reczero] SFT: dropped {too_long} of {len(responses)} traces longer than "
              f"sft.max_response_tokens={max_response_tokens} (end-of-turn token included)")
    if not examples:
        raise ValueError(
            "no SFT examples: no trace matched a training sample" if not responses else
            f"no SFT examples: all {len(responses)} traces are longer than "
            f"sft.max_response_tokens={max_response_tokens}; raise it")
    return examples


def sft_batch(examples: Sequence[tuple[list[int], int]], index: int, batch_size: int,
              length: int, pad_id: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch ``index``: right-padded [B, length] int32 ids, attention mask and loss mask (1 on
    the response tokens) of B distinct examples drawn from the generator seeded by
    (seed, index) alone, so any batch is reproduced from its index (exact resume). One length:
    one compilation."""
    rng = np.random.default_rng([seed, index])
    chosen = [examples[i] for i in rng.permutation(len(examples))[:batch_size]]
    ids, mask = right_pad([tokens for tokens, _ in chosen], length, pad_id)
    responses = [[0] * prompt_length + [1] * (len(tokens) - prompt_length)
                 for tokens, prompt_length in chosen]
    loss_mask, _ = right_pad(responses, length, 0)
    return ids, mask, loss_mask
