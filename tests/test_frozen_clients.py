"""Frozen clients (c_lr = 0, TAResSFL's deployment): the step takes no client backward and no
client optimizer step, the clients' params stay bit-identical over steps and syncs while the
server trains, on every mapping of the step (vmap, chunks, shard_map) and in the split step."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import core_testlib
from core_testlib import case, copy_tree, pool_for, views
from mocosfl_jax import parallel
from mocosfl_jax.algorithm import parties, state, step

fast_compile = core_testlib.fast_compile          # the fixture, used through pytestmark
pytestmark = pytest.mark.usefixtures('fast_compile')
# (epoch, batch_idx); S=4, avg_freq 2: b=1 and b=3 are sync steps.
SCHEDULE = ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1))


def frozen(name):
  net, cfg = case(name)
  return net, dataclasses.replace(cfg, c_lr=0.0)


def _changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# monaco_two_view_full: BatchNorm on both sides (client running stats), momentum sync, all
# clients; monaco_two_view_sampled: 2 of 4 clients per epoch (gather, scatter, the sync's copy
# to non-participants), on 4 devices with 2 masked padding clients.
@pytest.mark.parametrize('name,mapping', [('monaco_two_view_full', 'vmap'),
                                          ('monaco_two_view_full', 'chunks'),
                                          ('monaco_two_view_sampled', 'shard_map')])
def test_frozen_clients_keep_params_bit_identical_while_the_server_trains(name, mapping):
  net, cfg = frozen(name)
  assert cfg.frozen_clients
  st = state.create_train_state(net, cfg, jax.random.key(0))
  init = copy_tree(st)
  par = {'vmap': None, 'chunks': parallel.ClientParallel('vmap', chunk=2),
         'shard_map': parallel.ClientParallel('shard_map', mesh=parallel.client_mesh())}[mapping]
  if mapping == 'shard_map':
    st = st.replace(clients=parallel.shard_clients(st.clients, par.mesh),
                    server=parallel.replicate(st.server, par.mesh))
  synced = []
  for i, (e, b) in enumerate(SCHEDULE):
    vq, vk = views(cfg, net, i)
    st, m = parallel.train_step(net, cfg, st, pool_for(cfg, e), vq, vk, jnp.int32(e),
                                jnp.int32(b), par=par)
    synced.append(float(m['synced']))
    assert float(m['client_lr']) == 0.0
  assert synced == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
  # Bit for bit: every client's params (syncs included) and optimizer state.
  chex.assert_trees_all_equal(st.clients.online['params'], init.clients.online['params'])
  chex.assert_trees_all_equal(st.clients.opt_state, init.clients.opt_state)
  assert _changed(st.server.online['params'], init.server.online['params'])   # server trains
  assert _changed(st.clients.momentum['params'], init.clients.momentum['params'])  # EMA runs
  assert int(st.server.step) == len(SCHEDULE)
  stats = st.clients.online['batch_stats']
  if jax.tree.leaves(stats):   # train-mode BatchNorm: running stats follow the batches ...
    assert _changed(stats, init.clients.online['batch_stats'])
    for leaf in jax.tree.leaves(stats):   # ... and the last step's sync averaged them
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))


def _one_step(net, cfg, st, b=0):
  vq, vk = views(cfg, net, 0)
  args = (net, cfg, copy_tree(st), pool_for(cfg, 0), vq, vk, jnp.int32(0), jnp.int32(b))
  return parallel.train_step(*args), parallel.train_step.lower(*args)


def test_a_frozen_step_is_the_training_step_less_the_client_update_and_costs_less():
  net, cfg = case('moco_original_full')
  _, frozen_cfg = frozen('moco_original_full')
  st = state.create_train_state(net, cfg, jax.random.key(1))
  (trained, m1), lowered = _one_step(net, cfg, st)
  (fro, m0), lowered_frozen = _one_step(net, frozen_cfg, st)
  # The server's update needs no client gradient: the same with or without the client step.
  chex.assert_trees_all_close(fro.server, trained.server, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(m0['loss'], m1['loss'], rtol=1e-6)
  chex.assert_trees_all_close(fro.clients.momentum, trained.clients.momentum, rtol=1e-6)
  assert _changed(trained.clients.online['params'], st.clients.online['params'])
  chex.assert_trees_all_equal(fro.clients.online['params'], st.clients.online['params'])
  chex.assert_trees_all_equal(fro.clients.opt_state, st.clients.opt_state)
  # No client backward, no client SGD: fewer FLOPs in XLA's count of the same step.
  flops = lambda low: low.cost_analysis()['flops']
  assert flops(lowered_frozen) < flops(lowered)


def test_the_split_step_of_frozen_clients_sends_no_gradient_and_keeps_params():
  net, cfg = frozen('monaco_two_view_full')
  st = state.create_train_state(net, cfg, jax.random.key(2))
  init = copy_tree(st)
  vq, vk = views(cfg, net, 0)
  one = jax.tree.map(lambda x: x[0], (st.clients.online, st.clients.momentum))
  residual = parties.client_send(net, cfg, *one, vq[0], vk[0])[4]
  assert residual is None                      # no VJP built for a client that never steps
  split = jax.jit(step.split_train_step, static_argnums=(0, 1))
  fused = jax.jit(lambda *a: step.train_step(*a, pool=pool_for(cfg, 0)), static_argnums=(0, 1))
  a, b = copy_tree(st), copy_tree(st)
  for i, bi in enumerate((0, 1)):               # b=1: a sync step
    vq, vk = views(cfg, net, i)
    a, _ = split(net, cfg, a, vq, vk, jnp.int32(0), jnp.int32(bi), pool=pool_for(cfg, 0))
    b, _ = fused(net, cfg, b, vq, vk, jnp.int32(0), jnp.int32(bi))
  chex.assert_trees_all_equal(a.clients.online['params'], init.clients.online['params'])
  chex.assert_trees_all_equal(a.clients.opt_state, init.clients.opt_state)
  chex.assert_trees_all_close(a.server, b.server, rtol=1e-5, atol=1e-6)
