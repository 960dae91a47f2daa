"""XLA flags this project sets by default, added to ``XLA_FLAGS`` when ``reczero_jax`` is
imported (before jax starts a backend: XLA reads the variable once, when jax creates its
first client).

The defaults are for jax on CPU, so they are added only where no accelerator plugin is
installed (``libtpu``; ``jax_plugins``, where the CUDA and ROCm plugins live), or where
``JAX_PLATFORMS`` names ``cpu`` first: another backend's XLA is not asked to parse a flag it
was not tested with. A user's own setting always wins: a flag that ``XLA_FLAGS`` already
names is left as it is.
Importing ``reczero_jax`` after jax has started its backends changes nothing (and says so at
INFO level), so a script that runs jax code first should import ``reczero_jax`` first or set
the flags itself. Subprocesses inherit the variable, so every process of a run compiles with
the same flags.

The defaults and why (measured with ``python -m benchmarks.profile_decode``, see
``benchmarks/PROFILE.md``):

* ``--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT``. XLA:CPU (jaxlib
  0.10.2) hands dots *and* reductions to YNNPACK by default
  (``LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE``). Its reductions ran several
  times slower than XLA's own loops: SmolLM2's head on 1,024 positions plus the entropy of
  its [1,024, 49,152] logits took 1.07 s instead of 0.62 s, and a SmolLM2-135M GRPO update
  at (P, R, G) = (512, 128, 8) 25.5 s instead of 16.5 s. Dots stay with YNNPACK; the decode step did not
  change (95 and 111 ms, within this machine's noise). Only the CPU backend reads it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

DEFAULT_FLAGS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
}

_logger = logging.getLogger(__name__)


def with_defaults(flags: str) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) plus ``--name=value`` for every default whose name it
    does not mention."""
    added = [f"--{name}={value}" for name, value in DEFAULT_FLAGS.items()
             if f"--{name}=" not in flags and f"--{name} " not in f"{flags} "]
    return " ".join([flags.strip(), *added]).strip()


def _backends_started() -> bool:
    """Whether jax has created its backend clients (too late for ``XLA_FLAGS``). Reads jax
    only if it is already imported: importing this module never imports jax."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bridge is not None and bridge.backends_are_initialized()


def runs_on_cpu(environ=os.environ) -> bool:
    """Whether jax will compute on its CPU backend: ``JAX_PLATFORMS`` names ``cpu`` first, or,
    without it, no TPU or GPU plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in ("libtpu", "jax_plugins"))


def apply_defaults(environ=os.environ) -> bool:
    """Add the defaults to ``environ["XLA_FLAGS"]`` when jax will run on CPU. False (and an
    INFO line) if jax's backends have already started, so the flags would not take effect."""
    flags = environ.get("XLA_FLAGS", "")
    if not runs_on_cpu(environ) or with_defaults(flags) == flags.strip():
        return True
    if _backends_started():
        _logger.info("XLA_FLAGS defaults not applied (jax's backends have already started): "
                     "%s", with_defaults(""))
        return False
    environ["XLA_FLAGS"] = with_defaults(flags)
    return True
