"""Run observability: metrics rows and TensorBoard events read back, plots, MFU by hand."""

import json
import math
import struct
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from reczero_jax.config import GRPOConfig
from reczero_jax.models import ModelConfig
from reczero_jax.observe import (
    RunLogger,
    _curves_figure,
    _eval_figure,
    eval_stage,
    grpo_step_flops,
    matmul_parameters,
    mfu_estimate,
    model_flops,
    moving_average,
    platform_peak_flops,
    plot_run,
    read_metrics,
    scalar_metrics,
    tensorboard_tag,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_events(directory):
    """(tag, step, value) of every scalar in the TFRecord event files of ``directory``.

    A TFRecord is: uint64 length, uint32 CRC of the length, ``length`` bytes, uint32 CRC."""
    scalars = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset: offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return scalars


def test_scalar_metrics_keeps_numeric_scalars_only():
    metrics = {"int": 3, "float": 0.5, "np": np.float32(0.25), "jax": jnp.asarray(2.0),
               "flag": True, "vector": np.zeros(3), "jax_vector": jnp.ones(2),
               "nested": {"mae": 1.0}, "name": "grpo", "none": None}
    assert scalar_metrics(metrics) == {"int": 3.0, "float": 0.5, "np": 0.25, "jax": 2.0,
                                       "flag": 1.0}


def test_run_logger_writes_rows_and_tensorboard_events(tmp_path):
    run_dir = tmp_path / "run"
    with RunLogger(run_dir) as log:
        for step in range(3):
            log.write("grpo", step, {"reward_mean": step / 2, "kl": jnp.float32(0.125),
                                     "sample_mae": math.nan if step == 0 else 1.5,
                                     "by_bin": {"1-3": 0.5}})
        log.write("eval after SFT + GRPO", 7, {"mae": 0.75, "n": 16})

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in rows] == [
        ("grpo", 0), ("grpo", 1), ("grpo", 2), ("eval after SFT + GRPO", 7)]
    assert set(rows[1]) == {"phase", "step", "time", "reward_mean", "kl", "sample_mae"}
    assert rows[2]["reward_mean"] == 1.0 and rows[2]["kl"] == 0.125
    assert math.isnan(rows[0]["sample_mae"]) and rows[1]["sample_mae"] == 1.5
    assert rows[3] == {"phase": "eval after SFT + GRPO", "step": 7, "time": rows[3]["time"],
                       "mae": 0.75, "n": 16.0}
    assert read_metrics(run_dir) == rows

    events = read_events(run_dir / "tensorboard")
    expected = [("grpo/reward_mean", s, s / 2) for s in range(3)]
    expected += [("grpo/kl", s, 0.125) for s in range(3)]
    expected += [("grpo/sample_mae", s, 1.5) for s in (1, 2)]  # the NaN stays in the rows only
    expected += [("eval_after_SFT_GRPO/mae", 7, 0.75), ("eval_after_SFT_GRPO/n", 7, 16.0)]
    assert sorted(events) == sorted(expected)


def test_closed_logger_refuses_rows(tmp_path):
    log = RunLogger(tmp_path)
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.write("sft", 0, {"loss": 1.0})


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, enabled=False) as log:
        row = log.write("sft", 0, {"loss": 1.0})
    assert row["loss"] == 1.0
    assert not run_dir.exists()


def test_tensorboard_tag():
    assert tensorboard_tag("grpo", "reward_mean") == "grpo/reward_mean"
    assert tensorboard_tag("eval after SFT + GRPO", "mae") == "eval_after_SFT_GRPO/mae"


def write_rows(run_dir, rows, trailing=""):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows) + trailing
    (run_dir / "metrics.jsonl").write_text(text)


def test_plot_run_writes_one_png_per_phase_and_the_eval_chart(tmp_path):
    rows = [{"phase": "sft", "step": s, "time": 0.0, "loss": 2.0 - s / 4, "grad_norm": 1.0}
            for s in range(4)]
    rows += [{"phase": "grpo", "step": s, "time": 0.0, "reward_mean": s / 10, "format_rate": 0.5,
              "sample_mae": math.nan if s < 2 else 1.0, "kl": 0.0} for s in range(5)]
    # A phase whose only metric is never finite: nothing to draw, no file.
    rows += [{"phase": "probe", "step": s, "time": 0.0, "sample_mae": math.nan} for s in range(2)]
    rows += [{"phase": f"eval {name}", "step": 0, "time": 0.0, "mae": mae, "format_rate": rate}
             for name, mae, rate in [("zero-shot", 1.4, 0.0), ("after SFT", 1.0, 0.9)]]
    write_rows(tmp_path, rows, trailing='{"phase": "grpo", "st')  # a run killed mid-write

    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        written = plot_run(tmp_path)

    plots = tmp_path / "plots"
    assert written == [plots / "sft.png", plots / "grpo.png", plots / "eval.png"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000


def test_plot_run_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_run(tmp_path)


def test_mfu_by_hand():
    # 1e6 parameters: 6e6 FLOPs per trained token, 2e6 per forward-only (sampled) token.
    flops = model_flops(1_000_000, trained_tokens=1_000, forward_tokens=500)
    assert flops == 6e9 + 1e9
    assert mfu_estimate(flops, seconds=2.0, peak_flops=7e9) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="positive"):
        mfu_estimate(flops, seconds=0.0, peak_flops=7e9)


def test_platform_peak_flops():
    chips = [SimpleNamespace(device_kind="TPU v5")] * 4  # a v5p-8: four chips
    assert platform_peak_flops(chips) == 4 * 459e12
    assert platform_peak_flops([SimpleNamespace(device_kind="TPU v6 lite")]) == 918e12
    mixed = [SimpleNamespace(device_kind="TPU v5"), SimpleNamespace(device_kind="cpu")]
    assert platform_peak_flops(mixed) is None
    if jax.devices()[0].platform == "cpu":
        assert platform_peak_flops() is None


def test_matmul_parameters_and_grpo_step_flops_by_hand():
    # d=4, 2 heads of 3 (H D = 6), 1 kv head (K D = 3), MLP 5, vocab 7, 2 layers. Per layer:
    # q 4*6 + k 4*3 + v 4*3 + o 6*4 + gate, up, down 3*4*5 = 24+12+12+24+60 = 132; head 4*7.
    config = ModelConfig(model_type="llama", vocab_size=7, hidden_size=4, intermediate_size=5,
                         num_layers=2, num_heads=2, num_kv_heads=1, head_dim=3)
    n = 2 * 132 + 28
    assert matmul_parameters(config) == n
    # B=2 prompts of P=10 tokens, G=3 responses of R=4: 24 response tokens.
    # Sampling: 20 + 24 forward; update (shared prompt): 20 + 24 trained.
    grpo = GRPOConfig(group_size=3)
    assert grpo_step_flops(config, grpo, 2, 10, 4) == 6 * n * 44 + 2 * n * 44
    # Dynamic sampling's three rounds sample three times, update once.
    assert grpo_step_flops(config, grpo, 2, 10, 4, sampling_rounds=3) == (
        6 * n * 44 + 2 * n * 3 * 44)
    # Prompt repeated per response, two updates, a KL reference forward per update.
    grpo = GRPOConfig(group_size=3, shared_prompt=False, updates_per_rollout=2, kl_coef=0.1)
    trained = 2 * (60 + 24)
    assert grpo_step_flops(config, grpo, 2, 10, 4) == 6 * n * trained + 2 * n * (44 + trained)


def test_moving_average_by_hand():
    np.testing.assert_allclose(moving_average([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(moving_average([2.0, 4.0, 9.0], 5), [2.0, 3.0, 5.0])


def test_noisy_curves_get_a_moving_average_named_in_the_legend():
    rows = [{"phase": "grpo", "step": s, "reward_mean": float(s % 3)} for s in range(1, 41)]
    (ax,) = _curves_figure("grpo", rows).axes
    raw, average = ax.get_lines()
    assert raw.get_alpha() == 0.25 and list(raw.get_ydata()) == [s % 3 for s in range(1, 41)]
    np.testing.assert_allclose(average.get_ydata(), moving_average(raw.get_ydata(), 4))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["per step",
                                                                   "mean of last 4 steps"]
    # A short curve is drawn raw.
    (ax,) = _curves_figure("grpo", rows[:5]).axes
    assert len(ax.get_lines()) == 1 and ax.get_legend() is None


def test_eval_chart_marks_each_stage():
    assert [eval_stage(name) for name in ("zero-shot", "after SFT", "after SFT + GRPO",
                                          "after GRPO")] == ["zero-shot", "after SFT",
                                                             "after SFT + GRPO", "after GRPO"]
    rows = [{"phase": f"eval {name}", "step": 0, "mae": 1.0}
            for name in ("zero-shot", "after SFT", "after SFT + GRPO")]
    figure = _eval_figure(rows)
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == ["zero-shot", "after SFT",
                                                          "after SFT + GRPO"]
    (ax,) = figure.axes
    assert len({bar.get_facecolor() for bar in ax.patches}) == 3
