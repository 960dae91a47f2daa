"""What several test modules share: the tiny model configs, a tiny random decoder and the
inputs it takes, a fake scored rollout, tree comparisons, the transformers reference models,
and small runners for the CLI and for worker processes. Fixtures live in conftest.py."""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from reczero_jax.models import Decoder, ModelConfig
from reczero_jax.train.step import Rollout

# The JAX-side tiny model: Qwen2-style (q/k/v bias), GQA 4/2, untied.
TINY = ModelConfig(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                   eos_token_id=3)
# The transformers-side tiny models (config kwargs); the HF interop tests vary layers, heads,
# tying and rope per case.
HF_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
               bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=256)
HF_CASES = {
    "qwen2-bias-untied": ("Qwen2Config", dict(num_hidden_layers=2, tie_word_embeddings=False)),
    "qwen2-bias-tied": ("Qwen2Config", dict(num_hidden_layers=2, tie_word_embeddings=True)),
    "llama-gqa4-tied": ("LlamaConfig",
                        dict(num_hidden_layers=3, num_key_value_heads=1, tie_word_embeddings=True)),
    # head_dim 32 != hidden / heads, llama3 rope scaling whose bands the 512-token test spans
    "llama3-rope-untied": ("LlamaConfig", dict(num_hidden_layers=2, head_dim=32,
                                               tie_word_embeddings=False,
                                               rope_parameters=LLAMA3_ROPE)),
}


def tiny_model(seed=0, mesh=None, config=TINY, **kwargs) -> Decoder:
    """A random ``config`` decoder with weights 4x HF's init scale, so the distribution is far
    from uniform and differences between paths would show."""
    model = Decoder(config, rngs=nnx.Rngs(seed), mesh=mesh, **kwargs)
    state = nnx.state(model)
    scaled = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, scaled)
    nnx.update(model, state)
    return model


def left_padded_prompts(batch=2, length=21, seed=0):
    """Random [batch, length] ids and a mask whose row r > 0 has 3r + 2 left pads."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(4, TINY.vocab_size, (batch, length))
    mask = np.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 3 * row + 2] = 0
    return ids, mask


# The fake rollout's shape: B prompts of P tokens, G responses of R tokens.
B, G, P, R = 4, 2, 12, 6


def fake_rollout(seed=0) -> Rollout:
    """A scored rollout of random tokens for ``TINY``: one left-padded prompt, responses of
    random lengths 1..R, centred random advantages."""
    rng = np.random.RandomState(seed)
    prompt_ids = rng.randint(4, TINY.vocab_size, (B, P)).astype(np.int32)
    prompt_mask = np.ones((B, P), np.int32)
    prompt_mask[1, :4] = 0
    responses = rng.randint(4, TINY.vocab_size, (B, G, R)).astype(np.int32)
    lengths = rng.randint(1, R + 1, (B, G)).astype(np.int32)
    mask = (np.arange(R) < lengths[..., None]).astype(np.float32)
    rewards = rng.randn(B, G).astype(np.float32)
    return jax.tree.map(jnp.asarray, Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, responses=responses, response_mask=mask,
        old_logp=np.zeros((B, G, R), np.float32), rewards=rewards,
        advantages=rewards - rewards.mean(1, keepdims=True), format_ok=np.ones((B, G), bool),
        ratings=np.full((B, G), 3.0, np.float32), lengths=lengths))


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


def assert_same_loss_and_grads(result, reference, atol=1e-5):
    (loss, grads), (ref_loss, ref_grads) = result, reference
    # On-policy the loss value is ~0 (ratio 1, centred advantages); the gradient is not.
    assert float(optax.tree.norm(ref_grads)) > 1e-2
    np.testing.assert_allclose(loss, ref_loss, atol=atol)
    assert_trees_close(grads, ref_grads, atol=atol)


def randomize_torch(model, seed: int) -> None:
    """Every weight of a transformers model random (transformers zero-initialises biases and
    sets norms to one).

    Weights of std 0.15 make attention far from uniform (scores of std ~1.4), so a wrong
    position, mask or head mapping moves the logits by O(0.1). The final norm scale of ~0.3
    brings the logits to std ~0.3: there float32 rounding (transformers' own fp32 logits
    differ from its fp64 ones by ~1e-5 at std 1.2) stays under the 1e-5 tolerance.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name == "model.norm.weight":
                param.copy_(0.3 * (1 + 0.2 * noise))
            elif name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)


def make_torch_model(case: str, seed: int = 0):
    """The transformers model of ``HF_CASES[case]`` (fp32, eager attention), randomised."""
    import torch
    import transformers

    config_class, overrides = HF_CASES[case]
    config = getattr(transformers, config_class)(**{**HF_TINY, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32)
    randomize_torch(model, seed)
    return model.eval()


def run_data_prepare(*argv):
    """(exit status, stdout, stderr) of ``reczero data prepare ...`` through its ``register``."""
    from reczero_jax.data.cli import register

    parser = argparse.ArgumentParser(prog="reczero")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "prepare", *map(str, argv)])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = args.func(args)
    return status, out.getvalue(), err.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def wait_for(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each worker's output, after asserting that it succeeded; kills stragglers."""
    outputs = []
    try:
        for index, proc in enumerate(procs):
            output, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"process {index} failed:\n{output[-4000:]}"
            outputs.append(output)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def run_train_group(*argv) -> int:
    """``reczero train|export|eval ...`` through the train command group's ``register``."""
    from reczero_jax.train.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def restored_state(run_dir, step):
    """The checkpoint of ``step`` of the run in ``run_dir`` (wherever its config put the
    checkpoints) restored in this process on one device: (host arrays of its parameters and
    optimizer state, the ``Restored``)."""
    from reczero_jax.config import OptimConfig, load_config
    from reczero_jax.mesh import single_device_mesh
    from reczero_jax.train.checkpoint import Checkpointer
    from reczero_jax.train.export import checkpoint_directory, restore_model
    from reczero_jax.train.step import Trainer

    model, config, _ = restore_model(run_dir, step)
    trainer = Trainer(model, single_device_mesh(), OptimConfig(**config["optim"]))
    checkpoints = checkpoint_directory(load_config(run_dir / "config.yaml"))
    restored = Checkpointer(checkpoints).restore(
        step, abstract_params=trainer.params, param_sharding=trainer.param_sharding,
        abstract_opt_state=trainer.opt_state, opt_sharding=trainer.opt_sharding)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves((restored.params, restored.opt_state))]
    return leaves, restored
