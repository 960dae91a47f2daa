"""The GRPO update step on CPU, arms doing the same update on the same batch:

* ``shared``: ``Trainer.grpo_step`` with ``GRPOConfig(shared_prompt=True)``: each prompt runs
  once, its G responses attend to its keys and values;
* ``naive``: the same step with ``shared_prompt=False`` (the prompt repeated G times);
* ``materialized``, ``blockwise``: ``shared`` with that ``model.attention`` (``shared`` has
  ``auto``: on CPU materialized up to 1536 keys, blockwise beyond);
  ``blockwise+chunks``: blockwise and ``grpo.logprob_chunk=64`` (the LM head over 64 positions
  at a time); for each jax arm also the compiled update's per-device peak (XLA's memory
  analysis, ``Trainer.memory_report``);
* ``lora``: the ``shared`` step with LoRA (``reczero_jax.lora``: rank 16, alpha 32, on all
  seven projections) training the adapters alone, the base frozen (fp32 here);
* ``torch``: ``reczero_jax.compare.torch_grpo_loss`` (the same loss in plain torch, prompt repeated G times)
  on the transformers model loaded from the same weights, then ``backward``,
  ``clip_grad_norm_(1.0)`` and ``torch.optim.AdamW`` (betas 0.9/0.999, weight decay 0.01).

One step = the PPO clipped surrogate with token-mean aggregation (the paper's loss; one
update per rollout, so the old log-probs are the current ones under stop-gradient), its
gradient, global-norm clipping and an AdamW update. The batch: B prompts of exactly P
tokens, G responses of R tokens whose masks keep a random 50-100% prefix, random
advantages. The model: a small Qwen2 decoder (default 4 layers, width 256, 4 query / 2 kv
heads of 64, MLP 768, vocabulary 8192, tied embeddings: 5.25 M parameters) with random
weights, written with ``save_pretrained`` and loaded by both sides, fp32.

Work counted per arm (fp32; L layers, d width, H query / K kv heads, D head dim, I MLP width,
V vocabulary; N_b = L (2 d H D + 2 d K D + 3 d I) the block weights a token meets in matmuls;
the factor 6 = forward 2 + backward 4 FLOPs per weight and token):

    FLOPs = 6 N_b * block_tokens + 6 d V * B G R + 12 L H D * keys

* block_tokens, the token positions run through the blocks: ``shared`` B (P + G (R - 1))
  (the last response token predicts nothing, so it is not fed); ``naive`` and ``torch``
  B G (P + R) (the whole sequence, G times);
* the output head counts only the B G R positions that predict response tokens;
* keys, the (query, key) pairs of causal attention (QK^T and AV, 4 FLOPs forward per pair
  and head dim): ``shared`` B (P (P + 1) / 2 + G sum_{j=1}^{R-1} (P + j)); the others
  B G (P + R) (P + R + 1) / 2.

``lora`` is charged 4 instead of 6 per frozen weight and token (no weight gradient; the
adapters' own r (IN + OUT) per target are left out). The jax arms also report the compiled
step's per-device peak bytes (``Trainer.memory_report``: arguments + outputs - donated +
temporaries), and two tables put LoRA beside full fine-tuning (``shared``).

So each arm is charged for the work it really does; the achieved rate over the warm step
time is divided by the fp32 matmul ceiling measured in this run (``benchmarks.common``).

Run: ``python -m benchmarks.train_step [--shapes 1024x128x8 256x64x8 1024x64x4] [--out FILE]``
(about 4 minutes on 2 cores; ``--quick``: one small shape and a 2-layer decoder, for a smoke
run).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    Timing,
    cpu_count,
    describe_machine,
    emit_report,
    markdown_table,
    measure_matmul_flops,
    speedup_table,
    time_call,
)
from benchmarks.sampling import Shape, matmul_weights
from reczero_jax.compare import torch_grpo_loss
from reczero_jax.models.config import ModelConfig

DEFAULT_SHAPES = ("1024x128x8", "256x64x8", "1024x64x4")
QUICK_SHAPES = ("64x16x4",)
# jax arms: (shared prompt, model.attention, grpo.logprob_chunk, LoRA adapters)
JAX_ARMS = {"shared": (True, "auto", 0, False), "naive": (False, "auto", 0, False),
            "materialized": (True, "materialized", 0, False),
            "blockwise": (True, "blockwise", 0, False),
            "blockwise+chunks": (True, "blockwise", 64, False), "lora": (True, "auto", 0, True)}
ARMS = (*JAX_ARMS, "torch")
LORA_RANK = 16


@dataclasses.dataclass(frozen=True)
class DecoderSize:
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 768
    vocab: int = 8192

    def config(self) -> ModelConfig:
        return ModelConfig(model_type="qwen2", vocab_size=self.vocab, hidden_size=self.hidden,
                           intermediate_size=self.mlp, num_layers=self.layers,
                           num_heads=self.heads, num_kv_heads=self.kv_heads,
                           head_dim=self.hidden // self.heads, attention_bias=True,
                           tie_word_embeddings=True, max_position_embeddings=4096)


QUICK_SIZE = DecoderSize(layers=2, hidden=64, heads=4, kv_heads=2, mlp=128, vocab=512)


# ----------------------------------------------------------------------------- work model


def step_flops(config: ModelConfig, shape: Shape, shared: bool, frozen: bool = False) -> float:
    """Model FLOPs of one training step (formula in the module docstring); ``frozen``: the
    weights get no gradient (LoRA's base), 4 FLOPs per weight and token instead of 6."""
    head = config.hidden_size * config.vocab_size
    blocks = matmul_weights(config) - head
    per_key = 12 * config.num_layers * config.num_heads * config.head_dim
    b, p, r, g = shape.batch, shape.prompt, shape.new_tokens, shape.samples
    if shared:
        block_tokens = b * (p + g * (r - 1))
        keys = b * (p * (p + 1) / 2 + g * ((r - 1) * p + r * (r - 1) / 2))
    else:
        block_tokens = b * g * (p + r)
        keys = b * g * (p + r) * (p + r + 1) / 2
    per_weight = 4 if frozen else 6
    return float(per_weight * (blocks * block_tokens + head * b * g * r) + per_key * keys)


# ----------------------------------------------------------------------------- batch and arms


def make_batch(shape: Shape, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random prompts [B, P] (no padding), responses [B, G, R] with masks keeping a 50-100%
    prefix, advantages [B, G] centred per group."""
    rng = np.random.default_rng(seed)
    b, p, r, g = shape.batch, shape.prompt, shape.new_tokens, shape.samples
    lengths = rng.integers((r + 1) // 2, r + 1, (b, g)).astype(np.int32)
    advantages = rng.standard_normal((b, g)).astype(np.float32)
    return dict(
        prompt_ids=rng.integers(4, vocab_size, (b, p)).astype(np.int32),
        prompt_mask=np.ones((b, p), np.int32),
        responses=rng.integers(4, vocab_size, (b, g, r)).astype(np.int32),
        response_mask=(np.arange(r) < lengths[..., None]).astype(np.float32),
        advantages=advantages - advantages.mean(axis=1, keepdims=True),
        lengths=lengths,
    )


def as_rollout(batch: dict[str, np.ndarray]):
    """The batch as the trainer's Rollout (rewards = advantages; the step only logs them)."""
    from reczero_jax.train.step import Rollout

    b, g = batch["advantages"].shape
    return jax.tree.map(jnp.asarray, Rollout(
        prompt_ids=batch["prompt_ids"], prompt_mask=batch["prompt_mask"],
        responses=batch["responses"], response_mask=batch["response_mask"],
        old_logp=np.zeros(batch["responses"].shape, np.float32), rewards=batch["advantages"],
        advantages=batch["advantages"], format_ok=np.ones((b, g), bool),
        ratings=np.full((b, g), 3.0, np.float32), lengths=batch["lengths"]))


def jax_arm(model_dir: Path, shape: Shape, batch, arm: str
            ) -> tuple[Callable[[], object], Callable[[], float], float]:
    """(one update step, the gradient norm of the last step, the compiled update's peak bytes
    per device) for our trainer; the ``lora`` arm trains adapters of rank ``LORA_RANK`` on
    every target."""
    from reczero_jax.config import GRPOConfig, OptimConfig
    from reczero_jax.lora import add_lora
    from reczero_jax.mesh import single_device_mesh
    from reczero_jax.models import from_pretrained
    from reczero_jax.train.step import Trainer

    shared, attention, chunk, lora = JAX_ARMS[arm]
    config = GRPOConfig(group_size=shape.samples, max_new_tokens=shape.new_tokens,
                        shared_prompt=shared, logprob_chunk=chunk)
    model = from_pretrained(model_dir, attention=attention)
    if lora:
        add_lora(model, rank=LORA_RANK, alpha=2.0 * LORA_RANK)
    trainer = Trainer(model, single_device_mesh(), OptimConfig(), config)
    rollout_batch = as_rollout(batch)
    peak = trainer.memory_report(trainer.trimmed(rollout_batch))["peak_bytes"]
    last = {}

    def step():
        last.update(trainer.grpo_step(rollout_batch))  # device_get: waits for the step

    return step, lambda: float(last["grad_norm"]), peak


def torch_arm(model_dir: Path, batch) -> tuple[Callable[[], object], Callable[[], float]]:
    """(one update step, the gradient norm of the last step) on the transformers model."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optim = torch.optim.AdamW(model.parameters(), lr=2e-6, betas=(0.9, 0.999),
                              weight_decay=0.01, eps=1e-8)
    tensors = {name: torch.as_tensor(value) for name, value in batch.items() if name != "lengths"}
    last = {}

    def step():
        optim.zero_grad(set_to_none=True)
        loss, _, _ = torch_grpo_loss(model, **tensors)
        loss.backward()
        last["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()

    return step, lambda: float(last["grad_norm"])


@dataclasses.dataclass(frozen=True)
class Result:
    shape: Shape
    arm: str
    timing: Timing
    flops: float
    grad_norm: float
    peak_bytes: float | None  # the compiled jax step's per-device peak (None: torch)


def measure(arm: str, shape: Shape, model_dir: Path, config: ModelConfig,
            repeats: int) -> Result:
    batch = make_batch(shape, config.vocab_size)
    peak = None
    if arm == "torch":
        step, grad_norm = torch_arm(model_dir, batch)
    else:
        step, grad_norm, peak = jax_arm(model_dir, shape, batch, arm)
    # The first step is the warm-up: for jax it compiles; torch warms its allocator.
    timing = time_call(step, repeats=repeats)
    shared, _, _, lora = JAX_ARMS.get(arm, (False, None, 0, False))
    return Result(shape, arm, timing, step_flops(config, shape, shared, lora), grad_norm(), peak)


# ----------------------------------------------------------------------------- report


def results_table(results: list[Result], matmul_flops: float) -> str:
    rows = []
    for res in results:
        seconds = res.timing.median_s
        rate = res.flops / seconds
        rows.append([str(res.shape), res.arm, f"{seconds:.3f}", f"{res.timing.compile_s:.1f}",
                     f"{res.flops / 1e9:.1f}", f"{rate / 1e9:.1f}",
                     f"{100 * rate / matmul_flops:.0f}%",
                     "-" if res.peak_bytes is None else f"{res.peak_bytes / 2**30:.3f}",
                     f"{res.grad_norm:.4g}"])
    return markdown_table(["shape", "arm", "warm s/step", "first-step extra s", "GFLOP/step",
                           "GFLOP/s", "of matmul", "peak GiB/device", "grad norm"], rows)


def ratios_table(results: list[Result]) -> str:
    return speedup_table(results, ("naive", "torch"), lambda res: res.timing.median_s,
                         ("naive time / shared time", "torch time / shared time"))


def lora_table(results: list[Result]) -> str:
    """LoRA beside full fine-tuning (the shared arm): step time and compiled peak memory."""
    time_ratio = speedup_table(results, ("lora",), lambda res: res.timing.median_s,
                               ("LoRA time / full time",))
    memory_ratio = speedup_table(results, ("lora",), lambda res: res.peak_bytes,
                                 ("LoRA peak bytes / full peak bytes",))
    return time_ratio + "\n\n" + memory_ratio


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+",
                        help=f"PxRxG: prompt x response tokens x samples per prompt (default "
                             f"{' '.join(DEFAULT_SHAPES)}; --quick: {' '.join(QUICK_SHAPES)})")
    parser.add_argument("--batch", type=int, default=1, help="prompts per step (B)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed warm steps per arm after the warm-up (median reported)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--quick", action="store_true",
                        help="small shapes, a 2-layer width-64 decoder, a small matmul ceiling")
    parser.add_argument("--torch-threads", type=int, default=cpu_count(),
                        help="torch.set_num_threads (default: the cores XLA's CPU pool uses)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    shapes = [Shape.parse(text, args.batch)
              for text in args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)]
    size = QUICK_SIZE if args.quick else DecoderSize()
    config = size.config()

    import torch
    from flax import nnx

    from reczero_jax.models import Decoder, save_pretrained

    torch.set_num_threads(args.torch_threads)
    matmul_flops = measure_matmul_flops(n=512 if args.quick else 2048)
    model = Decoder(config, rngs=nnx.Rngs(0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        save_pretrained(model, model_dir)
        del model
        for shape in shapes:
            for arm in args.arms:
                start = time.perf_counter()
                results.append(measure(arm, shape, model_dir, config, args.repeats))
                print(f"{shape} {arm}: {results[-1].timing.median_s:.3f} s/step "
                      f"({time.perf_counter() - start:.0f} s with warm-up)", flush=True)

    report = "\n\n".join([
        f"GRPO update step benchmark on CPU ({describe_machine()}).",
        f"Decoder: Qwen2 family, {size.layers} layers, width {size.hidden}, {size.heads} query / "
        f"{size.kv_heads} kv heads of {size.hidden // size.heads}, MLP {size.mlp}, vocabulary "
        f"{size.vocab}, tied embeddings ({params / 1e6:.2f} M parameters), fp32, random weights. "
        f"Measured fp32 matmul ceiling: {matmul_flops / 1e9:.1f} GFLOP/s. FLOPs per step = "
        f"6 N_blocks x block tokens + 6 d V x response tokens + 12 L H D x attended pairs "
        f"(module docstring). torch.set_num_threads({args.torch_threads}); median of "
        f"{args.repeats} warm step(s) after a warm-up step.",
        results_table(results, matmul_flops),
        ratios_table(results),
        f"LoRA (rank {LORA_RANK}, all seven projections) vs full fine-tuning:",
        lora_table(results),
    ])
    return emit_report(report, args.out)


if __name__ == "__main__":
    main()
