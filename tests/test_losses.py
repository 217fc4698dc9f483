"""Tests for mocosfl_jax.algorithm.losses: InfoNCE golden numbers and the stop-gradients of each form."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.algorithm import losses
from mocosfl_jax.algorithm.queue import l2_normalize


def test_info_nce_golden():
  q = jnp.array([[1.0, 0.0], [0.6, 0.8]])
  k = jnp.array([[0.6, 0.8], [0.6, 0.8]])
  queue = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  loss, acc, pos = losses.info_nce(q, k, queue, 0.5)
  # row 0 logits [0.6, 1, 0] / 0.5 -> positive not top-1; row 1 logits [1, .6, .8] / 0.5 -> top-1.
  row0 = math.log(math.exp(1.2) + math.exp(2.0) + math.exp(0.0)) - 1.2
  row1 = math.log(math.exp(2.0) + math.exp(1.2) + math.exp(1.6)) - 2.0
  assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-6)
  assert float(loss) == pytest.approx(1.0058115, rel=1e-5)
  assert float(acc) == pytest.approx(50.0)
  assert float(pos) == pytest.approx(0.8)


def test_info_nce_per_client_queues_group_rows():
  kq, kk, kn = jax.random.split(jax.random.key(0), 3)
  q = l2_normalize(jax.random.normal(kq, (6, 4)))
  k = l2_normalize(jax.random.normal(kk, (6, 4)))
  queues = l2_normalize(jax.random.normal(kn, (3, 5, 4)))       # 3 pool positions, 2 rows each

  @jax.jit
  def both(q, k, queues):
    grouped = losses.info_nce(q, k, queues, 0.1)
    parts = [losses.info_nce(q[2 * g:2 * g + 2], k[2 * g:2 * g + 2], queues[g], 0.1)
             for g in range(3)]
    return grouped, parts

  (loss, acc, _), parts = both(q, k, queues)
  assert float(loss) == pytest.approx(np.mean([float(p[0]) for p in parts]), rel=1e-6)
  assert float(acc) == pytest.approx(np.mean([float(p[1]) for p in parts]), rel=1e-6)


class _LinearNet:
  """apply_server = flatten @ W; enough to check where gradients flow."""

  @staticmethod
  def apply_server(variables, x, train=True):
    return x.reshape(x.shape[0], -1) @ variables['params']['w'], variables


def _setup(rows=4, d=3):
  ks = jax.random.split(jax.random.key(1), 5)
  online = {'params': {'w': jax.random.normal(ks[0], (2 * d, 5))}, 'batch_stats': {}}
  target = {'params': {'w': jax.random.normal(ks[1], (2 * d, 5))}, 'batch_stats': {}}
  a_q = jax.random.normal(ks[2], (rows, 2, d))
  a_k = jax.random.normal(ks[3], (rows, 2, d))
  queue = l2_normalize(jax.random.normal(ks[4], (16, 5)))
  return online, target, a_q, a_k, queue


def _emb(v, x):
  return l2_normalize(_LinearNet.apply_server(v, x)[0])


def test_original_form_sum_stop_gradients_and_key_order():
  online, target, a_q, a_k, queue = _setup()

  def f(aq, ak, w=online['params']['w']):
    v = {'params': {'w': w}, 'batch_stats': {}}
    return losses.server_loss(_LinearNet, 'original', 0.1, v, target, aq, ak, queue, 2)

  @jax.jit
  def everything(a_q, a_k, w):
    loss, aux = f(a_q, a_k)
    q1, q2 = _emb(online, a_q), _emb(online, a_k)
    k1, k2 = _emb(target, a_q), _emb(target, a_k)
    term1 = losses.info_nce(q1, k2, queue, 0.1)[0]
    term2, acc2, _ = losses.info_nce(q2, k1, queue, 0.1)
    g_q, g_k = jax.grad(lambda aq, ak: f(aq, ak)[0], argnums=(0, 1))(a_q, a_k)
    g_term1 = jax.grad(lambda aq: losses.info_nce(_emb(online, aq), k2, queue, 0.1)[0])(a_q)
    g_w = jax.grad(lambda w: f(a_q, a_k, w)[0])(w)
    g_w1 = jax.grad(lambda w: losses.info_nce(
        _emb({'params': {'w': w}}, a_q), k2, queue, 0.1)[0])(w)
    return dict(loss=loss, aux=aux, k1=k1, k2=k2, term1=term1, term2=term2, acc2=acc2, g_q=g_q,
                g_k=g_k, g_term1=g_term1, g_w=g_w, g_w1=g_w1)

  r = everything(a_q, a_k, online['params']['w'])
  assert float(r['loss']) == pytest.approx(float(r['term1'] + r['term2']), rel=1e-6)  # a sum
  assert float(r['aux']['acc']) == pytest.approx(float(r['acc2']))      # acc of the last term
  chex.assert_trees_all_close(r['aux']['keys'], jnp.concatenate([r['k1'], r['k2']]),
                              rtol=1e-6)                                 # k1 block first
  # per-client layout: client j = [k1 rows of j; k2 rows of j]
  chex.assert_trees_all_close(r['aux']['client_keys'][1],
                              jnp.concatenate([r['k1'][2:], r['k2'][2:]]), rtol=1e-6)
  # Clients get gradient from term 1 only; none through the key path or through A_k.
  chex.assert_trees_all_close(r['g_q'], r['g_term1'], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(r['g_k'], np.zeros_like(r['g_k']))
  # The server online net is trained by both terms (term 2 on client-target features).
  assert float(jnp.max(jnp.abs(r['g_w'] - r['g_w1']))) > 1e-4


@pytest.mark.parametrize('form', ['two_view', 'single'])
def test_single_term_forms(form):
  online, target, a_q, a_k, queue = _setup()
  loss, aux = losses.server_loss(_LinearNet, form, 0.1, online, target, a_q, a_k, queue, 2)
  q, k = _emb(online, a_q), _emb(target, a_k)
  assert float(loss) == pytest.approx(float(losses.info_nce(q, k, queue, 0.1)[0]), rel=1e-6)
  chex.assert_trees_all_close(aux['keys'], k, rtol=1e-6)
  chex.assert_shape(aux['client_keys'], (2, 2, 5))


def test_client_inputs_two_view_concat():
  xq, xk = jnp.zeros((2, 1)), jnp.ones((2, 1))
  iq, ik = losses.client_inputs('two_view', xq, xk)
  np.testing.assert_array_equal(iq[:, 0], [0, 0, 1, 1])
  np.testing.assert_array_equal(ik[:, 0], [1, 1, 0, 0])
  assert losses.client_inputs('original', xq, xk)[0] is xq


def test_bad_form_raises():
  online, target, a_q, a_k, queue = _setup()
  with pytest.raises(ValueError, match='loss_form'):
    losses.server_loss(_LinearNet, 'sym', 0.1, online, target, a_q, a_k, queue, 2)


def test_fused_server_passes_equal_four_passes_and_refuse_batchnorm():
  from core_testlib import tiny_net  # pylint: disable=g-import-not-at-top
  net = tiny_net(head='V2')                           # GroupNorm only: rows are independent
  ks = jax.random.split(jax.random.key(4), 4)
  online = net.init_server(ks[0])
  target = jax.tree.map(lambda x: x * 0.9, online)
  a_q = jax.random.normal(ks[1], (4,) + net.smashed_shape)
  a_k = jax.random.normal(ks[2], (4,) + net.smashed_shape)
  queue = l2_normalize(jax.random.normal(ks[3], (16, net.key_dim)))

  def run(fuse):
    def f(aq, w):
      return losses.server_loss(net, 'original', 0.1, dict(online, params=w), target, aq, a_k,
                                queue, 2, fuse_passes=fuse)
    (loss, aux), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(a_q,
                                                                             online['params'])
    return loss, aux['keys'], aux['client_keys'], aux['acc'], grads

  fused, four = jax.jit(lambda: run(True))(), jax.jit(lambda: run(False))()
  chex.assert_trees_all_close(fused, four, rtol=1e-5, atol=1e-6)
  bn_net = tiny_net(head='largeV2')                   # server BatchNorm: must not fuse
  bn_vars = bn_net.init_server(ks[0])
  a = jnp.zeros((4,) + bn_net.smashed_shape)
  with pytest.raises(ValueError, match='fuse_passes'):
    losses.server_loss(bn_net, 'original', 0.1, bn_vars, bn_vars, a, a, queue[:, :0], 2,
                       fuse_passes=True)


def _dominant_rows(seed, rows=64, dim=64, negatives=64):
  """Queries near one direction q0, keys at cos 0.55..0.99 to their query, negatives at cos -0.3
  to q0 (T = 0.1): logits up to ~9.9 against negatives near -3, per-row losses from ~1e-2 down
  to ~1e-4, where the positive dominates the softmax."""
  k0, kq, kk, kn = jax.random.split(jax.random.key(seed), 4)

  def orthogonal(key, shape, to):
    v = jax.random.normal(key, shape)
    return l2_normalize(v - jnp.sum(v * to, -1, keepdims=True) * to)

  q0 = l2_normalize(jax.random.normal(k0, (dim,)))
  q = l2_normalize(q0 + 0.02 * jax.random.normal(kq, (rows, dim)))
  cos = jnp.linspace(0.55, 0.99, rows)[:, None]
  k = cos * q + jnp.sqrt(1 - cos**2) * orthogonal(kk, (rows, dim), q)
  queue = -0.3 * q0 + jnp.sqrt(1 - 0.3**2) * orthogonal(kn, (negatives, dim), q0)
  return q, k, queue


def _info_nce_rows_float64(q, k, queue, t):
  """-log softmax(logits)[0] per row in float64 numpy, from the float32 inputs."""
  q, k, queue = (np.asarray(a, np.float64) for a in (q, k, queue))
  logits = np.concatenate([np.sum(q * k, -1, keepdims=True), q @ queue.T], axis=1) / t
  m = logits.max(axis=1, keepdims=True)
  return (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))) - logits[:, 0]


def test_info_nce_small_losses_are_accurate_in_float32():
  """A loss of 1e-4 is a few ulps of logits near 10: logsumexp - positive (or -log_softmax) would
  round it to ~1e-3 relative; softplus(logsumexp(negatives) - positive) keeps ~1e-6."""
  q, k, queue = _dominant_rows(0)
  want_rows = _info_nce_rows_float64(q, k, queue, 0.1)
  assert want_rows.max() > 1e-2 and want_rows.min() < 2e-4, (want_rows.min(), want_rows.max())
  worst = 0.0
  for lo in range(0, 64, 8):   # means over slices of rising dominance (falling loss)
    loss, _, _ = losses.info_nce(q[lo:lo + 8], k[lo:lo + 8], queue, 0.1)
    assert loss.dtype == jnp.float32
    want = want_rows[lo:lo + 8].mean()
    worst = max(worst, abs(float(loss) - want) / want)
  assert worst < 3e-6, worst


def test_nll_of_positive_equals_cross_entropy_and_its_gradient():
  logits = jax.random.normal(jax.random.key(3), (5, 7)) * 3
  labels = jnp.array([0, 3, 6, 2, 2])
  want = -jax.nn.log_softmax(logits)[jnp.arange(5), labels]
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(losses.nll_of_positive(logits[:, 0], logits[:, 1:]),
                             -jax.nn.log_softmax(logits)[:, 0], rtol=1e-6, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(losses.cross_entropy(x, labels)))(logits)
  np.testing.assert_allclose(grad, jax.nn.softmax(logits) - jax.nn.one_hot(labels, 7),
                             rtol=1e-5, atol=1e-6)
