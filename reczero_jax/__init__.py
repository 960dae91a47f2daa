"""RecZero / RecOne in JAX."""

from reczero_jax import xla_flags as _xla_flags

_xla_flags.apply_defaults()  # before jax starts a backend (reczero_jax.xla_flags)
