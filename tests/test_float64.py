"""The library under JAX's x64 mode: models, training state, steps and evaluation are float64.

Each test turns x64 on with the `jax.enable_x64()` context manager, which restores the previous
setting on exit (and jit caches are keyed on it), so nothing leaks into other tests.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_testlib import case, copy_tree, load_config, pool_for, views
from mocosfl_jax import experiment, parallel
from mocosfl_jax.data import augment, sampler
from mocosfl_jax.evaluation import features
from mocosfl_jax.models import build
from mocosfl_jax.run import train


def _floats(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _assert_float64_finite(tree, what):
  leaves = _floats(tree)
  assert leaves, what
  for x in leaves:
    assert x.dtype == jnp.float64, (what, x.dtype)
    assert bool(jnp.all(jnp.isfinite(x))), what


def _to_float64(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, tree)


@pytest.fixture(scope='module')
def tiny():
  """The tiny config resolved (synthetic data), its training images and client table."""
  exp = experiment.resolve(load_config('tiny').get_config())
  return (exp, sampler.TrainImages.flat(exp.train.images),
          sampler.ClientTable.from_partition(exp.parts, exp.step.batch_size))


def _two_steps(exp, net, state, images, table):
  """The two steps of epoch 0 of the tiny run that end with its first sync (gather,
  augmentation, step); returns (state, [metrics])."""
  data_key, aug_key = jax.random.split(jax.random.key(5))
  first_sync = exp.step.steps_per_epoch // exp.step.avg_freq - 1
  out = []
  for s in range(2):
    state, m = train.simulated_step(net, exp.step, exp.aug, state, images, table, data_key,
                                    aug_key, None, jnp.int32(0), jnp.int32(first_sync - 1 + s),
                                    exp.par)
    out.append(m)
  return state, out


def test_tiny_config_builds_trains_and_evaluates_in_float64(tiny):
  exp, images, table = tiny
  with jax.enable_x64():
    net = build(exp.model)
    state = parallel.create_train_state(net, exp.step, jax.random.key(0))
    _assert_float64_finite(state, 'initial state')
    x = jnp.asarray(exp.test.images[:3], jnp.float32) / 255.0   # float32 images, as augmented
    smashed, _ = net.apply_client(features.client0(state.clients), x)
    proj, _ = net.apply_server(state.server.online, smashed)
    assert smashed.dtype == proj.dtype == jnp.float64
    state, metrics = _two_steps(exp, net, state, images, table)
    for m in metrics:
      _assert_float64_finite(m, 'step metrics')
    assert float(metrics[1]['synced']) == 1.0
    _assert_float64_finite(state, 'state after two steps')
    embed = features.embed_fn(net, jnp.asarray(exp.aug.mean), jnp.asarray(exp.aug.std))
    assert embed(features.client0(state.clients), state.server.online,
                 exp.test.images[:2]).dtype == jnp.float64
    acc = features.knn_accuracy(embed, state.clients, state.server, exp.train, exp.test, k=10,
                                t=0.1, batch_size=64)
  assert 0.0 <= acc <= 100.0


def test_float64_steps_compute_what_float32_steps_compute(tiny):
  """The same initial state, data and keys in float32 and (cast) in float64: same losses up to
  float32 rounding, so x64 mode changes the precision only."""
  exp, images, table = tiny
  net = build(exp.model)
  init = parallel.create_train_state(net, exp.step, jax.random.key(0))
  init64 = jax.device_get(init)
  _, m32 = _two_steps(exp, net, copy_tree(init), images, table)
  with jax.enable_x64():
    _, m64 = _two_steps(exp, net, _to_float64(init64), images, table)
    assert all(m['loss'].dtype == jnp.float64 for m in m64)
  np.testing.assert_allclose([float(m['loss']) for m in m64], [float(m['loss']) for m in m32],
                             rtol=1e-4)


def test_batchnorm_and_sampled_pool_stay_float64():
  """largeV2 head (server BatchNorm), two-view form, sampling, momentum sync: running statistics,
  per-client rows and sync metrics stay float64."""
  with jax.enable_x64():
    net, cfg = case('monaco_two_view_sampled')
    state = parallel.create_train_state(net, cfg, jax.random.key(0))
    assert state.server.online['batch_stats']
    _assert_float64_finite(state, 'initial state')
    pool = pool_for(cfg, 0)
    for s in range(2):
      vq, vk = views(cfg, net, s)
      state, m = parallel.train_step(net, cfg, state, pool, vq, vk, jnp.int32(0), jnp.int32(s))
      _assert_float64_finite(m, 'step metrics')
    assert float(m['synced']) == 1.0
    _assert_float64_finite(state, 'state after two steps')


def test_augmentation_keeps_float32_views_under_x64():
  """Views are float32 in both modes, from the same random draws."""
  imgs = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
  mean, std = jnp.asarray([0.49, 0.48, 0.45]), jnp.asarray([0.25, 0.24, 0.26])
  want = augment.two_views(jax.random.key(3), imgs, mean, std, 'mocov2')
  with jax.enable_x64():
    got = augment.two_views(jax.random.key(3), imgs, mean, std, 'mocov2')
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
