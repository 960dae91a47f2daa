"""``make quality`` (benchmarks/quality.py) end to end in its --quick mode on the tiny model and
the small MovieLens-100k slice: the four arms and the baselines on both splits, intervals that
hold their estimates, the plots, and a second invocation that reuses everything."""

import argparse
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import quality
from benchmarks.quality_report import Evaluated, verdict

CONFIG = str(Path(__file__).parents[1] / quality.DEFAULT_CONFIG)


def quick_overrides(tmp_path, model_dir, data_dir):
    return [f"run_dir={tmp_path / 'runs'}", f"model.path={model_dir}", f"data.dir={data_dir}",
            "data.max_prompt_tokens=512", "sft.max_response_tokens=256"]


ROW = re.compile(r"^\| (?P<arm>[^|]+) \| (?P<split>validation|test) \| (?P<n>\d+) \| "
                 r"(?P<mae>[\d.]+) \[(?P<mae_low>[\d.]+), (?P<mae_high>[\d.]+)\] \| "
                 r"(?P<rmse>[\d.]+) \[(?P<rmse_low>[\d.]+), (?P<rmse_high>[\d.]+)\] \|", re.M)


@pytest.mark.slow
def test_quick_quality_report_then_reuse(tiny_model_dir, small_ml100k, tmp_path, capsys):
    overrides = quick_overrides(tmp_path, tiny_model_dir, small_ml100k)
    arguments = ["--quick", "--config", CONFIG, "--out", str(tmp_path / "report" / "QUALITY.md"),
                 *overrides]
    assert quality.main(arguments) == 0
    report = (tmp_path / "report" / "QUALITY.md").read_text()
    rows = {(m["arm"], m["split"]): m for m in ROW.finditer(report)}
    arms = [arm.name for arm in quality.ARMS]
    baselines = ["global_mean", "user_mean", "item_mean", "biased_mf", "user_history_avg",
                 "item_history_avg"]
    # small_ml100k: 2 validation and 4 test samples (all of them: fewer than --quick's 4).
    assert set(rows) == {(name, split) for name in arms + baselines
                         for split in ("validation", "test")}
    for (_, split), row in rows.items():
        assert int(row["n"]) == {"validation": 2, "test": 4}[split]
        for metric in ("mae", "rmse"):
            low, estimate, high = (float(row[metric + suffix]) for suffix in ("_low", "", "_high"))
            assert low <= estimate <= high
    # Computed, never absent: one sentence per comparison and split.
    assert len(re.findall(r"^- (validation|test): MAE\(", report, re.M)) == 4
    assert "Smoke run" in report and "RecZero (GRPO, dynamic sampling)" in report
    for name in ("reward_mean", "format_rate", "val_mae", "dropped_fraction"):
        assert (tmp_path / "report" / "quality" / f"{name}.png").stat().st_size > 0
        assert f"](quality/{name}.png)" in report
    # The SFT arm is the post-SFT checkpoint and RecOne's the export after it, not the base
    # (GRPO may not move the tiny model: its groups have no reward spread).
    configs = quality.run_configs(CONFIG, [*quality.QUICK_OVERRIDES, *overrides])
    first_leaf = {arm.name: np.asarray(jax.tree.leaves(nnx.state(
        quality.load_policy(arm, configs)))[0]) for arm in quality.ARMS[:3]}
    assert not np.array_equal(first_leaf["zero-shot"], first_leaf["SFT"])
    assert not np.array_equal(first_leaf["zero-shot"], first_leaf["SFT + GRPO (RecOne)"])
    timings = json.loads((tmp_path / "runs" / "timings.json").read_text())
    assert {"recone run", "reczero run", "baselines"} <= timings.keys()
    assert sum(name.startswith("evaluate ") for name in timings) == 8  # 4 arms x 2 splits

    # Again: the finished runs and the saved evaluations are reused, nothing is retrained.
    metrics_files = {name: (tmp_path / "runs" / name / "metrics.jsonl").read_text()
                     for name in quality.RUNS}
    capsys.readouterr()
    assert quality.main(arguments) == 0
    log = capsys.readouterr().out
    assert log.count("[quality] reusing the finished run") == 2
    assert log.count("[quality] reusing the evaluation") == 8
    assert "[reczero]" not in log  # the training loop did not start
    for name, text in metrics_files.items():
        assert (tmp_path / "runs" / name / "metrics.jsonl").read_text() == text
    assert json.loads((tmp_path / "runs" / "timings.json").read_text()) == {
        name: seconds for name, seconds in timings.items() if name != "baselines"
    } | {"baselines": pytest.approx(timings["baselines"], abs=60)}
    assert {(m["arm"], m["split"]): m["mae"] for m in ROW.finditer(
        (tmp_path / "report" / "QUALITY.md").read_text())} == {
        key: row["mae"] for key, row in rows.items()}


def test_quality_config_and_its_checks():
    configs = quality.run_configs(CONFIG, [])
    assert [c.algorithm for c in configs.values()] == ["recone", "reczero"]
    assert [c.grpo.dynamic_sampling for c in configs.values()] == [False, True]
    assert len({c.run_dir for c in configs.values()}) == 2
    with pytest.raises(ValueError, match="grpo.kl_coef > 0"):
        quality.run_configs(CONFIG, ["grpo.kl_coef=0"])
    with pytest.raises(ValueError, match="checkpoint_dir"):
        quality.run_configs(CONFIG, ["train.checkpoint_dir=/elsewhere"])


def arm(name, errors):
    errors = np.asarray(errors, dtype=np.float64)
    return Evaluated(name, "validation", {"mae": float(np.abs(errors).mean())}, errors, {})


def test_verdict_says_whether_grpo_beats_sft_from_the_paired_interval():
    rng = np.random.default_rng(0)
    sft = rng.choice([-2.0, -1.0, 0.0, 1.0, 2.0], size=200)
    better = arm("SFT + GRPO", np.where(rng.random(200) < 0.5, 0.0, sft))
    assert "**SFT + GRPO beats SFT** on MAE" in verdict(better, arm("SFT", sft), 1000, 0)
    assert "**SFT is worse than SFT + GRPO**" in verdict(arm("SFT", sft), better, 1000, 0)
    # Errors swapped between samples: the same MAE up to noise, the interval spans zero.
    noisy = arm("SFT + GRPO", rng.permutation(sft))
    line = verdict(noisy, arm("SFT", sft), 1000, 0)
    assert "does not beat SFT on MAE within the 95% confidence interval" in line
    low, high = map(float, line.split("paired 95% CI [")[1].split("]")[0].split(", "))
    assert low < 0 < high


def test_estimate_prices_the_configs_pieces():
    configs = quality.run_configs(CONFIG, [])
    costs = quality.Costs()
    pieces = quality.estimate(configs, 200, 50, costs)
    recone, reczero = configs["recone"], configs["reczero"]
    assert pieces["recone SFT"] == recone.sft.steps * costs.sft_step
    # RecZero samples up to max_sampling_rounds rounds per step, RecOne one.
    assert pieces["reczero GRPO"] - pieces["recone GRPO"] == pytest.approx(
        reczero.train.steps * (reczero.grpo.max_sampling_rounds - 1) * costs.rollout
        * reczero.grpo.max_new_tokens / costs.rollout_tokens)
    assert pieces["table evaluations"] == 8 * 4 * (costs.eval_fixed + 50 * costs.eval_per_row)
    assert quality.estimate(configs, 400, 50, costs)["table evaluations"] == pytest.approx(
        2 * pieces["table evaluations"])


def test_departures_name_what_makes_a_run_smaller_than_the_recipe():
    def parsed(*argv):
        return argparse.Namespace(config=quality.DEFAULT_CONFIG, overrides=list(argv))

    assert quality.departures(parsed(), quality.SAMPLES) == []
    assert quality.departures(parsed("train.steps=8"), 32) == ["--samples", "32", "train.steps=8"]
    other = argparse.Namespace(config="mine.yaml", overrides=[])
    assert quality.departures(other, 400) == ["--config", "mine.yaml"]
