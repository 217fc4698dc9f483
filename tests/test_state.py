"""Tests for mocosfl_jax.algorithm.state.create_train_state."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from mocosfl_jax.algorithm import state
from mocosfl_jax.algorithm.plan import StepConfig
import pytest

from core_testlib import fast_compile  # noqa: F401  pylint: disable=unused-import
from core_testlib import tiny_net

pytestmark = pytest.mark.usefixtures('fast_compile')


def _cfg(**kw):
  base = dict(num_clients=3, batch_size=2, queue_size=24, num_epochs=3, steps_per_epoch=4,
              avg_freq=2)
  base.update(kw)
  return StepConfig(**base)


def test_create_train_state_clients_identical_and_targets_are_copies():
  net = tiny_net()
  st = state.create_train_state(net, _cfg(), jax.random.key(0))
  cs, ss = st.clients, st.server
  for leaf in jax.tree.leaves((cs.online, cs.momentum, cs.opt_state)):
    assert leaf.shape[0] == 3
    for i in (1, 2):
      np.testing.assert_array_equal(leaf[i], leaf[0])
  chex.assert_trees_all_equal(cs.online, cs.momentum)
  chex.assert_trees_all_equal(ss.online, ss.momentum)
  # distinct buffers, so both may be donated
  for a, b in zip(jax.tree.leaves(cs.online), jax.tree.leaves(cs.momentum)):
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
  np.testing.assert_array_equal(cs.count, [0, 0, 0])
  np.testing.assert_array_equal(cs.lr_scale, [1, 1, 1])
  assert cs.count.dtype == jnp.int32 and cs.draws.dtype == jnp.int32
  chex.assert_shape(ss.queue, (24, net.key_dim))
  np.testing.assert_allclose(jnp.linalg.norm(ss.queue, axis=1), np.ones(24), rtol=1e-5)
  assert ss.ptr.shape == () and int(ss.step) == 0
  assert st.tx is state.optimizer(_cfg())          # one static optimizer per config


def test_create_train_state_per_client_queues_and_determinism():
  net = tiny_net()
  cfg = _cfg(feature_sharing=False)
  cs, ss = (lambda st: (st.clients, st.server))(state.create_train_state(net, cfg, jax.random.key(1)))
  chex.assert_shape(ss.queue, (3, 8, net.key_dim))
  chex.assert_shape(ss.ptr, (3,))
  st2 = state.create_train_state(net, cfg, jax.random.key(1))
  chex.assert_trees_all_equal((cs, ss), (st2.clients, st2.server))
  cs3 = state.create_train_state(net, cfg, jax.random.key(2)).clients
  assert not np.array_equal(jax.tree.leaves(cs3.online)[0], jax.tree.leaves(cs.online)[0])
