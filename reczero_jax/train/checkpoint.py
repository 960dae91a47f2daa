"""Orbax checkpoints of a training run: exact resume, any-mesh restore, preemption.

One step directory ``RUN_DIR/<step>/`` holds five items::

    params/     parameters (nnx.State), array storage, each host writes its own shards
    opt_state/  optax state (Adam moments mu, nu and the step count), array storage
    run/        JSON: every RNG key (impl name, shape, uint32 key data), the data-iterator state
                and the loop's progress (e.g. the phase and its step, evaluation results)
    config/     JSON: the resolved config
    metrics/    JSON: the step's metrics (orbax's own item; it ranks the best-N checkpoints)

Safety comes from orbax's commit protocol: a step is written under a temporary name and
renamed to ``<step>`` only once every item of every host is complete, and only renamed
steps are listed. Old steps are garbage-collected (``keep_last`` latest, plus
``keep_best`` lowest ``val_mae``) in the save's finalize phase, AFTER the new step has been
committed, so the last good checkpoint always survives a crash mid-save. A committed step
whose files were damaged later is caught when it is read: ``restore()`` warns and falls back
to the previous step.

Typical use in a training loop::

    ckpt = Checkpointer(run_dir, save_every=K, keep_last=3)
    if ckpt.latest_complete_step() is not None:
        check_compatible(ckpt.saved_config(), config)
        state = ckpt.restore(abstract_params=trainer.params,   # onto this run's mesh
                             param_sharding=trainer.param_sharding,
                             abstract_opt_state=trainer.opt_state,
                             opt_sharding=trainer.opt_sharding)
        trainer.params, trainer.opt_state = state.params, state.opt_state
    with PreemptionGuard() as guard:
        for step in ...:
            ...                                                 # one train step
            stop = guard.should_stop()
            ckpt.save(step, params=trainer.params, opt_state=trainer.opt_state,
                      rng_keys=..., data_state=iterator.get_state(), config=config,
                      metrics=metrics, force=stop or step == last_step)
            if stop:
                break
    ckpt.close()                                                # waits for the async save
"""

from __future__ import annotations

import json
import math
import signal
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from reczero_jax import distributed

# Entries of ExperimentConfig that fix the shapes of the saved arrays (the model and its
# parameter dtype), the position the data-iterator state refers to (the data, prompt
# length and layout, batch size, seed), or the meaning of a step number (the algorithm and
# its SFT phase, whose length offsets the GRPO steps). A dotted key names one entry, or
# every entry under it when it names a sub-tree. Mesh layout, GRPO step count, evaluation,
# logging, checkpointing and learning rates may change between runs.
COMPATIBILITY_KEYS = (
    "algorithm",
    "seed",
    "model.path",
    "model.param_dtype",
    "model.lora",
    "data.dir",
    "data.layout",
    "data.max_prompt_tokens",
    "data.train_samples",
    "grpo.group_size",
    "grpo.max_new_tokens",
    "train.prompts_per_step",
    "sft.traces",
    "sft.steps",
    "sft.batch_size",
    "sft.max_response_tokens",
)

BEST_METRIC = "val_mae"


class Restored(NamedTuple):
    """A restored step; params/opt_state are None when no target was asked for."""

    step: int
    params: Any
    opt_state: Any
    rng_keys: dict[str, jax.Array]
    data_state: dict | bytes | str | None
    config: dict
    metrics: dict[str, float]
    progress: dict


def abstract_like(tree, shardings):
    """``tree`` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs placed by ``shardings``,
    a tree of the same structure holding one ``jax.sharding.Sharding`` per leaf."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree, shardings)


class Checkpointer:
    """An orbax ``CheckpointManager`` over ``directory`` (local path or ``gs://``).

    ``save_every``: a step is saved when ``step % save_every == 0`` (or when forced).
    ``keep_last``: the newest N steps are kept; ``keep_best`` > 0 also keeps the N steps with
    the lowest ``metrics['val_mae']`` (steps without it rank last); ``keep_steps``: these steps
    are kept too, once saved (e.g. the policy a later phase refers to). ``async_save``: ``save``
    returns once the arrays are copied off the devices, and the files are written in the
    background (``wait()`` or the next ``save`` blocks until they are committed).
    """

    def __init__(self, directory, *, save_every: int = 1, keep_last: int = 3,
                 keep_best: int = 0, keep_steps: Sequence[int] = (), async_save: bool = True):
        if save_every < 1 or keep_last < 1 or keep_best < 0:
            raise ValueError(f"need save_every >= 1, keep_last >= 1, keep_best >= 0; got "
                             f"{save_every=}, {keep_last=}, {keep_best=}")
        self.directory = epath.Path(directory)
        if not self.directory.is_absolute():
            self.directory = self.directory.resolve()
        preserve = [policies.LatestN(n=keep_last)]
        if keep_best:
            preserve.append(policies.BestN(get_metric_fn=_best_metric, reverse=True,
                                           n=keep_best, keep_checkpoints_without_metrics=False))
        if keep_steps:
            preserve.append(policies.CustomSteps(steps=[int(step) for step in keep_steps]))
        options = ocp.CheckpointManagerOptions(
            # No initial-save policy: the first step is saved only if the interval says so.
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_every),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            # best_fn also makes the manager write each step's metrics (and read them back).
            best_fn=_best_metric,
            best_mode="min",
            enable_async_checkpointing=async_save,
            # Partial steps of a killed run carry a temporary name; remove them on start.
            cleanup_tmp_directories=True,
        )
        # Registered up front so that a fresh process can read item metadata before any save.
        handlers = ocp.handlers.create_default_handler_registry(
            params=ocp.StandardCheckpointHandler(), opt_state=ocp.StandardCheckpointHandler(),
            run=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler())
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=handlers)

    # -- saving ---------------------------------------------------------------------------

    def save(self, step: int, *, params, opt_state, rng_keys: Mapping[str, jax.Array],
             data_state: dict | bytes | str | None, config: Mapping[str, Any],
             metrics: Mapping[str, float], progress: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Start saving ``step``; returns whether a save was started (the interval, or
        ``force``; a step that already exists is never overwritten). ``progress`` is any
        JSON the caller needs to continue from this step (``Restored.progress``).

        Safe to donate ``params``/``opt_state`` to the next train step right after this
        returns: orbax copies every array to host memory before returning (its default, no
        device-to-host byte limit) and writes the files from those copies.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        run_state = {"rng_keys": _keys_to_json(rng_keys), "data_state": _encode_data(data_state),
                     "progress": _as_json("progress", dict(progress or {}))}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            run=ocp.args.JsonSave(run_state),
            config=ocp.args.JsonSave(_as_json("config", config)),
        )
        metrics = {name: float(value) for name, value in metrics.items()}
        return bool(self._manager.save(step, args=args, metrics=metrics, force=force))

    def wait(self) -> None:
        """Block until the save in flight is committed (raises if it failed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (waits for a save in flight to commit first)."""
        self.wait()
        return list(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the lowest ``val_mae`` (the latest when none has it)."""
        steps = self.all_steps()
        scored = [(_best_metric(self._manager.metrics(s) or {}), s) for s in steps]
        finite = [(score, s) for score, s in scored if math.isfinite(score)]
        return min(finite)[1] if finite else (max(steps) if steps else None)

    def latest_complete_step(self) -> int | None:
        """The newest committed step whose metadata and JSON items read back.

        A step that fails is reported (RuntimeWarning with the step and the error) and the
        one before it is tried. Array data is checked only when it is read: ``restore()``
        falls back the same way on, e.g., a truncated array file.
        """
        for step in reversed(self.all_steps()):
            try:
                self._read_json(step)
                metadata = self._manager.item_metadata(step)
                for item in ("params", "opt_state"):
                    if metadata[item] is None:
                        raise FileNotFoundError(f"item {item!r} has no readable metadata")
            except Exception as error:  # noqa: BLE001 - any read failure disqualifies a step
                _warn_skipped(self.directory, step, error)
                continue
            return step
        return None

    def saved_config(self, step: int | None = None) -> dict:
        """The resolved config stored with ``step`` (default: the latest complete step)."""
        step = self._step_or_latest(step)
        return self._read_json(step)["config"]

    def restore(self, step: int | None = None, *, abstract_params=None, param_sharding=None,
                abstract_opt_state=None, opt_sharding=None) -> Restored:
        """Restore ``step`` onto the given shardings (any mesh shape: each device reads its
        own slices). ``abstract_*`` are trees of arrays or ShapeDtypeStructs (only shape and
        dtype are used), ``*_sharding`` the matching trees of shardings; leave a pair None to
        skip that item (e.g. no optimizer state for an export).

        ``step=None``: the newest step that restores; an unreadable one is reported
        (RuntimeWarning) and the previous one tried. An explicit ``step`` never falls back.
        """
        targets = {}
        for name, abstract, sharding in (("params", abstract_params, param_sharding),
                                         ("opt_state", abstract_opt_state, opt_sharding)):
            if (abstract is None) != (sharding is None):
                raise ValueError(f"pass both abstract_{name} and its sharding, or neither")
            if abstract is not None:
                targets[name] = abstract_like(abstract, sharding)
        if step is not None:
            self.wait()
            return self._restore_step(int(step), targets)
        failures = []
        for candidate in reversed(self.all_steps()):
            try:
                return self._restore_step(candidate, targets)
            except Exception as error:  # noqa: BLE001 - any read failure disqualifies a step
                _warn_skipped(self.directory, candidate, error)
                failures.append(f"step {candidate}: {type(error).__name__}: {error}")
        detail = "; ".join(failures) if failures else "there are no committed steps"
        raise FileNotFoundError(f"no checkpoint in {self.directory} restores ({detail})")

    # -- internals ------------------------------------------------------------------------

    def _step_or_latest(self, step: int | None) -> int:
        if step is None:
            step = self.latest_complete_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        return int(step)

    def _read_json(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            run=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        return {"run": restored["run"], "config": restored["config"]}

    def _restore_step(self, step: int, targets: dict) -> Restored:
        items = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        restored = self._manager.restore(step, args=ocp.args.Composite(
            run=ocp.args.JsonRestore(), config=ocp.args.JsonRestore(), **items))
        run = restored["run"]
        return Restored(
            step=step,
            params=restored["params"] if "params" in targets else None,
            opt_state=restored["opt_state"] if "opt_state" in targets else None,
            rng_keys=_keys_from_json(run["rng_keys"]),
            data_state=_decode_data(run["data_state"]),
            config=restored["config"],
            metrics=dict(self._manager.metrics(step) or {}),
            progress=run["progress"],
        )


def check_compatible(saved_config: Mapping[str, Any], config: Mapping[str, Any],
                     keys: Iterable[str] = COMPATIBILITY_KEYS) -> None:
    """Raise ValueError naming every entry under ``keys`` (dotted paths) that differs
    between a checkpoint's config and this run's; entries outside ``keys`` may differ."""
    saved = _flatten(_as_json("saved config", saved_config))
    current = _flatten(_as_json("config", config))
    differences = []
    for key in keys:
        names = sorted({name for name in (*saved, *current)
                        if name == key or name.startswith(key + ".")})
        for name in names:
            before, now = saved.get(name, "<absent>"), current.get(name, "<absent>")
            if before != now:
                differences.append(f"{name}: checkpoint has {before!r}, config has {now!r}")
    if differences:
        raise ValueError(
            "the checkpoint was written by an incompatible config:\n  "
            + "\n  ".join(differences)
            + "\nresume with the checkpoint's values, or start over in a new run directory "
            "(or with --restart)")


class PreemptionGuard:
    """Turns SIGTERM (a TPU preemption notice) into a flag the training loop polls.

    Inside ``with PreemptionGuard() as guard:`` the signal no longer kills the process; it
    sets ``guard.requested``. The loop calls ``guard.should_stop()`` after each step and, when
    true, saves with ``force=True``, waits, and exits 0. The previous handlers come back on
    exit. Must be entered from the main thread (Python delivers signals only there).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        del frame
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered from the main thread")
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def should_stop(self) -> bool:
        """Whether any process was asked to stop. With several processes the flags are
        OR-ed across them (``distributed.any_process``: one tiny all-gather, so call it once
        per step, in every process), so every host stops after the same step and they all
        take part in the final save."""
        return distributed.any_process(self.requested)


# -- helpers -----------------------------------------------------------------------------


def _best_metric(metrics: Mapping[str, float]) -> float:
    return float(metrics.get(BEST_METRIC, math.inf))


def _warn_skipped(directory, step: int, error: BaseException) -> None:
    warnings.warn(f"checkpoint step {step} in {directory} cannot be read "
                  f"({type(error).__name__}: {error}); falling back to the previous step",
                  RuntimeWarning, stacklevel=3)


def _as_json(what: str, value) -> Any:
    """A JSON round trip (tuples become lists), so saved and live configs compare equal."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as error:
        raise TypeError(f"{what} is not JSON-serialisable ({error}); pass plain dicts/lists "
                        "(e.g. dataclasses.asdict or OmegaConf.to_container(resolve=True))"
                        ) from None


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _keys_to_json(rng_keys: Mapping[str, jax.Array]) -> dict:
    encoded = {}
    for name, key in rng_keys.items():
        if not jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
            raise TypeError(f"rng_keys[{name!r}] is not a typed PRNG key (dtype "
                            f"{getattr(key, 'dtype', type(key))}); make keys with jax.random.key")
        data = np.asarray(jax.random.key_data(key))
        encoded[name] = {"impl": str(jax.random.key_impl(key)), "shape": list(data.shape),
                         "data": data.reshape(-1).tolist()}
    return encoded


def _keys_from_json(encoded: Mapping[str, dict]) -> dict[str, jax.Array]:
    return {name: jax.random.wrap_key_data(
                np.asarray(entry["data"], np.uint32).reshape(entry["shape"]), impl=entry["impl"])
            for name, entry in encoded.items()}


def _encode_data(state) -> dict:
    """The data-iterator state as JSON. grain's ``DatasetIterator.get_state()`` is a dict;
    its DataLoader iterator's is JSON text as bytes. The pipeline iterates the same global
    batches in every process (data/pipeline.py), so one copy serves all hosts."""
    if isinstance(state, bytes):
        try:
            return {"kind": "bytes", "value": state.decode("utf-8")}
        except UnicodeDecodeError:
            raise ValueError("data_state bytes are not UTF-8 text; grain iterator states are "
                             "JSON text, pass that") from None
    if isinstance(state, str):
        return {"kind": "str", "value": state}
    return {"kind": "json", "value": _as_json("data_state", state)}


def _decode_data(encoded: dict):
    value = encoded["value"]
    return value.encode("utf-8") if encoded["kind"] == "bytes" else value
