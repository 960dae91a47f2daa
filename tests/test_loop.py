"""End to end: each program on a tiny model and a small slice of MovieLens-100k."""

import json

import pytest
from flax import nnx

from reczero_jax.config import load_config
from reczero_jax.data.samples import SampleConfig
from reczero_jax.data.tfds_builder import SourceConfig, prepare
from reczero_jax.models import Decoder, ModelConfig, from_pretrained, save_pretrained
from reczero_jax.train.loop import run


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


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["recone", "reczero", "sft"])
def test_program_writes_its_run_directory(algorithm, tiny_model_dir, small_ml100k, tmp_path):
    run_dir = tmp_path / algorithm
    config = load_config(None, [
        f"algorithm={algorithm}", f"run_dir={run_dir}", f"model.path={tiny_model_dir}",
        f"data.dir={small_ml100k}", "data.max_prompt_tokens=512", "data.eval_samples=2",
        "sft.steps=1", "sft.batch_size=2", "sft.max_response_tokens=32", "grpo.group_size=2",
        "grpo.max_new_tokens=8", "train.steps=1", "train.prompts_per_step=2",
        "train.eval_max_new_tokens=8", "train.eval_batch_size=2"])
    results = run(config)

    expected = {"recone": ["zero-shot", "after SFT", "after SFT + GRPO"],
                "reczero": ["zero-shot", "after GRPO"], "sft": ["zero-shot", "after SFT"]}
    assert list(results) == expected[algorithm]
    assert json.loads((run_dir / "eval.json").read_text()).keys() == results.keys()
    for metrics in results.values():
        assert metrics["n"] == 2 and 0.0 <= metrics["parse_rate"] <= 1.0
        assert metrics["mae"] >= 0 and metrics["tokens_per_request"] <= 8
    phases = [json.loads(line)["phase"] for line in (run_dir / "metrics.jsonl").open()]
    assert ("grpo" in phases) == (algorithm != "sft")
    assert ("sft" in phases) == (algorithm != "reczero")
    assert (run_dir / "eval.md").read_text().startswith("| name |")
    assert len((run_dir / "eval_samples.jsonl").read_text().splitlines()) == 2 * len(results)
    assert load_config(run_dir / "config.yaml") == config
    reloaded = from_pretrained(run_dir / "export")
    assert reloaded.config.vocab_size == config_vocab(tiny_model_dir)


def config_vocab(model_dir):
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]
