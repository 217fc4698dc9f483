"""PyTorch-equivalent SGD and the parameter EMA.

PyTorch SGD (dampening 0, no nesterov): g' = g + wd * w; buf = momentum * buf + g' (buf = g' at
the first step, which a zero-initialised optax trace reproduces); w = w - lr * buf. We build it
as optax `add_decayed_weights(wd)` + `trace(momentum)` and apply `-lr` ourselves, so the
learning rate is an ordinary (traced, per-client) array supplied each step rather than state.
Weight decay covers every parameter, GroupNorm affine and biases included, as the reference.
Only the 'params' collection is optimised; 'batch_stats' are never touched here. See
docs/reference.md, 'Optimisers' and 'Per-step order'.
"""
from collections.abc import Mapping
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def make_sgd(momentum: float = 0.9, weight_decay: float = 5e-4) -> optax.GradientTransformation:
  """Learning-rate-free part of PyTorch SGD: decayed weights then momentum trace."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum))


def sgd_update(tx: optax.GradientTransformation, params: PyTree, opt_state: PyTree,
               grads: PyTree, lr) -> Tuple[PyTree, PyTree]:
  """One SGD step with an externally supplied learning rate (scalar array).

  The learning rate is rounded to each parameter's type only here, so a float64 run steps with
  its float64 schedule value.

  Returns:
    (new_params, new_opt_state).
  """
  direction, opt_state = tx.update(grads, opt_state, params)
  lr = jnp.asarray(lr)
  params = jax.tree.map(lambda p, d: p - lr.astype(p.dtype) * d, params, direction)
  return params, opt_state


def ema(target_vars: PyTree, online_vars: PyTree, tau) -> PyTree:
  """Target <- tau * target + (1 - tau) * online over 'params' only (buffers untouched).

  Same arithmetic order as the reference (`t * m + o * (1 - m)`). Works on a variables dict
  ({'params', 'batch_stats'}) or, when there is no 'params' key, on a bare parameter tree.
  """
  def upd(t, o):
    return t * tau + o * (1.0 - tau)

  if isinstance(target_vars, Mapping) and 'params' in target_vars:
    new = dict(target_vars)
    new['params'] = jax.tree.map(upd, target_vars['params'], online_vars['params'])
    return new
  return jax.tree.map(upd, target_vars, online_vars)
