"""Tests for mocosfl_jax.algorithm.sync: FedAvg golden numbers, momentum sync switch, shard_map parity."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mocosfl_jax.algorithm import sync


def _pool():
  online = {'params': {'w': jnp.array([[1.0, 2.0], [3.0, 6.0]])},
            'batch_stats': {'m': jnp.array([[1.0], [3.0]])}}
  momentum = {'params': {'w': jnp.array([[0.0, 2.0], [4.0, 6.0]])},
              'batch_stats': {'m': jnp.array([[5.0], [7.0]])}}
  return online, momentum


def test_fedavg_pool_golden_and_divergences():
  online, momentum = _pool()
  avg_on, avg_mom, m = sync.fedavg_pool(online, momentum, sync_momentum=True)
  np.testing.assert_allclose(avg_on['params']['w'], [2.0, 4.0])
  np.testing.assert_allclose(avg_on['batch_stats']['m'], [2.0])      # buffers averaged too
  np.testing.assert_allclose(avg_mom['params']['w'], [2.0, 4.0])
  np.testing.assert_allclose(avg_mom['batch_stats']['m'], [6.0])
  # client 0: online-mean = [-1, -2] -> 2.5; client 1: [1, 2] -> 2.5
  assert float(m['div_online_global']) == pytest.approx(2.5)
  # online-momentum: client 0 [1, 0] -> 0.5; client 1 [-1, 0] -> 0.5
  assert float(m['div_online_momentum']) == pytest.approx(0.5)
  # momentum-mean: client 0 [-2, -2] -> 4; client 1 [2, 2] -> 4
  assert float(m['div_momentum_global']) == pytest.approx(4.0)
  _, none, _ = sync.fedavg_pool(online, momentum, sync_momentum=False)
  assert none is None


def test_fedavg_client_keeps_momentum_without_sync_and_ints():
  online, momentum = _pool()
  online = dict(online, counter=jnp.array([1, 2], jnp.int32))
  _, mom, _ = jax.vmap(lambda o, m: sync.fedavg_client(o, m, False), axis_name='clients')(
      online, momentum)
  chex.assert_trees_all_equal(mom, momentum)
  avg, _, _ = jax.vmap(lambda o, m: sync.fedavg_client(o, m, False), axis_name='clients')(
      online, momentum)
  np.testing.assert_array_equal(avg['counter'], [1, 2])                  # ints not averaged


def test_broadcast_clients():
  out = sync.broadcast_clients({'w': jnp.array([1.0, 2.0])}, 3)
  np.testing.assert_array_equal(out['w'], [[1, 2]] * 3)


def test_same_body_under_shard_map():
  devices = jax.devices()
  if len(devices) < 4:
    pytest.skip('needs 4 (forced host) devices')
  mesh = jax.make_mesh((4,), ('clients',), axis_types=(jax.sharding.AxisType.Auto,))
  key = jax.random.key(0)
  online = {'params': {'w': jax.random.normal(key, (4, 3))}, 'batch_stats': {}}
  momentum = {'params': {'w': jax.random.normal(jax.random.key(1), (4, 3))}, 'batch_stats': {}}
  body = lambda o, m: sync.fedavg_client(o, m, True)
  ref = jax.vmap(body, axis_name='clients')(online, momentum)

  def per_shard(o, m):   # one client per device: drop / restore the block axis
    out = body(*jax.tree.map(lambda x: x[0], (o, m)))
    return jax.tree.map(lambda x: x[None], out)

  out = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=(P('clients'), P('clients')),
                              out_specs=P('clients')))(online, momentum)
  chex.assert_trees_all_close(out, ref, rtol=1e-6, atol=1e-7)
