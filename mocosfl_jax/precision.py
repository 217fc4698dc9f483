"""The library's floating-point type: float32, or float64 when JAX's x64 mode is on.

Parameters, queues, learning rates and metrics are created in `float_dtype()` rather than a fixed
float32, so a run under `jax.enable_x64()` (or JAX_ENABLE_X64=1) is float64 from the initial
state to the loss. That is what float64 comparisons against the reference need: one float32
rounding anywhere would dominate the float64 rounding of everything else.
"""
import jax
import jax.numpy as jnp


def float_dtype() -> jnp.dtype:
  """float64 under jax_enable_x64, float32 otherwise (read when called, not at import)."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)
