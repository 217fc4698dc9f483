"""Tests for mocosfl_jax.algorithm.plan: config validation, sync rule, auto_adjust, pool sampling."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.algorithm import plan
from mocosfl_jax.algorithm.plan import StepConfig


def test_derived_fields_and_hashable():
  cfg = StepConfig(num_clients=20, batch_size=20, sample_ratio=0.25, lr=0.06)
  assert cfg.pool_size == 5 and cfg.c_lr == 0.06
  assert cfg.keys_per_step == 200 and cfg.rows_per_client == 20
  assert hash(cfg) == hash(StepConfig(num_clients=20, batch_size=20, sample_ratio=0.25, lr=0.06))
  two = dataclasses.replace(cfg, loss_form='two_view')
  assert two.rows_per_client == 40 and two.keys_per_step == 200
  single = dataclasses.replace(cfg, loss_form='single')
  assert single.keys_per_step == 100
  assert StepConfig(num_clients=4, batch_size=2, c_lr=0.0).c_lr == 0.0


@pytest.mark.parametrize('kwargs, field', [
    (dict(queue_size=10), 'queue_size'),                       # 2*P*B = 16 keys > 10
    (dict(steps_per_epoch=3, avg_freq=4), 'avg_freq'),          # S // avg_freq == 0
    (dict(sample_ratio=0.0), 'sample_ratio'),
    (dict(sample_ratio=1.5), 'sample_ratio'),
    (dict(sample_ratio=0.1), 'pool_size'),                      # int(0.1 * 4) == 0
    (dict(pool_size=5), 'pool_size'),
    (dict(loss_form='symmetric'), 'loss_form'),
    (dict(lr_schedule='step'), 'lr_schedule'),
    (dict(client_schedule='per_step'), 'client_schedule'),
    (dict(temperature=0.0), 'temperature'),
    (dict(tau=1.5), 'tau'),
    (dict(momentum=1.0), 'momentum'),
    (dict(batch_size=0), 'batch_size'),
    (dict(feature_sharing=False, queue_size=12), 'queue_size'),  # K // N = 3 < 2B = 4
])
def test_validate_names_field(kwargs, field):
  base = dict(num_clients=4, batch_size=2, queue_size=64, steps_per_epoch=8, avg_freq=2)
  base.update(kwargs)
  with pytest.raises(ValueError, match=field):
    StepConfig(**base)


def test_no_divisibility_requirement():
  StepConfig(num_clients=3, batch_size=2, queue_size=13)   # 12 keys per step, 13 % 12 != 0


def _syncs(s, f):
  return [b for b in range(s) if plan.is_sync_step(b, s, f)]


def test_sync_rule_matches_reference_examples():
  # 5 clients, S=500, avg_freq=10: every 50 steps, last one is b = S-1.
  assert _syncs(500, 10) == list(range(49, 500, 50))
  # 20 clients: S=125, avg_freq=10 -> period 12, plus the end of the epoch (docs/reference.md,
  # 'Step-count invariant of the provided configurations').
  assert _syncs(125, 10) == list(range(11, 125, 12)) + [124]
  assert _syncs(4, 2) == [1, 3]
  assert _syncs(5, 1) == [4]
  with pytest.raises(ValueError, match='avg_freq'):
    plan.is_sync_step(0, 3, 4)


def test_sync_rule_traced_equals_python():
  f = jax.jit(lambda b: plan.is_sync_step(b, 125, 10))
  got = [bool(f(jnp.int32(b))) for b in range(125)]
  assert got == [plan.is_sync_step(b, 125, 10) for b in range(125)]


@pytest.mark.parametrize('n, expect', [
    (5, dict(batch_size=20, avg_freq=10, sample_ratio=1.0, num_epochs=200)),
    (100, dict(batch_size=1, avg_freq=10, sample_ratio=1.0, num_epochs=200)),
    (200, dict(batch_size=1, avg_freq=5, sample_ratio=0.5, num_epochs=400)),
    (1000, dict(batch_size=1, avg_freq=1, sample_ratio=0.1, num_epochs=2000)),
])
def test_auto_adjust_mocosfl_table(n, expect):
  out = plan.auto_adjust(n, 'mocosfl', num_epochs=200)
  for k, v in expect.items():
    assert out[k] == pytest.approx(v), k
  assert out['queue_size'] == 6000


def test_auto_adjust_monacosfl():
  assert plan.auto_adjust(5, 'monacosfl')['batch_size'] == 2            # 12 // 5
  assert plan.auto_adjust(5, 'monacosfl')['avg_freq'] == 100
  out = plan.auto_adjust(200, 'monacosfl')
  assert (out['batch_size'], out['avg_freq'], out['sample_ratio'], out['num_epochs']) == (
      1, 5, 0.5, 400)
  out = plan.auto_adjust(5, 'monacosfl', batch_size=100, feature_sharing=False)
  assert out['batch_size'] == 100 and out['queue_size'] == 30000
  assert plan.auto_adjust(60, 'monacosfl', batch_size=120,
                          adjust_batch_for_large=False)['batch_size'] == 2
  with pytest.raises(ValueError, match='batch_size'):
    plan.auto_adjust(20, 'monacosfl')                                  # 12 // 20 == 0
  with pytest.raises(ValueError, match='flavour'):
    plan.auto_adjust(5, 'fl')


def test_sample_pool():
  key = jax.random.key(0)
  np.testing.assert_array_equal(plan.sample_pool(key, 3, 5, 5), np.arange(5))
  a = plan.sample_pool(key, 0, 100, 10)
  chex.assert_shape(a, (10,))
  assert a.dtype == jnp.int32 and len(set(np.asarray(a).tolist())) == 10
  assert np.all((np.asarray(a) >= 0) & (np.asarray(a) < 100))
  np.testing.assert_array_equal(a, plan.sample_pool(key, 0, 100, 10))      # deterministic
  assert not np.array_equal(a, plan.sample_pool(key, 1, 100, 10))          # new epoch, new pool
  with pytest.raises(ValueError, match='pool_size'):
    plan.sample_pool(key, 0, 4, 5)
