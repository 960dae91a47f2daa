"""End to end: each program on a tiny model and a small slice of MovieLens-100k."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reczero_jax import evaluate as evaluation
from reczero_jax import grpo
from reczero_jax.cli import main
from reczero_jax.config import load_config, save_config
from reczero_jax.models import from_pretrained
from reczero_jax.train import loop
from reczero_jax.train.checkpoint import Checkpointer
from reczero_jax.train.export import restore_model
from reczero_jax.train.loop import plan_phases, run


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


def tiny_reczero(run_dir, model_dir, data_dir, *extra) -> list[str]:
    """A RecZero run of a few steps on the tiny model: overrides for load_config."""
    return [f"run_dir={run_dir}", f"model.path={model_dir}", f"data.dir={data_dir}",
            "data.max_prompt_tokens=512", "data.eval_samples=2", "grpo.group_size=2",
            "grpo.max_new_tokens=8", "train.prompts_per_step=2", "train.eval_max_new_tokens=8",
            "train.eval_batch_size=2", *extra]


@pytest.mark.slow
def test_kl_run_with_another_layout_and_reward_is_scored_alike_by_eval_run(
        tiny_model_dir, small_ml100k, tmp_path, monkeypatch):
    """`reczero train ... grpo.kl_coef=0.001` runs: the KL reference is a frozen copy of the
    initial weights while the policy moves (an entropy bonus gives the random model's
    all-equal rewards a gradient). Its data.layout and train.reward reach `reczero eval
    --run`, which scores the exported policy as the loop's last evaluation did."""
    trainers, evaluations = [], []
    evaluate = evaluation.evaluate

    def recorded_evaluate(model, tokenizer, records, *, reward_fn, desc, **settings):
        evaluations.append({**settings, "reward": reward_fn.variant.name})
        return evaluate(model, tokenizer, records, reward_fn=reward_fn, desc=desc, **settings)

    monkeypatch.setattr(evaluation, "evaluate", recorded_evaluate)

    class RecordedTrainer(loop.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(loop, "Trainer", RecordedTrainer)
    run_dir = tmp_path / "run"
    config = tmp_path / "kl.yaml"
    save_config(load_config(None, tiny_reczero(
        run_dir, tiny_model_dir, small_ml100k, "train.steps=2", "grpo.kl_coef=0.001",
        "grpo.entropy_coef=0.01", "optim.learning_rate=1e-3", "data.layout=user",
        "train.reward=answer_only")), config)
    assert main(["train", str(config)]) == 0

    (trainer,) = trainers
    initial = jax.tree.leaves(nnx.state(from_pretrained(tiny_model_dir)))
    moved = []
    for reference, policy, start in zip(jax.tree.leaves(trainer.ref_params),
                                        jax.tree.leaves(trainer.params), initial, strict=True):
        np.testing.assert_array_equal(np.asarray(reference), np.asarray(start))
        moved.append(np.abs(np.asarray(policy) - np.asarray(start)).max() > 1e-5)
    assert all(moved)
    kl = [row["kl"] for row in map(json.loads, (run_dir / "metrics.jsonl").open())
          if row["phase"] == "grpo"]
    assert len(kl) == 2 and kl[1] > 0 and np.isfinite(kl).all()

    assert main(["eval", "--run", str(run_dir), "--n", "2", "--no-baselines"]) == 0
    *in_training, after = evaluations
    assert after == in_training[-1]  # the settings of the loop's last evaluation
    assert (after["layout"], after["reward"], after["batch_size"]) == ("user", "answer_only", 2)
    report = json.loads((run_dir / "eval_test.json").read_text())
    looped = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").open()]
    looped = [row for row in looped if row.pop("model") == "after GRPO"]
    assert [row["response"] for row in report["rows"]] == [row["response"] for row in looped]
    final = json.loads((run_dir / "eval.json").read_text())["after GRPO"]
    for name in ("mae", "rmse", "parse_rate", "format_rate", "tokens_per_request"):
        assert report["metrics"][name] == pytest.approx(final[name], nan_ok=True), name


@pytest.mark.slow
def test_best_validated_step_is_saved_when_it_happens_and_exported(
        tiny_model_dir, small_ml100k, tmp_path, monkeypatch):
    """Validation every step, checkpoints (by cadence) never: the step of lowest validation
    MAE is saved anyway, kept, evaluated next to the last step's and exported. The MAEs are
    scripted (a random model's would all tie); the rest is the real loop."""
    scripted = iter([0.9, 0.5, 0.7])  # steps 1, 2, 3: step 2 is the best
    evaluate = loop.Session._evaluate

    def scripted_evaluate(self, model, records, desc):
        report = evaluate(self, model, records, desc)
        if desc == "validation":
            report["metrics"]["mae"] = next(scripted)
        return report

    monkeypatch.setattr(loop.Session, "_evaluate", scripted_evaluate)
    run_dir = tmp_path / "run"
    config = load_config(None, tiny_reczero(
        run_dir, tiny_model_dir, small_ml100k, "train.steps=3", "train.eval_every=1",
        "train.checkpoint_every=50", "train.keep_checkpoints=1", "train.final_policy=best_val",
        "optim.learning_rate=1e-3", "grpo.entropy_coef=0.01"))
    results = run(config)

    assert list(results) == ["zero-shot", "after GRPO", "after GRPO, best validation (step 2)"]
    assert "after GRPO, best validation (step 2)" in (run_dir / "eval.md").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [(row["step"], row["mae"]) for row in rows if row["phase"] == "val"] == [
        (1, 0.9), (2, 0.5), (3, 0.7)]
    checkpoints = Checkpointer(run_dir / "checkpoints")
    assert checkpoints.all_steps() == [2, 3]  # the best (kept) and the last
    assert checkpoints.restore(3).progress["validations"] == {"1": 0.9, "2": 0.5, "3": 0.7}
    best, _, _ = restore_model(run_dir, 2)
    last, _, _ = restore_model(run_dir, 3)
    exported = from_pretrained(run_dir / "export")
    for out, expected in zip(jax.tree.leaves(nnx.state(exported)),
                             jax.tree.leaves(nnx.state(best)), strict=True):
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves(nnx.state(best)), jax.tree.leaves(nnx.state(last)), strict=True))


@pytest.mark.slow
def test_dynamic_sampling_updates_on_full_batches_of_informative_groups(
        tiny_model_dir, small_ml100k, tmp_path, monkeypatch):
    """Most groups have zero reward spread (scripted: of the groups in the order drawn, every
    third has spread, the rest all -1): with grpo.dynamic_sampling each step samples further
    rounds, updates on train.prompts_per_step groups, the informative ones first and dropped
    ones filling up when rounds run out, and logs the counts."""
    rollout, drawn = loop.rollout, []

    def scripted_rollout(*args, **kwargs):
        scored = rollout(*args, **kwargs)
        batch, group = scored.rewards.shape
        spread = np.arange(len(drawn), len(drawn) + batch) % 3 == 0
        drawn.extend(spread)
        rewards = jnp.asarray(np.where(spread[:, None], np.linspace(-1, 1, group), -1.0),
                              jnp.float32)
        return scored._replace(rewards=rewards, advantages=grpo.group_advantages(
            rewards.reshape(-1), group).reshape(batch, group))

    updated = []

    class RecordedTrainer(loop.Trainer):
        def grpo_updates(self, rollout_batch):
            updated.append(jax.device_get((rollout_batch.rewards, rollout_batch.advantages)))
            return super().grpo_updates(rollout_batch)

    monkeypatch.setattr(loop, "rollout", scripted_rollout)
    monkeypatch.setattr(loop, "Trainer", RecordedTrainer)
    run_dir = tmp_path / "run"
    run(load_config(None, tiny_reczero(run_dir, tiny_model_dir, small_ml100k, "train.steps=3",
                                       "grpo.dynamic_sampling=true",
                                       "grpo.max_sampling_rounds=2")))

    grpo_rows = [row for row in map(json.loads, (run_dir / "metrics.jsonl").open())
                 if row["phase"] == "grpo"]
    # Groups drawn 0-3: 0 and 3 have spread (enough); 4-7: only 6; 8-11: only 9 (filled up).
    assert [(r["sampling_rounds"], r["groups_kept"], r["groups_dropped"], r["prompts_consumed"])
            for r in grpo_rows] == [(2, 2, 2, 4), (2, 1, 3, 4), (2, 1, 3, 4)]
    assert len(drawn) == 12
    assert len(updated) == 3
    for row, (rewards, advantages) in zip(grpo_rows, updated, strict=True):
        assert rewards.shape == advantages.shape == (2, 2)  # train.prompts_per_step groups
        kept = int(row["groups_kept"])
        assert grpo.informative_groups(rewards[:kept]).all() and advantages[:kept].all()
        assert not grpo.informative_groups(rewards[kept:]).any() and not advantages[kept:].any()
        assert row["reward_mean"] == pytest.approx(rewards.mean())  # of the updated batch
        assert row["grad_norm"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["train.final_policy=best"], "train.final_policy='best' is not a known value"),
    (["train.final_policy=best_val"], "validates none"),
    (["train.final_policy=best_val", "train.eval_every=5", "train.steps=2"], "validates none"),
    (["train.final_policy=best_val", "train.eval_every=1", "algorithm=sft"], "validates none"),
])
def test_final_policy_setting_is_checked_when_the_config_loads(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_config(None, [f"run_dir={tmp_path / 'run'}", *overrides])
    assert not (tmp_path / "run").exists()
