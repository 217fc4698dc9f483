"""Shared helpers of the tests (not collected by pytest): tiny nets, step cases, config files.

`tiny_net()` is the models package's `resnet_tiny` (cut 1, width 4, 8x8). `StandInNet` is a
smaller split net with exactly the models' interface (init_client / init_server / apply_client /
apply_server / server_features, smashed_shape, key_dim, feature_dim) that can put a BatchNorm on
each side, so the step tests also cover running-stat threading and averaging (resnet_tiny has
no client-side BatchNorm). `load_config(name)` loads configs/<name>.py by path, as
`python -m mocosfl_jax.main --config configs/<name>.py` does.
"""
import contextlib
import dataclasses
import importlib.util
import math
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mocosfl_jax
from mocosfl_jax.algorithm import plan
from mocosfl_jax.algorithm.plan import StepConfig
from mocosfl_jax.algorithm.state import ClientState
from mocosfl_jax.models import SplitConfig, build

CONFIG_DIR = Path(__file__).resolve().parent.parent / 'configs'
# The directory holding the mocosfl_jax under test: subprocesses get it as PYTHONPATH, so they
# import the same copy (a checkout, an editable or a regular install).
PACKAGE_PARENT = str(Path(mocosfl_jax.__file__).resolve().parent.parent)


def load_config(name):
  """The module of configs/<name>.py, loaded by path as ml_collections' config_flags loads it."""
  path = CONFIG_DIR / f'{name}.py'
  spec = importlib.util.spec_from_file_location(f'config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def optimisations_off():
  """XLA with most optimisations off: tiny nets compile faster. The flag is not part of JAX's
  in-memory jit cache key, so a test under it compares its numbers only with numbers compiled
  under it too, or with a loop of its own."""
  prev = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', prev)


@pytest.fixture(scope='module')
def fast_compile():
  """optimisations_off() for a whole module (through pytestmark or a module-level name)."""
  with optimisations_off():
    yield


class _Client(nn.Module):
  width: int
  bn: bool

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (3, 3), padding=1)(x)
    x = nn.GroupNorm(num_groups=2)(x)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x)


class _Server(nn.Module):
  width: int
  key_dim: int
  bn: bool

  def features(self, x):
    x = nn.Conv(2 * self.width, (3, 3), strides=2, padding=1, name='conv')(x)
    x = nn.relu(nn.GroupNorm(num_groups=2, name='gn')(x))
    return jnp.mean(x, axis=(1, 2))

  @nn.compact
  def __call__(self, x, train: bool):
    h = self.features(x)
    h = nn.Dense(2 * self.width, name='fc1')(h)
    if self.bn:
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn')(h)
    h = nn.relu(h)
    return nn.Dense(self.key_dim, name='fc2')(h)


@dataclasses.dataclass(frozen=True)
class StandInNet:
  """A split net with the models' interface: conv+GN(+BN) client, conv+GN+GAP+MLP(+BN) server."""
  width: int = 4
  input_size: int = 8
  key_dim: int = 8
  client_bn: bool = False
  server_bn: bool = False

  @property
  def _client(self):
    return _Client(self.width, self.client_bn)

  @property
  def _server(self):
    return _Server(self.width, self.key_dim, self.server_bn)

  @property
  def smashed_shape(self):
    return (self.input_size, self.input_size, self.width)

  @property
  def feature_dim(self):
    return 2 * self.width

  def init_client(self, key):
    x = jnp.zeros((2, self.input_size, self.input_size, 3))
    v = dict(self._client.init(key, x, train=False))
    v.setdefault('batch_stats', {})
    return v

  def init_server(self, key):
    v = dict(self._server.init(key, jnp.zeros((2,) + self.smashed_shape), train=False))
    v.setdefault('batch_stats', {})
    return v

  @staticmethod
  def _apply(module, variables, x, train):
    out, mut = module.apply(variables, x, train=train, mutable=['batch_stats'])
    new = dict(variables)
    if train and mut.get('batch_stats'):
      new['batch_stats'] = mut['batch_stats']
    return out, new

  def apply_client(self, variables, x, train=True):
    return self._apply(self._client, variables, x, train)

  def apply_server(self, variables, smashed, train=True):
    return self._apply(self._server, variables, smashed, train)

  def server_features(self, variables, smashed):
    return self._server.apply(variables, smashed, method=_Server.features)


def tiny_net(head: str = 'V2'):
  """The models' resnet_tiny (cut 1, width 4, 8x8); head='largeV2' gives it a server BatchNorm."""
  return build(SplitConfig(arch='resnet_tiny', cut=1, input_size=8, bottleneck='None', head=head,
                           ws=True, c_residual=True, width=4))


# ---- shared step-test cases (same objects across test files => one compile per case) ----------

_COMMON = dict(batch_size=2, num_epochs=3, steps_per_epoch=4, avg_freq=2, lr=0.06)
# Each case: (net builder, StepConfig kwargs). Two cases run resnet_tiny; two run the
# stand-in, which is cheaper to compile and is the only tiny net with a *client-side*
# BatchNorm (per-client running stats under vmap).
CASES = {
    # MocoSFL: original two-term loss, all clients, shared queue (24 keys/step, K=40 wraps).
    'moco_original_full': (lambda: StandInNet(server_bn=True), dict(
        num_clients=3, queue_size=40, loss_form='original', **dict(_COMMON, batch_size=4))),
    # MocoSFL with sampling, per-client queues, multistep schedule stepped per epoch, V1 head.
    'moco_original_sampled_pcq': (lambda: tiny_net(head='V1'), dict(
        num_clients=4, sample_ratio=0.5, queue_size=40, feature_sharing=False,
        loss_form='original', lr_schedule='multistep', client_schedule='per_epoch',
        **dict(_COMMON, num_epochs=2))),
    # MonAcoSFL: two-view form, momentum sync, sampling, largeV2 head (server BatchNorm).
    'monaco_two_view_sampled': (lambda: tiny_net(head='largeV2'), dict(
        num_clients=4, sample_ratio=0.5, queue_size=12, loss_form='two_view',
        momentum_sync=True, **_COMMON)),
    # MonAcoSFL without sampling; BatchNorm on both sides.
    'monaco_two_view_full': (lambda: StandInNet(client_bn=True, server_bn=True), dict(
        num_clients=3, queue_size=40, loss_form='two_view', momentum_sync=True,
        **dict(_COMMON, batch_size=4))),
}


def case(name):
  """(net, cfg) of a named case."""
  make_net, cfg_kw = CASES[name]
  return make_net(), StepConfig(**cfg_kw)


def pool_for(cfg, epoch):
  """The epoch's pool (fixed key), natural order when there is no sampling."""
  return plan.sample_pool(jax.random.key(7), epoch, cfg.num_clients, cfg.pool_size)


def views(cfg, net, seed):
  """Random normalised query/key views [P, B, H, W, 3] for one step."""
  del net
  h = 8
  kq, kk = jax.random.split(jax.random.key(1000 + seed))
  shape = (cfg.pool_size, cfg.batch_size, h, h, 3)
  return jax.random.normal(kq, shape), jax.random.normal(kk, shape)


def assert_states_close(got, ref):
  """(ClientState, ServerState) pairs equal to 1e-5; optimizer buffers to 3e-4 absolute.

  The SGD momentum buffers hold raw (un-scaled) gradient sums of magnitude up to ~5; with
  BatchNorm over a handful of rows float32 re-association noise in them reaches ~1e-4 between
  two mathematically identical gradient paths (the same comparison in float64 agrees to 3e-8).
  Everything the optimizer *applies* (params, lr * buffer) stays within 1e-5.
  """
  strip = lambda t: tuple(x.replace(opt_state=None) for x in t)
  chex.assert_trees_all_close(strip(got), strip(ref), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(tuple(x.opt_state for x in got), tuple(x.opt_state for x in ref),
                              rtol=1e-5, atol=3e-4)


def client_lr_by_hand(cfg, count, epoch):
  """A client's learning rate written out independently of schedules.py (the reference's
  chained cosine, or MultiStep with gamma 0.2), at `count` participations or `epoch`."""
  t = count if cfg.client_schedule == 'per_participation' else epoch
  if cfg.lr_schedule == 'cosine':
    return cfg.c_lr * (1 + math.cos(math.pi * t / cfg.num_epochs)) / 2
  marks = (int(0.6 * cfg.num_epochs), int(0.8 * cfg.num_epochs))
  return cfg.c_lr * 0.2 ** sum(t >= m for m in marks)


# ---- steps written out one client at a time (the tests' per-client loops) ---------------------

def clients_by_hand(cs):
  """Stacked ClientState rows -> per client [online, momentum, opt_state] (lists, editable)."""
  return [list(jax.tree.map(lambda x, i=i: x[i], (cs.online, cs.momentum, cs.opt_state)))
          for i in range(cs.count.shape[0])]


def fedavg_by_hand(cfg, per, pool):
  """The pool's plain FedAvg in numpy: every client's online variables (with momentum_sync also
  its momentum variables) := the mean of the pool's. Returns the reference's divergence of each
  pool client before the sync, the sum over 'params' tensors of ||local - global||_2."""
  mean = lambda k: jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0),
                                *[per[c][k] for c in pool])
  avg_on, avg_mom = mean(0), mean(1)
  leaves = lambda c: zip(jax.tree.leaves(per[c][0]['params']), jax.tree.leaves(avg_on['params']))
  div = [sum(np.linalg.norm(np.ravel(np.asarray(a) - g)) for a, g in leaves(c)) for c in pool]
  for p in per:
    p[0] = avg_on
    if cfg.momentum_sync:
      p[1] = avg_mom
  return div


def stack_by_hand(per, count, draws, lr_scale):
  """`clients_by_hand`'s lists (updated) back into one stacked ClientState."""
  stack = lambda k: jax.tree.map(lambda *xs: jnp.stack(xs), *[p[k] for p in per])
  return ClientState(online=stack(0), momentum=stack(1), opt_state=stack(2),
                     count=jnp.array(count), draws=jnp.array(draws), lr_scale=lr_scale)


def stop_at(monkeypatch, obj, name, after, error):
  """Makes `obj.name` raise `error` on its call number `after + 1` (a run killed there); the
  first `after` calls go through. monkeypatch.setattr(obj, name, original) undoes it."""
  real, calls = getattr(obj, name), []

  def stopping(*args, **kwargs):
    calls.append(1)
    if len(calls) == after + 1:
      raise error
    return real(*args, **kwargs)

  monkeypatch.setattr(obj, name, stopping)


def copy_tree(tree):
  """Deep copy (fresh buffers) so a donated original can still be compared against."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
