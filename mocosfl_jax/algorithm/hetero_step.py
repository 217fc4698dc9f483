"""One simulated step with heterogeneous clients: rich clients 0..R-1 with a larger batch.

    state, metrics = hetero_step.train_step(net, cfg, state, (q_rich, q_poor), (k_rich, k_poor),
                                            epoch, batch_idx)

The clients form two groups with static shapes, each vmapped: the R rich clients' views are
[R, rich B, H, W, C], the N - R poor clients' [N - R, B, H, W, C]. The server's batch is the rich
group's smashed rows followed by the poor group's, which is pool order with the reference's
variable widths (the pool is range(N) and the rich clients are the lowest ids), so the loss
mean is over the R * rich B + (N - R) * B real rows, the keys enter the queue in pool order, and
a server BatchNorm sees exactly the real rows: no padding row exists anywhere. One
`value_and_grad` through both groups' forwards and the server loss gives every client the
gradient of its own rows, as the reference's split of dL/dA_q by consecutive widths. The rest
(client EMA before the key forward, server EMA, SGD on both sides, per-participation
schedules) is that of step.train_step, through the same per-party functions (parties.py);
FedAvg is the plain mean of all N clients (`sync.fedavg_if`: divergence-aware aggregation and
the reference's FedAvg set are refused with hetero, and its metrics have no div_l2_*).

Full participation only (StepConfig.validate): with client sampling the number of rich clients
in the pool changes from epoch to epoch, which static groups cannot follow (docs/reference.md,
'Heterogeneous clients').
"""
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

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


def check_views(cfg: StepConfig, views_q: Sequence[jax.Array], views_k: Sequence[jax.Array]):
  """Static shape checks (trace time): (rich, poor) groups of [clients, batch, H, W, C]."""
  r, n = cfg.rich_clients, cfg.num_clients
  if not r:
    raise ValueError('hetero_step needs a StepConfig with rich_clients >= 1.')
  want = ((r, cfg.rich_batch_size), (n - r, cfg.batch_size))
  for name, v in (('views_q', views_q), ('views_k', views_k)):
    shapes = [tuple(x.shape) for x in v]
    if len(v) != 2 or any(len(s) != 5 or s[:2] != w for s, w in zip(shapes, want)):
      raise ValueError(f'{name} has shapes {shapes}, expected the rich and the poor group: '
                       f'[({r}, {cfg.rich_batch_size}, H, W, C), ({n - r}, {cfg.batch_size}, '
                       'H, W, C)] = (rich_clients, rich_batch_size), (num_clients - '
                       'rich_clients, batch_size).')


def train_step_fn(net, cfg: StepConfig, state: TrainState, views_q: Sequence[jax.Array],
                  views_k: Sequence[jax.Array], epoch, batch_idx,
                  sync: Optional[jax.Array] = None):
  """One step of all N clients (un-jitted; see `train_step`).

  Args:
    net, cfg: split network and StepConfig with rich_clients >= 1 (static).
    state: TrainState of all N clients.
    views_q, views_k: (rich, poor) normalised views, [R, rich B, H, W, C] and
      [N - R, B, H, W, C].
    epoch, batch_idx, sync: as step.train_step.

  Returns:
    (state, metrics) as step.train_step, without the ressfl and the div_l2_* metrics.
  """
  check_views(cfg, views_q, views_k)
  r, n = cfg.rich_clients, cfg.num_clients
  clients, server, tx = state.clients, state.server, state.tx
  bounds = ((0, r), (r, n))
  groups = [_rows(clients, lo, hi) for lo, hi in bounds]
  inputs = [jax.vmap(functools.partial(losses.client_inputs, cfg.loss_form))(q, k)
            for q, k in zip(views_q, views_k)]
  pool = jnp.arange(n, dtype=jnp.int32)

  # Clients: each momentum net follows its online net, then encodes the key views.
  keyed = [jax.vmap(functools.partial(parties.client_keys, net, cfg.tau))(
      g.momentum, g.online, x_k) for g, (_, x_k) in zip(groups, inputs)]
  a_k = jnp.concatenate([_flat(a) for a, _ in keyed], axis=0)
  s_momentum, queue = parties.server_prepare(cfg, server, pool)

  def server_loss(a_q, server_params):
    # Pool order: the rich clients' rows, then the poor clients' (variable widths).
    a_q = jnp.concatenate([_flat(a) for a in a_q], axis=0)
    return losses.server_loss(net, cfg.loss_form, cfg.temperature,
                              with_params(server.online, server_params), s_momentum, a_q, a_k,
                              queue, 1)

  def forward(client_params):
    out = [jax.vmap(functools.partial(parties.client_forward, net))(
        with_params(g.online, p), x_q) for g, p, (x_q, _) in zip(groups, client_params, inputs)]
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

  server, server_lr = parties.server_update(cfg, tx, server, aux, g_server, epoch, pool)
  clients = clients.replace(online=online, momentum=_join([m for _, m in keyed]),
                            opt_state=opt_state, count=clients.count + 1,
                            draws=clients.draws + 1)
  synced = sync_now(cfg, batch_idx, sync)
  clients, divergences = sync_lib.fedavg_if(synced, clients, cfg.momentum_sync,
                                            keep_params=cfg.frozen_clients)
  metrics = dict(loss=loss, contrastive_acc=aux['acc'], pos_logit_mean=aux['pos'],
                 server_lr=server_lr, client_lr=jnp.mean(client_lrs), client_lrs=client_lrs,
                 synced=synced.astype(precision.float_dtype()), **divergences)
  return state.replace(clients=clients, server=server), metrics


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def train_step(net, cfg: StepConfig, state: TrainState, views_q, views_k, epoch, batch_idx,
               sync: Optional[jax.Array] = None):
  """Jitted `train_step_fn`; `net`, `cfg` static, the state donated."""
  return train_step_fn(net, cfg, state, views_q, views_k, epoch, batch_idx, sync)
