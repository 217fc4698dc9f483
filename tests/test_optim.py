"""Tests for mocosfl_jax.algorithm.optim: PyTorch SGD arithmetic and the EMA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.algorithm import optim


def test_sgd_weight_decay_momentum_golden():
  tx = optim.make_sgd(momentum=0.9, weight_decay=0.1)
  w = {'w': jnp.array([1.0, -2.0])}
  g = {'w': jnp.array([0.5, 0.0])}
  s = tx.init(w)
  # step 1: g' = g + wd*w = [0.6, -0.2]; buf = g'; w -= 0.1*buf -> [0.94, -1.98]
  w, s = optim.sgd_update(tx, w, s, g, 0.1)
  np.testing.assert_allclose(w['w'], [0.94, -1.98], rtol=1e-6)
  # step 2 (lr 0.2): g' = [0.5 + 0.094, -0.198]; buf = 0.9*[0.6, -0.2] + g' = [1.134, -0.378]
  w, s = optim.sgd_update(tx, w, s, g, 0.2)
  np.testing.assert_allclose(w['w'], [0.94 - 0.2 * 1.134, -1.98 + 0.2 * 0.378], rtol=1e-6)


def test_ema_golden_params_only():
  target = {'params': {'w': jnp.array([1.0, 2.0])}, 'batch_stats': {'m': jnp.array([5.0])}}
  online = {'params': {'w': jnp.array([0.0, 4.0])}, 'batch_stats': {'m': jnp.array([7.0])}}
  out = optim.ema(target, online, 0.99)
  np.testing.assert_allclose(out['params']['w'], [0.99, 2.02], rtol=1e-6)
  np.testing.assert_array_equal(out['batch_stats']['m'], [5.0])      # buffers untouched
  bare = optim.ema({'w': jnp.array([1.0])}, {'w': jnp.array([0.0])}, 0.5)
  assert float(bare['w'][0]) == pytest.approx(0.5)


def test_sgd_keeps_a_float64_learning_rate():
  """The learning rate is not rounded to float32 on the way: a float64 run steps with it."""
  tx = optim.make_sgd(momentum=0.9, weight_decay=0.0)
  with jax.enable_x64():
    w = {'w': jnp.array([1.0, -2.0], jnp.float64)}
    g = {'w': jnp.array([0.5, 0.25], jnp.float64)}
    lr = jnp.asarray(0.1 + 1e-12, jnp.float64)   # 0.1 + 1e-12 is not a float32
    w, _ = optim.sgd_update(tx, w, tx.init(w), g, lr)
  assert w['w'].dtype == jnp.float64
  want = np.array([1.0, -2.0]) - (0.1 + 1e-12) * np.array([0.5, 0.25])
  np.testing.assert_array_equal(w['w'], want)
