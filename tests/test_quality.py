"""``make quality`` (benchmarks/quality.py) end to end in its --quick mode on the tiny model and
the small MovieLens-100k slice: the four arms and the baselines on both splits, intervals that
hold their estimates, the plots, and a second invocation that reuses everything."""

import json
import re
from pathlib import Path

import pytest

from benchmarks import quality


def quick_arguments(tmp_path, model_dir, data_dir):
    return ["--quick", "--out", str(tmp_path / "report" / "QUALITY.md"),
            f"run_dir={tmp_path / 'runs'}", f"model.path={model_dir}", f"data.dir={data_dir}",
            "data.max_prompt_tokens=512", "sft.max_response_tokens=256"]


ROW = re.compile(r"^\| (?P<arm>[^|]+) \| (?P<split>validation|test) \| (?P<n>\d+) \| "
                 r"(?P<mae>[\d.]+) \[(?P<mae_low>[\d.]+), (?P<mae_high>[\d.]+)\] \| "
                 r"(?P<rmse>[\d.]+) \[(?P<rmse_low>[\d.]+), (?P<rmse_high>[\d.]+)\] \|", re.M)


@pytest.mark.slow
def test_quick_quality_report_then_reuse(tiny_model_dir, small_ml100k, tmp_path, capsys):
    arguments = quick_arguments(tmp_path, tiny_model_dir, small_ml100k)
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
    config = Path(__file__).parents[1] / quality.DEFAULT_CONFIG
    configs = quality.run_configs(str(config), [])
    assert [c.algorithm for c in configs.values()] == ["recone", "reczero"]
    assert [c.grpo.dynamic_sampling for c in configs.values()] == [False, True]
    assert len({c.run_dir for c in configs.values()}) == 2
    with pytest.raises(ValueError, match="grpo.kl_coef > 0"):
        quality.run_configs(str(config), ["grpo.kl_coef=0"])
    with pytest.raises(ValueError, match="checkpoint_dir"):
        quality.run_configs(str(config), ["train.checkpoint_dir=/elsewhere"])
