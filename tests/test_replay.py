"""Loss-threshold communication saving: the A/B/C status machine, the B step and the C replay
against plain per-client Python loops, both storages of the stacks, and a run through A, B and C
that is killed mid-C and resumed."""
import math
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_testlib import fast_compile  # noqa: F401  pylint: disable=unused-import
from core_testlib import (assert_states_close, case, copy_tree, load_config, pool_for, stop_at,
                          views)
from mocosfl_jax import experiment, parallel
from mocosfl_jax.algorithm import parties, plan, replay, state
from mocosfl_jax.models import build
from mocosfl_jax.run import checkpoints, metrics, train
from mocosfl_jax.run import replay as replay_run

pytestmark = pytest.mark.usefixtures('fast_compile')


# ---- the status machine ------------------------------------------------------------------------

def _reference_statuses(losses, threshold, warmup):
  """The reference's loss_based_status, re-typed: (status of each epoch, counts it records)."""
  prev, status, ran, counts = math.inf, 'A', [], {'A': 0, 'B': 0, 'C': 0}
  for epoch, loss in enumerate(losses, start=1):
    ran.append(status)
    delta = threshold if epoch <= warmup else max(prev - loss, 0)
    prev = loss
    if delta < threshold:
      status = {'A': 'B', 'B': 'C', 'C': 'C'}[status]
    else:
      status = 'A'
    counts[status] += 1
  return ''.join(ran), counts


def test_status_machine_follows_the_reference_rules():
  # warm-up 3: A for epochs 1..4 whatever the loss; then small drops walk A -> B -> C, a big
  # drop returns to A, and a rise counts as no drop.
  losses = [9.0, 8.0, 7.9, 7.85, 7.84, 7.83, 7.82, 6.0, 5.99, 6.5, 6.49]
  m = replay.StatusMachine()
  for epoch, loss in enumerate(losses, start=1):
    m = replay.record_loss(m, epoch, loss, threshold=0.05, warmup=3)
  assert m.history == 'AAAAABCCABC'
  assert m.status == 'C'
  assert m.counts() == {'A': 5, 'B': 2, 'C': 4}     # the status reached after each epoch
  assert replay.reference_saving(m.counts()) == 5.0
  assert (m.history, m.counts()) == _reference_statuses(losses, 0.05, 3)
  rng = np.random.default_rng(0)
  for _ in range(20):        # random loss curves with plateaus, against the re-typed rules
    losses = list(np.cumsum(-np.abs(rng.normal(0, 0.05, 30)) * (rng.random(30) < 0.6)) + 5)
    m = replay.StatusMachine()
    for epoch, loss in enumerate(losses, start=1):
      m = replay.record_loss(m, epoch, float(loss), threshold=0.02, warmup=10)
    assert (m.history, m.counts()) == _reference_statuses(losses, 0.02, 10)
    assert replay.StatusMachine.from_dict(m.asdict()) == m
  assert replay.next_status('C', None, 1.0, 1, threshold=0.0, warmup=0) == 'A'   # 0: always A
  with pytest.raises(ValueError, match='status'):
    replay.next_status('D', 1.0, 1.0, 20, 0.1)


# ---- B and C against per-client loops ----------------------------------------------------------

_fwd = jax.jit(parties.client_send, static_argnums=(0, 1))
_srv = jax.jit(parties.server_step, static_argnums=(0, 1, 2))


def _loop_b_step(net, cfg, st, pool, vq, vk, epoch, b):
  """Status B written as the reference runs it: each client's forward and upload, the server's
  step; no gradient download, no client backward / SGD / scheduler step; FedAvg as usual
  (params unchanged since the last sync, running statistics and MonAcoSFL momentum averaged)."""
  cs, ss = st.clients, st.server
  per = [list(jax.tree.map(lambda x, i=i: x[i], (cs.online, cs.momentum)))
         for i in range(cfg.num_clients)]
  draws = np.array(cs.draws)
  aq, ak = [], []
  for j, c in enumerate(int(c) for c in pool):
    a_q, a_k, on, mom, _ = _fwd(net, cfg, per[c][0], per[c][1], vq[j], vk[j])
    per[c][0], per[c][1] = on, mom
    aq.append(a_q)
    ak.append(a_k)
    draws[c] += 1
  ss, _, m = _srv(net, cfg, st.tx, ss, jnp.stack(aq), jnp.stack(ak), jnp.asarray(pool),
                  jnp.int32(epoch))
  if plan.is_sync_step(b, cfg.steps_per_epoch, cfg.avg_freq):
    mean = lambda k: jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0),
                                  *[per[int(c)][k] for c in pool])
    stats, mom = mean(0)['batch_stats'], mean(1)
    for i in range(cfg.num_clients):
      per[i][0] = dict(per[i][0], batch_stats=stats)
      if cfg.momentum_sync:
        per[i][1] = mom
  stack = lambda k: jax.tree.map(lambda *xs: jnp.stack(xs), *[p[k] for p in per])
  cs = cs.replace(online=stack(0), momentum=stack(1), draws=jnp.array(draws))
  return st.replace(clients=cs, server=ss), m, (jnp.stack(aq), jnp.stack(ak))


@pytest.fixture(scope='module')
def b_epoch():
  """One epoch (S = 4 steps, a sync at b = 1 and b = 3) in status B, fused and looped."""
  net, cfg = case('monaco_two_view_full')       # BatchNorm on both sides, momentum sync
  st0 = state.create_train_state(net, cfg, jax.random.key(0))
  st = parallel.train_step(net, cfg, copy_tree(st0), None, *views(cfg, net, 9), jnp.int32(0),
                           jnp.int32(0))[0]          # one A step: clients differ from the init
  ref, got, stacks = copy_tree(st), copy_tree(st), []
  for b in range(cfg.steps_per_epoch):
    vq, vk = views(cfg, net, b)
    pool = pool_for(cfg, 0)
    ref, m_ref, s_ref = _loop_b_step(net, cfg, ref, pool, vq, vk, 0, b)
    got, m = parallel.train_step(net, cfg, got, None, vq, vk, jnp.int32(0), jnp.int32(b),
                                 train_clients=False, keep_smashed=True)
    stacks.append((m.pop('smashed_q'), m.pop('smashed_k')))
    np.testing.assert_allclose(m['loss'], m_ref['loss'], rtol=1e-5)
    chex.assert_trees_all_close(stacks[-1], s_ref, rtol=1e-5, atol=1e-6)
  return net, cfg, st, ref, got, stacks


def test_b_step_equals_clients_forward_and_server_step_without_client_backward(b_epoch):
  net, cfg, before, ref, got, _ = b_epoch
  assert_states_close((got.server,), (ref.server,))
  chex.assert_trees_all_close(got.clients.momentum, ref.clients.momentum, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got.clients.online['batch_stats'],
                              ref.clients.online['batch_stats'], rtol=1e-5, atol=1e-6)
  # No client training: params, SGD buffers and scheduler counters stay bit for bit.
  chex.assert_trees_all_equal(got.clients.online['params'], before.clients.online['params'])
  chex.assert_trees_all_equal(got.clients.opt_state, before.clients.opt_state)
  np.testing.assert_array_equal(got.clients.count, before.clients.count)
  np.testing.assert_array_equal(got.clients.draws, before.clients.draws + cfg.steps_per_epoch)
  # ...while the momentum nets and the server did move.
  assert not np.allclose(jax.tree.leaves(got.clients.momentum['params'])[0],
                         jax.tree.leaves(before.clients.momentum['params'])[0])
  assert int(got.server.step) == int(before.server.step) + cfg.steps_per_epoch


class _NoCheckpoints:
  def all_steps(self):
    return []


def _replay_run(net, cfg, workdir, device_bytes):
  config = types.SimpleNamespace(loss_threshold=0.1, replay_warmup_epochs=0, seed=3,
                                 replay_device_bytes=device_bytes)
  exp = types.SimpleNamespace(config=config, step=cfg)
  return replay_run.ReplayRun(exp, net, workdir, _NoCheckpoints(), jax.random.key(7))


def test_c_epoch_is_the_server_step_on_the_stored_stacks_in_a_shuffled_order(b_epoch, tmp_path):
  net, cfg, _, _, after_b, stacks = b_epoch
  s = cfg.steps_per_epoch
  order = np.asarray(jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(jax.random.key(3), replay_run.REPLAY_STREAM), 1), s))
  assert sorted(order.tolist()) == list(range(s))
  ref = copy_tree(after_b.server)
  ref_losses = []
  for b in range(s):                                  # the server alone, stacks in that order
    q, k = stacks[order[b]]
    ref, _, m = _srv(net, cfg, after_b.tx, ref, q, k, pool_for(cfg, 0), jnp.int32(1))
    ref_losses.append(float(m['loss']))

  results = {}
  for name, bound in (('device', 2**30), ('file', 0)):
    rp = _replay_run(net, cfg, tmp_path / name, bound)
    assert rp.on_device == (name == 'device')
    for b in range(s):
      assert rp.begin_step(0, b) == 'A'
      rp.store(b, *stacks[b])
    rp.machine = replay.StatusMachine('C')
    st = copy_tree(after_b)
    losses = []
    for b in range(s):
      assert rp.begin_step(1, b) == 'C'
      st, m = rp.replay(st, 1, b)
      losses.append(float(m['loss']))
    assert float(m['synced']) == 0.0 and 'client_lr' in m
    chex.assert_trees_all_equal(st.clients, after_b.clients)     # no client computation
    assert_states_close((st.server,), (ref,))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    results[name] = st.server
  assert sorted(p.name for p in (tmp_path / 'file' / 'replay').iterdir()) == [
      'epoch0_smashed_k.npy', 'epoch0_smashed_q.npy']
  assert not (tmp_path / 'device' / 'replay').exists()
  chex.assert_trees_all_equal(results['device'], results['file'])


# ---- a run through A, B and C, killed mid-C and resumed ----------------------------------------

def _config(**kw):
  c = load_config('tiny').get_config()
  # 32 images over 4 clients, B = 2: S = 4 steps; epochs A A B C C with warm-up 1 and a
  # threshold above any loss drop; a checkpoint at step 17 (second step of the second C epoch).
  # No augmentation: a smaller step to compile, and the saving does not touch the views.
  c.update(dict(data_proportion=0.125, num_epochs=5, num_steps=-1, loss_threshold=10.0,
                replay_warmup_epochs=1, eval_every_steps=20, checkpoint_every_steps=17,
                augmentation='none'), **kw)
  return c


def _final_state(workdir, config):
  p = experiment.resolve(config)
  net = build(p.model)
  st = state.create_train_state(net, p.step, jax.random.key(0))
  with checkpoints.Checkpointer(workdir / 'checkpoints', read_only=True) as ckpt:
    return ckpt.restore(p.num_steps, {'clients': st.clients, 'server': st.server}).state


def test_run_goes_through_a_b_c_and_resumes_mid_c_exactly(tmp_path, monkeypatch):
  full = tmp_path / 'full'
  results = train.train_and_evaluate(_config(), str(full))['replay']
  assert results['epoch_status'] == 'AABCC'
  assert results['epochs'] == {'A': 2, 'B': 1, 'C': 2}
  assert results['saving_epochs'] == 2.5
  assert results['reference_counts'] == {'A': 1, 'B': 1, 'C': 3}   # A A B C C -> A B C C C
  assert results['steps'] == {'A': 8, 'B': 4, 'C': 8}
  # resnet_tiny cut 2, width 4, 8 px: 8 x 8 x 4 float32 per image, 4 clients x 2 images per
  # step; B saves the gradient download, C the query and key uploads and the download.
  per_step = 8 * 8 * 4 * 4 * 2 * 4
  assert results['bytes_saved'] == {'gradient_download_in_B': 4 * per_step,
                                    'upload_and_download_in_C': 8 * 3 * per_step,
                                    'total': 4 * per_step + 8 * 3 * per_step}
  assert results['storage'] == 'device'
  statuses = [r['replay_status'] for r in metrics.read_metrics(full) if 'replay_status' in r]
  assert ''.join(statuses) == 'AABCC'

  # Kill after step 18 (inside the second C epoch); the files hold the stacks (file storage).
  killed = tmp_path / 'killed'
  config = _config(replay_device_bytes=0)
  real = replay.replay_step
  stop_at(monkeypatch, replay, 'replay_step', 6, KeyboardInterrupt('simulated kill in epoch 5 (C)'))
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(killed))
  monkeypatch.setattr(replay, 'replay_step', real)
  assert checkpoints.latest_step(killed / 'checkpoints') == 17
  # Step 17 needs epoch 3's stacks (the B epoch): without them the resume is refused.
  (killed / 'replay').rename(tmp_path / 'moved')
  with pytest.raises(replay_run.ReplayFilesMissingError, match='epoch 2'):
    train.train_and_evaluate(config, str(killed))
  (tmp_path / 'moved').rename(killed / 'replay')
  resumed = train.train_and_evaluate(config, str(killed))['replay']
  assert resumed['storage'] == 'file'
  assert {k: v for k, v in resumed.items() if k not in ('storage',)} == {
      k: v for k, v in results.items() if k not in ('storage',)}
  chex.assert_trees_all_equal(_final_state(killed, config), _final_state(full, _config()))
  logged = lambda d: [{k: v for k, v in r.items() if k not in ('steps_per_sec', 'eval_seconds')}
                      for r in metrics.read_metrics(d)]
  assert logged(killed) == logged(full)



@pytest.mark.parametrize('overrides, match', [
    (dict(loss_threshold=-0.1), r'config.loss_threshold=-0.1: must be >= 0'),
    (dict(replay_warmup_epochs=3), r'config.replay_warmup_epochs=3: only the loss-threshold'),
    (dict(replay_device_bytes=0), r'config.replay_device_bytes=0: only the loss-threshold'),
    (dict(loss_threshold=0.1, ressfl=True), r'config.loss_threshold=0.1: .*TAResSFL'),
    (dict(loss_threshold=0.1, client_parallel='shard_map'),
     r'config.loss_threshold=0.1: .*client_parallel'),
])
def test_settings_the_saving_cannot_honour_are_refused_naming_the_field(overrides, match):
  c = load_config('tiny').get_config()
  c.update(overrides)
  with pytest.raises(ValueError, match=match):
    experiment.check_fields(c)
