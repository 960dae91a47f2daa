"""The config's dtype names (``config.DTYPES``: model.dtype, model.param_dtype, --dtype flags)
as jax dtypes: the one mapping from a name to a dtype."""

from __future__ import annotations

import jax.numpy as jnp

from reczero_jax.config import DTYPES

JAX_DTYPES = {name: jnp.dtype(name) for name in DTYPES}


def jax_dtype(name: str) -> jnp.dtype:
    """The jax dtype of a config dtype name; a ValueError lists the known names."""
    if name not in JAX_DTYPES:
        raise ValueError(f"unknown dtype {name!r} (use one of: {', '.join(JAX_DTYPES)})")
    return JAX_DTYPES[name]
