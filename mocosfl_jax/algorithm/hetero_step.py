"""One simulated step with heterogeneous clients: rich clients 0..R-1 with a larger batch.

    state, metrics = hetero_step.train_step(net, cfg, state, (q_rich, q_poor), (k_rich, k_poor),
                                            epoch, batch_idx, pool=None)

The pool's clients form two groups with static shapes, each vmapped: its rich clients' views are
[rich in pool, rich B, H, W, C], its poor clients' [poor in pool, B, H, W, C]. The server's batch
is both groups' smashed rows put back in pool order with the reference's variable widths (a
row gather), so the loss mean is over the real rows, the keys enter the queue in pool order,
and a server BatchNorm sees exactly the real rows: no padding row exists anywhere. One
`value_and_grad` through both groups' forwards and the server loss gives every client the
gradient of its own rows, as the reference's split of dL/dA_q by consecutive widths. The rest
(client EMA before the key forward, server EMA, SGD on both sides, per-participation
schedules) is that of step.train_step, through the same per-party functions (parties.py);
FedAvg is the plain mean of the pool, given to all N clients, with the step's metrics
(`sync.aggregate_if`; divergence-aware aggregation and the reference's FedAvg set are refused
with hetero).

Full participation (`pool=None`): the groups are clients 0..R-1 and R..N-1, updated in place.
Client sampling (`pool=split_pool(...)`, host-side once per epoch): the pool's rich and poor
clients are gathered, stepped and written back. The number of rich clients in the pool is a
shape, so each count the sampler draws compiles the step once (about twenty over a whole run
of the reference's sampled settings; jit caches them). A masked step padded to min(R, P) rich
and min(N - R, P) poor slots would compile once but compute every slot: at the reference's
N = 500 setting (B 1, 100 rich at 16, pools of 100 holding about 20 rich) that is 1 700 images
per step where a pool sends about 400, about 4x.
"""
import functools
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mocosfl_jax import precision
from mocosfl_jax.algorithm import losses
from mocosfl_jax.algorithm import parties
from mocosfl_jax.algorithm import sync as sync_lib
from mocosfl_jax.algorithm.parties import with_params
from mocosfl_jax.algorithm.plan import StepConfig, sync_now
from mocosfl_jax.algorithm.state import TrainState


def _rows(tree, lo, hi):
  return jax.tree.map(lambda x: x[lo:hi], tree)


def _join(parts):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


def _flat(x):
  return x.reshape((-1,) + x.shape[2:])


@flax.struct.dataclass
class HeteroPool:
  """A sampled pool split into its rich and poor clients (`split_pool`).

  Attributes:
    pool: int32 [P] client ids in pool order (the per-client streams' and schedules' order).
    rich: int32 [P_r] the pool's rich client ids (< R), in pool order.
    poor: int32 [P - P_r] its poor client ids, in pool order.
    rows: int32 [P_r * rich B + (P - P_r) * B] (twice that for the two-view form) for each
      server row in pool order, its row in the group order [rich rows; poor rows].
    slots: int32 [P] for each pool position, its client's place in the group order.
  """
  pool: jax.Array
  rich: jax.Array
  poor: jax.Array
  rows: jax.Array
  slots: jax.Array

  @property
  def ids(self) -> jax.Array:
    """The pool's client ids in group order: rich, then poor."""
    return jnp.concatenate([self.rich, self.poor])


def split_pool(pool, cfg: StepConfig) -> HeteroPool:
  """The HeteroPool of a sampled pool (host side: its rich count becomes a static shape)."""
  pool = np.asarray(pool, np.int64)
  if pool.ndim != 1 or len(pool) != cfg.pool_size or len(set(pool.tolist())) != len(pool) or (
      len(pool) and not 0 <= pool.min() <= pool.max() < cfg.num_clients):
    raise ValueError(f'pool {pool.tolist()} must be {cfg.pool_size} distinct client ids in '
                     f'[0, {cfg.num_clients}).')
  per_image = cfg.rows_per_client // cfg.batch_size      # two_view: [q; k], 2 rows per image
  r, rb, b = cfg.rich_clients, per_image * cfg.rich_batch_size, per_image * cfg.batch_size
  is_rich = pool < r
  order = np.concatenate([np.flatnonzero(is_rich), np.flatnonzero(~is_rich)])
  slots = np.argsort(order)                       # pool position -> group-order place
  n_rich = int(is_rich.sum())
  widths = np.where(is_rich, rb, b)
  # Group-order start of each pool position's rows: rich places first at width rb, then poor.
  starts = np.where(is_rich, slots * rb, n_rich * rb + (slots - n_rich) * b)
  rows = np.concatenate([np.arange(s, s + w) for s, w in zip(starts, widths)])
  i32 = lambda x: jnp.asarray(np.asarray(x, np.int32))
  return HeteroPool(pool=i32(pool), rich=i32(pool[is_rich]), poor=i32(pool[~is_rich]),
                    rows=i32(rows), slots=i32(slots))


def check_views(cfg: StepConfig, views_q: Sequence[Optional[jax.Array]],
                views_k: Sequence[Optional[jax.Array]], pool: Optional[HeteroPool] = None):
  """Static shape checks (trace time): (rich, poor) groups of [clients, batch, H, W, C]; a
  group with no client in the pool is None."""
  r, n = cfg.rich_clients, cfg.num_clients
  if not r:
    raise ValueError('hetero_step needs a StepConfig with rich_clients >= 1.')
  if pool is not None and not isinstance(pool, HeteroPool):
    raise ValueError(f'pool is a {type(pool).__name__}; the heterogeneous step takes '
                     'split_pool(pool, cfg), which splits the pool into its rich and poor '
                     'clients.')
  if pool is None:
    if cfg.pool_size != n:
      raise ValueError(f'pool=None means all {n} clients, but pool_size={cfg.pool_size}; pass '
                       'split_pool(pool, cfg).')
    counts, what = (r, n - r), '(rich_clients, rich_batch_size), (num_clients - rich_clients, '
  else:
    counts = (pool.rich.shape[0], pool.poor.shape[0])
    what = "(the pool's rich clients, rich_batch_size), (its poor clients, "
  want = [None if c == 0 else (c, bs) for c, bs in zip(counts, (cfg.rich_batch_size,
                                                                 cfg.batch_size))]
  for name, v in (('views_q', views_q), ('views_k', views_k)):
    shapes = [None if x is None else tuple(x.shape) for x in v]
    if len(v) != 2 or any((s is None) != (w is None) or (s is not None and (
        len(s) != 5 or s[:2] != w)) for s, w in zip(shapes, want)):
      raise ValueError(f'{name} has shapes {shapes}, expected the rich and the poor group '
                       f'{[None if w is None else w + ("H", "W", "C") for w in want]} = '
                       f'{what}batch_size); None for a group with no client.')


def train_step_fn(net, cfg: StepConfig, state: TrainState,
                  views_q: Sequence[Optional[jax.Array]], views_k: Sequence[Optional[jax.Array]],
                  epoch, batch_idx, sync: Optional[jax.Array] = None,
                  pool: Optional[HeteroPool] = None):
  """One step of the pool (un-jitted; see `train_step`).

  Args:
    net, cfg: split network and StepConfig with rich_clients >= 1 (static).
    state: TrainState of all N clients.
    views_q, views_k: (rich, poor) normalised views in group order, [P_r, rich B, H, W, C] and
      [P - P_r, B, H, W, C]; None for an empty group. Full participation: P_r = R.
    epoch, batch_idx, sync: as step.train_step.
    pool: None (every client, natural order) or `split_pool` of this epoch's pool.

  Returns:
    (state, metrics) as step.train_step (client_lrs in pool order), without the ressfl
    metrics.
  """
  check_views(cfg, views_q, views_k, pool)
  all_clients, server, tx = state.clients, state.server, state.tx
  if pool is None:
    r, p = cfg.rich_clients, cfg.num_clients
    clients, ids = all_clients, jnp.arange(p, dtype=jnp.int32)
  else:
    r, p = pool.rich.shape[0], cfg.pool_size
    clients = jax.tree.map(lambda x: x[pool.ids], all_clients)     # group order
    ids = pool.pool
  bounds = [(lo, hi) for lo, hi in ((0, r), (r, p)) if hi > lo]
  groups = [_rows(clients, lo, hi) for lo, hi in bounds]
  inputs = [jax.vmap(functools.partial(losses.client_inputs, cfg.loss_form))(q, k)
            for q, k in zip(views_q, views_k) if q is not None]

  def pool_order(a):   # group order [rich rows; poor rows] -> pool order, variable widths
    a = jnp.concatenate([_flat(x) for x in a], axis=0)
    return a if pool is None else a[pool.rows]

  # Clients: each momentum net follows its online net, then encodes the key views.
  keyed = [jax.vmap(functools.partial(parties.client_keys, net, cfg.tau))(
      g.momentum, g.online, x_k) for g, (_, x_k) in zip(groups, inputs)]
  a_k = pool_order([a for a, _ in keyed])
  s_momentum, queue = parties.server_prepare(cfg, server, ids)

  def server_loss(a_q, server_params):
    return losses.server_loss(net, cfg.loss_form, cfg.temperature,
                              with_params(server.online, server_params), s_momentum,
                              pool_order(a_q), a_k, queue, 1)

  def forward(client_params):
    out = [jax.vmap(functools.partial(parties.client_forward, net))(
        with_params(g.online, params), x_q)
        for g, params, (x_q, _) in zip(groups, client_params, inputs)]
    return [a for a, _ in out], [o for _, o in out]

  def loss_fn(client_params, server_params):
    a_q, online = forward(client_params)
    loss, aux = server_loss(a_q, server_params)
    return loss, (online, aux)

  client_lrs = parties.client_lrs(cfg, clients, epoch)
  if cfg.frozen_clients:   # c_lr = 0: the server's gradient alone, clients untouched
    a_q, online = forward([g.online['params'] for g in groups])
    (loss, aux), g_server = jax.value_and_grad(server_loss, argnums=1, has_aux=True)(
        a_q, server.online['params'])
    online, opt_state = _join(online), clients.opt_state
  else:
    (loss, (online, aux)), (g_clients, g_server) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)([g.online['params'] for g in groups],
                                               server.online['params'])
    updated = [jax.vmap(functools.partial(parties.client_update, tx))(
        o, g.opt_state, gc, client_lrs[lo:hi])
        for o, g, gc, (lo, hi) in zip(online, groups, g_clients, bounds)]
    online = _join([o for o, _ in updated])
    opt_state = _join([s for _, s in updated])

  server, server_lr = parties.server_update(cfg, tx, server, aux, g_server, epoch, ids)
  clients = clients.replace(online=online, momentum=_join([m for _, m in keyed]),
                            opt_state=opt_state, count=clients.count + 1,
                            draws=clients.draws + 1)
  synced = sync_now(cfg, batch_idx, sync)
  # The pool's mean, through the sync the other steps run (the switches are refused with hetero).
  clients, divergences, _, _ = sync_lib.aggregate_if(
      synced, clients, cfg, pool=ids if pool is None else pool.ids)
  if pool is not None:     # the pool's rows back; after a sync every client gets the average
    rows = clients
    clients = jax.tree.map(lambda full, part: full.at[pool.ids].set(part), all_clients, rows)
    clients = jax.lax.cond(synced, lambda c: sync_lib.give_all(c, rows, cfg.momentum_sync),
                           lambda c: c, clients)
    client_lrs = client_lrs[pool.slots]
  metrics = dict(loss=loss, contrastive_acc=aux['acc'], pos_logit_mean=aux['pos'],
                 server_lr=server_lr, client_lr=jnp.mean(client_lrs), client_lrs=client_lrs,
                 synced=synced.astype(precision.float_dtype()), **divergences)
  return state.replace(clients=clients, server=server), metrics


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def train_step(net, cfg: StepConfig, state: TrainState, views_q, views_k, epoch, batch_idx,
               sync: Optional[jax.Array] = None, pool: Optional[HeteroPool] = None):
  """Jitted `train_step_fn`; `net`, `cfg` static, the state donated; one compilation per
  number of rich clients in the pool."""
  return train_step_fn(net, cfg, state, views_q, views_k, epoch, batch_idx, sync, pool)
