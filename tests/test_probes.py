"""Tests for mocosfl_jax.evaluation.probes: learning, final/best reporting, LR schedules, BN masking."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.evaluation import probes

C, F = 4, 12
EPOCHS = 8


def _blobs(n, seed):
  rng = np.random.default_rng(seed)
  centers = np.random.default_rng(0).normal(size=(C, F)) * 4.0
  y = rng.integers(0, C, n)
  return (centers[y] + rng.normal(size=(n, F))).astype(np.float32), y.astype(np.int32)


@pytest.fixture(scope="module")
def data():
  xtr, ytr = _blobs(300, 1)
  xte, yte = _blobs(120, 2)
  return xtr, ytr, xte, yte


@pytest.fixture(scope="module")
def linear_results(data):
  return {recipe: probes.linear_probe(*data, C, key=jax.random.key(0), recipe=recipe,
                                      epochs=EPOCHS, batch_size=64, lr=3e-2)
          for recipe in probes.RECIPES}


@pytest.mark.parametrize("recipe", probes.RECIPES)
def test_linear_probe_learns_and_reports_final_and_best(linear_results, recipe):
  r = linear_results[recipe]
  assert r.final_accuracy > 95.0, r
  assert len(r.accuracies) == EPOCHS
  assert r.best_accuracy == max(r.accuracies) >= r.final_accuracy
  assert r.accuracies[r.best_epoch] == r.best_accuracy
  assert r.final_accuracy == r.accuracies[-1]
  assert r.num_train == 300 and r.recipe == recipe
  # 300 examples at batch 64 -> 5 iterations per epoch, the last one partial.
  chex.assert_shape(r.lrs, (EPOCHS, probes.steps_per_epoch(300, 64)))


def test_reference_lr_is_per_iteration_and_clean_per_epoch(linear_results):
  lr, steps = 3e-2, 5
  ref = linear_results["reference"].lrs.reshape(-1)
  t_max = EPOCHS // 4  # = 2 iterations: the LR bounces lr, lr/2, 0, lr/2, lr, ...
  expected = lr * 0.5 * (1 + np.cos(np.pi * np.arange(EPOCHS * steps) / t_max))
  np.testing.assert_allclose(ref, expected, rtol=1e-5, atol=1e-9)
  assert np.ptp(linear_results["reference"].lrs[0]) > 0  # varies within an epoch
  clean = linear_results["clean"].lrs
  np.testing.assert_allclose(clean, np.repeat(clean[:, :1], steps, axis=1))  # constant per epoch
  np.testing.assert_allclose(clean[:, 0], lr * 0.5 * (1 + np.cos(np.pi * np.arange(EPOCHS) / EPOCHS)),
                             rtol=1e-5)


def test_reference_schedules_at_paper_scale():
  lin = probes.probe_lr_schedule("linear", "reference", lr=1e-3, epochs=100, steps_per_epoch=391)
  np.testing.assert_allclose([lin(0), lin(25), lin(50), lin(75), lin(391)],
                             [1e-3, 0.0, 1e-3, 0.0, 1e-3 * 0.5 * (1 + np.cos(np.pi * 391 / 25))],
                             atol=1e-9)
  semi = probes.probe_lr_schedule("semi", "reference", lr=1e-3, epochs=100, steps_per_epoch=40)
  np.testing.assert_allclose([semi(59), semi(60), semi(79), semi(80), semi(4000)],
                             [1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-5)
  clean = probes.probe_lr_schedule("semi", "clean", lr=1e-3, epochs=100, steps_per_epoch=40)
  np.testing.assert_allclose([clean(0), clean(39), clean(40), clean(50 * 40)],
                             [1e-3, 1e-3, 1e-3 * 0.5 * (1 + np.cos(np.pi / 100)), 5e-4], rtol=1e-5)


def test_semi_probe_learns_on_label_subset(data):
  r = probes.semi_supervised_probe(*data, C, key=jax.random.key(1), fraction=0.5,
                                   recipe="reference", epochs=100, batch_size=32, hidden=16,
                                   lr=1e-2)
  assert r.num_train == 150
  assert r.final_accuracy > 95.0, r
  assert r.best_accuracy == max(r.accuracies) and len(r.accuracies) == 100
  # MultiStep milestones int(0.6 * 100) = 60 and 80 *iterations*, i.e. epochs 12 and 16 of 100
  # at 5 iterations per epoch (reference quirk).
  np.testing.assert_allclose(r.lrs.reshape(-1)[[0, 59, 60, 79, 80, -1]],
                             [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-5)


def test_label_subset_is_random_and_sized():
  idx = probes.label_subset(jax.random.key(0), 1000, 0.01)
  chex.assert_shape(idx, (10,))
  assert len(set(idx.tolist())) == 10 and not np.all(np.diff(idx) > 0)
  with pytest.raises(ValueError, match="fraction"):
    probes.label_subset(jax.random.key(0), 10, 0.01)


def test_masked_batchnorm_ignores_padding():
  """A padded partial batch must give the same logits and BN stats as the unpadded batch."""
  params, state = jax.jit(probes._init, static_argnums=(0, 2, 3, 4))("semi", jax.random.key(0),
                                                                      F, C, 8)
  x = jax.random.normal(jax.random.key(1), (5, F))
  padded = jnp.concatenate([x, 100 * jnp.ones((3, F))])
  mask = jnp.arange(8) < 5
  apply = jax.jit(probes._apply, static_argnums=(0, 5))
  logits, st = apply("semi", params, state, x, jnp.ones(5, bool), True)
  logits_p, st_p = apply("semi", params, state, padded, mask, True)
  np.testing.assert_allclose(logits_p[:5], logits, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(st_p, st, rtol=1e-5)
  # Running var uses the unbiased batch variance, as torch BatchNorm1d.
  h = x @ params["w1"] + params["b1"]
  np.testing.assert_allclose(st["var"], 0.9 + 0.1 * np.var(np.asarray(h), axis=0, ddof=1),
                             rtol=1e-5)


def test_bad_arguments_raise(data):
  with pytest.raises(ValueError, match="recipe='fancy'"):
    probes.linear_probe(*data, C, key=jax.random.key(0), recipe="fancy")
  xtr, ytr, xte, yte = data
  with pytest.raises(ValueError, match="train_y must lie"):
    probes.linear_probe(xtr, ytr + C, xte, yte, C, key=jax.random.key(0))
  with pytest.raises(ValueError, match="feature dims"):
    probes.linear_probe(xtr, ytr, xte[:, :3], yte, C, key=jax.random.key(0))
