"""``make quality``: does GRPO improve a real model's rating predictions? Four arms trained on
the same data and evaluated on the same samples, next to the classic baselines, with bootstrap
95% confidence intervals; writes ``benchmarks/QUALITY.md`` and its plots (issue 19).

    python -m benchmarks.quality [--config configs/quality_ml100k_smollm2.yaml]
        [--out benchmarks/QUALITY.md] [--samples 200] [--batch-size 100] [--quick] [key=value ...]

The arms come from two training runs (``train.loop.run``), so SFT is trained once:

* ``zero-shot``: the instruct model itself (``model.path``);
* ``SFT``: the RecOne run's policy after its warm start, the checkpoint of step ``sft.steps``
  (the loop keeps it as the KL reference: the config needs ``grpo.kl_coef > 0``, no LoRA);
* ``SFT + GRPO (RecOne)``: the RecOne run's final policy (its ``export/``);
* ``RecZero``: GRPO from the instruct model with ``grpo.dynamic_sampling=true`` (its export).

The runs are the config with ``algorithm`` (and RecZero's ``grpo.dynamic_sampling``)
overridden, in ``run_dir``/recone and ``run_dir``/reczero. Their in-run evaluations and
validations (the first ``data.eval_samples`` of ``data.eval_split``, and of the validation
split every ``train.eval_every`` GRPO steps) draw the curves. The table's numbers come from
evaluating each arm's policy afterwards with the runs' own settings
(``EvalSettings.of_run(config)``, the batch size ``--batch-size``) on the first ``--samples``
records of the validation split and of the test split: the same records for every arm and
every baseline (``baselines.fit_baselines`` on the train split). Intervals:
``rewards.bootstrap_intervals`` (1000 resamples, seed 0, parse failures scored with the
user's average as in ``rating_metrics``); "GRPO beats SFT" is decided by the paired interval
of the MAE difference (``rewards.bootstrap_difference``) lying below zero.

Resumable: a finished run (its ``eval.json`` and ``export/`` written under this very config)
is reused as it is; an unfinished one resumes from its checkpoints (``run``); each evaluation
is saved in ``run_dir``/evals/ and reused while its policy's files are unchanged; wall times
are kept in ``run_dir``/timings.json (a run's add up across the invocations that resumed it; an
evaluation redone under a new key keeps its latest).

``--quick``: a smoke run of the whole machinery (``QUICK_OVERRIDES``: a few steps of tiny
batches and answers, ``QUICK_SAMPLES`` samples per split); ``tests/test_quality.py`` runs it
on a tiny random model.

Budget: ``estimate`` prices the config's pieces with the unit costs measured on the 2-core
CPU (``Costs``); it is printed at the start and written into the report beside the measured
wall times. For ``configs/quality_ml100k_smollm2.yaml``: see the comments there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from benchmarks.quality_report import Evaluated, write_report
from reczero_jax.baselines import fit_baselines, score
from reczero_jax.config import load_config
from reczero_jax.data import load_split
from reczero_jax.data.subset import take_subset
from reczero_jax.data.tfds_builder import SourceConfig, find_prepared, prepare
from reczero_jax.evaluate import EvalSettings, by_history_length
from reczero_jax.library_logs import library_logs_to
from reczero_jax.models import from_pretrained
from reczero_jax.models.dtypes import jax_dtype
from reczero_jax.models.gguf import convert_gguf
from reczero_jax.rewards import prediction_errors
from reczero_jax.train.export import checkpoint_directory, restore_model
from reczero_jax.train.loop import reference_steps, run

DEFAULT_CONFIG = "configs/quality_ml100k_smollm2.yaml"
DEFAULT_OUT = Path(__file__).with_name("QUALITY.md")
SPLITS = ("validation", "test")
SAMPLES = 200  # per split: issue 19 asks for at least 200 validation and 200 test samples
RESAMPLES, SEED = 1000, 0  # bootstrap
BATCH_SIZE = 100  # the table's evaluations: 200 records in 2 full batches (``Costs``)
QUICK_SAMPLES = 4
QUICK_OVERRIDES = (
    "data.train_samples=8", "data.eval_samples=2", "data.eval_split=validation",
    "sft.steps=2", "sft.batch_size=2", "grpo.group_size=2", "grpo.max_new_tokens=8",
    "grpo.max_sampling_rounds=2", "train.steps=2", "train.prompts_per_step=2",
    "train.eval_every=1", "train.eval_max_new_tokens=8", "train.eval_batch_size=2",
)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One row group of the table: ``run`` None is the instruct model itself; ``policy`` is
    "base", "sft" (the run's checkpoint of its last SFT step) or "export" (its final policy)."""

    name: str
    run: str | None
    policy: str


ARMS = (
    Arm("zero-shot", None, "base"),
    Arm("SFT", "recone", "sft"),
    Arm("SFT + GRPO (RecOne)", "recone", "export"),
    Arm("RecZero (GRPO, dynamic sampling)", "reczero", "export"),
)
# (arm, the arm it must beat): the report says whether it does, by the paired MAE interval.
COMPARISONS = (("SFT + GRPO (RecOne)", "SFT"), ("RecZero (GRPO, dynamic sampling)", "zero-shot"))


@dataclasses.dataclass(frozen=True)
class Costs:
    """Wall seconds measured on the 2-core CPU (2.0 GHz Xeon; README, "The demo" and "Known
    slow spots", and the evaluation batches measured for this script), SmolLM2-135M,
    512-token prompts:

    * ``sft_step``: an SFT step of 2 sequences of up to 704 tokens (39-52 s);
    * ``rollout`` / ``update``: a GRPO rollout round / update of 2 prompts x 4 samples of up
      to ``rollout_tokens`` = 160 tokens (32-50 s / 53-72 s); scaled by rows (prompts x
      samples) / 8, the rollout also by ``grpo.max_new_tokens`` / 160 (its decode steps);
    * ``kl_factor``: the update with a KL reference (one more forward of the ~4 forward
      equivalents of remat's update; reasoned, not measured);
    * ``eval_batch(b) = eval_fixed + eval_per_row * b``: a greedy batch of b records decoded
      to 192 new tokens (the zero-shot model writes to the limit; later arms stop earlier),
      the line through two zero-shot evaluations on a quiet machine at commit df2bc11:
      131 s for one batch of 16 and 350 s for one of 50 (``reczero eval --model
      artifacts/smollm2-135m-instruct --data artifacts/ml100k --split validation --n 50
      --batch-size 50 --max-prompt-tokens 512 --max-new-tokens 192 --no-baselines``). Per
      record: the prefill of its ~500 prompt tokens (~2.8 s) and 192 decode steps at ~20 ms
      per row (benchmarks/PROFILE.md, the evaluation's shape). Beyond 50 the line is an
      extrapolation.
    """

    sft_step: float = 45.0
    rollout: float = 41.0
    rollout_tokens: int = 160
    update: float = 59.0
    kl_factor: float = 1.25
    eval_fixed: float = 28.0
    eval_per_row: float = 6.44

    def eval_batches(self, records: int, batch: int) -> float:
        return -(-records // batch) * (self.eval_fixed + self.eval_per_row * batch)


def estimate(configs: dict, samples: int, batch_size: int, costs: Costs = Costs()
             ) -> dict[str, float]:
    """Seconds per piece of ``make quality``, priced by ``costs``: SFT steps; GRPO steps
    (RecZero at ``grpo.max_sampling_rounds`` rounds each, as when most groups have no reward
    spread); the runs' evaluations (zero-shot, after each phase, a validation every
    ``train.eval_every`` GRPO steps: ``data.eval_samples`` records each); the table's (4 arms
    x 2 splits of ``samples`` records, batches of ``batch_size``)."""
    pieces = {}
    for name, config in configs.items():
        grpo, train = config.grpo, config.train
        if name == "recone":
            pieces["recone SFT"] = (config.sft.steps * costs.sft_step
                                    * config.sft.batch_size / 2)
        rounds = grpo.max_sampling_rounds if grpo.dynamic_sampling else 1
        rollout = costs.rollout * grpo.max_new_tokens / costs.rollout_tokens
        update = costs.update * (costs.kl_factor if grpo.kl_coef else 1.0)
        pieces[f"{name} GRPO"] = (train.steps * (rounds * rollout + update)
                                  * train.prompts_per_step * grpo.group_size / 8)
        evaluations = (3 if name == "recone" else 2) + (
            train.steps // train.eval_every if train.eval_every else 0)
        pieces[f"{name} in-run evaluations"] = evaluations * costs.eval_batches(
            config.data.eval_samples, train.eval_batch_size)
    pieces["table evaluations"] = len(ARMS) * len(SPLITS) * costs.eval_batches(samples,
                                                                                 batch_size)
    return pieces


# The two training runs: their overrides of the config (and run_dir = run_dir/<name>).
RUNS = {"recone": ("algorithm=recone",),
        "reczero": ("algorithm=reczero", "grpo.dynamic_sampling=true")}


def run_overrides(name: str, root: Path) -> list[str]:
    return [*RUNS[name], f"run_dir={root / name}"]


def run_configs(path: str | None, overrides: Sequence[str]) -> dict:
    """The two runs' configs by name (``RUNS``): ``path`` with ``overrides``, then the run's
    own (``run_overrides``)."""
    base = load_config(path, overrides)
    if base.train.checkpoint_dir:
        raise ValueError(f"train.checkpoint_dir={base.train.checkpoint_dir!r}: the quality runs "
                         "keep their checkpoints in their own run directories; leave it empty")
    root = Path(base.run_dir)
    configs = {name: load_config(path, [*overrides, *run_overrides(name, root)])
               for name in RUNS}
    recone = configs["recone"]
    if reference_steps(recone) != (recone.sft.steps,):
        raise ValueError(
            "the SFT arm is the RecOne run's checkpoint of its last SFT step, which the loop "
            "keeps only as the KL reference: set grpo.kl_coef > 0 (the authors' 0.001) and "
            f"model.lora.rank=0 (got grpo.kl_coef={recone.grpo.kl_coef}, "
            f"model.lora.rank={recone.model.lora.rank})")
    return configs


def finished(config) -> bool:
    """Whether ``config``'s run is done: its eval.json and export/ are written and its saved
    config is this one (``run`` on a finished run would redo the last evaluation)."""
    run_dir = Path(config.run_dir)
    return ((run_dir / "eval.json").is_file() and (run_dir / "export" / "config.json").is_file()
            and (run_dir / "config.yaml").is_file()
            and load_config(run_dir / "config.yaml") == config)


class Timings:
    """Wall seconds per piece of work, kept in a JSON file. A resumable piece's time adds up
    over the invocations that worked on it (an interrupted run's too); one redone whole each
    time (``accumulate=False``) keeps its latest."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    @contextlib.contextmanager
    def timed(self, name: str, *, accumulate: bool = True) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            before = self.seconds.get(name, 0.0) if accumulate else 0.0
            self.seconds[name] = before + time.perf_counter() - start
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.seconds, indent=2))


def ensure_run(config, timings: Timings) -> str:
    """Run (or resume) ``config``'s program unless it finished; returns what was done."""
    if finished(config):
        print(f"[quality] reusing the finished run {config.run_dir}")
        return "reused"
    print(f"[quality] running {config.algorithm} in {config.run_dir}")
    with timings.timed(f"{config.algorithm} run"), library_logs_to(Path(config.run_dir)):
        run(config)
    if not finished(config):  # run returns early on SIGTERM, its checkpoint saved
        raise RuntimeError(f"the run in {config.run_dir} stopped before its end; the same "
                           "command resumes it")
    return "ran"


def files_stamp(path: Path) -> str:
    """What identifies a policy's files: count, total size and newest modification time of the
    files at or under ``path`` (a rewritten export or checkpoint changes it)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [p.stat() for p in files]
    return (f"{len(stats)} files, {sum(s.st_size for s in stats)} bytes, "
            f"newest {max((s.st_mtime_ns for s in stats), default=0)}")


def policy_path(arm: Arm, configs: dict) -> Path:
    """Where the arm's policy lives: the instruct model, the SFT checkpoint, or the export."""
    config = configs[arm.run or "recone"]
    if arm.policy == "base":
        return Path(config.model.path)
    if arm.policy == "sft":
        return Path(str(checkpoint_directory(config))) / str(config.sft.steps)
    return Path(config.run_dir) / "export"


def load_policy(arm: Arm, configs: dict):
    """The arm's policy as a Decoder on one device, in the runs' dtypes and attention."""
    config = configs[arm.run or "recone"]
    if arm.policy == "sft":
        return restore_model(config.run_dir, config.sft.steps)[0]
    return from_pretrained(policy_path(arm, configs), dtype=jax_dtype(config.model.dtype),
                           param_dtype=jax_dtype(config.model.param_dtype),
                           attention=config.model.attention)


def evaluate_arms(configs: dict, records: dict[str, list[dict]], batch_size: int | None,
                  timings: Timings) -> list[Evaluated]:
    """Every arm on every split's ``records``: the saved evaluation when its key (arm, split,
    records, settings, the policy's files) matches, else a fresh one, saved."""
    settings = EvalSettings.of_run(configs["recone"], batch_size=batch_size)
    tokenizer = AutoTokenizer.from_pretrained(configs["recone"].model.path)
    cache_dir = Path(configs["recone"].run_dir).parent / "evals"
    cache_dir.mkdir(parents=True, exist_ok=True)
    evaluated = []
    for arm in ARMS:
        model = None
        for split in SPLITS:
            key = {"arm": arm.name, "split": split,
                   "records": [[r["user_id"], r["item_id"]] for r in records[split]],
                   "settings": dataclasses.asdict(settings),
                   "policy": files_stamp(policy_path(arm, configs))}
            path = cache_dir / f"{arm.policy}-{arm.run or 'base'}-{split}.json"
            saved = json.loads(path.read_text()) if path.exists() else None
            if saved is not None and saved["key"] == key:
                print(f"[quality] reusing the evaluation of {arm.name} on {split} ({path})")
            else:
                # Redone whole when its key changes, so its time replaces the last one's.
                with timings.timed(f"evaluate {arm.name} on {split}", accumulate=False):
                    if model is None:  # loaded once for both splits
                        model = load_policy(arm, configs)
                    report = settings.evaluate(model, tokenizer, records[split],
                                               desc=f"{arm.name} {split}")
                saved = {"key": key, **report}
                path.write_text(json.dumps(saved))
                m = report["metrics"]
                print(f"[quality] {arm.name} on {split}: MAE {m['mae']:.4f} RMSE {m['rmse']:.4f} "
                      f"format {m['format_rate']:.2f} ({m['seconds']:.0f} s)")
            rows = saved["rows"]
            errors = prediction_errors([r["prediction"] for r in rows], [r["rating"] for r in rows],
                                       [r["user_avg_rating"] for r in rows])
            evaluated.append(Evaluated(arm.name, split, saved["metrics"], errors,
                                       saved["metrics"]["by_history_length"]))
    return evaluated


def evaluate_baselines(data_dir: str, records: dict[str, list[dict]], timings: Timings
                       ) -> list[Evaluated]:
    """The classic baselines, fitted on the train split, scored on the same records."""
    with timings.timed("baselines", accumulate=False):  # cheap: redone every time
        train = load_split(data_dir, "train")
        predictors = fit_baselines([train[i] for i in range(len(train))])
        evaluated = []
        for name, predictor in predictors.items():
            for split in SPLITS:
                predictions = predictor.predict(records[split])
                truth = np.array([r["rating"] for r in records[split]], dtype=np.float64)
                # by_history_length's rows: always parsed and well-formed.
                rows = [{"prediction": float(p), "rating": r["rating"], "format_ok": True,
                         "user_avg_rating": r["user_avg_rating"],
                         "history_length": len(r.get("user_history", ()))}
                        for p, r in zip(predictions, records[split], strict=True)]
                evaluated.append(Evaluated(name, split, score(predictor, records[split]),
                                           predictions - truth, by_history_length(rows)))
    return evaluated


def ensure_assets(config) -> None:
    """The offline default's model and data, as ``make demo`` prepares them, where missing."""
    if not (Path(config.model.path) / "config.json").exists():
        print(f"[quality] converting SmolLM2-135M-Instruct -> {config.model.path}")
        convert_gguf(out_dir=config.model.path)
    try:
        find_prepared(config.data.dir)
    except FileNotFoundError:
        print(f"[quality] preparing MovieLens-100k -> {config.data.dir}")
        prepare(SourceConfig.for_dataset("movielens-100k"), config.data.dir)


def departures(args: argparse.Namespace, samples: int) -> list[str]:
    """The arguments by which an invocation differs from the committed recipe at its full size:
    fewer than ``SAMPLES`` per split, and any config override."""
    return [*(["--samples", str(samples)] if samples < SAMPLES else []),
            *(["--config", args.config] if args.config != DEFAULT_CONFIG else []),
            *args.overrides]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the report (markdown)")
    parser.add_argument("--samples", type=int, help=f"per split (default {SAMPLES}; "
                                                    f"--quick: {QUICK_SAMPLES})")
    parser.add_argument("--batch-size", type=int,
                        help=f"batch of the table's evaluations (default {BATCH_SIZE}; "
                             "--quick: train.eval_batch_size)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.quality " + shlex.join(
        list(argv) if argv is not None else sys.argv[1:])
    began = time.perf_counter()
    overrides = [*(QUICK_OVERRIDES if args.quick else ()), *args.overrides]
    configs = run_configs(args.config, overrides)
    samples = args.samples or (QUICK_SAMPLES if args.quick else SAMPLES)
    root = Path(configs["recone"].run_dir).parent
    timings = Timings(root / "timings.json")
    batch_size = args.batch_size or (
        configs["recone"].train.eval_batch_size if args.quick else BATCH_SIZE)
    priced = estimate(configs, samples, batch_size)
    print(f"[quality] estimated {sum(priced.values()) / 3600:.1f} h on the 2-core CPU: "
          + ", ".join(f"{name} {seconds / 60:.0f} min" for name, seconds in priced.items()))
    ensure_assets(configs["recone"])
    done = {name: ensure_run(config, timings) for name, config in configs.items()}
    data_dir = configs["recone"].data.dir
    # The loop's own choice of evaluation records: the first n of the split.
    records = {split: take_subset(load_split(data_dir, split), samples) for split in SPLITS}
    evaluated = (evaluate_arms(configs, records, batch_size, timings)
                 + evaluate_baselines(data_dir, records, timings))
    # The same runs by hand (each reuses or resumes like this script).
    commands = [command] + [
        f"# {name}: reczero train " + shlex.join([args.config, *overrides,
                                                  *run_overrides(name, root)])
        for name in configs]
    arm_phases = {arm.name: (arm.run, "SFT" if arm.policy == "sft" else "GRPO") for arm in ARMS}
    written = write_report(args.out, evaluated, configs=configs, comparisons=COMPARISONS,
                           arm_phases=arm_phases,
                           timings=timings.seconds, estimated=priced, runs_done=done,
                           commands=commands,
                           quick=args.quick, samples=samples, resamples=RESAMPLES, seed=SEED,
                           invocation_seconds=time.perf_counter() - began,
                           departures=departures(args, samples))
    print(f"[quality] wrote {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
