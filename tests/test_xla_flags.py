"""The project's default XLA flags: added unless the user names them, and in effect."""

import json
import os
import subprocess
import sys

from reczero_jax import xla_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type"

# Compiles a reduction of a dot's output and reports whether YNNPACK took the reduction.
_PROBE = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
if sys.argv[1] == "jax-first":
    import jax
    jax.devices()
import reczero_jax
import jax, jax.numpy as jnp
program = jax.jit(lambda x, w: jnp.exp(x @ w).sum(-1)).lower(
    jnp.ones((16, 64)), jnp.ones((64, 512))).compile().as_text()
ynn_reduces = sum('__ynn_fusion' in line and 'reduce' in line for line in program.splitlines())
print(json.dumps({"flags": os.environ.get("XLA_FLAGS", ""), "ynn_reduces": ynn_reduces}))
"""


def _probe(order: str, flags: str | None) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if flags is not None:
        env["XLA_FLAGS"] = flags
    out = subprocess.run([sys.executable, "-c", _PROBE, order], env=env, check=True,
                         capture_output=True, text=True).stdout
    *log, result = out.strip().splitlines()
    return json.loads(result), "\n".join(log)


def test_with_defaults_adds_only_what_the_user_did_not_set():
    assert xla_flags.with_defaults("") == f"{YNN}=LIBRARY_FUSION_TYPE_DOT"
    assert xla_flags.with_defaults(" --a=1 ") == f"--a=1 {YNN}=LIBRARY_FUSION_TYPE_DOT"
    own = f"--a=1 {YNN}=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    assert xla_flags.with_defaults(own) == own


def test_apply_defaults_writes_the_environment_given(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backends_started", lambda: False)  # this process's have
    environ = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_flags.apply_defaults(environ)
    assert environ["XLA_FLAGS"] == (
        f"--xla_force_host_platform_device_count=2 {YNN}=LIBRARY_FUSION_TYPE_DOT")


def test_only_for_jax_on_cpu(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backends_started", lambda: False)
    for platforms, added in (("cpu", True), ("tpu,cpu", False), ("cuda", False)):
        environ = {"JAX_PLATFORMS": platforms, "XLA_FLAGS": "--a=1"}
        xla_flags.apply_defaults(environ)
        assert (YNN in environ["XLA_FLAGS"]) == added, platforms


def test_importing_the_package_first_keeps_reductions_out_of_ynnpack():
    result, _ = _probe("package-first", None)
    assert result["flags"] == f"{YNN}=LIBRARY_FUSION_TYPE_DOT"
    assert result["ynn_reduces"] == 0


def test_a_users_own_setting_wins():
    own = f"{YNN}=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    result, _ = _probe("package-first", own)
    assert result["flags"] == own
    assert result["ynn_reduces"] >= 1  # XLA's default: YNNPACK takes the reduction


def test_too_late_after_jax_started_changes_nothing_and_says_so():
    result, log = _probe("jax-first", None)
    assert result["flags"] == ""
    assert result["ynn_reduces"] >= 1
    assert "XLA_FLAGS defaults not applied" in log
