"""The reference switches of the step against a plain per-client Python loop: the reference's
FedAvg set (client 0 + pool[1:]), its divergence measure, divergence-aware aggregation (FedEMA
and the reference's no-op), the reference's per-client queues; the moco_version preset; and
CLI runs of configs/tiny.py with each switch.

The loop runs each client's forward and backward one at a time (the per-party functions, as
tests/test_step.py) and writes out the sync itself in numpy, from the reference's description.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_testlib import fast_compile  # noqa: F401  pylint: disable=unused-import
from core_testlib import (CONFIG_DIR, StandInNet, assert_states_close, copy_tree,
                          load_config, views)
from mocosfl_jax import cli, experiment, main, parallel
from mocosfl_jax.algorithm import parties, state, sync
from mocosfl_jax.algorithm import step as step_lib
from mocosfl_jax.algorithm.plan import StepConfig
from mocosfl_jax.algorithm.state import ClientState

pytestmark = pytest.mark.usefixtures('fast_compile')

_fwd = jax.jit(parties.client_send, static_argnums=(0, 1))
_bwd = jax.jit(parties.client_receive, static_argnums=(0, 1, 2))
_srv = jax.jit(parties.server_step, static_argnums=(0, 1, 2))

# Every step syncs (S // avg_freq == 1). Pools: client 0 inside the pool but not first (the
# reference counts it twice and drops pool[0]), then client 0 outside it (its stale weights).
_COMMON = dict(num_clients=4, sample_ratio=0.75, batch_size=2, queue_size=16, num_epochs=3,
               steps_per_epoch=2, avg_freq=2)
POOLS = ((0, 0, (2, 0, 1)), (0, 1, (2, 0, 1)), (1, 0, (1, 3, 2)))   # (epoch, batch_idx, pool)
CASES = {
    'reference_set_monaco': dict(loss_form='two_view', momentum_sync=True,
                                 fedavg_set='reference'),
    'fedema_reference_set': dict(loss_form='original', divergence_aware='fedema', div_mu=0.5,
                                 fedavg_set='reference'),
}


def _net():
  return StandInNet(client_bn=True)


def _tree_mean(trees):
  return jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x) for x in xs]), axis=0), *trees)


def loop_step(net, cfg, st, pool, vq, vk, epoch, lam):
  """One step, one client at a time, and the sync written out in numpy (every step syncs).

  lam: {client: lambda} of the FedEMA auto-scaler (updated in place).
  """
  cs, ss, tx = st.clients, st.server, st.tx
  n = cfg.num_clients
  per = [list(jax.tree.map(lambda x, i=i: np.asarray(x[i]), (cs.online, cs.momentum,
                                                             cs.opt_state))) for i in range(n)]
  count, draws = np.array(cs.count), np.array(cs.draws)
  aq, ak = [], []
  for j, c in enumerate(pool):
    a_q, a_k, on, mom, _ = _fwd(net, cfg, per[c][0], per[c][1], vq[j], vk[j])
    per[c][0], per[c][1] = on, mom
    aq.append(a_q)
    ak.append(a_k)
  ss, grads, m = _srv(net, cfg, tx, ss, jnp.stack(aq), jnp.stack(ak), jnp.array(pool, jnp.int32),
                      jnp.int32(epoch))
  for j, c in enumerate(pool):
    lr = cfg.c_lr * (1 + np.cos(np.pi * count[c] / cfg.num_epochs)) / 2
    per[c][0], per[c][2] = _bwd(net, cfg, tx, per[c][0], per[c][2], vq[j], vk[j], grads[j],
                                jnp.float32(lr))
    count[c] += 1
    draws[c] += 1
  # The sync. The reference's average_weights: client 0's weights, plus pool[1:], over P.
  members = [0] + list(pool[1:]) if cfg.fedavg_set == 'reference' else list(pool)
  g_on = _tree_mean([per[c][0] for c in members])
  g_mom = _tree_mean([per[c][1] for c in members])
  leaves = lambda c: zip(jax.tree.leaves(per[c][0]['params']), jax.tree.leaves(g_on['params']))
  div = {c: sum(np.linalg.norm(np.ravel(np.asarray(a) - g)) for a, g in leaves(c)) for c in pool}
  m = dict(m, div_l2_mean=np.mean([div[c] for c in pool]),
           div_l2_std=np.std([div[c] for c in pool]))
  mus = []
  for c in range(n):
    if c in pool and cfg.divergence_aware == 'fedema':
      if c not in lam and div[c] > 0:                 # the auto-scaler, at c's first sync
        lam[c] = cfg.div_mu / div[c]                  # (with local == global it waits)
      mu = min(1.0, lam.get(c, 0.0) * div[c])
      mus.append(mu)
      per[c][0] = jax.tree.map(lambda a, g, mu=mu: mu * np.asarray(a) + (1 - mu) * g,
                               per[c][0], g_on)
    elif not (c in pool and cfg.divergence_aware == 'reference'):   # the no-op keeps local
      per[c][0] = g_on
    if cfg.momentum_sync:
      per[c][1] = g_mom
  if mus:
    m['div_mu_mean'] = np.mean(mus)
  stack = lambda k: jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                                 *[p[k] for p in per])
  cs = ClientState(online=stack(0), momentum=stack(1), opt_state=stack(2),
                   count=jnp.array(count), draws=jnp.array(draws), lr_scale=cs.lr_scale)
  return st.replace(clients=cs, server=ss.replace(div_lambda=st.server.div_lambda)), m


def _fused(cfg, net, st, par=None):
  ms = []
  for i, (e, b, pool) in enumerate(POOLS):
    vq, vk = views(cfg, net, i)
    st, m = parallel.train_step(net, cfg, st, jnp.array(pool, jnp.int32), vq, vk, jnp.int32(e),
                                jnp.int32(b), par=par)
    ms.append(m)
  return st, ms


@pytest.mark.parametrize('name', sorted(CASES))
def test_sync_switches_equal_python_loop(name):
  net, cfg = _net(), StepConfig(**_COMMON, **CASES[name])
  st = state.create_train_state(net, cfg, jax.random.key(0))
  ref, ref_m, lam = copy_tree(st), [], {}
  for i, (e, _, pool) in enumerate(POOLS):
    vq, vk = views(cfg, net, i)
    ref, m = loop_step(net, cfg, ref, pool, vq, vk, e, lam)
    ref_m.append(m)
  got, got_m = _fused(cfg, net, st)
  assert_states_close((got.clients, got.server.replace(div_lambda=None)),
                      (ref.clients, ref.server.replace(div_lambda=None)))
  # A divergence is a norm of differences of nearly equal float32 weights (about 1e-3 of
  # them): its relative rounding is ~1e-4, and lambda = mu / divergence inherits it.
  for g, r in zip(got_m, ref_m):
    assert float(g['synced']) == 1.0
    np.testing.assert_allclose(g['loss'], r['loss'], rtol=2e-5)
    for k in ('div_l2_mean', 'div_l2_std') + (('div_mu_mean',) if 'div_mu_mean' in r else ()):
      np.testing.assert_allclose(g[k], r[k], rtol=1e-3, err_msg=k)
  assert float(got_m[0]['div_l2_mean']) > 0 and float(got_m[0]['div_l2_std']) > 0
  if cfg.divergence_aware == 'fedema':
    lam_got = np.asarray(got.server.div_lambda)
    np.testing.assert_allclose(lam_got, [lam.get(c, 0.0) for c in range(4)], rtol=1e-3)
    assert float(got_m[0]['div_mu_mean']) == pytest.approx(cfg.div_mu)   # the auto-scaler
    assert 0 < float(got_m[1]['div_mu_mean']) <= 1
  else:
    assert got.server.div_lambda is None       # no extra leaf in the checkpoint


def test_divergence_aware_and_reference_set_under_shard_map():
  """The same switches with the pool split over 4 devices (one masked padding client)."""
  assert jax.device_count() >= 4, 'conftest forces 4 CPU devices'
  net, cfg = _net(), StepConfig(**_COMMON, **CASES['fedema_reference_set'])
  st = state.create_train_state(net, cfg, jax.random.key(0))
  ref, ref_m = _fused(cfg, net, copy_tree(st))
  mesh = parallel.client_mesh(jax.devices()[:4])
  sharded = st.replace(clients=parallel.shard_clients(st.clients, mesh),
                       server=parallel.replicate(st.server, mesh))
  got, got_m = _fused(cfg, net, sharded, parallel.ClientParallel('shard_map', mesh=mesh))
  assert_states_close((got.clients, got.server), (ref.clients, ref.server))
  for g, r in zip(got_m, ref_m):
    for k in ('loss', 'div_l2_mean', 'div_l2_std', 'div_mu_mean', 'div_online_global'):
      np.testing.assert_allclose(g[k], r[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_reference_client_queues_equal_loop():
  """MocoSFL's per-client queues: raw N(0, 1) init, and each client c enqueues only the k1
  block (its own B keys W'(A_q), computed here client by client) into queue c."""
  net = StandInNet()
  kw = dict(num_clients=3, batch_size=2, queue_size=15, feature_sharing=False, num_epochs=3,
            steps_per_epoch=2, avg_freq=1)
  cfg = StepConfig(**kw, client_queues='reference')
  assert (cfg.keys_per_client, StepConfig(**kw).keys_per_client) == (2, 4)
  st = state.create_train_state(net, cfg, jax.random.key(0))
  q0 = np.asarray(st.server.queue)
  norms = np.linalg.norm(q0, axis=-1)
  assert np.all(np.abs(norms - 1) > 1e-3)                       # not normalised
  clean = state.create_train_state(net, StepConfig(**kw), jax.random.key(0)).server.queue
  np.testing.assert_allclose(q0 / norms[..., None], clean, rtol=1e-5, atol=1e-6)
  vq, vk = views(cfg, net, 0)
  cs, ss = st.clients, st.server
  w_mom = jax.tree.map(lambda a, b: 0.99 * a + 0.01 * b, ss.momentum, ss.online)
  expected = q0.copy()
  for c in range(3):          # client c's rows [c*B, (c+1)*B) of the batch go to queue c
    a_q, _ = net.apply_client(jax.tree.map(lambda x, c=c: x[c], cs.online), vq[c])
    k1, _ = net.apply_server(w_mom, a_q)
    expected[c, 0:2] = k1 / np.linalg.norm(k1, axis=-1, keepdims=True)
  got, _ = parallel.train_step(net, cfg, copy_tree(st), None, vq, vk, jnp.int32(0),
                               jnp.int32(0))
  np.testing.assert_allclose(got.server.queue, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got.server.ptr, [2, 2, 2])
  with pytest.raises(ValueError, match="client_queues='reference' slices rows by client id"):
    StepConfig(**dict(kw, sample_ratio=2 / 3), client_queues='reference')
  with pytest.raises(ValueError, match='no effect with the shared queue'):
    StepConfig(**dict(kw, feature_sharing=True), client_queues='reference')


@pytest.mark.parametrize('kw,match', [
    (dict(fedavg_set='first'), "fedavg_set='first'"),
    (dict(divergence_aware='on'), "divergence_aware='on'"),
    (dict(divergence_aware='fedema', momentum_sync=True), 'not combined'),
    (dict(divergence_aware='fedema', c_lr=0.0), 'frozen clients never diverge'),
    (dict(div_mu=0.0), r'div_mu=0.0 must be in \(0, 1\]'),
    (dict(client_queues='raw', feature_sharing=False), "client_queues='raw'"),
])
def test_bad_switch_values_are_refused(kw, match):
  with pytest.raises(ValueError, match=match):
    StepConfig(**dict(_COMMON, **kw))


def test_split_step_refuses_the_sync_switches():
  """The deployment's split step averages the pool only: the switches are refused, not
  ignored."""
  for kw in (dict(fedavg_set='reference'), dict(divergence_aware='fedema')):
    with pytest.raises(ValueError, match='split_train_step averages the pool'):
      step_lib.split_train_step(None, StepConfig(**_COMMON, **kw), None, None, None, 0, 0,
                                pool=None)


def _resolved(**fields):
  c = load_config('tiny').get_config()
  c.update(fields)
  return experiment.resolve(c)


def test_moco_version_sets_head_loss_schedule_and_augmentation():
  v1 = _resolved(head='V2', moco_version='V1')          # head='V2' is the default: unset
  assert (v1.model.head, v1.step.loss_form, v1.step.lr_schedule, v1.aug.pipeline) == (
      'V1', 'single', 'multistep', 'mocov1')
  v2 = _resolved(head='V2', moco_version='V2', loss_form='two_view')   # symmetric: agrees
  assert (v2.model.head, v2.step.loss_form, v2.step.lr_schedule, v2.aug.pipeline) == (
      'V2', 'two_view', 'cosine', 'mocov2')
  assert v2.config.moco_version == 'V2' and v2.config.head == 'V2'
  none = _resolved()
  assert (none.model.head, none.step.loss_form) == ('V1', 'original')   # tiny's own fields
  with pytest.raises(ValueError, match=r"config.loss_form='two_view': moco_version='V1' sets "):
    _resolved(moco_version='V1', loss_form='two_view')
  with pytest.raises(ValueError, match=r"config.head='V1': moco_version='V2' sets head"):
    _resolved(moco_version='V2')
  with pytest.raises(ValueError, match=r"config.moco_version='V3': valid"):
    _resolved(moco_version='V3')
  with pytest.raises(ValueError, match=r"config.div_mu=0.5: only divergence_aware='fedema'"):
    _resolved(div_mu=0.5)
  with pytest.raises(ValueError, match=r"config.client_queues='reference': describes"):
    _resolved(client_queues='reference')
  with pytest.raises(ValueError, match=r"config.fedavg_set='reference': client 0 \+ pool\[1:\] "
                     r"is the pool's mean when every client takes part"):
    _resolved(fedavg_set='reference')


def test_cli_takes_each_switch_on_tiny():
  """main's command line with configs/tiny.py and the switches resolves to the step they name
  (tests/test_train.py trains tiny through the same train_and_evaluate)."""
  seen = {}
  base = ['--config', str(CONFIG_DIR / 'tiny.py'), '--workdir', 'w']
  runs = {
      'sampled': (['--config.sample_ratio=0.5', '--config.fedavg_set=reference',
                   '--config.divergence_aware=fedema', '--config.div_mu=0.5',
                   '--config.moco_version=V1', '--config.head=V2'],
                  dict(fedavg_set='reference', divergence_aware='fedema', div_mu=0.5,
                       loss_form='single', lr_schedule='multistep', pool_size=2)),
      'queues': (['--config.feature_sharing=False', '--config.client_queues=reference',
                  '--config.divergence_aware=reference'],
                 dict(client_queues='reference', divergence_aware='reference',
                      feature_sharing=False, keys_per_client=2)),
      'monaco_large': (['--config.num_clients=60', '--config.batch_size=120',
                        '--config.auto_adjust=True', '--config.flavour=monacosfl',
                        '--config.adjust_batch_for_large_clients=False', '--config.queue_size=600'],
                       dict(batch_size=2)),      # --dont_adjust_batch_size_for_large_clients
  }
  for name, (argv, want) in runs.items():
    assert cli.run(main.define_flags, lambda a: seen.update(vars(a)), base + argv) == 0, name
    step = experiment.resolve(seen['config']).step
    assert {k: getattr(step, k) for k in want} == want, name


def test_aggregate_noop_keeps_pool_rows_and_returns_the_global():
  """divergence_aware='reference' (the reference's no-op): the pool's rows keep their local
  models (BatchNorm statistics included); the global model goes to the others."""
  cfg = StepConfig(**_COMMON, divergence_aware='reference')
  on = {'params': {'w': jnp.array([[1.0, 2.0], [3.0, 6.0]])},
        'batch_stats': {'m': jnp.array([[1.0], [3.0]])}}
  rows = ClientState(online=on, momentum=on, opt_state=(), count=jnp.zeros(2, jnp.int32),
                     draws=jnp.zeros(2, jnp.int32), lr_scale=jnp.ones(2))
  out, m, avg, lam = sync.aggregate_if(True, rows, cfg, pool=jnp.array([3, 1], jnp.int32))
  np.testing.assert_array_equal(out.online['params']['w'], on['params']['w'])
  np.testing.assert_array_equal(out.online['batch_stats']['m'], on['batch_stats']['m'])
  np.testing.assert_allclose(avg['params']['w'], [2.0, 4.0])
  np.testing.assert_allclose(avg['batch_stats']['m'], [2.0])
  # ||[-1, -2]|| = ||[1, 2]|| = sqrt(5) for both rows: mean sqrt(5), std 0
  np.testing.assert_allclose(m['div_l2_mean'], np.sqrt(5.0), rtol=1e-6)
  np.testing.assert_allclose(m['div_l2_std'], 0.0, atol=1e-6)
  assert lam is None
  _, m0, _, _ = sync.aggregate_if(False, rows, cfg, pool=jnp.array([3, 1], jnp.int32))
  assert float(m0['div_l2_mean']) == 0.0


def test_reference_set_with_full_pool_is_the_plain_mean():
  """Without sampling the reference's client 0 + pool[1:] is the pool itself (weights all 1)."""
  w, w0 = sync.reference_weights(jnp.arange(3, dtype=jnp.int32), 3, None)
  np.testing.assert_array_equal(w, [1, 1, 1])
  assert float(w0) == 0.0
  w, w0 = sync.reference_weights(jnp.array([2, 0], jnp.int32), 4, jnp.array([1., 1., 0., 0.]))
  np.testing.assert_array_equal(w, [0, 2, 0, 0])        # pool[0] dropped, client 0 twice
  assert float(w0) == 0.0
  w, w0 = sync.reference_weights(jnp.array([1, 3], jnp.int32), 2, None)
  np.testing.assert_array_equal(w, [0, 1])
  assert float(w0) == 1.0                                # client 0 from outside the pool
