"""Run observability: metrics as JSON lines and TensorBoard scalars, PNG plots, MFU.

A run directory holds::

    metrics.jsonl     one row per logged step: {"phase", "step", "time", <scalar metrics>}
    tensorboard/      event files, one scalar tag "<phase>/<metric>" per metric
    plots/            <phase>.png (curves against step) and eval.png, from ``plot_run``

The GRPO step logs ``mfu`` (model FLOPs utilisation: ``grpo_step_flops`` over the step's time
and the devices' peak, ``PEAK_BF16_FLOPS``) where the backend's peak is known (not on CPU).

    with RunLogger(run_dir, enabled=jax.process_index() == 0) as log:
        log.write("grpo", step, metrics)
    plot_run(run_dir)
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from tensorboardX import SummaryWriter

from reczero_jax.config import GRPOConfig

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"
EVAL_PREFIX = "eval "
EVAL_BAR_METRICS = ("mae", "rmse", "parse_rate", "format_rate")
# Evaluation stages by the start of their name (loop.plan_phases), each with its bar colour.
EVAL_STAGES = {"zero-shot": "0.6", "after SFT + GRPO": "C2", "after SFT": "C0", "after GRPO": "C2"}
MAX_SMOOTHING_WINDOW = 25

# Dense bf16 peak FLOP/s of one device, by jax's ``device_kind`` (TPU v4, v5p and v6e: one
# device per chip). From the vendors' data sheets; sparsity figures are not used.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
}


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are numeric scalars (Python, numpy or 0-d jax values),
    as floats. Others (strings, nested breakdowns, arrays) are left out: the eval breakdowns
    have their own file (eval.json)."""
    scalars = {}
    for name, value in metrics.items():
        if getattr(value, "ndim", 0) != 0:
            continue  # an array: checked before np.asarray, which would copy it to the host
        array = np.asarray(value)
        if array.dtype == bool or np.issubdtype(array.dtype, np.number):
            scalars[name] = float(array)
    return scalars


def tensorboard_tag(phase: str, name: str) -> str:
    """``"<phase>/<name>"`` with each run of characters TensorBoard rejects (anything but
    letters, digits, ``_ - . /``) made one ``_``: "eval after SFT + GRPO" -> "eval_after_SFT_GRPO"."""
    return re.sub(r"[^\w\-./]+", "_", f"{phase}/{name}")


class RunLogger:
    """Appends metrics rows to ``run_dir/metrics.jsonl`` and writes the same scalars (the
    finite ones) to TensorBoard event files in ``run_dir/tensorboard``.

    ``enabled=False`` (every process but one on a multi-host run) writes nothing: no files,
    no directories. Rows are appended, so a resumed run continues the same file.
    """

    def __init__(self, run_dir: str | Path, *, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_path = self.run_dir / METRICS_FILE
        self._writer = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(logdir=str(self.run_dir / TENSORBOARD_DIR), flush_secs=30)

    def write(self, phase: str, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Log the scalar ``metrics`` of ``phase`` at ``step``; returns the row."""
        row = {"phase": phase, "step": int(step), "time": time.time(), **scalar_metrics(metrics)}
        if not self.enabled:
            return row
        if self._writer is None:
            raise ValueError(f"the RunLogger of {self.run_dir} is closed")
        # Opened per row: each row is on disk when write returns.
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for name, value in row.items():
            # A NaN (e.g. the sample MAE of a step where no answer parsed) stays in the JSON
            # lines only: tensorboardX warns on every one and TensorBoard draws no point anyway.
            if name not in ("phase", "step", "time") and math.isfinite(value):
                self._writer.add_scalar(tensorboard_tag(phase, name), value, row["step"],
                                        walltime=row["time"])
        return row

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ----------------------------------------------------------------------------- plots


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl``. Lines that are not JSON objects (a run killed
    mid-write) are skipped with a warning that counts them."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a run directory?")
    rows, unreadable = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "phase" in row and "step" in row:
            rows.append(row)
        else:
            unreadable += 1
    if unreadable:
        warnings.warn(f"{path}: skipped {unreadable} unreadable line(s)", stacklevel=2)
    return rows


def plot_run(run_dir: str | Path) -> list[Path]:
    """PNG plots of ``run_dir/metrics.jsonl`` into ``run_dir/plots``; returns the files written.

    * ``<phase>.png`` for each training phase (sft, grpo, ...): one panel per metric the
      phase logged, value against step, in the order the metrics were first logged;
    * ``eval.png``: one bar per evaluation (rows whose phase starts with "eval ") for each of
      MAE, RMSE, parse rate and format rate.

    Metrics with no finite value are not plotted; a phase or chart with nothing left gives
    no file.
    """
    rows = read_metrics(run_dir)
    out_dir = Path(run_dir) / PLOTS_DIR
    written = []
    phases = dict.fromkeys(r["phase"] for r in rows if not r["phase"].startswith(EVAL_PREFIX))
    for phase in phases:
        figure = _curves_figure(phase, [r for r in rows if r["phase"] == phase])
        if figure is not None:
            written.append(_save(figure, out_dir / (re.sub(r"[^\w\-]+", "_", phase) + ".png")))
    figure = _eval_figure([r for r in rows if r["phase"].startswith(EVAL_PREFIX)])
    if figure is not None:
        written.append(_save(figure, out_dir / "eval.png"))
    return written


def _finite(values: Iterable[Any]) -> bool:
    return any(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _grid(count: int, title: str, bottom: float = 0.5):
    """A figure titled ``title`` of ``count`` 4 x 3 inch panels, up to four per row, with
    ``bottom`` inches below the last row; returns (figure, axes list).

    The margins are fixed in inches rather than fitted by matplotlib's constrained layout:
    every panel has the same labels, and fitting 20-odd panels took seconds per figure
    (half a run's plotting time on a 2-core CPU)."""
    columns = min(4, count)
    rows = math.ceil(count / columns)
    width, height = 4 * columns, 3 * rows + bottom
    figure = Figure(figsize=(width, height))
    # In inches: y tick labels at the left, the suptitle above, per panel a title and an
    # x label between rows (wspace and hspace are fractions of a panel's width and height).
    figure.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=bottom / height,
                           top=1 - 0.75 / height, wspace=0.3, hspace=0.5)
    figure.suptitle(title, y=1 - 0.1 / height, va="top")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, axes[:count]


def _curves_figure(phase: str, rows: Sequence[dict[str, Any]]):
    rows = sorted(rows, key=lambda r: r["step"])
    names = [name for name in dict.fromkeys(k for r in rows for k in r)
             if name not in ("phase", "step", "time") and _finite(r.get(name) for r in rows)]
    if not names:
        return None
    figure, axes = _grid(len(names), phase)
    for ax, name in zip(axes, names, strict=True):
        points = [(r["step"], r[name]) for r in rows
                  if isinstance(r.get(name), int | float) and math.isfinite(r[name])]
        steps, values = zip(*points, strict=True)
        window = smoothing_window(len(points))
        if window == 1:
            ax.plot(steps, values, marker=".")
        else:  # per-step values are noisy (a few samples each): the trend is the average
            ax.plot(steps, values, ".", color="C0", alpha=0.25, label="per step")
            ax.plot(steps, moving_average(values, window), color="C0",
                    label=f"mean of last {window} steps")
            ax.legend(fontsize="small")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return figure


def _eval_figure(rows: Sequence[dict[str, Any]]):
    names = [name for name in EVAL_BAR_METRICS if _finite(r.get(name) for r in rows)]
    if not names:
        return None
    # A validation evaluation repeated during training is told apart by its step.
    counts = Counter(r["phase"] for r in rows)
    labels = [r["phase"].removeprefix(EVAL_PREFIX)
              + (f" @{r['step']}" if counts[r["phase"]] > 1 else "") for r in rows]
    stages = [eval_stage(label) for label in labels]
    colors = [EVAL_STAGES.get(stage, "C1") for stage in stages]
    # Below the bars: the rotated stage labels, then the legend.
    figure, axes = _grid(len(names), "evaluations: zero-shot, then after each training phase",
                         bottom=1.25)
    for ax, name in zip(axes, names, strict=True):
        values = [r.get(name, math.nan) for r in rows]
        ax.bar_label(ax.bar(range(len(rows)), values, color=colors), fmt="%.3f")
        ax.margins(y=0.12)  # room above the tallest bar for its label
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    shown = dict(zip(stages, colors, strict=True))  # one legend entry per stage, in run order
    figure.legend([Patch(color=color) for color in shown.values()], list(shown),
                  loc="lower center", ncols=len(shown))
    return figure


def eval_stage(label: str) -> str:
    """The stage of an evaluation label: a key of ``EVAL_STAGES`` it starts with (the longest),
    else the label itself (e.g. a validation at some step)."""
    matches = [stage for stage in EVAL_STAGES if label.startswith(stage)]
    return max(matches, key=len) if matches else label


def smoothing_window(count: int) -> int:
    """Steps per moving-average window of a curve of ``count`` points: about a tenth of them,
    2 to ``MAX_SMOOTHING_WINDOW``; 1 (raw points only) under 8 points."""
    return 1 if count < 8 else min(MAX_SMOOTHING_WINDOW, max(2, count // 10))


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean: ``out[i] = mean(values[max(0, i - window + 1) : i + 1])`` (fewer points
    at the start, so the curve starts at the first step)."""
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - window, 0)
    return (sums[end] - sums[start]) / (end - start)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------- MFU


def model_flops(n_params: int, *, trained_tokens: int = 0, forward_tokens: int = 0) -> float:
    """Approximate model FLOPs: ``6 * N * trained_tokens + 2 * N * forward_tokens``.

    A token costs ``2 N`` FLOPs forward (one multiply-add per parameter) and ``4 N`` more
    backward, so ``6 N`` when trained; sampled tokens and log-prob-only passes (reference
    model, old policy) are forward only. Attention's ``O(sequence length)`` term and the
    padding are not counted, so MFU from this is a lower bound of the useful work's share.
    """
    return float(n_params) * (6.0 * trained_tokens + 2.0 * forward_tokens)


def matmul_parameters(config) -> int:
    """Weights that multiply each token's activations, 2 FLOPs apiece per token forward, of a
    ``models.ModelConfig``: per layer the q, k, v, o projections and the gated MLP, then the
    output head (tied or not):

        N = L (d H D + 2 d K D + H D d + 3 d I) + d V

    The embedding lookup, norms and biases do no matmul and are left out."""
    d, heads, kv_heads, head_dim = (config.hidden_size, config.num_heads, config.num_kv_heads,
                                    config.head_dim)
    per_layer = (2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
                 + 3 * d * config.intermediate_size)
    return config.num_layers * per_layer + d * config.vocab_size


def grpo_step_flops(config, grpo: GRPOConfig, prompts: int, prompt_tokens: int,
                    response_tokens: int, sampling_rounds: int = 1) -> float:
    """Model FLOPs of one GRPO step on the padded shapes it computes (``model_flops`` with
    N = ``matmul_parameters(config)``), B prompts of P tokens, G = ``grpo.group_size`` responses
    of R tokens, U = ``grpo.updates_per_rollout``, K = ``sampling_rounds`` (dynamic sampling's
    rounds, each of B prompts, counted at the updated batch's P, the longest of theirs):

        sampling, forward:            K (B P + B G R) tokens (each prompt prefilled once)
        each update, trained:         B P' + B G R tokens, P' = P with ``grpo.shared_prompt``
                                      (the prompt once per group), else G P
        each update, reference (KL):  the same tokens forward, when ``grpo.kl_coef`` is not 0
    """
    group, updates = grpo.group_size, grpo.updates_per_rollout
    responses = prompts * group * response_tokens
    updated = prompts * prompt_tokens * (1 if grpo.shared_prompt else group) + responses
    forward = (sampling_rounds * (prompts * prompt_tokens + responses)
               + (updates * updated if grpo.kl_coef else 0))
    return model_flops(matmul_parameters(config), trained_tokens=updates * updated,
                       forward_tokens=forward)


def mfu_estimate(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``flops / (seconds * peak_flops)``, with ``peak_flops`` the
    summed peak FLOP/s of the devices that did the work (``platform_peak_flops``)."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"seconds ({seconds}) and peak_flops ({peak_flops}) must be positive")
    return flops / (seconds * peak_flops)


def platform_peak_flops(devices: Sequence[Any] | None = None) -> float | None:
    """Summed dense bf16 peak FLOP/s of ``devices`` (default: all of ``jax.devices()``), or
    None when any device kind is not in ``PEAK_BF16_FLOPS`` (CPU among them): report no MFU
    then. A float32 run can reach only a fraction of the bf16 peak."""
    if devices is None:
        devices = jax.devices()
    peaks = [PEAK_BF16_FLOPS.get(device.device_kind) for device in devices]
    if not peaks or None in peaks:
        return None
    return float(sum(peaks))
