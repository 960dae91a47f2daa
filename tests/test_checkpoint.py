"""Orbax checkpoints: exact round trip, restore onto other meshes, retention, corruption
fallback, config compatibility, SIGTERM guard."""

import dataclasses
import functools
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reczero_jax import distributed
from reczero_jax import mesh as meshlib
from reczero_jax.config import OptimConfig, load_config
from reczero_jax.train.checkpoint import (
    COMPATIBILITY_KEYS,
    Checkpointer,
    PreemptionGuard,
    _flatten,
    check_compatible,
)
from reczero_jax.train.step import Trainer
from tests.helpers import tiny_model

CONFIG = {
    "model": {"path": "tiny", "hidden_size": 32, "vocab_size": 96},
    "grpo": {"group_size": 2, "max_new_tokens": 6, "temperature": 1.0},
    "data": {"max_prompt_tokens": 12, "buckets": (12,)},
    "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
    "train": {"steps": 6},
}


def make_trainer(mesh, seed=0):
    return Trainer(tiny_model(seed=seed, mesh=mesh), mesh, OptimConfig(learning_rate=1e-2))


@functools.cache
def compiled_adam_step(trainer):
    """A jitted AdamW update of ``trainer``'s state with pseudo-random gradients, donating
    the parameters and optimizer state like ``Trainer.grpo_update`` (and cheap to compile)."""

    def update(params, opt_state, seed):
        grads = jax.tree.map(lambda p: jnp.sin(p * (seed + 1.0)), params)
        updates, opt_state = trainer.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(update, donate_argnums=(0, 1),
                   out_shardings=(trainer.param_sharding, trainer.opt_sharding))


def adam_step(trainer, seed):
    trainer.params, trainer.opt_state = compiled_adam_step(trainer)(
        trainer.params, trainer.opt_state, jnp.float32(seed))


def host_copy(tree):
    return [np.array(leaf) for leaf in jax.tree.leaves(tree)]


def assert_bitwise_equal(restored, expected):
    leaves = jax.tree.leaves(restored)
    assert len(leaves) == len(expected)
    for leaf, want in zip(leaves, expected, strict=True):
        assert leaf.dtype == want.dtype and leaf.shape == want.shape
        np.testing.assert_array_equal(np.asarray(leaf), want)


def restore_targets(trainer):
    return dict(abstract_params=trainer.params, param_sharding=trainer.param_sharding,
                abstract_opt_state=trainer.opt_state, opt_sharding=trainer.opt_sharding)


def save_trainer(ckpt, trainer, step, **overrides):
    kwargs = dict(params=trainer.params, opt_state=trainer.opt_state,
                  rng_keys={"sample": jax.random.key(step)},
                  data_state={"next_index": step}, config=CONFIG,
                  metrics={"reward_mean": 0.5 * step})
    kwargs.update(overrides)
    return ckpt.save(step, **kwargs)


@pytest.fixture(scope="module")
def trained():
    """A trainer on a (2, 2, 2) mesh after one update (non-zero Adam moments, count 1).
    Tests read its values when they run; one advances it by a step."""
    trainer = make_trainer(meshlib.make_mesh(2, 2, 2))
    adam_step(trainer, seed=0)
    return trainer


def test_save_restore_is_bitwise_exact_even_when_buffers_are_donated_after_save(trained,
                                                                             tmp_path):
    trainer = trained
    params, opt_state = host_copy(trainer.params), host_copy(trainer.opt_state)
    count = int(trainer.opt_state[1][0].count)
    assert count >= 1
    assert np.abs(np.asarray(trainer.opt_state[1][0].mu["layers"]["wq"][...])).max() > 0
    rng_keys = {"sample": jax.random.key(7), "shuffle": jax.random.split(jax.random.key(1), 3),
                "dropout": jax.random.key(5, impl="rbg")}
    metrics = {"reward_mean": np.float32(0.25), "val_mae": 0.8125}
    with Checkpointer(tmp_path / "run") as ckpt:
        assert save_trainer(ckpt, trainer, 4, rng_keys=rng_keys, metrics=metrics,
                            data_state={"next_index": 17, "parent": {"epoch": 2}})
        # The next update runs while the save is in flight and donates the saved buffers;
        # the checkpoint must hold the values from before it.
        adam_step(trainer, seed=1)
        assert save_trainer(ckpt, trainer, 5, data_state=b'{"next_index": 18}')
        ckpt.wait()
        restored = ckpt.restore(4, **restore_targets(trainer))
        later = ckpt.restore(**restore_targets(trainer))

    assert restored.step == 4 and later.step == 5
    assert_bitwise_equal(restored.params, params)
    assert_bitwise_equal(restored.opt_state, opt_state)
    assert int(restored.opt_state[1][0].count) == count
    assert int(later.opt_state[1][0].count) == count + 1
    assert_bitwise_equal(later.params, host_copy(trainer.params))
    for name, key in rng_keys.items():
        assert restored.rng_keys[name].dtype == key.dtype
        np.testing.assert_array_equal(jax.random.key_data(restored.rng_keys[name]),
                                      jax.random.key_data(key))
    np.testing.assert_array_equal(jax.random.uniform(restored.rng_keys["sample"], (5,)),
                                  jax.random.uniform(rng_keys["sample"], (5,)))
    assert restored.data_state == {"next_index": 17, "parent": {"epoch": 2}}
    assert later.data_state == b'{"next_index": 18}'
    assert restored.metrics == {"reward_mean": 0.25, "val_mae": 0.8125}
    check_compatible(restored.config, CONFIG)  # tuples came back as lists, still compatible
    assert restored.config["model"] == CONFIG["model"]


@pytest.mark.parametrize("shape", [(1, 4, 2), (1, 1, 1)])
def test_restore_onto_another_mesh_shape(trained, tmp_path, shape):
    with Checkpointer(tmp_path / "run") as ckpt:
        save_trainer(ckpt, trained, 1)
    target = make_trainer(meshlib.make_mesh(*shape), seed=1)  # different values to overwrite
    restored = Checkpointer(tmp_path / "run").restore(**restore_targets(target))
    assert_bitwise_equal(restored.params, host_copy(trained.params))
    assert_bitwise_equal(restored.opt_state, host_copy(trained.opt_state))
    for tree, shardings in ((restored.params, target.param_sharding),
                            (restored.opt_state, target.opt_sharding)):
        for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings),
                                  strict=True):
            assert leaf.sharding == sharding
    wq = restored.params["layers"]["wq"][...]
    assert wq.sharding.mesh.shape == dict(zip(meshlib.MESH_AXES, shape, strict=True))


def test_restore_of_params_alone_for_export(trained, tmp_path):
    with Checkpointer(tmp_path / "run") as ckpt:
        save_trainer(ckpt, trained, 2)
        restored = ckpt.restore(abstract_params=trained.params,
                                param_sharding=trained.param_sharding)
    assert restored.opt_state is None
    assert_bitwise_equal(restored.params, host_copy(trained.params))
    with pytest.raises(ValueError, match="abstract_opt_state and its sharding"):
        ckpt.restore(abstract_opt_state=trained.opt_state)


@pytest.mark.parametrize("keep_last", [1, 2])
def test_old_steps_are_deleted_only_after_the_new_one_is_committed(trained, tmp_path,
                                                                   keep_last):
    run = tmp_path / "run"
    ckpt = Checkpointer(run, keep_last=keep_last)
    deletions = []
    deleter = ckpt._manager._checkpoint_deleter  # orbax internals: observe its GC moment
    delete_steps = deleter.delete_steps

    def observed_delete(steps):
        if steps:
            on_disk = sorted(int(p.name) for p in run.iterdir() if p.name.isdigit())
            deletions.append((list(steps), on_disk))
        return delete_steps(steps)

    deleter.delete_steps = observed_delete
    for step in (1, 2, 3):
        assert save_trainer(ckpt, trained, step)
    ckpt.close()
    # Each old step is deleted while finalizing a newer one, after that one was committed
    # (renamed from its temporary name to its step number).
    expected = [([step - keep_last], list(range(step - keep_last, step + 1)))
                for step in range(keep_last + 1, 4)]
    assert deletions == expected
    kept = list(range(4 - keep_last, 4))
    assert Checkpointer(run).all_steps() == kept
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith("_")) == [
        str(step) for step in kept]


def test_interval_and_forced_saves(trained, tmp_path):
    with Checkpointer(tmp_path / "run", save_every=4) as ckpt:
        saved = {step: save_trainer(ckpt, trained, step) for step in range(1, 9)}
        assert [step for step, ok in saved.items() if ok] == [4, 8]
        assert save_trainer(ckpt, trained, 9, force=True)  # e.g. on SIGTERM or the last step
        ckpt.wait()
        assert not save_trainer(ckpt, trained, 9, force=True)  # never overwrites a step
        assert ckpt.all_steps() == [4, 8, 9]


def test_best_checkpoints_by_val_mae_are_kept_next_to_the_latest(tmp_path):
    tree = {"w": jnp.arange(4.0)}
    maes = {1: 0.9, 2: 0.4, 3: 0.7, 4: None, 5: 0.8}
    with Checkpointer(tmp_path / "run", keep_last=1, keep_best=1) as ckpt:
        for step, mae in maes.items():
            metrics = {} if mae is None else {"val_mae": mae}
            ckpt.save(step, params=tree, opt_state=tree, rng_keys={}, data_state=None,
                      config=CONFIG, metrics=metrics)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 5]
        assert ckpt.best_step() == 2


def largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture
def three_steps(tmp_path):
    """Steps 1, 2, 3 of a (1, 1, 1) trainer, each after one more update."""
    trainer = make_trainer(meshlib.make_mesh(1, 1, 1))
    values = {}
    with Checkpointer(tmp_path / "run", keep_last=3) as ckpt:
        for step in (1, 2, 3):
            adam_step(trainer, seed=step)
            values[step] = host_copy(trainer.params)
            save_trainer(ckpt, trainer, step)
    return tmp_path / "run", trainer, values


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(three_steps):
    run, trainer, values = three_steps
    victim = largest_file(run / "3" / "params")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    ckpt = Checkpointer(run)
    with pytest.warns(RuntimeWarning, match="checkpoint step 3 .* cannot be read"):
        restored = ckpt.restore(**restore_targets(trainer))
    assert restored.step == 2 and restored.data_state == {"next_index": 2}
    assert_bitwise_equal(restored.params, values[2])
    with pytest.raises(Exception):  # noqa: B017 - an explicit step never falls back
        ckpt.restore(3, **restore_targets(trainer))


def test_latest_complete_step_skips_a_step_with_missing_files(three_steps):
    run, trainer, _ = three_steps
    (run / "3" / "run" / "metadata").unlink()
    (run / "2" / "opt_state" / "_METADATA").unlink()
    ckpt = Checkpointer(run)
    with pytest.warns(RuntimeWarning) as caught:
        assert ckpt.latest_complete_step() == 1
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "step 3" in messages[0] and "3/run/metadata" in messages[0]
    assert "step 2" in messages[1] and "'opt_state'" in messages[1]
    with pytest.warns(RuntimeWarning):
        assert ckpt.saved_config() == Checkpointer(run).restore(1).config


def test_restore_with_no_checkpoint_is_a_clear_error(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="there are no committed steps"):
        Checkpointer(tmp_path / "empty").restore(**restore_targets(trained))


def test_incompatible_config_is_an_error_naming_each_key():
    saved = dataclasses.asdict(load_config(None, []))
    changed = dataclasses.asdict(load_config(None, [
        "model.path=other", "grpo.group_size=4", "seed=3", "grpo.temperature=0.7",
        "mesh.fsdp=4", "train.steps=100", "optim.learning_rate=0.001"]))
    with pytest.raises(ValueError) as error:
        check_compatible(saved, changed)
    message = str(error.value)
    assert f"model.path: checkpoint has {saved['model']['path']!r}, config has 'other'" in message
    assert "grpo.group_size: checkpoint has 8, config has 4" in message
    assert "seed: checkpoint has 0, config has 3" in message
    for allowed in ("temperature", "mesh", "train.steps", "learning_rate"):
        assert allowed not in message
    # Mesh, step count, learning rate and sampling temperature may change freely.
    check_compatible(saved, {**changed, "model": saved["model"], "grpo": saved["grpo"],
                             "seed": saved["seed"]})
    dropped = {key: value for key, value in saved.items() if key != "data"}
    with pytest.raises(ValueError, match="data.max_prompt_tokens: checkpoint has 1024, config "
                                         "has '<absent>'"):
        check_compatible(saved, dropped)


def test_compatibility_keys_name_config_entries():
    entries = set(_flatten(dataclasses.asdict(load_config(None, []))))
    for key in COMPATIBILITY_KEYS:
        assert key in entries or any(name.startswith(key + ".") for name in entries), key


def test_untyped_rng_key_is_rejected(trained, tmp_path):
    with Checkpointer(tmp_path / "run") as ckpt, pytest.raises(TypeError, match="'sample'"):
        save_trainer(ckpt, trained, 1, rng_keys={"sample": jax.random.PRNGKey(0)})


def test_preemption_guard_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not guard.requested and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler runs in the main thread between bytecodes
        assert guard.requested and guard.should_stop()
        assert guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_steps_asked_for_are_kept_next_to_the_latest(tmp_path):
    tree = {"w": jnp.arange(4.0)}
    with Checkpointer(tmp_path / "run", keep_last=1, keep_steps=(2,)) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, params=tree, opt_state=tree, rng_keys={}, data_state=None,
                      config=CONFIG, metrics={})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 5]


def test_preemption_flag_is_or_ed_across_processes_by_one_collective(monkeypatch):
    """should_stop is the per-step collective: another process's request stops this one."""
    calls = []

    def another_process_was_signalled(flag):
        calls.append(flag)
        return True

    monkeypatch.setattr(distributed, "any_process", another_process_was_signalled)
    assert PreemptionGuard().should_stop() and calls == [False]
