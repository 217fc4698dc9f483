"""Tests for mocosfl_jax.algorithm.queue: init, wrap-around enqueue, per-client queues by pool position."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.algorithm import queue as queue_lib
from mocosfl_jax.benchmarks.compiles import count_compiles


def test_init_is_normalised_per_key():
  q = queue_lib.init_queue(jax.random.key(0), 7, 5)
  assert q.shape == (7, 5)
  np.testing.assert_allclose(jnp.linalg.norm(q, axis=1), np.ones(7), rtol=1e-5)
  qc = queue_lib.init_client_queues(jax.random.key(0), 3, 4, 5)
  np.testing.assert_allclose(jnp.linalg.norm(qc, axis=-1), np.ones((3, 4)), rtol=1e-5)


def test_enqueue_wraparound_golden():
  q = jnp.arange(5.0)[:, None] * jnp.ones((1, 2))            # rows 0..4
  keys = (10.0 + jnp.arange(4.0))[:, None] * jnp.ones((1, 2))  # 10, 11, 12, 13
  out, ptr = queue_lib.enqueue(q, jnp.int32(3), keys)
  # rows 3, 4 <- 10, 11; wrap: rows 0, 1 <- 12, 13; row 2 kept.
  np.testing.assert_array_equal(out[:, 0], [12, 13, 2, 10, 11])
  assert int(ptr) == 2
  out, ptr = queue_lib.enqueue(out, ptr, keys[:3])           # no wrap: rows 2..4
  np.testing.assert_array_equal(out[:, 0], [12, 13, 10, 11, 12])
  assert int(ptr) == 0
  out, ptr = queue_lib.enqueue(out, jnp.int32(4), 20.0 + jnp.arange(5.0)[:, None] * jnp.ones(2))
  np.testing.assert_array_equal(out[:, 0], [21, 22, 23, 24, 20])   # b == K, full turn
  assert int(ptr) == 4


def test_enqueue_traced_pointer_matches_modular_reference():
  k, d, b = 7, 3, 3                                           # 7 % 3 != 0
  f = jax.jit(queue_lib.enqueue)
  q = jnp.zeros((k, d))
  ref = np.zeros((k, d))
  ptr, p = jnp.int32(0), 0
  compiles = []
  for step in range(6):
    keys = jax.random.normal(jax.random.key(step), (b, d))
    with count_compiles(f) as c:
      q, ptr = f(q, ptr, keys)
    compiles.append(c.count)
    ref[(p + np.arange(b)) % k] = np.asarray(keys)
    p = (p + b) % k
    np.testing.assert_array_equal(q, ref)
    assert int(ptr) == p
  assert compiles[1:] == [0] * 5                              # one executable for every ptr


def test_enqueue_rejects_too_many_keys():
  with pytest.raises(ValueError, match='b <= K'):
    queue_lib.enqueue(jnp.zeros((3, 2)), jnp.int32(0), jnp.zeros((4, 2)))


def test_per_client_enqueue_by_pool_position():
  queues = jnp.zeros((4, 3, 1))
  ptrs = jnp.array([0, 2, 0, 1], jnp.int32)
  pool = jnp.array([3, 1], jnp.int32)                         # position 0 is client 3
  keys = jnp.array([[[1.0], [2.0]], [[5.0], [6.0]]])
  q, p = queue_lib.enqueue_clients(queues, ptrs, pool, keys)
  np.testing.assert_array_equal(q[3, :, 0], [0, 1, 2])
  np.testing.assert_array_equal(q[1, :, 0], [6, 0, 5])        # ptr 2 wraps
  np.testing.assert_array_equal(q[0], queues[0])
  np.testing.assert_array_equal(q[2], queues[2])
  np.testing.assert_array_equal(p, [0, 1, 0, 0])
