"""TAResSFL's simulated attacker in the step: against a per-client loop, the regulariser's
gradient, checkpoint and resume, the auxiliary data, and the refusals."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_testlib import StandInNet, copy_tree, load_config, optimisations_off, stop_at
from mocosfl_jax import experiment, parallel
from mocosfl_jax.algorithm import losses, parties, plan, ressfl, state as state_lib, step
from mocosfl_jax.data import sources
from mocosfl_jax.evaluation import protocols
from mocosfl_jax.privacy import decoder as decoder_lib
from mocosfl_jax.privacy import similarity
from mocosfl_jax.run import checkpoints, metrics, train

MEAN, STD = (0.4, 0.5, 0.6), (0.3, 0.25, 0.2)
ATTACK = plan.RessflConfig(alpha=2.0, target_ssim=0.0, decoder='res_normN0C4', norm='bn',
                           mean=MEAN, std=STD, milestones=(1, 2))
BASE = dict(num_clients=3, sample_ratio=2 / 3, batch_size=4, queue_size=48, num_epochs=3,
            steps_per_epoch=4, avg_freq=2, lr=0.06, c_lr=0.05)
POOL = jnp.array([2, 0], jnp.int32)
EPOCH = 1                                 # past the first milestone: attacker lr 2e-4
LR_ATTACKER = 1e-3 * 0.2


@pytest.fixture
def fast():
  with optimisations_off():
    yield


@dataclasses.dataclass(frozen=True)
class _Net(StandInNet):
  """The stand-in split net (one conv + GroupNorm client, cheap to compile) with the image shape
  the attacker's decoder is built for."""

  @property
  def input_shape(self):
    return (self.input_size, self.input_size, 3)


@pytest.fixture(scope='module')
def net():
  return _Net()


def _views(seed):
  kq, kk = jax.random.split(jax.random.key(seed))
  shape = (2, 4, 8, 8, 3)
  return jax.random.normal(kq, shape), jax.random.normal(kk, shape)


def _step(net, cfg, state, seed=0, sync=False):
  vq, vk = _views(seed)
  return parallel.train_step(net, cfg, copy_tree(state), POOL, vq, vk, jnp.int32(EPOCH),
                             jnp.int32(0), jnp.asarray(sync))


@pytest.fixture(scope='module')
def attacked(net):
  """(cfg, initial state, state after one step, metrics) with the regulariser always on."""
  cfg = plan.StepConfig(**BASE, ressfl=ATTACK)
  with optimisations_off():
    state = parallel.create_train_state(net, cfg, jax.random.key(3))
    new, m = _step(net, cfg, state)
  return cfg, state, new, m


def _row(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _loop_reference(net, cfg, state):
  """The step's clients and attackers recomputed one client at a time (jit it), the attacker's
  Adam moments and the clients' SGD written out by hand; the server's gradient w.r.t. the smashed
  data comes from the library's server loss (not under test here)."""
  r, vq, vk = cfg.ressfl, *_views(0)
  clients, server = state.clients, state.server
  s_momentum, queue = parties.server_prepare(cfg, server, POOL)
  a_q, a_k, pullback = [], [], []
  for j, c in enumerate(POOL.tolist()):
    online = _row(clients.online, c)
    a, vjp = jax.vjp(lambda p, online=online, j=j: net.apply_client(
        dict(online, params=p), vq[j], train=True)[0], online['params'])
    a_q.append(a)
    pullback.append(vjp)
    momentum = jax.tree.map(lambda t, o: 0.99 * t + 0.01 * o, _row(clients.momentum, c)['params'],
                            online['params'])
    a_k.append(net.apply_client(dict(online, params=momentum), vk[j], train=True)[0])
  g_server = jax.grad(lambda a: losses.server_loss(
      net, 'original', cfg.temperature, server.online, s_momentum, a, jnp.concatenate(a_k),
      queue, 2)[0])(jnp.concatenate(a_q))

  out = {}
  for j, c in enumerate(POOL.tolist()):
    images = jnp.clip(vq[j] * jnp.asarray(STD) + jnp.asarray(MEAN), 0.0, 1.0)
    dec = decoder_lib.build(r.decoder, 8, a_q[j].shape[1:], r.norm)
    variables = _row(clients.attacker.variables, c)

    def neg_ssim(p, variables=variables, images=images, j=j, dec=dec):
      rec, upd = dec.apply(dict(variables, params=p), a_q[j], train=True,
                           mutable=['batch_stats'])
      return -jnp.mean(similarity.ssim(rec, images)), upd['batch_stats']

    g, stats = jax.grad(neg_ssim, has_aux=True)(variables['params'])
    # Adam's first step from zero moments: m = 0.1 g, v = 0.001 g^2, both bias-corrected.
    mu = jax.tree.map(lambda x: 0.1 * x, g)
    nu = jax.tree.map(lambda x: 0.001 * x * x, g)
    params = jax.tree.map(lambda p, m, v: p - LR_ATTACKER * (m / 0.1) / (jnp.sqrt(v / 0.001)
                                                                         + 1e-8),
                          variables['params'], mu, nu)
    new_vars = {'params': params, 'batch_stats': stats}

    def ssim_of(a, new_vars=new_vars, images=images, dec=dec):
      return jnp.mean(similarity.ssim(dec.apply(new_vars, a, train=False), images))

    s, g_a = jax.value_and_grad(ssim_of)(a_q[j])
    extra = jnp.where(s > r.target_ssim, r.alpha * g_a, 0.0)
    (g_client,) = pullback[j](g_server[4 * j:4 * (j + 1)] + extra)
    w = _row(clients.online, c)['params']
    sgd = jax.tree.map(lambda w, g: w - cfg.c_lr * (g + cfg.weight_decay * w), w, g_client)
    out[c] = dict(params=sgd, attacker=new_vars, grad=g, mu=mu, nu=nu, ssim=s)
  return out


def test_vmapped_attackers_equal_a_per_client_loop(net, attacked, fast):
  cfg, state, new, m = attacked
  ref = jax.jit(lambda st: _loop_reference(net, cfg, st))(state)
  for c, want in ref.items():
    att = _row(new.clients.attacker, c)
    mu, nu = att.opt_state.mu, att.opt_state.nu
    chex.assert_trees_all_close(mu, want['mu'], rtol=2e-5, atol=1e-8)
    chex.assert_trees_all_close(nu, want['nu'], rtol=2e-5, atol=1e-11)
    assert int(att.opt_state.count) == 1
    chex.assert_trees_all_close(att.variables['batch_stats'], want['attacker']['batch_stats'],
                                rtol=1e-5, atol=1e-6)
    # The update from the moments: lr * m_hat / (sqrt(v_hat) + eps) on every parameter; and
    # equal to the loop's wherever the gradient is not rounding noise (a conv bias before
    # BatchNorm has a zero gradient, which Adam's normalisation turns into noise-sized steps).
    p0 = _row(state.clients.attacker.variables, c)['params']
    chex.assert_trees_all_close(
        att.variables['params'],
        jax.tree.map(lambda p, m, v: p - LR_ATTACKER * (m / 0.1) / (jnp.sqrt(v / 0.001) + 1e-8),
                     p0, mu, nu), rtol=1e-5, atol=1e-9)
    for got, exp, g in zip(jax.tree.leaves(att.variables['params']),
                           jax.tree.leaves(want['attacker']['params']),
                           jax.tree.leaves(want['grad'])):
      real = np.abs(np.asarray(g)) > 1e-6
      np.testing.assert_allclose(np.asarray(got)[real], np.asarray(exp)[real], rtol=1e-4,
                                 atol=1e-7)
    chex.assert_trees_all_close(_row(new.clients.online, c)['params'], want['params'],
                                rtol=2e-5, atol=2e-6)
  # The client outside the pool keeps its attacker bit for bit.
  chex.assert_trees_all_equal(_row(new.clients.attacker, 1), _row(state.clients.attacker, 1))
  assert float(m['regulariser_active']) == 1.0
  np.testing.assert_allclose(float(m['regulariser_ssim']),
                             np.mean([float(v['ssim']) for v in ref.values()]), rtol=1e-5)
  np.testing.assert_allclose(float(m['regulariser_penalty']),
                             2.0 * float(m['regulariser_ssim']), rtol=1e-5)
  np.testing.assert_allclose(float(m['attacker_lr']), LR_ATTACKER, rtol=1e-6)


def test_regulariser_adds_its_gradient_to_the_clients_only(net, attacked, fast):
  cfg, state, new, _ = attacked
  plain_cfg = dataclasses.replace(cfg, ressfl=None)
  plain_state = state.replace(clients=state_lib.ClientState(
      **{f.name: getattr(state.clients, f.name)
         for f in dataclasses.fields(state_lib.ClientState)}))
  plain, m_plain = _step(net, plain_cfg, plain_state)
  # The server never sees the regulariser; its loss is the logged loss.
  chex.assert_trees_all_close(new.server, plain.server, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(m_plain['loss']), float(attacked[3]['loss']), rtol=1e-6)
  # Client c: the update differs by -c_lr * (alpha dS/dA_q pulled back through its slice), S
  # the SSIM of the attacker after its step (taken from the step's own output).
  vq, _ = _views(0)

  @jax.jit
  def regulariser_grads(online, attacker):
    out = []
    for j, c in enumerate(POOL.tolist()):
      row, variables = _row(online, c), _row(attacker.variables, c)
      images = jnp.clip(vq[j] * jnp.asarray(STD) + jnp.asarray(MEAN), 0.0, 1.0)
      dec = decoder_lib.build('res_normN0C4', 8, net.smashed_shape, 'bn')

      def penalty(p, row=row, j=j, images=images, variables=variables, dec=dec):
        a = net.apply_client(dict(row, params=p), vq[j], train=True)[0]
        return 2.0 * jnp.mean(similarity.ssim(dec.apply(variables, a, train=False), images))

      out.append(jax.grad(penalty)(row['params']))
    return out

  for j, g in enumerate(regulariser_grads(state.clients.online, new.clients.attacker)):
    c = int(POOL[j])
    diff = jax.tree.map(lambda a, b: a - b, _row(new.clients.online, c)['params'],
                        _row(plain.clients.online, c)['params'])
    chex.assert_trees_all_close(diff, jax.tree.map(lambda x: -cfg.c_lr * x, g),
                                rtol=1e-3, atol=2e-7)
  # Below the target no extra gradient: the clients step exactly as without the attacker.
  calm_cfg = dataclasses.replace(cfg, ressfl=dataclasses.replace(ATTACK, target_ssim=0.99))
  calm, m_calm = _step(net, calm_cfg, state)
  assert float(m_calm['regulariser_active']) == 0.0 == float(m_calm['regulariser_penalty'])
  chex.assert_trees_all_close(calm.clients.online, plain.clients.online, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(calm.server, plain.server, rtol=1e-6, atol=1e-7)


def test_fedavg_leaves_attackers_apart_and_the_split_step_refuses(net, attacked, fast):
  cfg, _, new, _ = attacked
  synced, m = _step(net, cfg, new, seed=1, sync=True)
  assert float(m['synced']) == 1.0
  p = synced.clients.online['params']
  chex.assert_trees_all_equal(_row(p, 0), _row(p, 1), _row(p, 2))   # every client averaged
  a = synced.clients.attacker.variables['params']
  assert not all(np.array_equal(x[0], x[2]) for x in jax.tree.leaves(a))   # attackers not
  vq, vk = _views(0)
  with pytest.raises(ValueError, match='split_train_step does not run the simulated attacker'):
    step.split_train_step(net, cfg, new, vq, vk, 0, 0, pool=POOL)


def _tiny_ressfl():
  c = load_config('tiny').get_config()
  c.ressfl, c.attacker_decoder, c.ressfl_target_ssim = True, 'res_normN0C4', 0.3
  c.aux_dataset, c.data_proportion = 'sample_photos', 0.5
  return c


def test_run_with_the_attacker_resumes_exactly(tmp_path, fast, monkeypatch):
  config = _tiny_ressfl()
  full = tmp_path / 'full'
  train.train_and_evaluate(config, str(full))
  real_step = train.simulated_step
  resumed = tmp_path / 'resumed'
  stop_at(monkeypatch, train, 'simulated_step', 4,
          KeyboardInterrupt('simulated kill between steps 4 and 5'))
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(resumed))
  monkeypatch.setattr(train, 'simulated_step', real_step)
  assert checkpoints.latest_step(resumed / 'checkpoints') == 3
  train.train_and_evaluate(config, str(resumed))
  exp, _, clients, server, step_done = protocols.restore_for_eval(full, 'latest')
  _, _, clients2, server2, _ = protocols.restore_for_eval(resumed, 'latest')
  assert step_done == 6 and exp.step.batch_size == 4 and exp.aux.spec.batch_size == 2
  assert isinstance(clients, state_lib.AttackedClientState)
  chex.assert_trees_all_equal((clients, server), (clients2, server2))
  # The attacker trained: its Adam count is the number of steps of each client.
  np.testing.assert_array_equal(clients.attacker.opt_state.count, np.full(4, 6))
  records = metrics.read_metrics(full)
  logged = {k for r in records for k in r}
  assert set(ressfl.METRIC_KEYS) | {'attacker_lr'} <= logged
  assert not [k for k in logged - {'step'}
              if metrics.plot_group(k) is None and k not in metrics.NOT_PLOTTED]
  assert metrics.plot_group('attacker_ssim') == metrics.plot_group('regulariser_ssim')
  assert metrics.plot_group('attacker_lr') == 'learning_rate'
  assert (full / metrics.PLOTS_DIR / 'regulariser.png').exists()
  strip = lambda d: [{k: v for k, v in r.items() if k not in ('steps_per_sec', 'eval_seconds')}
                     for r in metrics.read_metrics(d)]
  assert strip(full) == strip(resumed)


def test_auxiliary_rows_and_steps_per_epoch():
  config = load_config('tiny').get_config()
  config.batch_size, config.num_clients, config.queue_size = 8, 2, 512
  config.aux_dataset = 'sample_photos'
  exp = experiment.resolve(config)
  # 256 synthetic images (128 per client, 16 steps) and 1024 photos per client (128 steps).
  assert exp.step.batch_size == 16 and exp.aux.spec.batch_size == 8
  assert exp.step.steps_per_epoch == 128 and exp.aux.spec.with_target
  assert [len(p) for p in exp.aux.parts] == [1024, 1024]
  assert exp.aux.spec.aug.mean != exp.aug.mean          # each set keeps its own constants
  assert exp.step.ressfl is None                       # the auxiliary set alone adds no attacker
  config.data_proportion = 0.0
  exp = experiment.resolve(config)
  assert exp.step.batch_size == 8 and not exp.aux.spec.with_target
  assert sum(len(p) for p in exp.parts) == 0
  config.ressfl, config.batch_size = True, 20
  exp = experiment.resolve(config)
  assert exp.step.ressfl.norm == 'bn' and exp.step.ressfl.milestones == (60, 120, 160)
  assert exp.step.ressfl.mean == exp.aug.mean
  config.batch_size, config.sample_ratio, config.num_clients = 19, 0.5, 4
  assert experiment.resolve(config).step.ressfl.norm == 'gn'
  assert experiment.resolve(config).step.ressfl.milestones == (120, 240, 320)


def test_sample_photos_are_seeded_crops_with_their_own_constants():
  a = sources.load('sample_photos', 'train', image_size=8)
  b = sources.load('sample_photos', 'train', image_size=8)
  assert a.images.shape == (sources.SAMPLE_PHOTOS_CROPS, 8, 8, 3) and (a.labels == -1).all()
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_allclose(a.mean, a.images.reshape(-1, 3).mean(0) / 255.0, rtol=1e-5)
  assert len({a.images[i].tobytes() for i in range(64)}) == 64
  with pytest.raises(ValueError, match="split='test' is not valid for sample_photos"):
    sources.load('sample_photos', 'test')


@pytest.mark.parametrize('changes,match', [
    (dict(ressfl_alpha=1.0), r'config.ressfl_alpha=1.0: only TAResSFL'),
    (dict(attacker_decoder='res_normN1C8'), r'config.attacker_decoder=.*set ressfl=True'),
    (dict(ressfl=True, attacker_decoder='custom'), r"attacker_decoder='custom'.*res_normN"),
    (dict(ressfl=True, ressfl_target_ssim=1.0), r'ressfl_target_ssim=1.0: must be in \[0, 1\)'),
    (dict(ressfl=True, ressfl_alpha=-1.0), r'ressfl_alpha=-1.0: must be >= 0'),
    (dict(data_proportion=0.0), r'data_proportion=0.0.*needs an aux_dataset'),
    (dict(aux_dataset='synthetic'), r"aux_dataset='synthetic': is the training dataset"),
    (dict(aux_dataset='mnist'), r"aux_dataset='mnist': unknown"),
    (dict(dataset='sample_photos'), r"dataset='sample_photos': is unlabelled"),
])
def test_bad_settings_are_refused_naming_the_field(changes, match):
  config = load_config('tiny').get_config()
  config.update(changes)
  with pytest.raises(ValueError, match=match):
    experiment.resolve(config)
