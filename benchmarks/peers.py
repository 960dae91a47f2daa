"""The whole GRPO step against the trainers a user would otherwise use: TRL's
``GRPOTrainer`` (PyTorch) and Google Tunix's ``GRPOLearner`` (JAX).

One step = rollout (sample G responses to one prompt, score them) + one policy update on
them, for every system, on the same work:

* the model: SmolLM2-135M-Instruct, fp32, on CPU; AdamW at 2e-6 (b 0.9 / 0.999, weight decay
  0.01, gradient clipping at 1.0); no KL term (none loads a reference model); token-mean loss
  (TRL's ``loss_type="dapo"``, Tunix's ``loss_agg_mode="token-mean"``, ours by default); one
  update per rollout; no gradient checkpointing;
* the prompt: one real MovieLens-100k training prompt (the chat template applied once, by
  ``prompts.encode_prompt`` under ``max_prompt_tokens`` = P), the same text and token ids for
  all (checked); the peers receive it as plain text and tokenise it without a template;
* the responses: G samples at temperature 1 (no top-k / top-p) of exactly R tokens each (ours:
  ``eos_ids=()``; TRL: ``min_new_tokens=R``; Tunix: a stop token no sample can draw, -1),
  scored by the rating reward (ours: the jitted token reward; the peers: the same rule on the
  decoded text); every sample's length is checked.

Each (shape, system) runs in its own process, one after another (torch's and XLA's thread
pools would fight over the cores), as ``--steps`` steps of which the first is the warm-up (for
the JAX systems: compilation); the table gives the median of the others. Rollout seconds:
ours from the sampler's call to the scored rollout on the host; TRL's
``_generate_and_score_completions`` (``transformers`` ``generate``, decoding, reward);
Tunix's ``_generate_and_compute_advantage`` (its vanilla sampler, reward, advantages).
Update seconds: the rest of the step (the log-probs forward, backward and AdamW).

Tunix pins other ``transformers`` / ``tokenizers`` / ``safetensors`` than this project, so it
runs from its own environment (``--tunix-python``, default ``.venv-tunix``, which ``make
bench`` builds), with ``--xla_cpu_enable_concurrency_optimized_scheduler=false``: with XLA's
default CPU scheduler its update needed over 24 GiB. SmolLM2 is a Llama: Tunix's llama3 model.
Its worker inherits this process's ``XLA_FLAGS``, which importing ``reczero_jax`` filled with
the package's defaults (``reczero_jax.xla_flags``), so both JAX systems compile with the same
XLA flags and the comparison is of the code, not of the flags.

ML-100k prompts hold at most 10 history entries per side, about 920 tokens with SmolLM2's
template, so at P = 1024 the prompt is the longest of the records read (the table gives its
length); our sampler pads it on the left to its 1024-token bucket and computes over the
padding, the peers do not pad a single prompt.

Run: ``python -m benchmarks.peers [--shapes 512x128x8 1024x256x8] [--steps 2]
[--systems reczero trl tunix] [--out FILE]`` (TRL: ``pip install -e '.[peers]'``; both
peers: ``make bench``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from benchmarks.common import cpu_count, describe_machine, emit_report, markdown_table
from benchmarks.sampling import Shape, ensure_model_dir

DEFAULT_SHAPES = ("512x128x8", "1024x256x8")
SYSTEMS = ("reczero", "trl", "tunix")
TUNIX_PYTHON = Path(".venv-tunix/bin/python")
MODEL_DIR = Path("artifacts/smollm2-135m-instruct")
DATA_DIR = Path("artifacts/ml100k")
RECORDS_READ = 300  # training records searched for the prompt closest to P tokens
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 2e-6, 0.01, 1.0
RESULT_TAG = "PEER_RESULT "


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """Seconds of each step of one system at one shape (the first is the warm-up)."""

    system: str
    version: str
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


@dataclasses.dataclass(frozen=True)
class Failed:
    """A system that did not finish at one shape, and the last line its process printed (e.g.
    XLA's out-of-memory error): the report shows it in place of its times."""

    system: str
    shape: str
    reason: str


# ----------------------------------------------------------------------------- the work


@dataclasses.dataclass(frozen=True)
class Prompt:
    """The prompt every system gets: its token ids, their text and the true rating."""

    ids: list[int]
    text: str
    rating: float


def real_prompt(prompt_tokens: int) -> Prompt:
    """The training record whose prompt, encoded under ``max_prompt_tokens=prompt_tokens``,
    is the longest among the first ``RECORDS_READ`` records."""
    from transformers import AutoTokenizer

    from reczero_jax.data import load_split
    from reczero_jax.data.tfds_builder import SourceConfig, prepare
    from reczero_jax.prompts import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    prepare(SourceConfig.for_dataset("movielens-100k"), DATA_DIR)
    records = load_split(DATA_DIR, "train")
    best = None
    for index in range(min(len(records), RECORDS_READ)):
        encoded = encode_prompt(records[index], tokenizer, max_prompt_tokens=prompt_tokens)
        if best is None or len(encoded.ids) > len(best[1].ids):
            best = (records[index], encoded)
    record, encoded = best
    if tokenizer(encoded.text)["input_ids"] != list(encoded.ids):
        raise RuntimeError("the prompt text does not tokenise back to its ids: the peers would "
                           "see another prompt than ours")
    return Prompt(list(encoded.ids), encoded.text, float(record["rating"]))


def check_lengths(system: str, lengths, shape: Shape) -> None:
    if any(int(length) != shape.new_tokens for length in lengths):
        raise RuntimeError(f"{system}: response lengths {sorted(set(map(int, lengths)))}, "
                           f"expected exactly {shape.new_tokens} tokens each")


def run_reczero(shape: Shape, prompt: Prompt, steps: int) -> StepTimes:
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
    model = from_pretrained(MODEL_DIR)
    grpo = GRPOConfig(group_size=shape.samples, max_new_tokens=shape.new_tokens)
    trainer = Trainer(model, single_device_mesh(),
                      OptimConfig(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                  max_grad_norm=MAX_GRAD_NORM), grpo)
    reward_fn = EvalSettings().reward_fn(tokenizer, stop_token_ids(model.config, tokenizer))
    prompt_ids = np.asarray([prompt.ids], np.int32)
    rating = np.asarray([prompt.rating], np.float32)
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
        log_step("reczero", shape, step_s, rollout_s)
    return StepTimes("reczero", system_version("reczero"), str(shape), len(prompt.ids),
                     tuple(step_s), tuple(rollout_s))


def run_trl(shape: Shape, prompt: Prompt, steps: int) -> StepTimes:
    """TRL's ``GRPOTrainer.train`` for ``steps`` steps; a callback times each step, a wrapper
    its rollout (``_generate_and_score_completions``)."""
    import torch
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(cpu_count())
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    reward, lengths = rating_reward()
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
        dataset = Dataset.from_list([{"prompt": prompt.text, "rating": prompt.rating}] * steps)
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args,
                              train_dataset=dataset, processing_class=tokenizer)
        step_s, rollout_s = [], []
        trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions,
                                                        rollout_s)

        class StepTimer(transformers.TrainerCallback):
            def on_step_begin(self, *_, **__):
                self.began = time.perf_counter()

            def on_step_end(self, *_, **__):
                step_s.append(time.perf_counter() - self.began)
                log_step("trl", shape, step_s, rollout_s)

        trainer.add_callback(StepTimer())
        trainer.train()
    check_lengths("trl", [len(ids) for ids in lengths], shape)
    return StepTimes("trl", system_version("trl"), str(shape), len(prompt.ids),
                     tuple(step_s), tuple(rollout_s))


def run_tunix(shape: Shape, prompt: Prompt, steps: int) -> StepTimes:
    """Tunix's ``GRPOLearner.train`` (vanilla rollout, actor and rollout on the one CPU device)
    for ``steps`` steps; wrappers time each global step and its rollout
    (``_generate_and_compute_advantage``). SmolLM2 is a Llama: Tunix's llama3 model."""
    import json

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import transformers
    from tunix.models.llama3 import model as llama
    from tunix.models.llama3 import params as llama_params
    from tunix.rl import rl_cluster as rl
    from tunix.rl.grpo.grpo_learner import GRPOConfig, GRPOLearner
    from tunix.rl.rollout.base_rollout import RolloutConfig

    from reczero_jax.models.config import ModelConfig

    ours = ModelConfig.from_hf(json.loads((MODEL_DIR / "config.json").read_text()))
    if ours.rope_scaling is not None:
        raise ValueError("Tunix's llama3 config here takes no RoPE scaling")
    config = llama.ModelConfig(
        num_layers=ours.num_layers, vocab_size=ours.vocab_size, embed_dim=ours.hidden_size,
        hidden_dim=ours.intermediate_size, num_heads=ours.num_heads, head_dim=ours.head_dim,
        num_kv_heads=ours.num_kv_heads, rope_theta=int(ours.rope_theta),
        norm_eps=ours.rms_norm_eps, weight_tying=ours.tie_word_embeddings)
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = llama_params.create_model_from_safe_tensors(str(MODEL_DIR), config, mesh,
                                                        dtype=jnp.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    optimizer = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM),
                            optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY))
    cluster = rl.RLCluster(
        actor=model, reference=None, tokenizer=tokenizer,
        cluster_config=rl.ClusterConfig(
            role_to_mesh={role: mesh for role in (rl.Role.ACTOR, rl.Role.REFERENCE,
                                                  rl.Role.ROLLOUT)},
            rollout_engine="vanilla", offload_to_cpu=False,
            training_config=rl.RLTrainingConfig(actor_optimizer=optimizer,
                                                eval_every_n_steps=10**6, max_steps=steps),
            # No token is -1: every sample runs to R tokens, as the other systems' do.
            rollout_config=RolloutConfig(
                max_tokens_to_generate=shape.new_tokens, max_prompt_length=len(prompt.ids),
                kv_cache_size=len(prompt.ids) + shape.new_tokens, temperature=1.0, top_p=1.0,
                top_k=None, eos_tokens=[-1])))
    reward, _ = rating_reward()
    lengths = []
    generate = cluster.generate

    def recorded_generate(*args, **kwargs):  # the sampled ids: text would not round-trip
        out = generate(*args, **kwargs)
        lengths.extend(len(ids) for ids in out.tokens)
        return out

    cluster.generate = recorded_generate
    learner = GRPOLearner(cluster, GRPOConfig(num_generations=shape.samples, num_iterations=1,
                                              beta=0.0, epsilon=0.2, loss_agg_mode="token-mean"),
                          reward_fns=[reward])
    step_s, rollout_s = [], []
    learner._generate_and_compute_advantage = timed(learner._generate_and_compute_advantage,
                                                    rollout_s)
    run_global_step = learner._run_global_step

    def timed_global_step(*args, **kwargs):
        began = time.perf_counter()
        run_global_step(*args, **kwargs)
        jax.effects_barrier()
        step_s.append(time.perf_counter() - began)
        log_step("tunix", shape, step_s, rollout_s)

    learner._run_global_step = timed_global_step
    # Arrays: Tunix repeats every leaf of a batch G times with np.repeat.
    learner.train([{"prompts": np.asarray([prompt.text]),
                    "rating": np.asarray([prompt.rating])}] * steps)
    check_lengths("tunix", lengths, shape)
    return StepTimes("tunix", system_version("tunix"), str(shape), len(prompt.ids),
                     tuple(step_s), tuple(rollout_s))


def rating_reward():
    """(reward function for the peers' trainers, list of the completions' token ids it was
    given, if any): the rating reward of the decoded text against the ``rating`` column,
    which both trainers repeat per sample (TRL passes the ids, Tunix text alone)."""
    from reczero_jax.rewards import get_reward

    score, seen = get_reward("rating"), []

    def reward(prompts, completions, rating, completion_ids=(), **_):
        seen.extend(completion_ids)
        return [score(text, float(r)).reward for text, r in zip(completions, rating, strict=True)]

    return reward, seen


def system_version(system: str) -> str:
    """The peers' package versions; ours: the git commit measured."""
    if system == "reczero":
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True)
        return f"@{commit.stdout.strip()}" if commit.returncode == 0 else version("reczero-jax")
    return version({"trl": "trl", "tunix": "google-tunix"}[system])


def timed(fn, seconds: list[float]):
    """``fn`` that appends the seconds of each call to ``seconds``."""
    def call(*args, **kwargs):
        began = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds.append(time.perf_counter() - began)
        return out

    return call


def log_step(system: str, shape: Shape, step_s: list[float], rollout_s: list[float]) -> None:
    print(f"{system} {shape}: step {len(step_s) - 1} {step_s[-1]:.1f} s (rollout "
          f"{rollout_s[-1]:.1f} s)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the report


def run_worker(system: str, shape: str, prompt_file: Path, steps: int,
               tunix_python: Path) -> StepTimes | Failed:
    """``system`` at ``shape`` in a fresh process (Tunix: in its own environment): its times,
    or ``Failed`` with the process's last line if it did not finish. The process's output is
    passed through as it comes."""
    python, env = sys.executable, dict(os.environ)
    if system == "tunix":
        if not tunix_python.exists():
            raise RuntimeError(f"{tunix_python} not found: Tunix needs its own environment (it "
                               f"pins other transformers and tokenizers); make bench builds it")
        # The CPU scheduler's default overlaps buffers enough to need over 24 GiB here.
        python = str(tunix_python)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " "
                            "--xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
    command = [python, "-m", "benchmarks.peers", "--worker", system, "--shapes", shape,
               "--prompt-file", str(prompt_file), "--steps", str(steps)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    result, last = None, ""
    for line in process.stdout:
        if line.startswith(RESULT_TAG):
            result = json.loads(line.removeprefix(RESULT_TAG))
        else:
            sys.stderr.write(line)
            last = line.strip() or last
    if process.wait() or result is None:
        hint = " (pip install -e '.[peers]')" if system == "trl" else ""
        return Failed(system, str(Shape.parse(shape, batch=1)),
                      f"exit {process.returncode}{hint}: {last[:200]}")
    return StepTimes(**{k: tuple(v) if isinstance(v, list) else v for k, v in result.items()})


def report(results: list[StepTimes | Failed], steps: int, minutes: float) -> str:
    """The markdown report: every system's times (or why it failed), then each peer's over
    ours per part where both finished."""
    rows = [[r.shape, r.system, "", f"failed ({r.reason})", "", "", ""] if isinstance(r, Failed)
            else [r.shape, f"{r.system} {r.version}", r.prompt_tokens, f"{r.step:.1f}",
                  f"{r.rollout:.1f}", f"{r.update:.1f}", f"{r.step_s[0]:.1f}"] for r in results]
    by_shape: dict[str, dict[str, StepTimes]] = {}
    for r in results:
        if isinstance(r, StepTimes):
            by_shape.setdefault(r.shape, {})[r.system] = r
    ratios = [[shape, f"{peer} / reczero",
               *(f"{getattr(arms[peer], part) / getattr(arms['reczero'], part):.2f}x"
                 for part in ("step", "rollout", "update"))]
              for shape, arms in by_shape.items() if "reczero" in arms
              for peer in arms if peer != "reczero"]
    return "\n\n".join([
        f"Whole GRPO step, reczero-jax vs its peers, SmolLM2-135M-Instruct fp32 on CPU "
        f"({describe_machine(('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'trl'))}; "
        f"Tunix in its own environment).",
        f"One real ML-100k prompt, G samples of exactly R new tokens, AdamW {LEARNING_RATE:g}, "
        f"no KL, token-mean loss; torch.set_num_threads({cpu_count()}). Median of "
        f"{max(steps - 1, 1)} step(s) after a warm-up step (its time in the last column). "
        f"Total {minutes:.1f} min.",
        markdown_table(["shape", "system", "prompt tokens", "s/step", "rollout s", "update s",
                        "warm-up step s"], rows),
        markdown_table(["shape", "time ratio", "step", "rollout", "update"], ratios),
    ])


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="PxRxG: prompt tokens x new tokens x samples per prompt")
    parser.add_argument("--steps", type=int, default=2,
                        help="GRPO steps per system and shape, the first a warm-up (>= 2)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--tunix-python", type=Path, default=TUNIX_PYTHON,
                        help="the Python of Tunix's own environment")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (a warm-up and a timed step), got {args.steps}")
    if args.worker:
        (shape,) = args.shapes
        prompt = Prompt(**json.loads(args.prompt_file.read_text()))
        run = {"reczero": run_reczero, "trl": run_trl, "tunix": run_tunix}[args.worker]
        times = run(Shape.parse(shape, batch=1), prompt, args.steps)
        print(RESULT_TAG + json.dumps(dataclasses.asdict(times)), flush=True)
        return None
    ensure_model_dir(MODEL_DIR)
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            prompt_file = Path(tmp) / f"{shape}.json"
            prompt_file.write_text(json.dumps(dataclasses.asdict(
                real_prompt(Shape.parse(shape, batch=1).prompt))))
            for system in args.systems:
                results.append(run_worker(system, shape, prompt_file, args.steps,
                                          args.tunix_python))
                r = results[-1]
                print(f"{shape} {system}: failed ({r.reason})" if isinstance(r, Failed) else
                      f"{shape} {system}: {r.step:.1f} s/step (rollout {r.rollout:.1f} s, "
                      f"update {r.update:.1f} s)", flush=True)
    return emit_report(report(results, args.steps, (time.perf_counter() - start) / 60), args.out)


if __name__ == "__main__":
    main()
