"""Stop tokens: generation_config.json's EOS ids join config.json's and the tokenizer's
(``models.stop_token_ids``); the sampler stops at them; save_pretrained writes them back in a
generation_config.json that transformers reads."""

import dataclasses
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx
from transformers import GenerationConfig

from reczero_jax.models import Decoder, from_pretrained, save_pretrained
from reczero_jax.models.hf import read_config, stop_token_ids
from reczero_jax.sampling import generate
from tests import helpers

CONFIG_EOS = 3  # config.json's one EOS id (A)
TINY = dataclasses.replace(helpers.TINY, bos_token_id=1, eos_token_id=CONFIG_EOS)
PROMPT_IDS = np.arange(10, 30, dtype=np.int32).reshape(2, 10)
PROMPT_MASK = np.ones_like(PROMPT_IDS)
NEW_TOKENS = 12


def greedy(model, eos_ids=None):
    out = generate(model, PROMPT_IDS, PROMPT_MASK, num_samples=1, max_new_tokens=NEW_TOKENS,
                   temperature=0.0, eos_ids=eos_ids, rng=jax.random.key(0))
    return (np.asarray(out.tokens[:, 0]), np.asarray(out.lengths[:, 0]),
            np.asarray(out.finished_by_eos[:, 0]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A checkpoint whose config.json names EOS A and generation_config.json [A, B], with B the
    token greedy decoding of row 0 emits at step 4 (so generation must stop there), A never
    emitted."""
    path = tmp_path_factory.mktemp("two_eos")
    model = Decoder(TINY, rngs=nnx.Rngs(0))
    tokens, _, _ = greedy(model, eos_ids=())
    stop = int(tokens[0, 4])
    assert CONFIG_EOS not in tokens[:, :5] and stop != CONFIG_EOS
    save_pretrained(model, path)
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [CONFIG_EOS, stop], "do_sample": True}))
    return path, stop, tokens


def test_union_of_config_generation_config_and_tokenizer(model_dir):
    path, stop, _ = model_dir
    config = read_config(path)
    assert config.eos_token_ids == (CONFIG_EOS,)  # config.json alone
    assert config.generation_eos_token_ids == (CONFIG_EOS, stop)
    assert stop_token_ids(config) == tuple(sorted({CONFIG_EOS, stop}))
    tokenizer = SimpleNamespace(eos_token_id=7)
    assert stop_token_ids(config, tokenizer) == tuple(sorted({CONFIG_EOS, stop, 7}))
    assert stop_token_ids(config, SimpleNamespace(eos_token_id=None)) == stop_token_ids(config)
    # Without generation_config.json: config.json's ids only.
    assert stop_token_ids(TINY) == (CONFIG_EOS,)


def test_generation_stops_at_the_generation_config_eos(model_dir):
    path, stop, free = model_dir
    tokens, lengths, by_eos = greedy(from_pretrained(path))  # the default: the model's stop ids
    for row in range(len(tokens)):
        hits = np.flatnonzero(np.isin(free[row], [CONFIG_EOS, stop]))
        expected = hits[0] + 1 if hits.size else NEW_TOKENS
        assert lengths[row] == expected and by_eos[row] == bool(hits.size)
        np.testing.assert_array_equal(tokens[row, :expected], free[row, :expected])
    assert lengths[0] <= 5 and tokens[0, lengths[0] - 1] == stop


def test_save_load_round_trip_keeps_the_stop_ids(model_dir, tmp_path):
    path, stop, _ = model_dir
    model = from_pretrained(path)
    written = save_pretrained(model, tmp_path)
    assert tmp_path / "generation_config.json" in written
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == CONFIG_EOS
    reread = read_config(tmp_path)
    assert reread.eos_token_ids == (CONFIG_EOS,)
    assert stop_token_ids(reread) == stop_token_ids(model.config)
    # transformers reads the file we write
    generation = GenerationConfig.from_pretrained(tmp_path)
    assert sorted(generation.eos_token_id) == sorted({CONFIG_EOS, stop})
    assert generation.bos_token_id == 1


def test_save_pretrained_adds_the_tokenizers_eos(tmp_path, qwen2_tokenizer):
    save_pretrained(Decoder(TINY, rngs=nnx.Rngs(0)), tmp_path, tokenizer=qwen2_tokenizer)
    eos = GenerationConfig.from_pretrained(tmp_path).eos_token_id
    assert sorted(eos) == sorted({CONFIG_EOS, qwen2_tokenizer.eos_token_id})


def test_a_bad_generation_config_is_a_clear_error(tmp_path):
    save_pretrained(Decoder(TINY, rngs=nnx.Rngs(0)), tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|im_end|>"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be"):
        read_config(tmp_path)
