"""End to end: each program on a tiny model and a small slice of MovieLens-100k."""

import json

import pytest

from reczero_jax.cli import main
from reczero_jax.config import load_config
from reczero_jax.models import from_pretrained
from reczero_jax.train.checkpoint import Checkpointer
from reczero_jax.train.loop import plan_phases, run
from tests import fixtures_run

# The shared fixtures, by name (pytest finds them as module attributes).
small_ml100k = fixtures_run.small_ml100k
tiny_model_dir = fixtures_run.tiny_model_dir


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["recone", "reczero", "sft"])
def test_program_writes_its_run_directory(algorithm, tiny_model_dir, small_ml100k, tmp_path):
    run_dir = tmp_path / algorithm
    # One program keeps its checkpoints outside the run directory (as in a gs:// bucket).
    checkpoint_dir = tmp_path / "elsewhere" if algorithm == "sft" else run_dir / "checkpoints"
    config = load_config(None, [f"train.checkpoint_dir={checkpoint_dir}",
        f"algorithm={algorithm}", f"run_dir={run_dir}", f"model.path={tiny_model_dir}",
        f"data.dir={small_ml100k}", "data.max_prompt_tokens=512", "data.eval_samples=2",
        "sft.steps=1", "sft.batch_size=2", "sft.max_response_tokens=256", "grpo.group_size=2",
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
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    plotted = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert plotted == {"eval.png"} | {f"{phase}.png" for phase in ("sft", "grpo")
                                       if phase in phases}
    assert "![eval](plots/eval.png)" in (run_dir / "eval.md").read_text()
    # Each phase's last step is checkpointed (steps numbered across phases).
    last = plan_phases(config)[-1]
    assert (run_dir / "checkpoints").exists() == (algorithm != "sft")
    restored = Checkpointer(checkpoint_dir).restore()
    assert restored.step == last.offset + last.steps == (2 if algorithm == "recone" else 1)
    assert restored.progress["phase"] == last.name
    reloaded = from_pretrained(run_dir / "export")
    assert reloaded.config.vocab_size == config_vocab(tiny_model_dir)
    if algorithm == "reczero":
        # `reczero eval --run` scores the run's export on its data, next to the baselines.
        assert main(["eval", "--run", str(run_dir), "--n", "2", "--batch-size", "2"]) == 0
        report = json.loads((run_dir / "eval_test.json").read_text())
        assert report["metrics"]["n"] == 2 and report["metrics"]["tokens_per_request"] <= 8
        assert {"global_mean", "biased_mf"} <= report["baselines"].keys()


def config_vocab(model_dir):
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]
