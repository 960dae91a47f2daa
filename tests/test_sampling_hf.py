"""Greedy sampling equals transformers' greedy ``generate`` token for token.

Checkpoints: tiny random Qwen2 and Llama models written by torch, and SmolLM2-135M-Instruct.
Our sampler runs a left-padded batch; transformers runs each row alone (no padding), so the
check also covers padding, positions from the mask and the bucketed prompt length.
EOS is handled the same on both sides: both stop at the checkpoint's EOS ids, ours pads after.

Ties: greedy picks the larger of two logits, and fp32 sums in a different order differ by
~1e-6, so a near-tie could let either side pick either token. Each check first asserts that
transformers' top-2 logit gap stays above MIN_TOP2_GAP at every step, so no tie decides any
token compared here (an assertion failure there means: choose another prompt or seed).
"""

import jax
import numpy as np
import pytest
import torch
import transformers

from reczero_jax.data.padding import left_pad
from reczero_jax.models.hf import from_pretrained
from reczero_jax.sampling import generate
from tests.helpers import HF_TINY

NEW_TOKENS = 20
MIN_TOP2_GAP = 1e-3
TINY = {**HF_TINY, "vocab_size": 256, "num_hidden_layers": 2}
TINY_CASES = {
    "qwen2": transformers.Qwen2Config(**TINY, tie_word_embeddings=False),
    "llama": transformers.LlamaConfig(**TINY, tie_word_embeddings=True),
}
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about a cat who watches the rain fall on a quiet city street at night.",
    "Rate the movie Toy Story (1995) from 1 to 5 and explain briefly.",
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """torch on one thread: on this shared 2-core machine, two OpenMP threads that wait for
    each other at every small op made transformers' token-by-token decoding ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def transformers_greedy(model, prompt: list[int], eos_ids: tuple[int, ...]):
    """One unpadded prompt -> (greedy tokens [<= NEW_TOKENS], top-2 logit gap per step)."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                           dtype=torch.long),
                         do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=list(eos_ids),
                         pad_token_id=eos_ids[0], output_logits=True,
                         return_dict_in_generate=True)
    top2 = torch.stack(out.logits)[:, 0].float().topk(2, dim=-1).values
    return out.sequences[0, len(prompt):].numpy(), (top2[:, 0] - top2[:, 1]).numpy()


def assert_greedy_matches_transformers(ours, theirs, prompts: list[list[int]], pad_id: int):
    eos_ids = ours.config.eos_token_ids
    ids, mask = left_pad(prompts, max(map(len, prompts)), pad_id)
    out = generate(ours, ids, mask, num_samples=2, max_new_tokens=NEW_TOKENS, temperature=0.0,
                   eos_ids=eos_ids, pad_id=pad_id, rng=jax.random.key(0))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    np.testing.assert_array_equal(tokens[:, 0], tokens[:, 1])  # greedy: samples agree
    for row, prompt in enumerate(prompts):
        expected, gaps = transformers_greedy(theirs, prompt, eos_ids)
        assert gaps.min() > MIN_TOP2_GAP, (
            f"row {row}: transformers' top-2 logits are {gaps.min():.2g} apart at step "
            f"{gaps.argmin()}, a near-tie; the comparison would be decided by rounding")
        n = len(expected)
        np.testing.assert_array_equal(tokens[row, 0, :n], expected, err_msg=f"row {row}")
        assert lengths[row, 0] == n
        assert bool(out.finished_by_eos[row, 0]) == (n < NEW_TOKENS or expected[-1] in eos_ids)
        assert (tokens[row, 0, n:] == pad_id).all()


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_random_checkpoint_greedy_equals_transformers(case, tmp_path):
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(
        TINY_CASES[case], attn_implementation="eager", dtype=torch.float32).eval()
    # transformers initialises weights with std 0.02, zero biases and unit norms: near-uniform
    # logits, full of near-ties. Spread every parameter so the greedy choice is clear.
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            param.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, TINY["vocab_size"], length).tolist() for length in (7, 19, 12)]
    assert_greedy_matches_transformers(ours, theirs, prompts, pad_id=0)


def test_smollm2_greedy_equals_transformers_on_chat_prompts(smollm2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True)["input_ids"]
               for text in CHAT_PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts), "prompts should need left padding"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, attn_implementation="eager", dtype=torch.float32).eval()
    ours = from_pretrained(smollm2_dir)
    assert_greedy_matches_transformers(ours, theirs, prompts, pad_id=tokenizer.pad_token_id or 0)
