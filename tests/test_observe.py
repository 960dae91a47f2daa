"""Run observability: metrics rows and TensorBoard events read back, plots, MFU by hand."""

import json
import math
import struct
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from reczero_jax.observe import (
    RunLogger,
    mfu_estimate,
    model_flops,
    parameter_count,
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


def test_parameter_count_by_hand():
    class TwoLayers(nnx.Module):
        def __init__(self, rngs):
            self.first = nnx.Linear(3, 4, rngs=rngs)  # 3 * 4 + 4
            self.second = nnx.Linear(4, 2, rngs=rngs)  # 4 * 2 + 2
            self.step = nnx.Variable(jnp.zeros(5))  # not a parameter

    assert parameter_count(TwoLayers(nnx.Rngs(0))) == 16 + 10
