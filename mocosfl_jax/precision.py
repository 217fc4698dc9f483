"""The library's floating-point type: float32, or float64 when JAX's x64 mode is on.

Parameters, queues, learning rates and metrics are created in `float_dtype()` rather than a fixed
float32, so a run under `jax.experimental.enable_x64()` (or `jax_enable_x64`) is float64 from the
initial state to the loss. That is what the float64 comparisons against the reference need:
float32 rounding anywhere would dominate differences that are otherwise ~1e-14.
"""
import jax
import jax.numpy as jnp


def float_dtype() -> jnp.dtype:
  """float64 under jax_enable_x64, float32 otherwise (read when called, not at import)."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)
