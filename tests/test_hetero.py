"""Heterogeneous clients: the hetero string, the rich / poor partitions, the per-group sampler,
and the two-group step (algorithm/hetero_step.py) against a per-client Python loop."""
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_testlib import fast_compile  # noqa: F401  pylint: disable=unused-import
from core_testlib import (CONFIG_DIR, StandInNet, assert_states_close, client_lr_by_hand,
                          clients_by_hand, copy_tree, fedavg_by_hand, load_config,
                          optimisations_off, stack_by_hand)
from mocosfl_jax import experiment, main
from mocosfl_jax.algorithm import hetero, hetero_step, losses, parties, plan, state
from mocosfl_jax.algorithm.plan import StepConfig
from mocosfl_jax.data import partition as partition_lib
from mocosfl_jax.data import sampler
from mocosfl_jax.evaluation import protocols
from mocosfl_jax.run import metrics, train

SCHEDULE = ((0, 0), (0, 1), (1, 0))      # (epoch, batch_idx); b=1 is a sync step (S=4, avg 2)
_COMMON = dict(num_clients=3, rich_clients=1, batch_size=2, rich_batch_size=6, num_epochs=3,
               steps_per_epoch=4, avg_freq=2, lr=0.06, queue_size=40)
CASES = {
    # MocoSFL: original two-term loss, BatchNorm on the server (sees every real row at once).
    'original_server_bn': (lambda: StandInNet(server_bn=True),
                           dict(loss_form='original', **_COMMON)),
    # MonAcoSFL's form and momentum sync, BatchNorm on the clients (per-client statistics).
    'two_view_client_bn': (lambda: StandInNet(client_bn=True),
                           dict(loss_form='two_view', momentum_sync=True,
                                client_schedule='per_epoch', **_COMMON)),
}


# ---- the hetero string -------------------------------------------------------------------------

def test_parse_and_reference_strings():
  s = hetero.parse('0.2_0.8|4|0.8_0.2')
  assert (s.rich_fraction, s.batch_multiplier, s.rich_data, s.poor_data) == (0.2, 4, 0.8, 0.2)
  assert s.rich_clients(10) == 2 and s.rich_batch(5) == 20 and s.shard_groups() == 4
  assert hetero.resolve('', 10) is None
  assert hetero.resolve('reference', 200).text == '0.5_0.5|4|0.8_0.2'
  assert hetero.resolve('reference', 100).text == '0.2_0.8|16|0.8_0.2'
  assert hetero.resolve('reference', 7).text == hetero.REFERENCE_DEFAULT
  assert hetero.resolve('0.5_0.5|2|0.6_0.4', 100).text == '0.5_0.5|2|0.6_0.4'   # as written


@pytest.mark.parametrize('text, match', [
    ('0.2_0.8|4', 'three'), ('0.2|4|0.8_0.2', 'two numbers'), ('0.2_0.8|x|0.8_0.2', 'multiplier'),
    ('0.2_0.8|0|0.8_0.2', 'multiplier'), ('0.2_0.7|4|0.8_0.2', 'rich fraction'),
    ('1.0_0.0|4|0.8_0.2', 'rich fraction'), ('0.2_0.8|4|0.8_0.3', 'rich data')])
def test_malformed_strings_raise(text, match):
  with pytest.raises(ValueError, match=match):
    hetero.parse(text)


def test_no_rich_or_no_poor_client_raises():
  with pytest.raises(ValueError, match='at least one rich and one poor'):
    hetero.resolve('0.2_0.8|4|0.8_0.2', 4)          # int(0.8) = 0 rich clients


# ---- partitions --------------------------------------------------------------------------------

def test_iid_partition_rule():
  labels = np.arange(103) % 10
  parts = partition_lib.partition(labels, 5, method='iid', seed=3, hetero=(2, 0.6, 0.4))
  subset = np.random.default_rng(3).permutation(103)          # the seeded subset, p = 1
  v = int(0.6 * 103)                                           # 61 samples for 2 rich clients
  expect = [subset[:30], subset[30:60]]
  expect += [subset[v + i * 42 // 3:v + (i + 1) * 42 // 3] for i in range(3)]
  for got, want in zip(parts, expect):
    np.testing.assert_array_equal(got, want)
  assert [len(p) for p in parts] == [30, 30, 14, 14, 14]


def test_shards_partition_rule():
  labels = np.repeat(np.arange(10), 40)                       # 400 samples
  n, r, c, e = 10, 2, 2, 0.2
  parts = partition_lib.partition(labels, n, method='shards', noniid_ratio=0.2, seed=0,
                                  hetero=(r, 0.8, e))
  size = int(400 / n / c * e)                                  # 4 images per shard
  assert [len(p) for p in parts] == [4 * c * size] * r + [c * size] * (n - r)
  flat = np.concatenate(parts)
  assert len(np.unique(flat)) == len(flat)                     # disjoint
  # every shard is label-pure and of one block of the label-sorted subset
  for p in parts:
    for s in p.reshape(-1, size):
      assert len(set(labels[s])) == 1


def test_shards_partition_too_few_shards_raises():
  with pytest.raises(ValueError, match='shard groups'):
    partition_lib.partition(np.arange(100) % 10, 4, method='shards', noniid_ratio=0.2,
                            hetero=(1, 0.4, 0.6))
  with pytest.raises(ValueError, match='dirichlet'):
    partition_lib.partition(np.arange(100) % 10, 4, method='dirichlet', hetero=(1, 0.8, 0.2))


# ---- sampler -----------------------------------------------------------------------------------

def test_group_tables_draw_each_clients_own_stream():
  parts = [np.arange(0, 12), np.arange(12, 24), np.arange(24, 28), np.arange(28, 32)]
  key = jax.random.key(0)
  whole = sampler.ClientTable.from_partition(parts, 2)
  poor = sampler.ClientTable.from_partition(parts[2:], 2, first_id=2)
  ids, draws = jnp.array([0, 1]), jnp.array([3, 1])
  np.testing.assert_array_equal(sampler.batch_indices(poor, ids, draws, 2, key),
                                sampler.batch_indices(whole, ids + 2, draws, 2, key))
  rich = sampler.ClientTable.from_partition(parts[:2], 6)
  # rich client 0: two batches of 6 per pass, a fresh shuffle every second draw (no reset)
  got = [np.asarray(sampler.batch_indices(rich, jnp.array([0]), jnp.array([d]), 6, key))[0]
         for d in range(4)]
  assert sorted(np.concatenate(got[:2]).tolist()) == list(range(12))
  assert sorted(np.concatenate(got[2:]).tolist()) == list(range(12))
  assert not np.array_equal(got[0], got[2])
  with pytest.raises(ValueError, match='batch_size=6'):
    sampler.ClientTable.from_partition(parts[2:], 6)


# ---- the step ----------------------------------------------------------------------------------

def _views(cfg, seed):
  r, n, h = cfg.rich_clients, cfg.num_clients, 8
  ks = jax.random.split(jax.random.key(1000 + seed), 4)
  rich, poor = (r, cfg.rich_batch_size, h, h, 3), (n - r, cfg.batch_size, h, h, 3)
  return ((jax.random.normal(ks[0], rich), jax.random.normal(ks[1], poor)),
          (jax.random.normal(ks[2], rich), jax.random.normal(ks[3], poor)))


_fwd = jax.jit(parties.client_send, static_argnums=(0, 1))
_bwd = jax.jit(parties.client_receive, static_argnums=(0, 1, 2))


def _server(net, cfg, tx, ss, aq, ak, epoch, pool):
  """The server on the concatenated rows: loss, dL/dA_q, SGD and enqueue."""
  s_mom, queue = parties.server_prepare(cfg, ss, pool)

  def server_loss(a_q, s_params):
    return losses.server_loss(net, cfg.loss_form, cfg.temperature,
                              parties.with_params(ss.online, s_params), s_mom, a_q, ak, queue, 1)
  (loss, aux), (g_a, g_s) = jax.value_and_grad(server_loss, argnums=(0, 1), has_aux=True)(
      aq, ss.online['params'])
  ss, _ = parties.server_update(cfg, tx, ss, aux, g_s, epoch, pool)
  return ss, g_a, loss


_server = jax.jit(_server, static_argnums=(0, 1, 2))


def _by_position(cfg, vq, vk):
  """Group views (rich, poor) of the whole federation -> per-client lists in id order."""
  r = cfg.rich_clients
  pick = lambda v, i: v[0][i] if i < r else v[1][i - r]
  return ([pick(vq, i) for i in range(cfg.num_clients)],
          [pick(vk, i) for i in range(cfg.num_clients)])


def loop_step(net, cfg, st, xq, xk, epoch, b, pool=None):
  """Reference-style step: a Python loop over the pool's clients (default 0..N-1) with
  unbatched per-party functions, views xq[j] / xk[j] for pool position j; the server
  concatenates rows of variable widths in pool order and splits dL/dA_q back by them; at a sync
  every client gets the pool's mean."""
  cs, ss, tx = st.clients, st.server, st.tx
  pool = list(range(cfg.num_clients)) if pool is None else list(pool)
  per = clients_by_hand(cs)
  count, draws = np.array(cs.count), np.array(cs.draws)
  aq, ak = [], []
  for j, c in enumerate(pool):                         # sequential client forwards
    a_q, a_k, on, mom, _ = _fwd(net, cfg, per[c][0], per[c][1], xq[j], xk[j])
    per[c][0], per[c][1] = on, mom
    aq.append(a_q)
    ak.append(a_k)
  widths = [a.shape[0] for a in aq]                    # rich width for ids < R, else B
  per_image = cfg.rows_per_client // cfg.batch_size    # 2 rows per image for two_view
  assert widths == [per_image * (cfg.rich_batch_size if c < cfg.rich_clients else cfg.batch_size)
                    for c in pool]
  ss, g_a, loss = _server(net, cfg, tx, ss, jnp.concatenate(aq), jnp.concatenate(ak),
                          jnp.int32(epoch), jnp.array(pool, jnp.int32))
  start = np.cumsum([0] + widths)
  for j, c in enumerate(pool):                         # sequential client backward + SGD
    g = g_a[start[j]:start[j + 1]]                     # consecutive widths, pool order
    per[c][0], per[c][2] = _bwd(net, cfg, tx, per[c][0], per[c][2], xq[j], xk[j], g,
                                jnp.float32(client_lr_by_hand(cfg, count[c], epoch)))
    count[c] += 1
    draws[c] += 1
  div = [0.0]
  if plan.is_sync_step(b, cfg.steps_per_epoch, cfg.avg_freq):
    div = fedavg_by_hand(cfg, per, pool)
  cs = stack_by_hand(per, count, draws, cs.lr_scale)
  return st.replace(clients=cs, server=ss), {'loss': loss, 'div_l2_mean': np.mean(div),
                                             'div_l2_std': np.std(div)}


@pytest.mark.usefixtures('fast_compile')
@pytest.mark.parametrize('name', sorted(CASES))
def test_two_group_step_equals_per_client_loop(name):
  make_net, kw = CASES[name]
  net, cfg = make_net(), StepConfig(**kw)
  st = state.create_train_state(net, cfg, jax.random.key(0))
  ref, got, init = copy_tree(st), st, copy_tree(st.clients.online['params'])
  for i, (e, b) in enumerate(SCHEDULE):
    vq, vk = _views(cfg, i)
    ref, m_ref = loop_step(net, cfg, ref, *_by_position(cfg, vq, vk), e, b)
    got, m = hetero_step.train_step(net, cfg, got, vq, vk, jnp.int32(e), jnp.int32(b))
    np.testing.assert_allclose(m['loss'], m_ref['loss'], rtol=1e-5)
    for k in ('div_l2_mean', 'div_l2_std'):       # the reference's measure, 0 without a sync
      np.testing.assert_allclose(m[k], m_ref[k], rtol=1e-4, atol=1e-6)
  assert_states_close((got.clients, got.server), (ref.clients, ref.server))
  keys = (1 if cfg.loss_form == 'single' else 2) * (6 + 2 * 2)
  assert cfg.keys_per_step == keys and int(got.server.ptr) == 3 * keys % cfg.queue_size
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(got.clients.online['params']),
                                                   jax.tree.leaves(init)))


# (epoch, batch_idx, pool) with 2 rich clients of 4, pools of 2: a mixed pool whose rich client
# is not first (b=1 syncs), a pool of poor clients only, then of rich clients only (a sync).
SAMPLED = ((0, 0, (2, 0)), (0, 1, (2, 0)), (1, 0, (3, 2)), (1, 1, (1, 0)))


def _pool_views(cfg, pool, seed):
  """Per pool position views (rich width for ids < R), and the step's group views."""
  ks = jax.random.split(jax.random.key(2000 + seed), 2 * len(pool))
  width = lambda c: cfg.rich_batch_size if c < cfg.rich_clients else cfg.batch_size
  xq = [jax.random.normal(ks[2 * j], (width(c), 8, 8, 3)) for j, c in enumerate(pool)]
  xk = [jax.random.normal(ks[2 * j + 1], (width(c), 8, 8, 3)) for j, c in enumerate(pool)]

  def groups(xs):
    rich = [x for x, c in zip(xs, pool) if c < cfg.rich_clients]
    poor = [x for x, c in zip(xs, pool) if c >= cfg.rich_clients]
    return tuple(jnp.stack(g) if g else None for g in (rich, poor))
  return xq, xk, groups(xq), groups(xk)


@pytest.mark.usefixtures('fast_compile')
@pytest.mark.parametrize('name', sorted(CASES))
def test_sampled_pools_equal_per_client_loop(name):
  make_net, kw = CASES[name]
  net = make_net()
  cfg = StepConfig(**dict(kw, num_clients=4, rich_clients=2, sample_ratio=0.5))
  assert cfg.pool_size == 2 and cfg.images_per_step == 12
  st = state.create_train_state(net, cfg, jax.random.key(3))
  ref, got = copy_tree(st), st
  for i, (e, b, pool) in enumerate(SAMPLED):
    xq, xk, vq, vk = _pool_views(cfg, pool, i)
    hp = hetero_step.split_pool(np.array(pool), cfg)
    assert hp.rich.shape[0] == sum(c < 2 for c in pool)
    ref, m_ref = loop_step(net, cfg, ref, xq, xk, e, b, pool)
    got, m = hetero_step.train_step(net, cfg, got, vq, vk, jnp.int32(e), jnp.int32(b), pool=hp)
    np.testing.assert_allclose(m['loss'], m_ref['loss'], rtol=1e-5)
    for k in ('div_l2_mean', 'div_l2_std'):       # the reference's measure, 0 without a sync
      np.testing.assert_allclose(m[k], m_ref[k], rtol=1e-4, atol=1e-6)
    lrs = [client_lr_by_hand(cfg, int(c), e) for c in np.asarray(ref.clients.count)[list(pool)] - 1]
    np.testing.assert_allclose(m['client_lrs'], lrs, rtol=1e-6)   # in pool order
    assert float(m['synced']) == float(plan.is_sync_step(b, cfg.steps_per_epoch, cfg.avg_freq))
  assert_states_close((got.clients, got.server), (ref.clients, ref.server))
  np.testing.assert_array_equal(got.clients.count, [3, 1, 3, 1])    # participations
  # 2 (2B) + 2 (2B) + 2 (2B) + 2 (2 rich B) keys per row pair.
  keys = (1 if cfg.loss_form == 'single' else 2) * (8 + 8 + 4 + 12)
  assert int(got.server.ptr) == keys % cfg.queue_size


def test_split_pool_orders_rows_and_refuses_bad_pools():
  cfg = StepConfig(**dict(_COMMON, num_clients=5, rich_clients=2, sample_ratio=0.6))
  hp = hetero_step.split_pool(np.array([3, 1, 4]), cfg)       # poor, rich, poor
  np.testing.assert_array_equal(hp.rich, [1])
  np.testing.assert_array_equal(hp.poor, [3, 4])
  np.testing.assert_array_equal(hp.ids, [1, 3, 4])
  np.testing.assert_array_equal(hp.slots, [1, 0, 2])
  # group order rows: client 1 at 0..5 (rich B 6), client 3 at 6..7, client 4 at 8..9.
  np.testing.assert_array_equal(hp.rows, [6, 7, 0, 1, 2, 3, 4, 5, 8, 9])
  for bad in ([3, 3, 1], [0, 1], [0, 1, 5], [[0, 1, 2]]):
    with pytest.raises(ValueError, match='distinct client ids'):
      hetero_step.split_pool(np.array(bad), cfg)
  views = [jnp.zeros((1, 6, 8, 8, 3)), jnp.zeros((2, 2, 8, 8, 3))]
  hetero_step.check_views(cfg, views, views, hp)
  with pytest.raises(ValueError, match=r'takes split_pool\(pool, cfg\)'):
    hetero_step.check_views(cfg, views, views, jnp.array([3, 1, 4]))
  with pytest.raises(ValueError, match='None for a group with no client'):
    hetero_step.check_views(cfg, views[::-1], views, hp)


@pytest.mark.usefixtures('fast_compile')
def test_frozen_clients_keep_their_params_and_the_server_steps_as_with_training_clients():
  make_net, kw = CASES['original_server_bn']
  net, cfg = make_net(), StepConfig(**kw)                  # compiled by the loop test already
  frozen_cfg = StepConfig(**dict(kw, c_lr=0.0))
  st = state.create_train_state(net, cfg, jax.random.key(1))
  init = copy_tree(st.clients)
  vq, vk = _views(cfg, 0)
  trained, m = hetero_step.train_step(net, cfg, copy_tree(st), vq, vk, jnp.int32(0), jnp.int32(0))
  frozen, m0 = hetero_step.train_step(net, frozen_cfg, st, vq, vk, jnp.int32(0), jnp.int32(0))
  # The server's loss and gradient do not depend on whether the clients take theirs.
  np.testing.assert_allclose(m0['loss'], m['loss'], rtol=1e-6)
  chex.assert_trees_all_close(frozen.server, trained.server, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(frozen.clients.momentum, trained.clients.momentum, rtol=1e-6,
                              atol=1e-7)
  chex.assert_trees_all_equal(frozen.clients.online['params'], init.online['params'])
  chex.assert_trees_all_equal(frozen.clients.opt_state, init.opt_state)
  assert not np.allclose(jax.tree.leaves(trained.clients.online['params'])[0],
                         jax.tree.leaves(init.online['params'])[0])


def test_step_config_refusals():
  with pytest.raises(ValueError, match="fedavg_set='reference'"):
    StepConfig(**dict(_COMMON, num_clients=4, sample_ratio=0.5, fedavg_set='reference'))
  with pytest.raises(ValueError, match='per-client queues'):
    StepConfig(**dict(_COMMON, feature_sharing=False, queue_size=60))
  with pytest.raises(ValueError, match='rich_batch_size'):
    StepConfig(**dict(_COMMON, rich_batch_size=1))
  with pytest.raises(ValueError, match='queue_size'):
    StepConfig(**dict(_COMMON, queue_size=19))          # 2 * (6 + 2 + 2) = 20 keys per step
  cfg = StepConfig(**_COMMON)
  vq, vk = _views(StepConfig(**dict(_COMMON, rich_batch_size=4)), 0)
  with pytest.raises(ValueError, match='rich_batch_size'):
    hetero_step.check_views(cfg, vq, vk)


# ---- the run: config checks and the command line ----------------------------------------------

def _tiny(**overrides):
  config = load_config('tiny').get_config()
  config.update(overrides)
  return config


@pytest.mark.parametrize('overrides, match', [
    (dict(hetero='0.5_0.5|64|0.6_0.4'), r"config.hetero=.*rich batch int\(c\) \* batch_size = 128"),
    (dict(hetero='0.5_0.5|2|0.6_0.4', sample_ratio=0.5, fedavg_set='reference'),
     r"config.fedavg_set='reference': the reference's FedAvg set"),
    (dict(hetero='0.5_0.5|2|0.6_0.4', feature_sharing=False), r'config.feature_sharing=False'),
    (dict(hetero='0.5_0.5|2|0.6_0.4', partition='dirichlet'), r"config.partition='dirichlet'"),
    (dict(hetero='0.5_0.5|2'), r"config.hetero='0.5_0.5\|2': needs three"),
    (dict(hetero='0.2_0.8|2|0.8_0.2', num_clients=100, queue_size=400),
     r'config.hetero=.* poor client 0 samples'),
])
def test_bad_hetero_configs_name_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    experiment.resolve(_tiny(**overrides))


def test_reference_string_under_auto_adjust():
  exp = experiment.resolve(_tiny(hetero='reference', auto_adjust=True, num_clients=100,
                                 dataset='digits',
                                 queue_size=6000, avg_freq=1))
  assert (exp.step.rich_clients, exp.step.batch_size, exp.step.rich_batch_size) == (20, 1, 16)
  sizes = [len(p) for p in exp.parts]
  assert exp.step.steps_per_epoch == math.ceil(sizes[0] / 16)    # client 0 is rich
  assert len(set(sizes[:20])) == 1 and sizes[0] > sizes[20]
  # N = 200: auto_adjust samples half the clients; the reference's string makes 100 rich.
  exp = experiment.resolve(_tiny(hetero='reference', auto_adjust=True, num_clients=200,
                                 dataset='digits', queue_size=6000, avg_freq=1))
  assert (exp.step.pool_size, exp.step.rich_clients, exp.step.rich_batch_size) == (100, 100, 4)


@pytest.mark.usefixtures('fast_compile')
def test_cli_run_with_tiny_overrides(tmp_path, capsys):
  workdir = tmp_path / 'run'
  argv = ['--config', str(CONFIG_DIR / 'tiny.py'), '--workdir', str(workdir),
          '--config.hetero=0.5_0.5|2|0.6_0.4', '--config.num_steps=3',
          '--config.eval_every_steps=3', '--config.log_every_steps=3']
  assert main.main(argv) == 0
  assert 'final test kNN accuracy' in capsys.readouterr().out
  saved = json.loads((workdir / 'config.json').read_text())['step']
  assert (saved['rich_clients'], saved['rich_batch_size'], saved['batch_size']) == (2, 4, 2)
  losses_ = [r['loss'] for r in metrics.read_metrics(workdir) if 'loss' in r]
  assert len(losses_) == 1 and np.isfinite(losses_[0])
  sizes = json.loads((workdir / 'partition.json').read_text())['sizes']
  assert sizes[0] == sizes[1] > sizes[2]


def test_sampled_run_resumes_exactly(tmp_path):
  """Client sampling with rich clients from the config: S = 3 (client 0: 76 samples at the rich
  batch 32), pools of 2 of 4 clients; stopped after step 4 (mid-epoch 1) and resumed, the run
  ends as the uninterrupted one, bit for bit."""
  def config(**kw):
    return _tiny(hetero='0.5_0.5|2|0.6_0.4', sample_ratio=0.5, batch_size=16, queue_size=128,
                 checkpoint_every_steps=4, eval_every_steps=4, log_every_steps=1, **kw)
  exp = experiment.resolve(config())
  assert (exp.step.steps_per_epoch, exp.step.pool_size, exp.step.rich_batch_size) == (3, 2, 32)
  with optimisations_off():
    train.train_and_evaluate(config(num_steps=7), str(tmp_path / 'whole'))
    train.train_and_evaluate(config(num_steps=4), str(tmp_path / 'resumed'))
    train.train_and_evaluate(config(num_steps=7), str(tmp_path / 'resumed'))
  losses_ = lambda d: [(r['step'], r['loss']) for r in metrics.read_metrics(tmp_path / d)
                       if 'loss' in r]
  assert losses_('whole') == losses_('resumed') and len(losses_('whole')) == 7
  assert all(np.isfinite(l) for _, l in losses_('whole'))
  states = [protocols.restore_for_eval(tmp_path / d, 'latest')[2:4] for d in ('whole', 'resumed')]
  chex.assert_trees_all_equal(*states)
  counts = np.asarray(states[0][0].count)
  assert counts.sum() == 2 * 7 and (counts < 7).all()        # two clients per step, sampled


class _FirstPool(Exception):
  """Raised by the spy below at the first pool a run (or the bench) draws."""


def test_bench_counts_the_pools_a_run_draws(tmp_path, monkeypatch):
  """bench/hetero_step.py's compilation counts (docs/reference.md) are those of the pools a
  run with the same seed draws: the same pool key."""
  from mocosfl_jax.benchmarks import hetero as bench  # pylint: disable=g-import-not-at-top
  keys = []

  def spy(key, epoch, num_clients, pool_size):
    keys.append(np.asarray(jax.random.key_data(key)))
    raise _FirstPool
  monkeypatch.setattr(plan, 'sample_pool', spy)
  with pytest.raises(_FirstPool):
    train.train_and_evaluate(_tiny(sample_ratio=0.5, seed=0), str(tmp_path / 'run'))
  with pytest.raises(_FirstPool):
    bench.compiles_over_runs(seed=0)
  np.testing.assert_array_equal(keys[1], keys[0])


def test_divergence_aware_aggregation_is_refused_with_hetero():
  c = load_config('tiny').get_config()
  c.hetero, c.divergence_aware = '0.5_0.5|2|0.6_0.4', 'fedema'
  with pytest.raises(ValueError, match="divergence_aware='fedema': divergence-aware aggregation"):
    experiment.resolve(c)
