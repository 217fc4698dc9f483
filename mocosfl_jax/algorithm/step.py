"""One simulated MocoSFL / MonAcoSFL training step of the participating clients (the pool).

    state, metrics = step.train_step(net, cfg, state, views_q, views_k, epoch, batch_idx,
                                     pool=pool)

`state.clients` holds the pool's rows in pool order (`parallel.train_step` gathers them from
all N clients, pads the pool for a device mesh, and writes them back). The body composes the
per-party functions of parties.py: the clients encode both views (vmapped), the server
concatenates every client's smashed data and computes InfoNCE against the queue, one
`value_and_grad` differentiates through clients and server together (equal to the server's
backward followed by each client's backward), both sides take an SGD step, and every few steps
the pool's clients are averaged (sync.py). One compiled step serves sync and non-sync steps.
With `cfg.ressfl` every pool client's simulated attacker takes its step right after the client's
forward and the regulariser's penalties join the loss (algorithm/ressfl.py).
Frozen clients (c_lr = 0, TAResSFL's deployment) take no backward and no SGD step: the gradient
is the server's alone, and their params stay bit-identical, syncs included (their BatchNorm
running statistics still follow the batches and are averaged, as the reference's frozen clients
run in train mode).
`train_clients=False` (static) is the status B of the loss-threshold saving (algorithm/replay.py):
the clients' forward, momentum EMA and running statistics run, the server trains, and the
clients take no backward, no SGD step and no scheduler step (their `count` stays), as frozen
clients do. `keep_smashed=True` (static) adds the smashed stacks the server received to the
metrics ('smashed_q', 'smashed_k', [P, B', ...]) so the run can keep them for replay.

Step order, the three loss forms and where we differ from the reference on purpose (batch
shuffle dropped, FedAvg of exactly the pool, per-client queues indexed by pool position) are
described in docs/reference.md; `StepConfig` switches to the reference's FedAvg set and
per-client queues, and to divergence-aware aggregation (sync.aggregate_if).
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from mocosfl_jax import precision
from mocosfl_jax.algorithm import losses
from mocosfl_jax.algorithm import parties
from mocosfl_jax.algorithm import ressfl
from mocosfl_jax.algorithm import sync as sync_lib
from mocosfl_jax.algorithm.mapping import ClientParallel, map_clients
from mocosfl_jax.algorithm.parties import concat_clients, with_params
from mocosfl_jax.algorithm.plan import StepConfig, sync_now
from mocosfl_jax.algorithm.state import TrainState


def train_step(net, cfg: StepConfig, state: TrainState, views_q: jax.Array, views_k: jax.Array,
               epoch, batch_idx, sync: Optional[jax.Array] = None, *, pool: jax.Array,
               mask: Optional[jax.Array] = None, par: Optional[ClientParallel] = None,
               client0: Optional[tuple] = None, train_clients: bool = True,
               keep_smashed: bool = False):
  """One step of the pool (pure; jit it, or use `parallel.train_step`): `pool_step` without
  its third output."""
  new, metrics, _ = pool_step(net, cfg, state, views_q, views_k, epoch, batch_idx, sync,
                              pool=pool, mask=mask, par=par, client0=client0,
                              train_clients=train_clients, keep_smashed=keep_smashed)
  return new, metrics


def pool_step(net, cfg: StepConfig, state: TrainState, views_q: jax.Array, views_k: jax.Array,
              epoch, batch_idx, sync: Optional[jax.Array] = None, *, pool: jax.Array,
              mask: Optional[jax.Array] = None, par: Optional[ClientParallel] = None,
              client0: Optional[tuple] = None, train_clients: bool = True,
              keep_smashed: bool = False):
  """One step of the pool (pure), and the global model its sync gave the clients outside it.

  Args:
    net: split network (static).
    cfg: StepConfig (static).
    state: TrainState whose clients are the pool's P' rows in pool order (P' >= P rows: the
      rows past P are masked padding clients, see `mask`).
    views_q, views_k: [P', B, H, W, C] normalised query / key views per pool position.
    epoch: int32 0-based epoch (server schedule; client schedule when per_epoch).
    batch_idx: int32 0-based step within the epoch (the sync rule).
    sync: optional bool overriding the reference's sync rule.
    pool: int32 [P] client ids of the pool (per-client queues are indexed by them).
    mask: float32 [P'] with 1 for the real clients (None: all rows are real).
    par: how per-client work is mapped (vmap, chunks, shard_map); None is vmap.
    train_clients: False (static): status B, no client backward / SGD / scheduler step.
    keep_smashed: True (static): the metrics also hold the smashed stacks.
    client0: (online, momentum) variables of client 0 before the step, for
      cfg.fedavg_set='reference' (client 0 + pool[1:]); unused otherwise.

  Returns:
    (state, metrics, global online variables of the sync, or None unless
    cfg.divergence_aware: then the pool's rows need not hold it). metrics: loss,
    contrastive_acc (%), pos_logit_mean, server_lr, client_lr (pool mean), client_lrs [P],
    synced, div_online_global, div_online_momentum,
    div_momentum_global, div_l2_mean, div_l2_std (and div_mu_mean with
    divergence_aware='fedema'; the divergences are 0 on steps without sync); with cfg.ressfl also
    attacker_lr and the pool means of ressfl.METRIC_KEYS (`loss` stays the server's loss).
  """
  clients, server, tx, p = state.clients, state.server, state.tx, cfg.pool_size
  rows = views_q.shape[0]
  if cfg.ressfl is not None and not train_clients:
    raise ValueError('train_clients=False with cfg.ressfl: the regulariser trains the clients; '
                     'the loss-threshold saving does not run with TAResSFL.')
  skip_clients = cfg.frozen_clients or not train_clients
  attacker_lr = None if cfg.ressfl is None else ressfl.learning_rate(cfg.ressfl, epoch)
  x_q, x_k = jax.vmap(functools.partial(losses.client_inputs, cfg.loss_form))(views_q, views_k)

  # Clients: each momentum net follows its online net, then encodes the key views.
  a_k, momentum = map_clients(par, functools.partial(parties.client_keys, net, cfg.tau),
                              clients.momentum, clients.online, x_k)
  # Server: W' follows W; the loss sees the queue as it was before this step.
  s_momentum, queue = parties.server_prepare(cfg, server, pool)

  def server_loss(a_q, server_params):
    # The server concatenates all clients' smashed data.
    return losses.server_loss(net, cfg.loss_form, cfg.temperature,
                              with_params(server.online, server_params), s_momentum,
                              concat_clients(a_q, p), concat_clients(a_k, p), queue, p)

  def loss_fn(client_params, server_params):
    # Clients encode the query views.
    if cfg.ressfl is None:
      a_q, online = map_clients(par, functools.partial(parties.client_forward, net),
                                with_params(clients.online, client_params), x_q)
      loss, aux = server_loss(a_q, server_params)
      return loss, (online, aux, loss, None, a_q)
    # Each client's attacker steps on its smashed data; the regulariser's penalty
    # differentiates w.r.t. that client only.
    a_q, online, attacker, m = map_clients(
        par, functools.partial(ressfl.client_forward,
                               functools.partial(parties.client_forward, net), cfg.ressfl),
        with_params(clients.online, client_params), clients.attacker, x_q,
        jnp.broadcast_to(attacker_lr, (rows,)))
    loss, aux = server_loss(a_q, server_params)
    penalty = jnp.sum(m['regulariser_penalty'][:p])
    return loss + penalty, (online, aux, loss, (attacker, m), a_q)

  client_lrs = parties.client_lrs(cfg, clients, epoch)
  if skip_clients:
    # c_lr = 0 or status B: no client backward and no client SGD. The forward builds no VJP, the
    # gradient is the server's alone, params and optimizer states stay as they are (bit for bit).
    a_q, online = map_clients(par, functools.partial(parties.client_forward, net),
                              clients.online, x_q)
    (loss, aux), g_server = jax.value_and_grad(server_loss, argnums=1, has_aux=True)(
        a_q, server.online['params'])
    opt_state, attacked = clients.opt_state, None    # ressfl needs trainable clients
  else:
    (_, (online, aux, loss, attacked, a_q)), (g_clients, g_server) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(clients.online['params'],
                                               server.online['params'])
    online, opt_state = jax.vmap(functools.partial(parties.client_update, tx))(
        online, clients.opt_state, g_clients, client_lrs)

  # SGD on the server (and above on the clients); the server enqueues this step's keys.
  server, server_lr = parties.server_update(cfg, tx, server, aux, g_server, epoch, pool)
  count = clients.count + 1 if train_clients else clients.count   # B: no scheduler step
  clients = clients.replace(online=online, momentum=momentum, opt_state=opt_state,
                            count=count, draws=clients.draws + 1)
  if attacked is not None:
    clients = clients.replace(attacker=attacked[0])

  # Every few steps: FedAvg of the pool's clients (MonAcoSFL: their momentum nets too).
  synced = sync_now(cfg, batch_idx, sync)
  clients, divergences, global_online, div_lambda = sync_lib.aggregate_if(
      synced, clients, cfg, mask, par, pool=pool, client0=client0,
      div_lambda=server.div_lambda, keep_params=skip_clients)
  if div_lambda is not None:
    server = server.replace(div_lambda=div_lambda)

  metrics = dict(loss=loss, contrastive_acc=aux['acc'], pos_logit_mean=aux['pos'],
                 server_lr=server_lr, client_lr=jnp.mean(client_lrs[:p]),
                 client_lrs=client_lrs[:p], synced=synced.astype(precision.float_dtype()),
                 **divergences)
  if attacked is not None:
    metrics.update(attacker_lr=attacker_lr, **ressfl.pool_means(attacked[1], p))
  if keep_smashed:
    metrics.update(smashed_q=a_q[:p], smashed_k=a_k[:p])
  return state.replace(clients=clients, server=server), metrics, global_online


def split_train_step(net, cfg: StepConfig, state: TrainState, views_q: jax.Array,
                     views_k: jax.Array, epoch, batch_idx, sync: Optional[jax.Array] = None, *,
                     pool: jax.Array, keep_residual: bool = True):
  """`train_step` as a deployment runs it: each client's forward, the server's step, each
  client's backward, as separate functions (parties.client_send / server_step /
  client_receive), vmapped over the pool. Same results as `train_step` up to float rounding.

  keep_residual=False makes clients recompute their forward in `client_receive`. TAResSFL's
  simulated attacker (cfg.ressfl) runs in `train_step` only and is refused here.
  """
  if cfg.ressfl is not None:
    raise ValueError('split_train_step does not run the simulated attacker (cfg.ressfl); use '
                     'step.train_step, or a StepConfig with ressfl=None.')
  if cfg.fedavg_set != 'pool' or cfg.divergence_aware != 'off':
    raise ValueError(f'split_train_step averages the pool (fedavg_set={cfg.fedavg_set!r}, '
                     f'divergence_aware={cfg.divergence_aware!r}); use step.train_step, or '
                     "fedavg_set='pool' and divergence_aware='off'.")
  clients, server, tx = state.clients, state.server, state.tx
  a_q, a_k, online, momentum, residual = jax.vmap(
      functools.partial(parties.client_send, net, cfg))(clients.online, clients.momentum,
                                                         views_q, views_k)
  server, grads, m = parties.server_step(net, cfg, tx, server, a_q, a_k, pool, epoch)
  client_lrs = parties.client_lrs(cfg, clients, epoch)
  if cfg.frozen_clients:   # c_lr = 0: no gradient came back, nothing to pull back
    opt_state = clients.opt_state
  else:
    online, opt_state = jax.vmap(functools.partial(parties.client_receive, net, cfg, tx))(
        online, clients.opt_state, views_q, views_k, grads, client_lrs,
        residual if keep_residual else None)
  clients = clients.replace(online=online, momentum=momentum, opt_state=opt_state,
                            count=clients.count + 1, draws=clients.draws + 1)
  synced = sync_now(cfg, batch_idx, sync)
  # The pool's mean (the switches are refused above), with the same metrics as train_step.
  clients, divergences, _, _ = sync_lib.aggregate_if(synced, clients, cfg, pool=pool)
  metrics = dict(m, client_lr=jnp.mean(client_lrs), client_lrs=client_lrs,
                 synced=synced.astype(precision.float_dtype()), **divergences)
  return state.replace(clients=clients, server=server), metrics
