"""Tests for mocosfl_jax.algorithm.schedules against closed forms and PyTorch's chained recursion."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.algorithm import schedules
from mocosfl_jax.algorithm.plan import StepConfig


def _torch_chained_cosine(base, period, steps):
  """PyTorch CosineAnnealingLR.get_lr recursion (eta_min = 0), stepped `steps` times."""
  lrs, lr = [base], base
  for t in range(1, steps + 1):
    if (t - 1 - period) % (2 * period) == 0:
      lr = lr + base * (1 - math.cos(math.pi / period)) / 2
    else:
      lr = (1 + math.cos(math.pi * t / period)) / (1 + math.cos(math.pi * (t - 1) / period)) * lr
    lrs.append(lr)
  return lrs


def _cfg(**kw):
  base = dict(num_clients=4, batch_size=2, queue_size=64, lr=0.5, c_lr=0.2, num_epochs=10,
              steps_per_epoch=8, avg_freq=2)
  base.update(kw)
  return StepConfig(**base)


def test_server_cosine_golden():
  cfg = _cfg()
  assert float(schedules.server_lr(cfg, 0)) == pytest.approx(0.5)
  assert float(schedules.server_lr(cfg, 5)) == pytest.approx(0.25)
  assert float(schedules.server_lr(cfg, 10)) == pytest.approx(0.0, abs=1e-7)


def test_client_per_participation_is_periodic_chained_cosine():
  cfg = _cfg()
  counts = jnp.arange(45)
  got = np.asarray(schedules.client_lr(cfg, counts, epoch=0))
  ref = _torch_chained_cosine(0.2, 10, 44)
  np.testing.assert_allclose(got, ref, atol=1e-6)
  assert got[10] == pytest.approx(0.0, abs=1e-7) and got[20] == pytest.approx(0.2)
  assert got[30] == pytest.approx(0.0, abs=1e-7)


def test_cosine_large_counts_stay_accurate():
  cfg = _cfg(num_epochs=200)
  big = jnp.array([400 * 1000 + 3, 400 * 1000 + 200], jnp.int32)
  np.testing.assert_allclose(schedules.client_lr(cfg, big, 0),
                             schedules.client_lr(cfg, jnp.array([3, 200]), 0), rtol=1e-7)
  assert float(schedules.client_lr(cfg, big, 0)[1]) == pytest.approx(0.0, abs=1e-8)


def test_client_per_epoch_ignores_count():
  cfg = _cfg(client_schedule='per_epoch')
  got = schedules.client_lr(cfg, jnp.array([0, 7, 30]), epoch=jnp.int32(5))
  np.testing.assert_allclose(got, [0.1, 0.1, 0.1], rtol=1e-6)


def test_multistep_server_and_client():
  cfg = _cfg(lr_schedule='multistep')                     # milestones [6, 8]
  assert schedules.milestones(10) == (6, 8)
  s = [float(schedules.server_lr(cfg, e)) for e in (0, 5, 6, 7, 8, 20)]
  np.testing.assert_allclose(s, [0.5, 0.5, 0.05, 0.05, 0.005, 0.005], rtol=1e-6)
  c = np.asarray(schedules.client_lr(cfg, jnp.array([5, 6, 8]), 0))
  np.testing.assert_allclose(c, [0.2, 0.04, 0.008], rtol=1e-6)   # gamma 0.2 on clients
  # Duplicate milestones decay twice (PyTorch Counter semantics): E=1 -> [0, 0].
  one = _cfg(lr_schedule='multistep', num_epochs=1)
  assert float(schedules.server_lr(one, 0)) == pytest.approx(0.005)


def test_schedules_under_jit():
  cfg = _cfg()
  f = jax.jit(lambda c, e: (schedules.server_lr(cfg, e), schedules.client_lr(cfg, c, e)))
  s, c = f(jnp.array([0, 10], jnp.int32), jnp.int32(5))
  assert float(s) == pytest.approx(0.25)
  np.testing.assert_allclose(c, [0.2, 0.0], atol=1e-7)


# Around the minimum of a 1000-step cosine: 1 + cos(pi t / E) is ~5e-6 at t = E - 1.
NEAR_MIN = np.array([900, 990, 999, 1001, 1010, 1100, 2999])


def _cosine_float64(base, t, period):
  return base * (1 + np.cos(np.pi * np.asarray(t, np.float64) / period)) / 2


def test_cosine_near_the_minimum_float32():
  """float32: relative error ~1e-7 even where 1 + cos(x) would cancel to ~1e-2."""
  cfg = _cfg(num_epochs=1000)
  got = schedules.client_lr(cfg, jnp.asarray(NEAR_MIN, jnp.int32), 0)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _cosine_float64(0.2, NEAR_MIN, 1000), rtol=1e-6, atol=0)


def test_schedules_are_float64_under_x64():
  """With x64 the learning rates are float64 (as PyTorch's Python doubles), accurate near the
  cosine minimum, and the multistep values are the doubles base * gamma ** n."""
  cfg = _cfg(num_epochs=1000)
  with jax.enable_x64():
    got = schedules.client_lr(cfg, jnp.asarray(NEAR_MIN), 0)
    server = schedules.server_lr(cfg, jnp.int32(999))
    multi = schedules.server_lr(_cfg(lr_schedule='multistep'), jnp.int32(9))
  assert got.dtype == server.dtype == multi.dtype == jnp.float64
  # numpy's own 1 + cos rounds to ~2e-11 relative at t = E - 1.
  np.testing.assert_allclose(got, _cosine_float64(0.2, NEAR_MIN, 1000), rtol=1e-10, atol=0)
  np.testing.assert_allclose(server, _cosine_float64(0.5, 999, 1000), rtol=1e-10, atol=0)
  assert float(multi) == 0.5 * 0.1 * 0.1
