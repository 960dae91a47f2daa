"""The programs users run: RecZero (GRPO only), RecOne (warm-start SFT, then GRPO), SFT.

    run(config, restart=False) -> {"zero-shot": metrics, "after SFT": metrics, ...}

A run is a zero-shot evaluation, then its phases ("sft", "grpo" or both, in that order), each
followed by a greedy evaluation. Steps are numbered across phases from 1: with S SFT steps
and T GRPO steps, SFT is steps 1..S and GRPO S+1..S+T, and step g's checkpoint holds the
state after g updates. The GRPO phase starts with a fresh optimizer state.

Writes into ``config.run_dir``: ``checkpoints/<g>/`` (Orbax: every ``train.checkpoint_every``
steps, at the end of each phase, at each new lowest validation MAE and on SIGTERM; the newest
``train.keep_checkpoints`` are kept, plus the one of lowest validation MAE when validation runs),
and, from process 0 alone, ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per step and
phase; phase "val" every ``train.eval_every`` GRPO steps), ``eval.json`` / ``eval.md`` (the
evaluations, with per-sample answers in ``eval_samples.jsonl``) and ``export/`` (the final
policy as a Hugging Face directory).

The final policy (``train.final_policy``): the last step's (``last``), or ``best_val``, the
policy of the validated step of lowest MAE, restored from its checkpoint; when that is not the
last step, it is evaluated too ("after GRPO, best validation (step g)"), so the report shows
both, and it is the one exported.

Several processes (the hosts of a pod slice; ``reczero train --coordinator ...``): each runs
``run`` with the same config (``run_dir`` may differ: it is each host's own disk), loads only its
block of every batch and contributes it to global arrays (``reczero_jax.distributed``); host
metrics and evaluation rows are gathered to every process, which keeps their loops in step.
Only process 0 writes into its run directory; every process writes its shards of each checkpoint,
so ``train.checkpoint_dir`` must be a directory they share (a gs:// bucket).

Resume: on a run directory that holds a checkpoint, ``run`` continues from the latest complete
one (after checking that the config is compatible): parameters, optimizer state, RNG key,
the grain iterator's position and the SFT sampler's position come back, so the resumed run is
the uninterrupted one. Logs keep the rows written up to that checkpoint and lose the rest;
evaluations before it are not repeated. ``restart=True`` deletes the run's outputs first.
SIGTERM (a preemption notice): the current step finishes, is saved, and ``run`` returns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from reczero_jax import distributed, traces
from reczero_jax.baselines import markdown_table
from reczero_jax.config import ExperimentConfig, OptimConfig, save_config
from reczero_jax.data import load_split
from reczero_jax.data.padding import default_pad_id
from reczero_jax.data.pipeline import make_pipeline
from reczero_jax.data.sft import sft_batch, sft_examples
from reczero_jax.data.subset import take_subset
from reczero_jax.evaluate import REPORT_COLUMNS, EvalSettings
from reczero_jax.lora import LoRAParam, add_lora, has_lora
from reczero_jax.mesh import make_mesh, param_shardings
from reczero_jax.models import from_pretrained, stop_token_ids
from reczero_jax.models.dtypes import jax_dtype
from reczero_jax.observe import (
    METRICS_FILE,
    RunLogger,
    grpo_step_flops,
    mfu_estimate,
    platform_peak_flops,
    plot_run,
    scalar_metrics,
)
from reczero_jax.train.checkpoint import Checkpointer, PreemptionGuard, Restored, check_compatible
from reczero_jax.train.dynamic import sample_informative
from reczero_jax.train.export import checkpoint_directory, export_model
from reczero_jax.train.step import Trainer, rollout

SAMPLES_FILE = "eval_samples.jsonl"
# What a run writes besides checkpoints: a fresh start removes what an earlier run left
# (tensorboard/ and plots/ are observe.RunLogger's); --restart removes checkpoints too.
LOG_OUTPUTS = (METRICS_FILE, SAMPLES_FILE, "eval.json", "eval.md", "export", "tensorboard",
               "plots")
VAL_SPLIT = "validation"  # validation every train.eval_every steps; the report uses eval_split


@dataclasses.dataclass(frozen=True)
class Phase:
    """A training phase: global steps ``offset + 1 .. offset + steps``, then ``eval_name``."""

    name: str  # "sft" | "grpo"
    steps: int
    offset: int
    eval_name: str


def plan_phases(config: ExperimentConfig) -> list[Phase]:
    phases = []
    if config.algorithm in ("recone", "sft"):
        phases.append(Phase("sft", config.sft.steps, 0, "after SFT"))
    if config.algorithm in ("reczero", "recone"):
        offset = sum(phase.steps for phase in phases)
        phases.append(Phase("grpo", config.train.steps, offset,
                            "after GRPO" if config.algorithm == "reczero" else "after SFT + GRPO"))
    return phases


def run(config: ExperimentConfig, *, restart: bool = False) -> dict[str, dict[str, Any]]:
    """Run (or resume) the program of ``config``; returns the evaluations so far by name."""
    run_dir = local_run_dir(config.run_dir)
    checkpoint_dir = checkpoint_directory(config)
    primary = distributed.is_primary()
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        if restart:
            remove_outputs(run_dir, LOG_OUTPUTS)
            if checkpoint_dir.exists():
                checkpoint_dir.rmtree()
    distributed.sync("run directory prepared")
    checkpoints = Checkpointer(checkpoint_dir, save_every=config.train.checkpoint_every,
                               keep_last=config.train.keep_checkpoints,
                               keep_best=1 if config.train.eval_every else 0,
                               keep_steps=reference_steps(config))
    resume = find_resume(checkpoints, config)
    if primary:
        if resume is None:
            remove_outputs(run_dir, LOG_OUTPUTS)
        save_config(config, run_dir / "config.yaml")
    log = RunLogger(run_dir, enabled=primary)
    session = Session(config, checkpoints, log)
    print(f"[reczero] {config.algorithm}: {len(session.train_records)} train samples, "
          f"{len(session.eval_records)} {config.data.eval_split} samples, "
          f"mesh {dict(session.mesh.shape)}")
    if resume is None:
        session.run_eval("zero-shot", session.base_model, step=0)

    model = session.base_model
    phases = plan_phases(config)
    # The phase of the checkpoint resumes; the ones before it are done.
    first = [phase.name for phase in phases].index(resume.progress["phase"]) if resume else 0
    with PreemptionGuard() as guard, log:
        for index, phase in enumerate(phases):
            if index < first:
                continue
            run_phase = session.warm_start if phase.name == "sft" else session.train_grpo
            model, stopped = run_phase(phase, model, resume is not None and index == first, guard)
            if stopped:
                checkpoints.close()
                print(f"[reczero] {guard.signal_name}: stopped after step {stopped}, saved to "
                      f"{checkpoints.directory}; the same command resumes the run")
                return session.results
            session.run_eval(phase.eval_name, model, step=phase.offset + phase.steps)
        model = session.final_policy(model, phases[-1])  # evaluated and logged: in the with

    if primary:
        (run_dir / "eval.json").write_text(json.dumps(session.results, indent=2))
        plots = plot_run(run_dir)
        figures = "".join(f"\n![{p.stem}]({p.relative_to(run_dir)})\n" for p in plots)
        (run_dir / "eval.md").write_text(markdown_table(session.results, REPORT_COLUMNS) + "\n"
                                         + figures)
        print(f"[reczero] plots: {', '.join(str(p) for p in plots)}")
    export_model(model, run_dir / "export", tokenizer=session.tokenizer)
    checkpoints.close()
    print(f"[reczero] run directory {run_dir}: eval.md, metrics.jsonl, tensorboard/, plots/, "
          f"export/; checkpoints in {checkpoints.directory}")
    return session.results


def reference_steps(config: ExperimentConfig) -> tuple[int, ...]:
    """Checkpoint steps kept for good: RecOne's last SFT step when GRPO has a KL penalty (its
    parameters are the KL reference, which a resumed GRPO phase restores from there)."""
    # (With LoRA the reference is the frozen base, which needs no checkpoint.)
    if config.algorithm == "recone" and config.grpo.kl_coef and not config.model.lora.rank:
        return (config.sft.steps,)
    return ()


def local_run_dir(run_dir: str) -> Path:
    """The run directory: logs, plots and the export, written by process 0 on its own disk."""
    if "://" in run_dir:
        raise ValueError(f"run_dir must be a local directory, got {run_dir!r}: put the "
                         "checkpoints in a bucket with train.checkpoint_dir=gs://BUCKET/PATH")
    return Path(run_dir)


def find_resume(checkpoints: Checkpointer, config: ExperimentConfig) -> Restored | None:
    """The latest complete checkpoint's non-array parts (its phase says where the run goes
    on), or None in a fresh run directory. Raises if the saved config is incompatible, or if
    no saved step can be read. ``Session.restore`` reads the arrays, and falls back to an
    earlier step if this one's turn out to be damaged."""
    saved = checkpoints.all_steps()
    if not saved:
        return None
    step = checkpoints.latest_complete_step()
    if step is None:
        raise RuntimeError(f"{checkpoints.directory} holds steps {saved} but none can be read; "
                           "start over with --restart (this deletes them)")
    check_compatible(checkpoints.saved_config(step), dataclasses.asdict(config))
    return checkpoints.restore(step)


def remove_outputs(run_dir: Path, names: Sequence[str]) -> None:
    for name in names:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def rewind_logs(run_dir: Path, resume: Restored) -> None:
    """Keep the log lines written before checkpoint ``resume.step`` was saved: metrics rows of
    earlier steps and of this step's training and validation (an evaluation after a phase is
    logged at the phase's last step but runs after its checkpoint, so it is redone), and the
    samples of the evaluations the checkpoint holds."""
    evals = resume.progress["evals"]

    def keep_metrics(row):
        return row["step"] < resume.step or (row["step"] == resume.step
                                             and not row["phase"].startswith("eval "))

    for name, keep in ((METRICS_FILE, keep_metrics), (SAMPLES_FILE, lambda r: r["model"] in evals)):
        path = run_dir / name
        if path.exists():
            lines = [line for line in path.read_text().splitlines() if keep(json.loads(line))]
            path.write_text("".join(line + "\n" for line in lines))


class Session:
    """What the phases of one run share: config, mesh, tokenizer, data, logs, checkpoints."""

    def __init__(self, config: ExperimentConfig, checkpoints: Checkpointer, log: RunLogger):
        self.config = config
        self.checkpoints = checkpoints
        self.log = log
        self.run_dir = Path(config.run_dir)
        self.results: dict[str, dict[str, Any]] = {}
        self.mesh = make_mesh(**dataclasses.asdict(config.mesh))
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.path)
        self.base_model = from_pretrained(config.model.path, dtype=jax_dtype(config.model.dtype),
                                          param_dtype=jax_dtype(config.model.param_dtype),
                                          mesh=self.mesh, attention=config.model.attention)
        self.base_model.remat = config.model.remat
        lora = config.model.lora
        if lora.rank:  # trains adapters alone; the base stays frozen (and is the KL reference)
            add_lora(self.base_model, rank=lora.rank, alpha=lora.alpha, targets=lora.targets,
                     seed=config.seed)
        self.train_records = take_subset(load_split(config.data.dir, "train"),
                                         config.data.train_samples, config.data.subset,
                                         config.seed)
        self.eval_records = take_subset(load_split(config.data.dir, config.data.eval_split),
                                        config.data.eval_samples)
        self.eos_ids = stop_token_ids(self.base_model.config, self.tokenizer)
        # One setup for every evaluation of the run, and for `reczero eval --run` after it.
        self.eval_settings = EvalSettings.of_run(config)
        # train.reward: GRPO's reward and the evaluations' scoring rule, built once.
        self.reward_fn = self.eval_settings.reward_fn(self.tokenizer, self.eos_ids)
        self._val_records = None
        # Every validation's MAE by global step (kept in the checkpoints' progress).
        self.validations: dict[int, float] = {}

    # -- evaluation -------------------------------------------------------------------

    def _evaluate(self, model, records, desc: str) -> dict[str, Any]:
        return self.eval_settings.evaluate(model, self.tokenizer, records,
                                           reward_fn=self.reward_fn, desc=desc)

    def run_eval(self, name: str, model, step: int) -> None:
        """A report evaluation (on ``data.eval_split``), logged at global ``step``."""
        report = self._evaluate(model, self.eval_records, f"eval {name}")
        m = self.results[name] = report["metrics"]
        self.log.write(f"eval {name}", step, m)
        if self.log.enabled:
            with (self.run_dir / SAMPLES_FILE).open("a") as f:
                for row in report["rows"]:
                    f.write(json.dumps({"model": name, **row}) + "\n")
        print(f"[reczero] {name}: MAE {m['mae']:.4f} RMSE {m['rmse']:.4f} "
              f"parse {m['parse_rate']:.2f} format {m['format_rate']:.2f} "
              f"tokens/request {m['tokens_per_request']:.0f}")

    def validate(self, model, step: int) -> dict[str, float]:
        """Greedy evaluation on the validation split, logged as phase "val" and recorded."""
        if self._val_records is None:
            self._val_records = take_subset(load_split(self.config.data.dir, VAL_SPLIT),
                                            self.config.data.eval_samples)
        metrics = self._evaluate(model, self._val_records, "validation")["metrics"]
        self.log.write("val", step, metrics)
        self.validations[step] = metrics["mae"]
        return {"val_mae": metrics["mae"]}

    def best_validated_step(self) -> int | None:
        """The validated step of lowest MAE, the latest of equals (the one the checkpoints'
        best-N policy keeps); None before any validation."""
        if not self.validations:
            return None
        return min(self.validations, key=lambda step: (self.validations[step], -step))

    def final_policy(self, model, last: Phase):
        """The policy to export: ``model`` (the last step's), or with ``train.final_policy``
        ``best_val`` the best validated step's, restored from its checkpoint and evaluated
        (unless it is the last step)."""
        best, last_step = self.best_validated_step(), last.offset + last.steps
        if self.config.train.final_policy == "last" or best is None or best == last_step:
            return model
        best_model = self.saved_policy(best, model)
        print(f"[reczero] final policy: step {best} of lowest validation MAE "
              f"({self.validations[best]:.4f}; last step {last_step}: "
              f"{self.validations.get(last_step, float('nan')):.4f})")
        # Logged at the last step: a resumed run redoes what follows its last checkpoint.
        self.run_eval(f"{last.eval_name}, best validation (step {best})", best_model,
                      step=last_step)
        return best_model

    def saved_policy(self, step: int, like):
        """The policy saved at ``step``, as a module of ``like``'s structure on the mesh (with
        LoRA the checkpoint holds the adapters alone; the base is ``like``'s)."""
        graphdef, state, *frozen = nnx.split(like, LoRAParam, ...) if has_lora(like) else (
            nnx.split(like))
        restored = self.checkpoints.restore(step, abstract_params=state,
                                            param_sharding=param_shardings(state, self.mesh))
        return nnx.merge(graphdef, restored.params, *frozen)

    # -- the step loop shared by both phases ----------------------------------------------

    def train_steps(self, phase: Phase, trainer: Trainer, start: int, guard: PreemptionGuard,
                    step_fn: Callable[[int, int], dict[str, Any]],
                    saved_state: Callable[[], tuple[dict, Any]]) -> int:
        """Phase steps ``start + 1 .. phase.steps``: ``step_fn(phase_step, global_step)``
        updates ``trainer`` and returns the checkpoint metrics; ``saved_state()`` gives the RNG
        keys and data-iterator state to save. Returns the global step it stopped at on
        SIGTERM (after saving it), else 0."""
        progress = tqdm(range(start + 1, phase.steps + 1), initial=start, total=phase.steps,
                        desc=phase.name.upper(), unit="step", disable=not self.log.enabled)
        for phase_step in progress:
            step = phase.offset + phase_step
            metrics = step_fn(phase_step, step)
            # A signal may reach some processes only: all stop (and save) at the same step.
            stop = guard.should_stop()
            # A new lowest validation MAE is saved whatever the cadence (train.final_policy).
            best = "val_mae" in metrics and self.best_validated_step() == step
            rng_keys, data_state = saved_state()
            self.checkpoints.save(
                step, params=trainer.params, opt_state=trainer.opt_state, rng_keys=rng_keys,
                data_state=data_state, config=dataclasses.asdict(self.config),
                metrics=scalar_metrics(metrics),
                progress={"phase": phase.name, "phase_step": phase_step, "evals": self.results,
                          "validations": self.validations},
                force=stop or best or phase_step == phase.steps)
            progress.set_postfix({k: f"{metrics[k]:.3f}" for k in ("loss", "reward_mean",
                                                                   "format_rate") if k in metrics})
            if stop:
                self.checkpoints.wait()
                return step
        return 0

    def restore(self, trainer: Trainer, phase: Phase) -> Restored:
        """The newest step that restores (an unreadable one is reported and the one before it
        tried) into ``trainer``; the logs and evaluation results are rewound to it."""
        restored = self.checkpoints.restore(
            abstract_params=trainer.params, param_sharding=trainer.param_sharding,
            abstract_opt_state=trainer.opt_state, opt_sharding=trainer.opt_sharding)
        if restored.progress["phase"] != phase.name:
            raise RuntimeError(
                f"the {phase.name} checkpoints in {self.checkpoints.directory} cannot be read and "
                f"the newest readable one, step {restored.step}, is of the "
                f"{restored.progress['phase']} phase; move the unreadable steps away to resume "
                "from it, or start over with --restart")
        trainer.params, trainer.opt_state = restored.params, restored.opt_state
        self.results = dict(restored.progress["evals"])
        # JSON keys are strings; checkpoints written before validations were recorded lack it.
        self.validations = {int(step): mae for step, mae
                            in restored.progress.get("validations", {}).items()}
        if self.log.enabled:
            rewind_logs(self.run_dir, restored)
        print(f"[reczero] resuming {self.run_dir} from checkpoint step {restored.step} "
              f"({phase.name} step {restored.progress['phase_step']} of {phase.steps}); "
              "--restart starts over")
        return restored

    # -- SFT --------------------------------------------------------------------------

    def warm_start(self, phase: Phase, model, resume: bool, guard: PreemptionGuard):
        """RecOne's warm start: SFT on four-tag traces (loss on the response tokens only).
        ``resume``: continue from the newest checkpoint (of this phase). Returns the policy
        and the step it stopped at on SIGTERM (0 when the phase ran to its end)."""
        config = self.config
        examples = sft_examples(self.train_records,
                                traces.sft_responses(self.train_records, config.sft.traces),
                                self.tokenizer, max_prompt_tokens=config.data.max_prompt_tokens,
                                layout=config.data.layout,
                                max_response_tokens=config.sft.max_response_tokens)
        optim = OptimConfig(**{**dataclasses.asdict(config.optim),
                               "learning_rate": config.sft.learning_rate, "micro_batches": 1})
        trainer = Trainer(model, self.mesh, optim)
        start = self.restore(trainer, phase).progress["phase_step"] if resume else 0
        longest = config.data.max_prompt_tokens + config.sft.max_response_tokens
        length, pad_id = -(-longest // 128) * 128, default_pad_id(self.tokenizer)

        rows = distributed.process_rows(config.sft.batch_size, self.mesh)

        def step_fn(phase_step: int, step: int) -> dict[str, Any]:
            # Every process draws the whole batch (cheap) and feeds its own block of rows.
            batch = sft_batch(examples, phase_step, config.sft.batch_size, length, pad_id,
                              config.seed)
            metrics = trainer.sft_step(*distributed.global_batch(
                tuple(a[rows] for a in batch), self.mesh))
            self.log.write("sft", step, metrics)
            return metrics

        # The sampler draws batch k from (seed, k) alone: its position is the phase step.
        stopped = self.train_steps(phase, trainer, start, guard, step_fn, lambda: ({}, None))
        return trainer.model, stopped

    # -- GRPO -------------------------------------------------------------------------

    def train_grpo(self, phase: Phase, model, resume: bool, guard: PreemptionGuard):
        """GRPO: rollout (sample G answers per prompt, token rewards, advantages) then update;
        with ``grpo.dynamic_sampling`` rounds of rollouts until the step has enough informative
        groups (``train.dynamic``). Arguments and result as ``warm_start``'s."""
        config = self.config
        # The KL reference is the policy GRPO starts from: the base model, or the SFT result
        # (the trainer keeps a frozen copy); a resumed RecOne reads the latter from the last
        # SFT step, which is kept for it (reference_steps).
        reference = model if config.grpo.kl_coef else None
        if resume and reference_steps(config) and not has_lora(model):
            (sft_end,) = reference_steps(config)
            if sft_end not in self.checkpoints.all_steps():
                raise RuntimeError(
                    f"resuming RecOne's GRPO phase with grpo.kl_coef > 0 needs the post-SFT "
                    f"policy (the KL reference) of step {sft_end}, which "
                    f"{self.checkpoints.directory} no longer holds (a run started before such "
                    "steps were kept); set grpo.kl_coef=0 or start over with --restart")
            reference = self.saved_policy(sft_end, model)
        trainer = Trainer(model, self.mesh, config.optim, config.grpo, reference=reference)
        index, count = distributed.process_batch_share(self.mesh)
        batches = iter(make_pipeline(self.train_records, self.tokenizer,
                                     global_batch_size=config.train.prompts_per_step,
                                     max_prompt_tokens=config.data.max_prompt_tokens,
                                     seed=config.seed, num_epochs=None, layout=config.data.layout,
                                     process_index=index, process_count=count))
        key = jax.random.key(config.seed)
        start = 0
        if resume:
            restored = self.restore(trainer, phase)
            batches.set_state(restored.data_state)
            key = restored.rng_keys["rollout"]
            start = restored.progress["phase_step"]
        pad_id = default_pad_id(self.tokenizer)
        peak_flops = platform_peak_flops(self.mesh.devices.flat)  # None: no MFU (e.g. CPU)

        def sample_round(phase_step: int, round_index: int):
            """Round ``round_index`` of the step's rollouts: the next batch of prompts, sampled
            and scored; (Rollout, true ratings [B]). Its RNG: the step's key, folded with the
            round from the second round on (the first is the step's, as without rounds)."""
            local = next(batches)  # this process's rows of the global batch
            batch = distributed.global_batch(
                {"prompt_ids": local["prompt_ids"], "prompt_mask": local["prompt_mask"],
                 "rating": local["rating"].astype(np.float32)}, self.mesh)
            rng = jax.random.fold_in(key, phase_step)
            if round_index:
                rng = jax.random.fold_in(rng, round_index)
            scored = rollout(trainer.model, self.reward_fn, batch["prompt_ids"],
                             batch["prompt_mask"], batch["rating"], rng, config.grpo,
                             eos_ids=self.eos_ids, pad_id=pad_id)
            return scored, batch["rating"]

        def step_fn(phase_step: int, step: int) -> dict[str, Any]:
            began = time.perf_counter()
            sample = functools.partial(sample_round, phase_step)
            counts = {}
            if config.grpo.dynamic_sampling:
                # The metrics below (reward_mean, sample_mae, ...) describe the updated batch.
                scored, ratings, counts = sample_informative(
                    sample, config.train.prompts_per_step, config.grpo, pad_id)
            else:
                scored, ratings = sample(0)
            jax.block_until_ready(scored)
            rollout_seconds = time.perf_counter() - began  # every round's
            if phase_step == start + 1 and config.optim.memory_budget_gib:
                # Compiles the update once more, ahead of time: only when a budget asks for it.
                report = trainer.check_memory(scored)
                print(f"[reczero] GRPO update: {report['peak_bytes'] / 2**30:.2f} GiB per device "
                      f"(XLA's estimate), within optim.memory_budget_gib="
                      f"{config.optim.memory_budget_gib:g}")
            metrics = trainer.grpo_updates(scored)  # grpo.updates_per_rollout of them
            metrics.update(rollout_metrics(scored, ratings), **counts,
                           rollout_seconds=rollout_seconds,
                           update_seconds=time.perf_counter() - began - rollout_seconds)
            if peak_flops:
                flops = grpo_step_flops(model.config, config.grpo, *scored.prompt_ids.shape,
                                        scored.responses.shape[-1],
                                        sampling_rounds=counts.get("sampling_rounds", 1))
                metrics["mfu"] = mfu_estimate(flops, time.perf_counter() - began, peak_flops)
            self.log.write("grpo", step, metrics)
            if config.train.eval_every and phase_step % config.train.eval_every == 0:
                metrics.update(self.validate(trainer.model, step))
            return metrics

        stopped = self.train_steps(phase, trainer, start, guard, step_fn,
                                   lambda: ({"rollout": key}, batches.get_state()))
        return trainer.model, stopped


def rollout_metrics(scored, ratings) -> dict[str, float]:
    """Sample MAE and parse rate over the rollout's answers, its prompt and generated tokens.
    ``scored`` and ``ratings`` [B] are global arrays (a collective with several processes)."""
    predicted, ratings, prompt_mask, lengths = distributed.to_host(
        (scored.ratings, ratings, scored.prompt_mask, scored.lengths))
    truth = np.broadcast_to(ratings.astype(np.float32)[:, None], predicted.shape)
    parsed = np.isfinite(predicted)
    return {"sample_mae": float(np.abs(predicted - truth)[parsed].mean()) if parsed.any()
            else float("nan"), "parse_rate": float(parsed.mean()),
            "prompt_tokens": float(prompt_mask.sum()), "generated_tokens": float(lengths.sum())}
