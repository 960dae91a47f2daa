"""Fixtures shared by the run-level tests (loop, resume, export): a tiny model directory and
a small prepared slice of MovieLens-100k. Import them into a test module to use them."""

import pytest
from flax import nnx

from reczero_jax.data.samples import SampleConfig
from reczero_jax.data.tfds_builder import SourceConfig, prepare
from reczero_jax.models import Decoder, ModelConfig, save_pretrained


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A random 2-layer Llama with SmolLM2's vocabulary and tokenizer, as an HF directory."""
    config = ModelConfig(model_type="llama", vocab_size=len(smollm2_tokenizer), hidden_size=32,
                         intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, tie_word_embeddings=True,
                         eos_token_id=smollm2_tokenizer.eos_token_id)
    out = tmp_path_factory.mktemp("tiny_llama")
    save_pretrained(Decoder(config, rngs=nnx.Rngs(0)), out, tokenizer=smollm2_tokenizer)
    return out


@pytest.fixture(scope="module")
def small_ml100k(tmp_path_factory):
    samples = SampleConfig(max_samples=(("train", 8), ("validation", 2), ("test", 4)))
    out = tmp_path_factory.mktemp("ml100k")
    prepare(SourceConfig.for_dataset("movielens-100k", samples=samples), out)
    return out
