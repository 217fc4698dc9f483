"""One simulated MocoSFL / MonAcoSFL training step, clients vmapped (spec §1.3, §2, §11.2, §12).

How client work maps onto devices (vmap, lax.map chunks, shard_map) is `par`
(parallel.ClientParallel, a static argument); every mapping gives the same numbers.

Order (status "A" of the reference): gather the pool -> vmapped client online forward on view q
-> client EMA of the pool's momentum nets (params only, tau) -> vmapped momentum forward on view k
(stop-gradient) -> concatenate to [P*B', ...] -> server EMA -> loss against the pre-step queue ->
one `value_and_grad` w.r.t. (pool client params, server params), which equals the split
protocol's server backward + per-client `backward(grad)` -> SGD on both sides (per-client LR)
-> scatter back to the pool's rows (other clients untouched bit-for-bit) -> enqueue -> FedAvg at
sync steps (lax.cond, so one compiled step serves both kinds of step).

Deliberate deviations from the reference (each documented where it happens): batch shuffle
dropped (no-op on one device, losses.py); FedAvg averages exactly the pool instead of client 0 +
pool[1:] (sync.py); per-client queues indexed by pool position (queue.py); keys/queue stored as
rows. Everything else, including the per-participation client scheduler quirk (selectable) and
the 'original' loss's sum and stop-gradients, follows the reference.
"""
import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax.algorithm import losses
from mocosfl_jax.algorithm import optim
from mocosfl_jax import parallel
from mocosfl_jax.algorithm import queue as queue_lib
from mocosfl_jax.algorithm import schedules
from mocosfl_jax.algorithm import sync as sync_lib
from mocosfl_jax.algorithm.plan import StepConfig, is_sync_step
from mocosfl_jax.algorithm.state import ClientState, ServerState

PyTree = Any


def with_params(variables: dict, params: PyTree) -> dict:
  """Variables dict with 'params' replaced."""
  out = dict(variables)
  out['params'] = params
  return out


def client_apply(net, variables: dict, x: jax.Array):
  """Train-mode client forward; returns (smashed, variables with updated running stats only)."""
  smashed, new_vars = net.apply_client(variables, x, train=True)
  out = dict(variables)
  if 'batch_stats' in new_vars:
    out['batch_stats'] = new_vars['batch_stats']
  return smashed, out


def _flat(x: jax.Array) -> jax.Array:
  return x.reshape((-1,) + x.shape[2:])


def check_inputs(cfg: StepConfig, pool, views_q, views_k) -> None:
  """Static shape checks (trace time) so misuse fails with a readable ValueError."""
  p, b = cfg.pool_size, cfg.batch_size
  if tuple(pool.shape) != (p,):
    raise ValueError(f'pool has shape {tuple(pool.shape)}, expected ({p},) = (pool_size,).')
  for name, v in (('views_q', views_q), ('views_k', views_k)):
    if v.ndim != 5 or tuple(v.shape[:2]) != (p, b):
      raise ValueError(f'{name} has shape {tuple(v.shape)}, expected ({p}, {b}, H, W, C) = '
                       '(pool_size, batch_size, ...).')


# ---- pieces shared with protocol.py -------------------------------------------------------------

def server_prepare(cfg: StepConfig, server: ServerState, pool: jax.Array):
  """Server EMA (before the loss, §1.3.4b) and the pre-step queue as the loss sees it."""
  s_momentum = optim.ema(server.momentum, server.online, cfg.tau)
  queue_in = server.queue if cfg.feature_sharing else server.queue[pool]
  return s_momentum, queue_in


def server_finish(cfg: StepConfig, server: ServerState, aux: dict, grads: PyTree, epoch,
                  pool: jax.Array) -> Tuple[ServerState, jax.Array]:
  """Server SGD with the epoch's LR, enqueue of this step's keys, counters. Returns (state, lr)."""
  tx = optim.make_sgd(cfg.momentum, cfg.weight_decay)
  lr = schedules.server_lr(cfg, epoch)
  params, opt_state = optim.sgd_update(tx, server.online['params'], server.opt_state, grads, lr)
  if cfg.feature_sharing:
    q, ptr = queue_lib.enqueue(server.queue, server.ptr, aux['keys'])
  else:
    q, ptr = queue_lib.enqueue_clients(server.queue, server.ptr, pool, aux['client_keys'])
  server = server.replace(
      online=with_params(aux['online_vars'], params), momentum=aux['momentum_vars'],
      opt_state=opt_state, queue=q, ptr=ptr, step=server.step + 1,
      epoch=jnp.asarray(epoch, jnp.int32))
  return server, lr


def client_lrs(cfg: StepConfig, clients: ClientState, pool: jax.Array, epoch) -> jax.Array:
  """[P] learning rates of the pool's clients for this step (schedule x lr_scale)."""
  return schedules.client_lr(cfg, clients.count[pool], epoch) * clients.lr_scale[pool]


def clients_finish(clients: ClientState, pool: Optional[jax.Array], online_pool: PyTree,
                   momentum_pool: PyTree, opt_pool: PyTree,
                   par: Optional[parallel.ClientParallel] = None) -> ClientState:
  """Scatter the pool's new state back and advance its counters; others stay bit-identical.

  pool=None: the pool is every client in natural order, so its rows replace the state as is.
  """
  if pool is None:
    return clients.replace(online=online_pool, momentum=momentum_pool, opt_state=opt_pool,
                           count=clients.count + 1, draws=clients.draws + 1)
  new = parallel.scatter_pool(par, (clients.online, clients.momentum, clients.opt_state),
                              (online_pool, momentum_pool, opt_pool), pool)
  return clients.replace(
      online=new[0], momentum=new[1], opt_state=new[2],
      count=clients.count.at[pool].add(1, mode='drop'),
      draws=clients.draws.at[pool].add(1, mode='drop'))


def apply_sync(cfg: StepConfig, clients: ClientState, online_pool: PyTree, momentum_pool: PyTree,
               sync, par: Optional[parallel.ClientParallel] = None,
               mask: Optional[jax.Array] = None) -> Tuple[ClientState, dict]:
  """FedAvg at sync steps, written to all N clients (MonAcoSFL: momentum nets too).

  Divergence metrics are the pool means measured before averaging; they are 0 on non-sync
  steps (check metrics['synced']). The average is a (mask-weighted) sum over the pool axis,
  psum'ed over the mesh under shard_map (sync.fedavg_masked): a dot product with the weights,
  which XLA:CPU runs ~30x faster than the reduction that `lax.pmean` under vmap lowers to.
  """
  n = cfg.num_clients

  def do_sync(cl):
    avg_on, avg_mom, m = sync_lib.fedavg_masked(par, online_pool, momentum_pool, mask,
                                                cfg.momentum_sync)
    cl = cl.replace(online=sync_lib.broadcast_clients(avg_on, n))
    if cfg.momentum_sync:
      cl = cl.replace(momentum=sync_lib.broadcast_clients(avg_mom, n))
    return cl, {k: v.astype(jnp.float32) for k, v in m.items()}

  def no_sync(cl):
    return cl, {k: jnp.zeros((), jnp.float32) for k in sync_lib.DIVERGENCE_KEYS}

  return lax.cond(jnp.asarray(sync, bool), do_sync, no_sync, clients)


def resolve_sync(cfg: StepConfig, batch_idx, sync):
  """The explicit `sync` flag if given, else the reference rule on the 0-based batch index."""
  if sync is None:
    return is_sync_step(jnp.asarray(batch_idx, jnp.int32), cfg.steps_per_epoch, cfg.avg_freq)
  return jnp.asarray(sync, bool)


def step_metrics(loss, aux, s_lr, c_lrs, sync, divs) -> dict:
  """The step's metrics dict (same keys for the fused and the split path)."""
  m = dict(loss=loss, contrastive_acc=aux['acc'], pos_logit_mean=aux['pos'], server_lr=s_lr,
           client_lr=jnp.mean(c_lrs), client_lrs=c_lrs,
           synced=jnp.asarray(sync, jnp.float32))
  m.update(divs)
  return m


# ---- the fused step -----------------------------------------------------------------------------

def train_step_fn(net, cfg: StepConfig, clients: ClientState, server: ServerState,
                  pool: jax.Array, views_q: jax.Array, views_k: jax.Array, epoch, batch_idx,
                  sync: Optional[jax.Array] = None,
                  par: Optional[parallel.ClientParallel] = None):
  """One simulated step (un-jitted; use `train_step`).

  Args:
    net: split network (static, hashable).
    cfg: StepConfig (static).
    clients, server: current state (donated by `train_step`).
    pool: int32 [P] distinct client ids of this epoch's pool, in pool order; or None for all
      N clients in natural order (pool_size == num_clients, what `plan.sample_pool` gives then):
      the pool's state is then read and written in place, without the gather and scatter
      (a copy of every client's state, and on several devices the rounds that move it).
    views_q, views_k: float32 [P, B, H, W, C] normalised query / key views per pool position.
    epoch: int32 scalar, 0-based epoch (server scheduler steps so far; client LR when per_epoch).
    batch_idx: int32 scalar, 0-based step within the epoch (sync rule).
    sync: optional bool scalar overriding the reference sync rule.
    par: how client work is mapped (parallel.ClientParallel, static); None = vmap, all at once.

  Returns:
    (clients, server, metrics) with metrics: loss, contrastive_acc (%), pos_logit_mean,
    server_lr, client_lr (pool mean), client_lrs [P], synced, div_online_global,
    div_online_momentum, div_momentum_global.
  """
  natural = pool is None
  if natural:
    if cfg.pool_size != cfg.num_clients:
      raise ValueError(f'pool=None means all {cfg.num_clients} clients in natural order, but '
                       f'pool_size={cfg.pool_size}; pass the pool\'s client ids.')
    pool = jnp.arange(cfg.num_clients, dtype=jnp.int32)
  check_inputs(cfg, pool, views_q, views_k)
  par = parallel.ClientParallel() if par is None else par
  tx = optim.make_sgd(cfg.momentum, cfg.weight_decay)
  pool = jnp.asarray(pool, jnp.int32)
  epoch = jnp.asarray(epoch, jnp.int32)
  p = cfg.pool_size
  p_pad = par.padded(p)          # shard_map: masked padding clients up to a multiple of devices
  ids, mask = parallel.pad_pool(pool, cfg.num_clients, p_pad)
  views_q, views_k = parallel.pad_rows(views_q, p_pad), parallel.pad_rows(views_k, p_pad)

  in_place = natural and mask is None      # pool slot j is client j: no gather / scatter
  state_rows = (clients.online, clients.momentum, clients.opt_state)
  on_pool, mom_pool, opt_pool = state_rows if in_place else parallel.gather_pool(
      par, state_rows, ids)
  x_q, x_k = jax.vmap(functools.partial(losses.client_inputs, cfg.loss_form))(views_q, views_k)
  apply = functools.partial(client_apply, net)

  # Client EMA (params only) right after the online forward, then the momentum forward on it.
  mom_pool = optim.ema(mom_pool, on_pool, cfg.tau)
  a_k, mom_pool = parallel.map_clients(par, apply, mom_pool, x_k)
  a_k = lax.stop_gradient(a_k)

  s_momentum, queue_in = server_prepare(cfg, server, pool)

  def loss_fn(c_params, s_params):
    a_q, new_on = parallel.map_clients(par, apply, with_params(on_pool, c_params), x_q)
    loss, aux = losses.server_loss(net, cfg.loss_form, cfg.temperature,
                                   with_params(server.online, s_params), s_momentum,
                                   _flat(a_q[:p]), _flat(a_k[:p]), queue_in, p)
    return loss, (new_on, aux)

  (loss, (new_on, aux)), (g_c, g_s) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      on_pool['params'], server.online['params'])

  server, s_lr = server_finish(cfg, server, aux, g_s, epoch, pool)
  c_lrs = client_lrs(cfg, clients, pool, epoch)
  new_params, opt_pool = jax.vmap(lambda q, s, g, lr: optim.sgd_update(tx, q, s, g, lr))(
      on_pool['params'], opt_pool, g_c, parallel.pad_rows(c_lrs, p_pad))
  on_pool = with_params(new_on, new_params)
  clients = clients_finish(clients, None if in_place else ids, on_pool, mom_pool, opt_pool, par)

  sync = resolve_sync(cfg, batch_idx, sync)
  clients, divs = apply_sync(cfg, clients, on_pool, mom_pool, sync, par, mask)
  return clients, server, step_metrics(loss, aux, s_lr, c_lrs, sync, divs)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=('par',),
                   donate_argnums=(2, 3))
def train_step(net, cfg: StepConfig, clients: ClientState, server: ServerState, pool: jax.Array,
               views_q: jax.Array, views_k: jax.Array, epoch, batch_idx,
               sync: Optional[jax.Array] = None, par: Optional[parallel.ClientParallel] = None):
  """Jitted `train_step_fn` (same arguments); `net`, `cfg`, `par` static; state donated.

  Pass epoch / batch_idx as int32 arrays (e.g. jnp.int32(e)) and keep `sync` either always None
  or always an array, so every step reuses one compiled executable.
  """
  return train_step_fn(net, cfg, clients, server, pool, views_q, views_k, epoch, batch_idx, sync,
                       par)
