"""``benchmarks/QUALITY.md`` from the quality runs (``benchmarks.quality``): the table with
bootstrap intervals, whether GRPO beats its starting point, the GRPO curves (PNG plots and
their numbers), dynamic sampling's dropped groups, the breakdown by history length, the wall
times and the commands.

Curves, from each run's ``metrics.jsonl`` (``observe.read_metrics``), against the GRPO step
(RecOne's SFT steps come before 0): ``reward_mean`` and ``format_rate`` of the sampled groups
(phase "grpo"), validation MAE (phase "val", and the run's evaluations when they are on the
validation split: the same records), and the fraction of sampled groups dynamic sampling
dropped, ``groups_dropped / (groups_kept + groups_dropped)``.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry

from reczero_jax.evaluate import HISTORY_BINS
from reczero_jax.observe import EVAL_PREFIX, moving_average, read_metrics, smoothing_window
from reczero_jax.rewards import bootstrap_difference, bootstrap_intervals

PLOTS = "quality"  # the plots' directory, beside the report


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """One arm or baseline on one split: its metrics (``rating_metrics``' keys), its signed
    errors [n] on the split's records (``rewards.prediction_errors``) and its metrics by
    history length (``evaluate.by_history_length``)."""

    name: str
    split: str
    metrics: Mapping[str, Any]
    errors: np.ndarray
    by_history: Mapping[str, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Curve:
    """One run's per-step values of a metric: x the GRPO step, y the value."""

    label: str
    x: list[float]
    y: list[float]


def interval(estimate: float, bounds: tuple[float, float]) -> str:
    return f"{estimate:.4f} [{bounds[0]:.4f}, {bounds[1]:.4f}]"


def results_table(evaluated: Sequence[Evaluated], resamples: int, seed: int) -> str:
    lines = ["| arm | split | n | MAE [95% CI] | RMSE [95% CI] | parse rate | format rate |",
             "|---|---|---:|---|---|---:|---:|"]
    for split in dict.fromkeys(e.split for e in evaluated):
        for e in (e for e in evaluated if e.split == split):
            bounds = bootstrap_intervals(e.errors, resamples=resamples, seed=seed)
            m = e.metrics
            lines.append(f"| {e.name} | {split} | {m['n']} | {interval(m['mae'], bounds['mae'])} "
                         f"| {interval(m['rmse'], bounds['rmse'])} | {m['parse_rate']:.3f} | "
                         f"{m['format_rate']:.3f} |")
    return "\n".join(lines) + "\n"


def verdict(arm: Evaluated, reference: Evaluated, resamples: int, seed: int) -> str:
    """One sentence: does ``arm`` beat ``reference`` on MAE, by the paired 95% interval of
    ``MAE(arm) - MAE(reference)`` on the same records?"""
    low, high = bootstrap_difference(arm.errors, reference.errors, resamples=resamples,
                                     seed=seed)
    difference = arm.metrics["mae"] - reference.metrics["mae"]
    if high < 0:
        outcome = f"**{arm.name} beats {reference.name}** on MAE (the interval lies below zero)"
    elif low > 0:
        outcome = (f"**{arm.name} is worse than {reference.name}** on MAE (the interval lies "
                   "above zero)")
    else:
        outcome = (f"**{arm.name} does not beat {reference.name} on MAE within the 95% "
                   "confidence interval** (the interval contains zero)")
    return (f"{arm.split}: MAE({arm.name}) - MAE({reference.name}) = {difference:+.4f}, paired "
            f"95% CI [{low:+.4f}, {high:+.4f}]: {outcome}.")


def history_table(evaluated: Sequence[Evaluated]) -> str:
    bins = [f"{low}+" if high is None else f"{low}-{high}" for low, high in HISTORY_BINS]
    lines = ["| arm | split | " + " | ".join(f"history {b}: MAE (n)" for b in bins) + " |",
             "|---|---|" + "---:|" * len(bins)]
    for e in evaluated:
        cells = [f"{e.by_history[b]['mae']:.3f} ({e.by_history[b]['n']})" if b in e.by_history
                 else "-" for b in bins]
        lines.append(f"| {e.name} | {e.split} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_curves(config) -> dict[str, Curve]:
    """The run's curves by metric name ("reward_mean", "format_rate", "val_mae",
    "dropped_fraction"), x = global step - the SFT steps (the GRPO step)."""
    rows = read_metrics(config.run_dir)
    offset = config.sft.steps if config.algorithm == "recone" else 0
    label = {"recone": "RecOne (SFT + GRPO)", "reczero": "RecZero"}[config.algorithm]
    grpo = [r for r in rows if r["phase"] == "grpo"]
    validation = [r for r in rows if r["phase"] == "val" or (
        r["phase"].startswith(EVAL_PREFIX) and config.data.eval_split == "validation"
        and "best validation" not in r["phase"])]
    validation = sorted({r["step"]: r for r in validation}.values(), key=lambda r: r["step"])
    curves = {name: Curve(label, [r["step"] - offset for r in grpo], [r[name] for r in grpo])
              for name in ("reward_mean", "format_rate") if grpo and name in grpo[0]}
    if validation:
        curves["val_mae"] = Curve(label, [r["step"] - offset for r in validation],
                                  [r["mae"] for r in validation])
    sampled = [r for r in grpo if "groups_dropped" in r]
    if sampled:
        curves["dropped_fraction"] = Curve(
            label, [r["step"] - offset for r in sampled],
            [r["groups_dropped"] / (r["groups_kept"] + r["groups_dropped"]) for r in sampled])
    return curves


def line_plot(path: Path, title: str, curves: Sequence[Curve], *, smooth: bool) -> Path:
    """Each curve against the GRPO step; with ``smooth`` and enough points, the per-step
    values faint and their trailing moving average (``observe.smoothing_window``)."""
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    ax = figure.subplots()
    for index, curve in enumerate(curves):
        color = f"C{index}"
        window = smoothing_window(len(curve.x)) if smooth else 1
        if window == 1:
            ax.plot(curve.x, curve.y, marker=".", color=color, label=curve.label)
        else:
            ax.plot(curve.x, curve.y, ".", color=color, alpha=0.3)
            ax.plot(curve.x, moving_average(curve.y, window), color=color,
                    label=f"{curve.label} (mean of last {window})")
    ax.axvline(0, color="0.6", linestyle=":", linewidth=1)
    ax.set_xlabel("GRPO step (RecOne's SFT before 0)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


PLOTTED = (("reward_mean", "GRPO sample reward (mean per step)", True),
           ("format_rate", "GRPO sample format rate", True),
           ("val_mae", "validation MAE (greedy, the runs' validation records)", False),
           ("dropped_fraction", "groups dynamic sampling dropped (fraction per step)", True))


def curves_section(curves: Mapping[str, Sequence[Curve]], plots: Sequence[Path],
                   out_dir: Path) -> str:
    """The plots' links, then every curve's numbers."""
    links = "\n\n".join(f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots)
    lines = []
    for name, title, _ in PLOTTED:
        for curve in curves.get(name, ()):
            values = ", ".join(f"{x:g}: {y:.3f}" for x, y in zip(curve.x, curve.y, strict=True))
            summary = ""
            if name == "dropped_fraction" and curve.y:
                half = max(1, len(curve.y) // 2)
                summary = (f" (mean {np.mean(curve.y):.3f}; first half of the steps "
                           f"{np.mean(curve.y[:half]):.3f}, second half "
                           f"{np.mean(curve.y[half:] or curve.y[-1:]):.3f})")
            lines.append(f"- {title}, {curve.label} (step: value): {values}{summary}")
    return links + "\n\n" + "\n".join(lines) + "\n"


def training_seconds(config) -> dict[str, float]:
    """Seconds of each training phase of a finished run, from its metrics.jsonl timestamps:
    from the evaluation before the phase to the last row of the phase (its validations and
    the evaluation after it included; the gap of an interruption too)."""
    rows = read_metrics(config.run_dir)
    evaluations = {r["phase"].removeprefix(EVAL_PREFIX): r["time"] for r in rows
                   if r["phase"].startswith(EVAL_PREFIX)}
    if config.algorithm == "recone":
        return {"SFT": evaluations["after SFT"] - evaluations["zero-shot"],
                "GRPO": rows[-1]["time"] - evaluations["after SFT"]}
    return {"GRPO": rows[-1]["time"] - evaluations["zero-shot"]}


def wall_time_table(timings: Mapping[str, float], estimated: Mapping[str, float],
                    arm_training: Mapping[str, float], invocation_seconds: float) -> str:
    """Per arm (training from ``training_seconds``, the table's evaluations from ``timings``),
    then every timed piece and the estimate."""
    lines = ["| arm | its training (min) | its table evaluations (min) |", "|---|---:|---:|"]
    for arm, seconds in arm_training.items():
        evaluations = sum(value for name, value in timings.items()
                          if name.startswith(f"evaluate {arm} on "))
        lines.append(f"| {arm} | {seconds / 60:.1f} | {evaluations / 60:.1f} |")
    lines += ["", "| piece | minutes |", "|---|---:|"]
    lines += [f"| {name} | {seconds / 60:.1f} |" for name, seconds in timings.items()]
    lines.append(f"| **total (sum of the pieces)** | **{sum(timings.values()) / 60:.1f}** |")
    priced = ", ".join(f"{name} {seconds / 60:.0f}" for name, seconds in estimated.items())
    return ("\n".join(lines) + "\n\nAn arm's training: from its run's metrics.jsonl timestamps "
            "(the phase with its validations and the evaluation after it; the zero-shot arm "
            "trains nothing). Estimated beforehand (`quality.estimate`, minutes): "
            f"{priced}; total {sum(estimated.values()) / 60:.0f}.\n\n"
            f"This invocation: {invocation_seconds / 60:.1f} minutes "
            "(reused runs and evaluations cost nothing; a run's time adds up over the "
            "invocations that resumed it, an evaluation redone keeps its latest time).\n")


def setup_line(configs: Mapping[str, Any], samples: int) -> str:
    recone, reczero = configs["recone"], configs["reczero"]
    grpo, train = recone.grpo, recone.train
    return (
        f"Model `{recone.model.path}`, data `{recone.data.dir}` ({recone.data.train_samples or 'all'} "
        f"training samples, prompts cut to {recone.data.max_prompt_tokens} tokens). RecOne: "
        f"{recone.sft.steps} SFT steps of {recone.sft.batch_size} ({recone.sft.traces} traces, "
        f"LR {recone.sft.learning_rate:g}), then {train.steps} GRPO steps of "
        f"{train.prompts_per_step} prompts x {grpo.group_size} samples (LR "
        f"{recone.optim.learning_rate:g}, temperature {grpo.temperature:g}, KL {grpo.kl_coef:g}, "
        f"up to {grpo.max_new_tokens} new tokens, dynamic sampling "
        f"{'on' if grpo.dynamic_sampling else 'off'}). RecZero: the same GRPO from the instruct "
        f"model with dynamic sampling (up to {reczero.grpo.max_sampling_rounds} rounds per "
        f"step). In the runs: greedy evaluations of the first {recone.data.eval_samples} "
        f"{recone.data.eval_split} records before and after each phase, and of the first "
        f"{recone.data.eval_samples} validation records every {train.eval_every} GRPO steps "
        f"(0: never). The table: greedy, up to {train.eval_max_new_tokens} new tokens, the first "
        f"{samples} records of each split for every row; a parse failure is scored with the "
        "user's average rating (`rewards.rating_metrics`).")


def write_report(out: Path, evaluated: Sequence[Evaluated], *, configs: Mapping[str, Any],
                 comparisons: Sequence[tuple[str, str]], arm_phases: Mapping[str, tuple],
                 timings: Mapping[str, float], estimated: Mapping[str, float], runs_done: Mapping[str, str],
                 commands: Sequence[str], quick: bool, samples: int, resamples: int, seed: int,
                 invocation_seconds: float, departures: Sequence[str] = ()) -> list[Path]:
    """Write the report ``out`` and its plots (``out``'s directory / ``PLOTS``); returns the
    files written. ``arm_phases``: {arm: (run name, training phase)}, the training an arm's
    policy took ("zero-shot": none). ``departures``: the command-line arguments by which this
    run differs from the committed recipe at its full size, said at the top."""
    out_dir = out.parent
    phases = {name: training_seconds(config) for name, config in configs.items()}
    arm_training = {arm: phases[run][phase] if run else 0.0
                    for arm, (run, phase) in arm_phases.items()}
    curves: dict[str, list[Curve]] = {}
    for config in configs.values():
        for name, curve in run_curves(config).items():
            curves.setdefault(name, []).append(curve)
    plots = [line_plot(out_dir / PLOTS / f"{name}.png", title, curves[name], smooth=smooth)
             for name, title, smooth in PLOTTED if curves.get(name)]
    by_key = {(e.name, e.split): e for e in evaluated}
    verdicts = [verdict(by_key[arm, split], by_key[reference, split], resamples, seed)
                for arm, reference in comparisons
                for split in dict.fromkeys(e.split for e in evaluated)]
    runs = ", ".join(f"{name} {done}" for name, done in runs_done.items())
    sections = [
        "# Quality: does GRPO improve SmolLM2's rating predictions?\n",
        ("**Smoke run (`--quick`): tiny sizes, the numbers mean nothing; a full `make quality` "
         "has not written this file.**\n" if quick else ""),
        (f"**Not the committed recipe at its full size: this run had `{shlex.join(departures)}` "
         "on its command line (the full size: `make quality`'s default samples per split and "
         "the config's training values as committed). Read every interval at the sizes "
         "below.**\n"
         if departures and not quick else ""),
        setup_line(configs, samples) + "\n",
        f"95% confidence intervals: percentile bootstrap over the samples, {resamples} "
        f"resamples, seed {seed} (`rewards.bootstrap_intervals`); the comparisons use the "
        "paired interval of the MAE difference on the same records "
        f"(`rewards.bootstrap_difference`). Runs this invocation: {runs}.\n",
        "## Results\n",
        results_table(evaluated, resamples, seed),
        "## Does GRPO improve on its starting point?\n",
        "\n".join(f"- {line}" for line in verdicts) + "\n",
        "## GRPO curves\n",
        curves_section(curves, plots, out_dir),
        "## By user-history length\n",
        history_table(evaluated),
        "## Wall time\n",
        wall_time_table(timings, estimated, arm_training, invocation_seconds),
        "## Commands\n",
        "```bash\n" + "\n".join(commands) + "\n```\n",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(section for section in sections if section))
    return [out, *plots]

