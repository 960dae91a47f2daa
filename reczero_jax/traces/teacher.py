"""Teacher traces with rationalisation (PAPER.md, RecOne; rules in ``traces.rules``).

For N samples, in two passes of batched sampling (``reczero_jax.sampling.generate``, one
answer per prompt):

1. every sample's prompt (``prompts.encode_prompt``) -> answer A1, judged;
2. every sample whose A1 was not kept: the same prompt with ``rules.RATING_HINT`` inserted at
   the end of the user turn -> answer A2, judged as a hinted answer.

Kept samples are written with the UNHINTED prompt's sample key only (the record holds no
prompt), ``"rationalised": True`` when the trace is A2. Prompts are encoded with
``max_prompt_tokens`` minus the hint's length, so both versions of a prompt fit the budget and
differ only by the hint. A batch short of ``batch_size`` is filled with repeats of its rows
(their answers are ignored), so each prompt-length bucket compiles once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from reczero_jax import prompts
from reczero_jax.data.padding import default_pad_id, left_pad
from reczero_jax.models.decoder import Decoder
from reczero_jax.models.hf import stop_token_ids
from reczero_jax.sampling import generate
from reczero_jax.traces.rules import (
    KEPT,
    OK,
    OUTCOMES,
    RATIONALISED,
    RETRY,
    hint_text,
    judge,
    trace_outcome,
)

FIELDS_END = "target_item_avg_rating: {avg:.2f}"


def _token_ids(text: str, tokenizer) -> list[int]:
    # Prompt texts already hold their template's special tokens (as in prompts.encode_prompt).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def with_hint(prompt_text: str, sample: dict[str, Any]) -> str:
    """``prompt_text`` (a rendered prompt of ``sample``) with the rating hint inserted right
    after its last field, i.e. at the end of the user turn, before the template's end-of-turn."""
    marker = FIELDS_END.format(avg=float(sample["item_avg_rating"]))
    at = prompt_text.rfind(marker)
    if at < 0:
        raise ValueError(f"the prompt of user {sample['user_id']!r}, item {sample['item_id']!r} "
                         f"has no {marker!r} field to put the hint after: was it built by "
                         "reczero_jax.prompts?")
    at += len(marker)
    return prompt_text[:at] + hint_text(sample["rating"]) + prompt_text[at:]


def hint_reserve(tokenizer) -> int:
    """Tokens kept free in the prompt budget for the hint (its longest form, plus 2 for merges
    at the seams)."""
    return max(len(_token_ids(hint_text(r), tokenizer)) for r in range(1, 6)) + 2


def sample_answers(model: Decoder, tokenizer, prompt_ids: Sequence[list[int]], *,
                   batch_size: int, max_new_tokens: int, temperature: float, rng: jax.Array,
                   eos_ids: Sequence[int], desc: str) -> list[str]:
    """One sampled answer per prompt (token id lists), decoded without its end-of-sequence
    token, in the order of ``prompt_ids``."""
    pad_id = default_pad_id(tokenizer)
    answers: list[str] = []
    for batch_number, start in enumerate(tqdm(range(0, len(prompt_ids), batch_size), desc=desc,
                                              unit="batch", leave=False)):
        rows = list(prompt_ids[start: start + batch_size])
        real = len(rows)
        rows += [rows[i % real] for i in range(batch_size - real)]
        ids, mask = left_pad(rows, max(len(r) for r in rows), pad_id)
        out = generate(model, ids, mask, num_samples=1, max_new_tokens=max_new_tokens,
                       temperature=temperature, eos_ids=eos_ids, pad_id=pad_id,
                       rng=jax.random.fold_in(rng, batch_number))
        tokens, lengths, by_eos = jax.device_get((out.tokens[:, 0], out.lengths[:, 0],
                                                  out.finished_by_eos[:, 0]))
        for row in range(real):
            end = int(lengths[row]) - int(by_eos[row])
            answers.append(tokenizer.decode(np.asarray(tokens[row, :end]),
                                            skip_special_tokens=False))
    return answers


def generate_traces(model: Decoder, tokenizer, samples: Sequence[dict[str, Any]], *,
                    max_prompt_tokens: int, max_new_tokens: int, batch_size: int = 8,
                    temperature: float = 0.6, seed: int = 0, layout: str = "chat",
                    teacher: str = "model") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Traces of ``samples`` by the teacher ``model`` with one rationalisation retry (module
    docstring). Returns (records in sample order, counts): counts hold ``samples``,
    ``first_try_format`` / ``first_try_wrong_rating`` (why first answers were retried),
    ``trimmed_prompts`` and one entry per outcome in ``rules.OUTCOMES``; the outcomes sum to
    ``samples``."""
    reserve = hint_reserve(tokenizer)
    if max_prompt_tokens <= reserve:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room for a prompt "
                         f"next to the {reserve}-token rating hint: raise it")
    encoded = [prompts.encode_prompt(s, tokenizer, max_prompt_tokens=max_prompt_tokens - reserve,
                                     layout=layout) for s in samples]
    eos_ids = stop_token_ids(model.config, tokenizer)
    rng = jax.random.key(seed)
    options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
                   eos_ids=eos_ids)

    first = sample_answers(model, tokenizer, [e.ids for e in encoded], rng=jax.random.fold_in(rng, 0),
                           desc="teacher", **options)
    first_verdicts = [judge(a, int(s["rating"])) for a, s in zip(first, samples, strict=True)]
    retry = [i for i, verdict in enumerate(first_verdicts) if trace_outcome(verdict) == RETRY]
    hinted_ids = [_token_ids(with_hint(encoded[i].text, samples[i]), tokenizer) for i in retry]
    second = dict(zip(retry, sample_answers(model, tokenizer, hinted_ids,
                                            rng=jax.random.fold_in(rng, 1),
                                            desc="teacher, hinted", **options), strict=True))

    counts = Counter({"samples": len(samples), **dict.fromkeys(OUTCOMES, 0),
                      "first_try_format": 0, "first_try_wrong_rating": 0,
                      "trimmed_prompts": sum(e.trimmed for e in encoded)})
    counts.update(f"first_try_{v}" for v in first_verdicts if v != OK)
    records = []
    for i, sample in enumerate(samples):
        verdict = None if i not in second else judge(second[i], int(sample["rating"]), hinted=True)
        outcome = trace_outcome(first_verdicts[i], verdict)
        counts[outcome] += 1
        if outcome in (KEPT, RATIONALISED):
            records.append({"user_id": str(sample["user_id"]), "item_id": str(sample["item_id"]),
                            "response": first[i] if outcome == KEPT else second[i],
                            "rating": int(sample["rating"]), "rationalised": outcome == RATIONALISED,
                            "teacher": teacher})
    return records, dict(counts)
