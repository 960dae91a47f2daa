"""Exact resume of `reczero train`: killed (SIGKILL) after a checkpoint, or stopped by SIGTERM
(which saves the current step and exits 0), and resumed, a run is the uninterrupted run bit
for bit; a RecOne run resumed in its GRPO phase does not redo SFT, and may go on on another
mesh; the logs of a resumed run read as one run."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from reczero_jax.config import load_config, save_config
from reczero_jax.train import loop
from reczero_jax.train.checkpoint import Checkpointer, Restored
from reczero_jax.train.cli import register
from reczero_jax.train.export import restore_model
from reczero_jax.train.loop import rewind_logs, run
from tests.helpers import restored_state

# Wall-clock measurements differ between runs of the same computation.
TIMINGS = ("time", "seconds", "rollout_seconds", "update_seconds", "latency_seconds",
           "requests_per_second", "tokens_per_second")


def tiny_run(run_dir, model_dir, data_dir, *extra):
    return [f"run_dir={run_dir}", f"model.path={model_dir}", f"data.dir={data_dir}",
            "data.max_prompt_tokens=512", "data.eval_samples=2", "grpo.group_size=2",
            "grpo.max_new_tokens=8", "train.prompts_per_step=2", "train.eval_max_new_tokens=8",
            "train.eval_batch_size=2", "sft.batch_size=2", "sft.max_response_tokens=256", *extra]


def start_train(tmp_path, name, overrides):
    """`python -m reczero_jax.cli train` in a subprocess (the test's environment, e.g. its 8
    CPU devices and matmul precision, so every run computes alike); stdout in a file."""
    config = tmp_path / f"{name}.yaml"
    save_config(load_config(None, overrides), config)
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    log = (tmp_path / f"{name}.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "reczero_jax.cli", "train", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def finish(process, tmp_path, name, timeout=300):
    assert process.wait(timeout) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    return (tmp_path / f"{name}.log").read_text()


def wait_for(condition, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the awaited point"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def without_timings(row):
    return {key: value for key, value in row.items() if key not in TIMINGS}


@pytest.mark.slow
# Each arm costs minutes of subprocess runs, so each covers two things: full fine-tuning is
# stopped by SIGTERM (a preemption notice), LoRA with dynamic sampling by SIGKILL.
@pytest.mark.parametrize("variant, stop", [
    ((), signal.SIGTERM),
    (("model.lora.rank=4", "grpo.kl_coef=0.01", "grpo.dynamic_sampling=true",
      "grpo.max_sampling_rounds=2"), signal.SIGKILL),
], ids=["full_sigterm", "lora_dynamic_sampling_sigkill"])
def test_stopped_run_resumes_bit_for_bit(tmp_path, tiny_model_dir, small_ml100k, variant, stop):
    """SIGKILL after a periodic checkpoint (step 3): the resumed run rewinds the logs written
    after it and goes on from it. SIGTERM during the first steps: the run saves the step it is
    on, exits 0 without exporting, and the resumed run goes on from that step. Either way the
    resumed run is the uninterrupted one bit for bit. Also with LoRA (adapters alone
    checkpointed, the frozen base as the KL reference), and with dynamic sampling (its rounds
    advance the data iterator and fold the RNG)."""
    lora = "model.lora.rank=4" in variant

    def overrides(run_dir):
        return tiny_run(run_dir, tiny_model_dir, small_ml100k, "algorithm=reczero",
                        "train.steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=3",
                        "train.eval_every=2",
                        # The random tiny model never answers in format, so every reward is -1
                        # and every advantage 0: an entropy bonus gives gradients that depend
                        # on each step's batch and samples. (Dynamic sampling then runs all its
                        # rounds and updates on groups that filled up.)
                        "grpo.entropy_coef=0.01", *variant)

    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    # The uninterrupted run in this process: the subprocesses get its XLA flags and matmul
    # precision, so they compile the same programs, and its own start would cost seconds.
    run(load_config(None, overrides(straight_dir)))

    stopped = start_train(tmp_path, "stopped", overrides(stopped_dir))
    if stop == signal.SIGKILL:
        wait_for(lambda: (stopped_dir / "checkpoints" / "3").exists(), stopped)
        stopped.send_signal(stop)
        stopped.wait(60)
        assert not (stopped_dir / "checkpoints" / "6").exists()
        resumed_from = 3
    else:
        wait_for(lambda: (stopped_dir / "metrics.jsonl").exists()
                 and '"grpo"' in (stopped_dir / "metrics.jsonl").read_text(), stopped)
        stopped.send_signal(stop)
        output = finish(stopped, tmp_path, "stopped", timeout=120)
        resumed_from = max(r["step"] for r in rows(stopped_dir) if r["phase"] == "grpo")
        assert 1 <= resumed_from < 6
        assert f"SIGTERM: stopped after step {resumed_from}" in output
        # The step it stopped at, besides the periodic one (step 3) if it got there.
        assert Checkpointer(stopped_dir / "checkpoints").all_steps() == [
            *([3] if resumed_from > 3 else []), resumed_from]
        assert not (stopped_dir / "export").exists()
    output = finish(start_train(tmp_path, "resumed", overrides(stopped_dir)), tmp_path, "resumed")
    assert f"from checkpoint step {resumed_from} (grpo step {resumed_from} of 6)" in output
    assert "[reczero] zero-shot:" not in output  # not evaluated again

    straight_leaves, straight_end = restored_state(straight_dir, 6)
    resumed_leaves, resumed_end = restored_state(stopped_dir, 6)
    assert len(straight_leaves) == len(resumed_leaves) > 0
    saved = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(resumed_end.params)]
    assert all(("adapters" in name) == bool(lora) for name in saved), saved
    for a, b in zip(straight_leaves, resumed_leaves, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert resumed_end.data_state == straight_end.data_state  # the iterator's position
    # The same log, row for row: batches (prompt tokens), rewards, losses, validation.
    straight_rows, resumed_rows = rows(straight_dir), rows(stopped_dir)
    assert [(r["phase"], r["step"]) for r in resumed_rows] == [
        ("eval zero-shot", 0), ("grpo", 1), ("grpo", 2), ("val", 2), ("grpo", 3), ("grpo", 4),
        ("val", 4), ("grpo", 5), ("grpo", 6), ("val", 6), ("eval after GRPO", 6)]
    assert list(map(without_timings, resumed_rows)) == list(map(without_timings, straight_rows))
    grpo_rows = [r for r in resumed_rows if r["phase"] == "grpo"]
    assert all(r["grad_norm"] > 0 for r in grpo_rows)
    assert len({r["loss"] for r in grpo_rows}) > 1 and len({r["prompt_tokens"] for r in grpo_rows}) > 1
    assert (stopped_dir / "eval.json").read_text().count("after GRPO") == 1
    if "grpo.dynamic_sampling=true" in variant:
        assert all((r["sampling_rounds"], r["groups_kept"], r["prompts_consumed"]) == (2, 0, 4)
                   for r in grpo_rows)


@pytest.mark.slow
def test_recone_resumed_in_grpo_skips_sft_and_continues_on_another_mesh(
        tmp_path, tiny_model_dir, small_ml100k, capsys, monkeypatch):
    """A RecOne run resumed in its GRPO phase does not redo SFT, may change mesh, and with a
    KL penalty gets its reference (the post-SFT policy) back from the last SFT step, which
    is kept for it."""
    trainers = []

    class RecordedTrainer(loop.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(loop, "Trainer", RecordedTrainer)
    run_dir = tmp_path / "recone"
    common = tiny_run(run_dir, tiny_model_dir, small_ml100k, "algorithm=recone",
                      "sft.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=1",
                      "grpo.kl_coef=0.001")
    first = run(load_config(None, [*common, "train.steps=2"]))
    assert Checkpointer(run_dir / "checkpoints").all_steps() == [2, 4]
    # A finished run given more GRPO steps goes on from its last checkpoint (step 4), here with
    # the parameters split over two devices (tensor parallel).
    second = run(load_config(None, [*common, "train.steps=3", "mesh.tensor=2"]))
    assert "from checkpoint step 4 (grpo step 2 of 3)" in capsys.readouterr().out

    assert second["zero-shot"] == first["zero-shot"] and second["after SFT"] == first["after SFT"]
    assert [(r["phase"], r["step"]) for r in rows(run_dir)] == [
        ("eval zero-shot", 0), ("sft", 1), ("sft", 2), ("eval after SFT", 2), ("grpo", 3),
        ("grpo", 4), ("grpo", 5), ("eval after SFT + GRPO", 5)]
    restored = Checkpointer(run_dir / "checkpoints").restore()
    assert restored.step == 5 and restored.progress["phase"] == "grpo"
    # Trainers: SFT, GRPO, then the resumed GRPO, whose reference is step 2's policy.
    post_sft, _, _ = restore_model(run_dir, 2)
    for reference, expected in zip(jax.tree.leaves(trainers[2].ref_params),
                                   jax.tree.leaves(nnx.state(post_sft)), strict=True):
        np.testing.assert_array_equal(np.asarray(reference), np.asarray(expected))
    assert [json.loads(line)["model"] for line in (run_dir / "eval_samples.jsonl").open()] == [
        "zero-shot"] * 2 + ["after SFT"] * 2 + ["after SFT + GRPO"] * 2


def write_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("step, evals, kept", [
    (4, ["zero-shot", "after SFT"], 7),  # mid-GRPO: its validation at step 4 stays
    (2, ["zero-shot"], 3),  # end of SFT: the evaluation after it is redone on resume
])
def test_rewind_keeps_what_was_written_before_the_checkpoint(tmp_path, step, evals, kept):
    metrics = [{"phase": phase, "step": s} for phase, s in [
        ("eval zero-shot", 0), ("sft", 1), ("sft", 2), ("eval after SFT", 2), ("grpo", 3),
        ("grpo", 4), ("val", 4), ("grpo", 5), ("eval after SFT + GRPO", 5)]]
    samples = [{"model": name, "user_id": n} for name in
               ("zero-shot", "after SFT", "after SFT + GRPO") for n in range(2)]
    write_lines(tmp_path / "metrics.jsonl", metrics)
    write_lines(tmp_path / "eval_samples.jsonl", samples)
    restored = Restored(step=step, params=None, opt_state=None, rng_keys={}, data_state=None,
                        config={}, metrics={},
                        progress={"phase": "grpo", "phase_step": 2, "evals": dict.fromkeys(evals)})
    rewind_logs(tmp_path, restored)
    assert rows(tmp_path) == metrics[:kept]
    assert [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").open()] == [
        row for row in samples if row["model"] in evals]


def test_train_takes_a_restart_flag():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "run.yaml", "seed=1", "--restart"])
    assert args.restart and args.overrides == ["seed=1"]
    assert not parser.parse_args(["train", "run.yaml"]).restart
