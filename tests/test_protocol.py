"""Tests for mocosfl_jax.algorithm.protocol: the split client/server functions reproduce the fused step."""
import chex
import jax
import jax.numpy as jnp
import pytest

from core_testlib import fast_compile  # noqa: F401  pylint: disable=unused-import
from core_testlib import assert_states_close, case, copy_tree, pool_for, views
from mocosfl_jax.algorithm import protocol, state, step

_split = jax.jit(protocol.split_step, static_argnums=(0, 1), static_argnames=('keep_residual',))


pytestmark = pytest.mark.usefixtures('fast_compile')


@pytest.mark.parametrize('name', ['monaco_two_view_sampled', 'moco_original_full'])
def test_split_path_equals_fused_step(name):
  net, cfg = case(name)
  cs, ss = state.init_state(net, cfg, jax.random.key(11))
  split, fused = (copy_tree(cs), copy_tree(ss)), (cs, ss)
  for i, (e, b) in enumerate(((0, 0), (0, 1), (1, 0))):
    vq, vk = views(cfg, net, 20 + i)
    args = (pool_for(cfg, e), vq, vk, jnp.int32(e), jnp.int32(b))
    *split, m_s = _split(net, cfg, *split, *args)
    *fused, m_f = step.train_step(net, cfg, *fused, *args)
    chex.assert_trees_all_close(m_s, m_f, rtol=1e-5, atol=1e-6)
  assert_states_close(tuple(split), tuple(fused))


def test_client_backward_residual_equals_recompute_and_shapes():
  net, cfg = case('moco_original_full')           # stand-in with BatchNorm
  cs, ss = state.init_state(net, cfg, jax.random.key(2))
  one = lambda t: jax.tree.map(lambda x: x[0], t)
  vq, vk = views(cfg, net, 0)
  fwd = jax.jit(protocol.client_forward, static_argnums=(0, 1))
  a_q, a_k, on, mom, res = fwd(net, cfg, one(cs.online), one(cs.momentum), vq[0], vk[0])
  chex.assert_shape((a_q, a_k), (cfg.rows_per_client,) + net.smashed_shape)
  # client EMA happened: momentum = 0.99 * old + 0.01 * online (identical at init -> unchanged)
  chex.assert_trees_all_close(mom['params'], one(cs.online)['params'], rtol=1e-6)
  grad = jax.random.normal(jax.random.key(3), a_q.shape)
  bwd = jax.jit(protocol.client_backward, static_argnums=(0, 1))
  with_res = bwd(net, cfg, on, one(cs.opt_state), vq[0], vk[0], grad, jnp.float32(0.1), res)
  recompute = bwd(net, cfg, on, one(cs.opt_state), vq[0], vk[0], grad, jnp.float32(0.1))
  chex.assert_trees_all_close(with_res, recompute, rtol=1e-6, atol=1e-7)
  assert not jnp.allclose(jax.tree.leaves(with_res[0]['params'])[0],
                          jax.tree.leaves(on['params'])[0])
  # server_step returns one gradient block per pool position, shaped like the smashed data
  stack = lambda x: jnp.stack([x] * cfg.pool_size)
  _, g, m = jax.jit(protocol.server_step, static_argnums=(0, 1))(
      net, cfg, ss, stack(a_q), stack(a_k), pool_for(cfg, 0), jnp.int32(0))
  chex.assert_shape(g, (cfg.pool_size, cfg.rows_per_client) + net.smashed_shape)
  assert set(m) >= {'loss', 'contrastive_acc', 'server_lr', 'pos_logit_mean'}
