"""RecZero / RecOne in JAX."""
