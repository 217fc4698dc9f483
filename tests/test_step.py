"""Tests for the fused step (algorithm/step.py through parallel.train_step): vmapped step ==
Python loop over clients running the per-party functions, sync semantics, masking of
non-participants, no recompilation, determinism."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_testlib import fast_compile  # noqa: F401  pylint: disable=unused-import
from core_testlib import (CASES, assert_states_close, case, client_lr_by_hand, clients_by_hand,
                          copy_tree, fedavg_by_hand, pool_for, stack_by_hand, views)
from mocosfl_jax import parallel
from mocosfl_jax.algorithm import parties, plan, state
from mocosfl_jax.benchmarks.compiles import count_compiles

SCHEDULE = ((0, 0), (0, 1), (1, 0))      # (epoch, batch_idx); b=1 is a sync step (S=4, avg 2)


pytestmark = pytest.mark.usefixtures('fast_compile')


_fwd = jax.jit(parties.client_send, static_argnums=(0, 1))
_bwd = jax.jit(parties.client_receive, static_argnums=(0, 1, 2))
_srv = jax.jit(parties.server_step, static_argnums=(0, 1, 2))


def loop_step(net, cfg, st, pool, vq, vk, epoch, b):
  """Reference-style step: Python loops over the pool with unbatched client functions."""
  cs, ss, tx = st.clients, st.server, st.tx
  per = clients_by_hand(cs)
  count, draws = np.array(cs.count), np.array(cs.draws)
  pool = [int(c) for c in pool]
  aq, ak = [], []
  for j, c in enumerate(pool):                        # sequential client forwards
    a_q, a_k, on, mom, _ = _fwd(net, cfg, per[c][0], per[c][1], vq[j], vk[j])
    per[c][0], per[c][1] = on, mom
    aq.append(a_q)
    ak.append(a_k)
  ss, grads, m = _srv(net, cfg, tx, ss, jnp.stack(aq), jnp.stack(ak), jnp.array(pool, jnp.int32),
                      jnp.int32(epoch))
  for j, c in enumerate(pool):                        # sequential client backward + SGD
    lr = client_lr_by_hand(cfg, count[c], epoch) * float(cs.lr_scale[c])
    per[c][0], per[c][2] = _bwd(net, cfg, tx, per[c][0], per[c][2], vq[j], vk[j], grads[j],
                                jnp.float32(lr))      # residual=None: recompute forward
    count[c] += 1
    draws[c] += 1
  if plan.is_sync_step(b, cfg.steps_per_epoch, cfg.avg_freq):
    fedavg_by_hand(cfg, per, pool)
  cs = stack_by_hand(per, count, draws, cs.lr_scale)
  return st.replace(clients=cs, server=ss), m


def _run(fn, net, cfg, st, schedule=SCHEDULE, seed=0):
  metrics = []
  for i, (e, b) in enumerate(schedule):
    vq, vk = views(cfg, net, seed + i)
    st, m = fn(net, cfg, st, pool_for(cfg, e), vq, vk, jnp.int32(e), jnp.int32(b))
    metrics.append(m)
  return st.clients, st.server, metrics


@pytest.mark.parametrize('name', sorted(CASES))
def test_vmapped_step_equals_python_loop(name):
  net, cfg = case(name)
  st = state.create_train_state(net, cfg, jax.random.key(0))
  init_cs = copy_tree(st.clients)
  ref_cs, ref_ss, ref_m = _run(loop_step, net, cfg, copy_tree(st))
  got_cs, got_ss, got_m = _run(parallel.train_step, net, cfg, st)
  assert_states_close((got_cs, got_ss), (ref_cs, ref_ss))
  np.testing.assert_array_equal(got_cs.count, ref_cs.count)
  for g, r in zip(got_m, ref_m):
    np.testing.assert_allclose(g['loss'], r['loss'], rtol=1e-5)
    np.testing.assert_allclose(g['server_lr'], r['server_lr'], rtol=1e-6)
  assert [float(m['synced']) for m in got_m] == [0.0, 1.0, 0.0]
  assert int(got_ss.step) == 3 and int(got_ss.epoch) == 1
  # the steps really trained something, and the queue pointer(s) moved as specified
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(got_cs.online['params']),
                                                  jax.tree.leaves(init_cs.online['params']))]
  assert any(moved)
  if cfg.feature_sharing:
    assert int(got_ss.ptr) == 3 * cfg.keys_per_step % cfg.queue_size
  else:
    np.testing.assert_array_equal(
        got_ss.ptr, np.asarray(got_cs.count) * cfg.keys_per_client % cfg.client_queue_size)


def _one_step(net, cfg, st, b, e=0):
  vq, vk = views(cfg, net, 0)
  return parallel.train_step(net, cfg, copy_tree(st), pool_for(cfg, e), vq, vk, jnp.int32(e),
                             jnp.int32(b))


@pytest.mark.parametrize('name', ['monaco_two_view_sampled', 'moco_original_full'])
def test_sync_writes_pool_means_to_all_clients(name):
  net, cfg = case(name)
  st = state.create_train_state(net, cfg, jax.random.key(0))
  st, _ = _one_step(net, cfg, st, b=0)                 # clients differ after one local step
  pool = np.asarray(pool_for(cfg, 0))
  local, m0 = _one_step(net, cfg, st, b=2)             # not a sync step: pre-sync values
  synced, m1 = _one_step(net, cfg, st, b=3)            # sync step, same inputs
  local, synced = local.clients, synced.clients
  assert float(m0['synced']) == 0.0 and float(m1['synced']) == 1.0
  assert float(m1['div_online_global']) > 0 and float(m1['div_online_momentum']) > 0
  pool_mean = lambda t: jax.tree.map(lambda x: jnp.mean(x[pool], axis=0), t)
  for i in range(cfg.num_clients):
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], synced.online),
                                pool_mean(local.online), rtol=1e-6, atol=1e-7)
  if cfg.momentum_sync:
    for i in range(cfg.num_clients):
      chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], synced.momentum),
                                  pool_mean(local.momentum), rtol=1e-6, atol=1e-7)
  else:   # MocoSFL: momentum nets untouched by the sync
    chex.assert_trees_all_equal(synced.momentum, local.momentum)
  chex.assert_trees_all_equal(synced.opt_state, local.opt_state)   # buffers never averaged


def test_non_participants_bit_identical_and_frozen_client():
  net, cfg = case('monaco_two_view_sampled')
  st = state.create_train_state(net, cfg, jax.random.key(3))
  st, _ = _one_step(net, cfg, st, b=0)
  pool = set(np.asarray(pool_for(cfg, 0)).tolist())
  out = set(range(cfg.num_clients)) - pool
  frozen = sorted(pool)[0]
  cs = st.clients.replace(lr_scale=st.clients.lr_scale.at[frozen].set(0.0))
  new = _one_step(net, cfg, st.replace(clients=cs), b=0)[0].clients
  for i in out:
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(cs)):
      np.testing.assert_array_equal(a[i], b[i])
  for i in pool:
    assert int(new.count[i]) == int(cs.count[i]) + 1
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[frozen], new.online['params']),
                              jax.tree.map(lambda x: x[frozen], cs.online['params']))


def test_second_call_does_not_recompile_and_is_deterministic():
  net, cfg = case('monaco_two_view_sampled')
  schedule = ((0, 0), (0, 1), (1, 2), (2, 3))           # sync and non-sync, new epochs/pools
  st = state.create_train_state(net, cfg, jax.random.key(5))
  with count_compiles(parallel.train_step) as first:
    a = _run(parallel.train_step, net, cfg, copy_tree(st), schedule)
  # Outputs fed back as inputs (dtypes, weak types, shardings) hit the same executable:
  # at most the first call of this test compiled (0 if an earlier test already did).
  assert first.count <= 1
  with count_compiles(parallel.train_step) as second:
    b = _run(parallel.train_step, net, cfg, st, schedule)
  assert second.count == 0
  chex.assert_trees_all_equal(a[:2], b[:2])            # same seed -> bit-identical state
  chex.assert_trees_all_equal(a[2], b[2])


def test_bad_inputs_raise():
  net, cfg = case('moco_original_full')
  st = state.create_train_state(net, cfg, jax.random.key(0))
  vq, vk = views(cfg, net, 0)
  with pytest.raises(ValueError, match='pool'):
    parallel.train_step(net, cfg, st, jnp.arange(2, dtype=jnp.int32), vq, vk, jnp.int32(0),
                        jnp.int32(0))
  with pytest.raises(ValueError, match='views_q'):
    parallel.train_step(net, cfg, st, pool_for(cfg, 0), vq[:, :1], vk, jnp.int32(0),
                        jnp.int32(0))
