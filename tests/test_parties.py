"""Tests for mocosfl_jax.algorithm.parties: the per-party functions, run as a deployment runs
them (step.split_train_step), reproduce the fused step."""
import chex
import jax
import jax.numpy as jnp
import pytest

from core_testlib import fast_compile  # noqa: F401  pylint: disable=unused-import
from core_testlib import assert_states_close, case, copy_tree, pool_for, views
from mocosfl_jax import parallel
from mocosfl_jax.algorithm import parties, state, step

_split = jax.jit(step.split_train_step, static_argnums=(0, 1),
                 static_argnames=('keep_residual',))


pytestmark = pytest.mark.usefixtures('fast_compile')


@pytest.mark.parametrize('name', ['monaco_two_view_sampled', 'moco_original_full'])
def test_split_path_equals_fused_step(name):
  net, cfg = case(name)
  st = state.create_train_state(net, cfg, jax.random.key(11))
  split, fused = copy_tree(st), st
  for i, (e, b) in enumerate(((0, 0), (0, 1), (1, 0))):
    vq, vk = views(cfg, net, 20 + i)
    pool = pool_for(cfg, e)
    rows = jax.tree.map(lambda x: x[pool], split.clients)
    new, m_s = _split(net, cfg, split.replace(clients=rows), vq, vk, jnp.int32(e),
                      jnp.int32(b), pool=pool)
    clients = jax.tree.map(lambda f, r: f.at[pool].set(r), split.clients, new.clients)
    if float(m_s['synced']):
      clients = clients.replace(online=jax.tree.map(
          lambda x: jnp.broadcast_to(x[pool[0]], x.shape), clients.online))
      if cfg.momentum_sync:
        clients = clients.replace(momentum=jax.tree.map(
            lambda x: jnp.broadcast_to(x[pool[0]], x.shape), clients.momentum))
    split = new.replace(clients=clients)
    fused, m_f = parallel.train_step(net, cfg, fused, pool, vq, vk, jnp.int32(e), jnp.int32(b))
    chex.assert_trees_all_close(m_s, m_f, rtol=1e-5, atol=1e-6)
  assert_states_close((split.clients, split.server), (fused.clients, fused.server))


def test_client_receive_residual_equals_recompute_and_shapes():
  net, cfg = case('moco_original_full')           # stand-in with BatchNorm
  st = state.create_train_state(net, cfg, jax.random.key(2))
  cs, ss, tx = st.clients, st.server, st.tx
  one = lambda t: jax.tree.map(lambda x: x[0], t)
  vq, vk = views(cfg, net, 0)
  fwd = jax.jit(parties.client_send, static_argnums=(0, 1))
  a_q, a_k, on, mom, res = fwd(net, cfg, one(cs.online), one(cs.momentum), vq[0], vk[0])
  chex.assert_shape((a_q, a_k), (cfg.rows_per_client,) + net.smashed_shape)
  # client EMA happened: momentum = 0.99 * old + 0.01 * online (identical at init -> unchanged)
  chex.assert_trees_all_close(mom['params'], one(cs.online)['params'], rtol=1e-6)
  grad = jax.random.normal(jax.random.key(3), a_q.shape)
  bwd = jax.jit(parties.client_receive, static_argnums=(0, 1, 2))
  with_res = bwd(net, cfg, tx, on, one(cs.opt_state), vq[0], vk[0], grad, jnp.float32(0.1), res)
  recompute = bwd(net, cfg, tx, on, one(cs.opt_state), vq[0], vk[0], grad, jnp.float32(0.1))
  chex.assert_trees_all_close(with_res, recompute, rtol=1e-6, atol=1e-7)
  assert not jnp.allclose(jax.tree.leaves(with_res[0]['params'])[0],
                          jax.tree.leaves(on['params'])[0])
  # server_step returns one gradient block per pool position, shaped like the smashed data
  stack = lambda x: jnp.stack([x] * cfg.pool_size)
  _, g, m = jax.jit(parties.server_step, static_argnums=(0, 1, 2))(
      net, cfg, tx, ss, stack(a_q), stack(a_k), pool_for(cfg, 0), jnp.int32(0))
  chex.assert_shape(g, (cfg.pool_size, cfg.rows_per_client) + net.smashed_shape)
  assert set(m) >= {'loss', 'contrastive_acc', 'server_lr', 'pos_logit_mean'}
