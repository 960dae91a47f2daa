"""One process of the multi-process GRPO test (tests/test_multiprocess.py).

    python -m tests.multiprocess_worker --coordinator localhost:PORT --num-processes 2 \
        --process-id I --out DIR          (with XLA_FLAGS=--xla_force_host_platform_device_count=4)

Joins the other processes (``reczero_jax.distributed``), runs ``STEPS`` GRPO updates of the
tiny test model on a (data=2, fsdp=2, tensor=2) mesh over every process's devices, each
process feeding its block of fixed synthetic rollouts, saves a checkpoint (every process
calls save) under DIR/checkpoints and, from process 0, the gathered parameters to
DIR/params.npz. ``train`` is also what the single-process reference runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from reczero_jax import distributed
from reczero_jax.config import GRPOConfig, OptimConfig
from reczero_jax.mesh import make_mesh
from reczero_jax.train.checkpoint import Checkpointer
from reczero_jax.train.step import Rollout, Trainer

STEPS = 2
MESH = {"data": 2, "fsdp": 2, "tensor": 2}
B, G, P, R = 8, 2, 12, 6  # prompts, samples per prompt, prompt and response lengths


def synthetic_rollout(step: int, vocab: int) -> Rollout:
    """The whole global rollout of ``step`` as numpy arrays (the same in every process)."""
    rng = np.random.RandomState(step)
    prompt_mask = np.ones((B, P), np.int32)
    prompt_mask[1::2, : 2 + step] = 0  # left padding, different per step
    lengths = rng.randint(1, R + 1, (B, G)).astype(np.int32)
    rewards = rng.randn(B, G).astype(np.float32)
    return Rollout(
        prompt_ids=rng.randint(4, vocab, (B, P)).astype(np.int32), prompt_mask=prompt_mask,
        responses=rng.randint(4, vocab, (B, G, R)).astype(np.int32),
        response_mask=(np.arange(R) < lengths[..., None]).astype(np.float32),
        old_logp=np.zeros((B, G, R), np.float32), rewards=rewards,
        advantages=rewards - rewards.mean(1, keepdims=True), format_ok=np.ones((B, G), bool),
        ratings=np.full((B, G), 3.0, np.float32), lengths=lengths)


def train(mesh) -> Trainer:
    """``STEPS`` GRPO updates; this process contributes its block of each rollout."""
    from tests.helpers import TINY, tiny_model

    trainer = Trainer(tiny_model(mesh=mesh), mesh, OptimConfig(learning_rate=1e-2),
                      GRPOConfig(group_size=G, max_new_tokens=R))
    index, count = distributed.process_batch_share(mesh)
    rows = slice(index * B // count, (index + 1) * B // count)
    for step in range(STEPS):
        local = jax.tree.map(lambda x: x[rows], synthetic_rollout(step, TINY.vocab_size))
        trainer.grpo_step(distributed.global_batch(local, mesh))
    return trainer


def flat_numpy(tree) -> dict[str, np.ndarray]:
    """A pytree of (fully addressable) arrays as {key path: numpy array}."""
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    distributed.add_arguments(parser)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    distributed.initialize_from_args(args)
    print(f"process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
    mesh = make_mesh(**MESH)
    trainer = train(mesh)
    with Checkpointer(args.out / "checkpoints") as checkpoints:
        checkpoints.save(STEPS, params=trainer.params, opt_state=trainer.opt_state,
                         rng_keys={"rollout": jax.random.key(0)}, data_state=None,
                         config={"test": "multiprocess"}, metrics={}, force=True)
    params = multihost_utils.process_allgather(trainer.params, tiled=True)
    if distributed.is_primary():
        np.savez(args.out / "params.npz", **flat_numpy(params))


if __name__ == "__main__":
    main()
