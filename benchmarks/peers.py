"""The whole GRPO step against TRL's ``GRPOTrainer``: the trainer a PyTorch user would use.

One step = rollout (sample G responses to one prompt, score them) + one policy update on
them, for both systems, on the same work:

* the model: SmolLM2-135M-Instruct, fp32, on CPU; AdamW at 2e-6 (b 0.9 / 0.999, weight decay
  0.01, gradient clipping at 1.0); no KL term; token-mean loss (TRL's ``loss_type="dapo"``,
  our ``loss_agg="token-mean"``); one update per rollout; no gradient checkpointing;
* the prompt: one real MovieLens-100k training prompt (the chat template applied once, by
  ``prompts.encode_prompt`` under ``max_prompt_tokens`` = P), the same text and token ids for
  both (checked); TRL receives it as plain text, which it tokenises without a template;
* the responses: G samples at temperature 1 (no top-k / top-p) of exactly R tokens each (ours:
  ``eos_ids=()``; TRL: ``min_new_tokens=R``), scored by the rating reward (ours: the jitted
  token reward; TRL: the same rule on the decoded text); checked per sample.

Each (shape, system) runs in its own process, one after another (torch's and XLA's thread
pools would fight over the cores), as ``--steps`` steps of which the first is the warm-up (for
us: compilation); the table gives the median of the others. Rollout seconds: ours from the
sampler's call to the scored rollout on the host; TRL's ``_generate_and_score_completions``
(generation, decoding, reward). Update seconds: the rest of the step (the log-probs forward,
backward and AdamW). TRL leaves generation to transformers' ``generate`` on CPU (no vLLM).

ML-100k prompts hold at most 10 history entries per side, about 920 tokens with SmolLM2's
template, so at P = 1024 the prompt is the longest of the records read (reported in the
table); our sampler pads it on the left to its 1024-token bucket and computes over the
padding, TRL does not pad a single prompt.

Run: ``python -m benchmarks.peers [--shapes 512x128x8 1024x256x8] [--steps 2] [--out FILE]``
(TRL: ``pip install -e '.[peers]'``, which ``make bench`` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import cpu_count, describe_machine, emit_report, markdown_table
from benchmarks.sampling import Shape, ensure_model_dir

DEFAULT_SHAPES = ("512x128x8", "1024x256x8")
SYSTEMS = ("reczero", "trl")
MODEL_DIR = Path("artifacts/smollm2-135m-instruct")
DATA_DIR = Path("artifacts/ml100k")
RECORDS_READ = 300  # training records searched for the prompt closest to P tokens
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 2e-6, 0.01, 1.0
RESULT_TAG = "PEER_RESULT "


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """Seconds of each step of one system at one shape (the first is the warm-up)."""

    system: str
    shape: str
    prompt_tokens: int
    step_s: tuple[float, ...]
    rollout_s: tuple[float, ...]

    def median(self, values: tuple[float, ...]) -> float:
        return statistics.median(values[1:] or values)

    @property
    def step(self) -> float:
        return self.median(self.step_s)

    @property
    def rollout(self) -> float:
        return self.median(self.rollout_s)

    @property
    def update(self) -> float:
        return self.median(tuple(s - r for s, r in zip(self.step_s, self.rollout_s, strict=True)))


# ----------------------------------------------------------------------------- the work


def real_prompt(tokenizer, prompt_tokens: int) -> tuple[dict, list[int], str]:
    """(record, ids, text) of the training record whose prompt, encoded under
    ``max_prompt_tokens=prompt_tokens``, is the longest among the first ``RECORDS_READ``."""
    from reczero_jax.data import load_split
    from reczero_jax.data.tfds_builder import SourceConfig, prepare
    from reczero_jax.prompts import encode_prompt

    prepare(SourceConfig.for_dataset("movielens-100k"), DATA_DIR)
    records = load_split(DATA_DIR, "train")
    best = None
    for index in range(min(len(records), RECORDS_READ)):
        encoded = encode_prompt(records[index], tokenizer, max_prompt_tokens=prompt_tokens)
        if best is None or len(encoded.ids) > len(best[1].ids):
            best = (records[index], encoded)
    record, encoded = best
    if tokenizer(encoded.text)["input_ids"] != list(encoded.ids):
        raise RuntimeError("the prompt text does not tokenise back to its ids: TRL would see "
                           "another prompt than ours")
    return record, list(encoded.ids), encoded.text


def check_lengths(system: str, lengths, shape: Shape) -> None:
    if any(int(length) != shape.new_tokens for length in lengths):
        raise RuntimeError(f"{system}: response lengths {sorted(set(map(int, lengths)))}, "
                           f"expected exactly {shape.new_tokens} tokens each")


def run_reczero(shape: Shape, steps: int) -> StepTimes:
    """Our loop's GRPO step (``train.loop``'s ``step_fn``): ``rollout`` then ``grpo_updates``."""
    import jax
    import numpy as np
    from transformers import AutoTokenizer

    from reczero_jax.config import GRPOConfig, OptimConfig
    from reczero_jax.evaluate import EvalSettings
    from reczero_jax.mesh import single_device_mesh
    from reczero_jax.models import from_pretrained, stop_token_ids
    from reczero_jax.train.step import Trainer, rollout

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    record, ids, _ = real_prompt(tokenizer, shape.prompt)
    model = from_pretrained(MODEL_DIR)
    grpo = GRPOConfig(group_size=shape.samples, max_new_tokens=shape.new_tokens)
    trainer = Trainer(model, single_device_mesh(),
                      OptimConfig(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                  max_grad_norm=MAX_GRAD_NORM), grpo)
    reward_fn = EvalSettings().reward_fn(tokenizer, stop_token_ids(model.config, tokenizer))
    prompt_ids = np.asarray([ids], np.int32)
    rating = np.asarray([record["rating"]], np.float32)
    step_s, rollout_s = [], []
    for step in range(steps):
        began = time.perf_counter()
        scored = rollout(trainer.model, reward_fn, prompt_ids, np.ones_like(prompt_ids), rating,
                         jax.random.key(step), grpo, eos_ids=(), pad_id=0)
        lengths = jax.device_get(scored.lengths).ravel()
        rollout_s.append(time.perf_counter() - began)
        trainer.grpo_updates(scored)  # returns host metrics: the update has finished
        step_s.append(time.perf_counter() - began)
        check_lengths("reczero", lengths, shape)
        print(f"reczero {shape}: step {step} {step_s[-1]:.1f} s (rollout {rollout_s[-1]:.1f} s)",
              file=sys.stderr, flush=True)
    return StepTimes("reczero", str(shape), len(ids), tuple(step_s), tuple(rollout_s))


def run_trl(shape: Shape, steps: int) -> StepTimes:
    """TRL's ``GRPOTrainer.train`` for ``steps`` steps; a callback times each step, a wrapper
    its rollout (``_generate_and_score_completions``)."""
    import tempfile

    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from reczero_jax.rewards import get_reward

    torch.set_num_threads(cpu_count())
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    record, ids, text = real_prompt(tokenizer, shape.prompt)
    score = get_reward("rating")
    lengths = []

    def rating_reward(prompts, completions, completion_ids, rating, **_):
        lengths.extend(len(c) for c in completion_ids)
        return [score(c, float(r)).reward for c, r in zip(completions, rating, strict=True)]

    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, max_steps=steps, seed=0,
            per_device_train_batch_size=shape.samples, num_generations=shape.samples,
            max_completion_length=shape.new_tokens,
            generation_kwargs={"min_new_tokens": shape.new_tokens},
            temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo",
            mask_truncated_completions=False, learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=WEIGHT_DECAY,
            max_grad_norm=MAX_GRAD_NORM, gradient_checkpointing=False,
            logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True)
        dataset = Dataset.from_list([{"prompt": text, "rating": float(record["rating"])}] * steps)
        trainer = GRPOTrainer(model=model, reward_funcs=[rating_reward], args=args,
                              train_dataset=dataset, processing_class=tokenizer)
        step_s, rollout_s = [], []
        generate = trainer._generate_and_score_completions

        def timed_generate(*a, **kw):
            began = time.perf_counter()
            out = generate(*a, **kw)
            rollout_s.append(time.perf_counter() - began)
            return out

        trainer._generate_and_score_completions = timed_generate

        class StepTimer(transformers.TrainerCallback):
            def on_step_begin(self, *_, **__):
                self.began = time.perf_counter()

            def on_step_end(self, *_, **__):
                step_s.append(time.perf_counter() - self.began)
                print(f"trl {shape}: step {len(step_s) - 1} {step_s[-1]:.1f} s (rollout "
                      f"{rollout_s[-1]:.1f} s)", file=sys.stderr, flush=True)

        trainer.add_callback(StepTimer())
        trainer.train()
    check_lengths("trl", lengths, shape)
    return StepTimes("trl", str(shape), len(ids), tuple(step_s), tuple(rollout_s))


# ----------------------------------------------------------------------------- the report


def run_worker(system: str, shape: str, steps: int) -> StepTimes:
    """``system`` at ``shape`` in a fresh process; its ``StepTimes``."""
    command = [sys.executable, "-m", "benchmarks.peers", "--worker", system,
               "--shapes", shape, "--steps", str(steps)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode or not lines:
        hint = " (pip install -e '.[peers]')" if system == "trl" else ""
        raise RuntimeError(f"{' '.join(command[1:])} failed with exit {done.returncode}{hint}")
    fields = json.loads(lines[-1].removeprefix(RESULT_TAG))
    return StepTimes(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def report(results: list[StepTimes], steps: int, minutes: float) -> str:
    rows = [[r.shape, r.system, r.prompt_tokens, f"{r.step:.1f}", f"{r.rollout:.1f}",
             f"{r.update:.1f}", f"{r.step_s[0]:.1f}"] for r in results]
    by_shape: dict[str, dict[str, StepTimes]] = {}
    for r in results:
        by_shape.setdefault(r.shape, {})[r.system] = r
    ratios = [[shape, *(f"{getattr(arms['trl'], part) / getattr(arms['reczero'], part):.2f}x"
                        for part in ("step", "rollout", "update"))]
              for shape, arms in by_shape.items() if set(SYSTEMS) <= arms.keys()]
    return "\n\n".join([
        f"Whole GRPO step, reczero-jax vs TRL GRPOTrainer, SmolLM2-135M-Instruct fp32 on CPU "
        f"({describe_machine(('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'trl'))}).",
        f"One real ML-100k prompt, G samples of exactly R new tokens, AdamW {LEARNING_RATE:g}, "
        f"no KL, token-mean loss; torch.set_num_threads({cpu_count()}). Median of "
        f"{max(steps - 1, 1)} step(s) after a warm-up step (its time in the last column). "
        f"Total {minutes:.1f} min.",
        markdown_table(["shape", "system", "prompt tokens", "s/step", "rollout s", "update s",
                        "warm-up step s"], rows),
        markdown_table(["shape", "TRL / reczero: step", "rollout", "update"], ratios),
    ])


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="PxRxG: prompt tokens x new tokens x samples per prompt")
    parser.add_argument("--steps", type=int, default=2,
                        help="GRPO steps per system and shape, the first a warm-up (>= 2)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (a warm-up and a timed step), got {args.steps}")
    ensure_model_dir(MODEL_DIR)
    if args.worker:
        (shape,) = args.shapes
        run = run_reczero if args.worker == "reczero" else run_trl
        times = run(Shape.parse(shape, batch=1), args.steps)
        print(RESULT_TAG + json.dumps(dataclasses.asdict(times)), flush=True)
        return None
    start = time.perf_counter()
    results = []
    for shape in args.shapes:
        for system in args.systems:
            results.append(run_worker(system, shape, args.steps))
            r = results[-1]
            print(f"{shape} {system}: {r.step:.1f} s/step (rollout {r.rollout:.1f} s, update "
                  f"{r.update:.1f} s)", flush=True)
    return emit_report(report(results, args.steps, (time.perf_counter() - start) / 60), args.out)


if __name__ == "__main__":
    main()
