"""`reczero export`: a run's checkpoint -> Hugging Face directory that transformers loads, with
the logits of our model (fp32, within 1e-5); --step picks the checkpoint, --dtype the weights."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from reczero_jax.config import OptimConfig, load_config
from reczero_jax.mesh import single_device_mesh
from reczero_jax.models import from_pretrained
from reczero_jax.train.checkpoint import Checkpointer
from reczero_jax.train.step import Trainer
from tests.helpers import run_train_group

IDS = np.random.default_rng(0).integers(0, 49152, (2, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A run directory with two checkpoints: step 1 holds the initial weights, step 2 the same
    plus seeded noise of std 0.05 (as a trained policy would differ). Returns the directory and
    the parameters of step 2 (host arrays)."""
    run = tmp_path_factory.mktemp("run")
    config = dataclasses.asdict(load_config(None, [f"model.path={tiny_model_dir}",
                                                   f"run_dir={run}"]))
    trainer = Trainer(from_pretrained(tiny_model_dir), single_device_mesh(), OptimConfig())
    leaves, treedef = jax.tree.flatten(trainer.params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    noisy = jax.tree.unflatten(treedef, [
        leaf + 0.05 * jax.random.normal(key, leaf.shape, leaf.dtype)
        for leaf, key in zip(leaves, keys, strict=True)])
    with Checkpointer(run / "checkpoints") as ckpt:
        for step, params in ((1, trainer.params), (2, noisy)):
            ckpt.save(step, params=params, opt_state=trainer.opt_state, rng_keys={},
                      data_state=None, config=config, metrics={}, force=True)
    return run, trainer.graphdef, noisy


def test_export_loads_in_transformers_with_equal_logits(run_dir, tmp_path):
    run, graphdef, params = run_dir
    out = tmp_path / "hf"
    assert run_train_group("export", "--run", run, "--out", out) == 0  # default: the latest step (2)

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.as_tensor(IDS)).logits.numpy()
    ours = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(IDS),
                                                  attention_mask=jnp.ones_like(IDS)))
    assert ours.std() > 1e-3  # the noise reaches the logits
    assert np.max(np.abs(ours - theirs)) < 1e-5
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer.encode("Rating: 4")) == "Rating: 4"


def test_step_and_dtype_options(run_dir, tiny_model_dir, tmp_path):
    run, _, _ = run_dir
    out = tmp_path / "hf"
    assert run_train_group("export", "--run", run, "--step", 1, "--out", out, "--dtype", "bfloat16") == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with (safe_open(out / "model.safetensors", "pt") as exported,
          safe_open(tiny_model_dir / "model.safetensors", "pt") as initial):
        assert set(exported.keys()) == set(initial.keys())
        for name in initial.keys():
            tensor = exported.get_tensor(name)
            assert tensor.dtype == torch.bfloat16
            torch.testing.assert_close(tensor, initial.get_tensor(name).to(torch.bfloat16),
                                       rtol=0, atol=0)  # step 1: the initial weights
    with pytest.raises(ValueError, match=r"step 7 is not in .*saved steps: \[1, 2\]"):
        run_train_group("export", "--run", run, "--step", 7, "--out", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        run_train_group("export", "--run", tmp_path, "--out", tmp_path / "none")
