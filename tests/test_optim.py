"""Tests for mocosfl_jax.algorithm.optim: PyTorch SGD arithmetic, masked client updates, EMA."""
import chex
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


def test_masked_update_keeps_non_participants_bit_identical():
  tx = optim.make_sgd(0.9, 5e-4)
  key = jax.random.key(0)
  params = {'a': jax.random.normal(key, (3, 4)), 'b': jnp.arange(3.0)}
  state = jax.vmap(tx.init)(params)
  grads = jax.tree.map(jnp.ones_like, params)
  mask = jnp.array([True, False, True])
  p1, s1 = optim.masked_sgd_update(tx, params, state, grads, jnp.array([0.1, 0.1, 0.2]), mask)
  for new, old in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((params, state))):
    np.testing.assert_array_equal(new[1], old[1])
    assert not np.array_equal(new[0], old[0])
  # participants equal an unmasked single-client update
  p0, _ = optim.sgd_update(tx, jax.tree.map(lambda x: x[2], params),
                           jax.tree.map(lambda x: x[2], state),
                           jax.tree.map(lambda x: x[2], grads), 0.2)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[2], p1), p0, rtol=1e-6)


def test_ema_golden_params_only():
  target = {'params': {'w': jnp.array([1.0, 2.0])}, 'batch_stats': {'m': jnp.array([5.0])}}
  online = {'params': {'w': jnp.array([0.0, 4.0])}, 'batch_stats': {'m': jnp.array([7.0])}}
  out = optim.ema(target, online, 0.99)
  np.testing.assert_allclose(out['params']['w'], [0.99, 2.02], rtol=1e-6)
  np.testing.assert_array_equal(out['batch_stats']['m'], [5.0])      # buffers untouched
  bare = optim.ema({'w': jnp.array([1.0])}, {'w': jnp.array([0.0])}, 0.5)
  assert float(bare['w'][0]) == pytest.approx(0.5)
