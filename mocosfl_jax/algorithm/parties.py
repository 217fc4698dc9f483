"""What each party computes in one MocoSFL step: the bottom layer of the algorithm.

A client holds the first layers of the backbone twice (an online net and a momentum net); the
server holds the rest of the backbone and the projection head (online W and momentum W') and a
queue of negative keys. One step:

  client   momentum net <- EMA(momentum net, online net); A_k = momentum net(x_k)  `client_keys`
           A_q = online net(x_q)                                               `client_forward`
  server   W' <- EMA(W', W); InfoNCE on the concatenated A_q, A_k of all
           clients against the queue as it was before the step                `server_prepare`
           SGD on W, enqueue this step's keys, send dL/dA_q to each client      `server_update`
  client   pull dL/dA_q back through the online net, SGD on it                 `client_update`
  every few steps: FedAvg of the clients' models                               sync.py

Per-client functions take ONE client's variables (no client axis). The simulated step
(algorithm/step.py) maps them over the pool and takes one `value_and_grad` through
`client_forward` -> concatenation -> server loss, which equals the server's backward followed by
each client's backward. A deployment runs the same pieces on separate machines:
`client_send` (forward, keeping the VJP), `server_step` (loss, gradient w.r.t. the smashed
data, server update) and `client_receive` (the client's backward and update).

The loss itself (three forms, the reference's stop-gradients) is `losses.server_loss`; the
exact reference behaviour is described in docs/reference.md.
"""
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from mocosfl_jax.algorithm import losses
from mocosfl_jax.algorithm import optim
from mocosfl_jax.algorithm import queue as queue_lib
from mocosfl_jax.algorithm import schedules
from mocosfl_jax.algorithm.plan import StepConfig
from mocosfl_jax.algorithm.state import ClientState, ServerState

PyTree = Any


def with_params(variables: dict, params: PyTree) -> dict:
  """Variables dict with 'params' replaced."""
  out = dict(variables)
  out['params'] = params
  return out


# ---- client ------------------------------------------------------------------------------------

def client_forward(net, online_vars: dict, x: jax.Array) -> Tuple[jax.Array, dict]:
  """Train-mode forward of a client slice: (smashed data, variables with new running stats)."""
  smashed, new_vars = net.apply_client(online_vars, x, train=True)
  out = dict(online_vars)
  if 'batch_stats' in new_vars:
    out['batch_stats'] = new_vars['batch_stats']
  return smashed, out


def client_keys(net, tau, momentum_vars: dict, online_vars: dict,
                x_k: jax.Array) -> Tuple[jax.Array, dict]:
  """The client's momentum net follows its online net (EMA of params), then encodes the keys.

  Returns (smashed keys, no gradient; momentum variables after the EMA and the forward).
  """
  momentum_vars = optim.ema(momentum_vars, online_vars, tau)
  smashed, momentum_vars = client_forward(net, momentum_vars, x_k)
  return jax.lax.stop_gradient(smashed), momentum_vars


def client_lrs(cfg: StepConfig, clients: ClientState, epoch) -> jax.Array:
  """Learning rate of every client row of `clients` for this step (schedule x lr_scale)."""
  return schedules.client_lr(cfg, clients.count, epoch) * clients.lr_scale


def client_update(tx: optax.GradientTransformation, online_vars: dict, opt_state: PyTree,
                  grads: PyTree, lr) -> Tuple[dict, PyTree]:
  """SGD on the client's online params with its gradient. Returns (online vars, opt state)."""
  params, opt_state = optim.sgd_update(tx, online_vars['params'], opt_state, grads, lr)
  return with_params(online_vars, params), opt_state


# ---- server ------------------------------------------------------------------------------------

def server_prepare(cfg: StepConfig, server: ServerState, pool: jax.Array):
  """The server's momentum net follows W (EMA, before the loss), and the queue the loss sees:
  the shared queue, or the pool's per-client queues. Returns (momentum vars, queue)."""
  momentum = optim.ema(server.momentum, server.online, cfg.tau)
  queue = server.queue if cfg.feature_sharing else server.queue[queue_rows(cfg, pool)]
  return momentum, queue


def queue_rows(cfg: StepConfig, pool: jax.Array) -> jax.Array:
  """Which per-client queue each pool position uses: its client's (pool[j]), or with the
  reference's queues (`client_queues='reference'`, every client in the pool) queue j, as the
  reference slices the j-th block of rows by client id."""
  if cfg.client_queues == 'reference':
    return jnp.arange(cfg.num_clients, dtype=jnp.int32)
  return pool


def server_update(cfg: StepConfig, tx: optax.GradientTransformation, server: ServerState,
                  aux: dict, grads: PyTree, epoch, pool: jax.Array) -> Tuple[ServerState, jax.Array]:
  """SGD on W with the epoch's learning rate, enqueue of this step's keys, step counters.

  `aux` is what `losses.server_loss` returned (new running stats of W and W', the keys).
  Returns (server state, learning rate used).
  """
  lr = schedules.server_lr(cfg, epoch)
  params, opt_state = optim.sgd_update(tx, server.online['params'], server.opt_state, grads, lr)
  if cfg.feature_sharing:
    queue, ptr = queue_lib.enqueue(server.queue, server.ptr, aux['keys'])
  else:
    keys = aux['client_keys']
    if cfg.drops_k2:   # MocoSFL's per-client queues: the k1 block of each client only
      keys = keys[:, :cfg.batch_size]
    queue, ptr = queue_lib.enqueue_clients(server.queue, server.ptr, queue_rows(cfg, pool), keys)
  server = server.replace(
      online=with_params(aux['online_vars'], params), momentum=aux['momentum_vars'],
      opt_state=opt_state, queue=queue, ptr=ptr, step=server.step + 1,
      epoch=jnp.asarray(epoch, jnp.int32))
  return server, lr


def concat_clients(smashed: jax.Array, pool_size: int) -> jax.Array:
  """[P', B', ...] per-client smashed data -> the server's batch [P*B', ...] in pool order.

  Rows past `pool_size` are masked padding clients (see parallel.py) and never reach the server.
  """
  smashed = smashed[:pool_size]
  return smashed.reshape((-1,) + smashed.shape[2:])


# ---- the same step across machines -------------------------------------------------------------

def client_send(net, cfg: StepConfig, online_vars: dict, momentum_vars: dict, x_q: jax.Array,
                x_k: jax.Array):
  """A client's forward half: online forward (keeping its VJP), EMA, momentum forward.

  Args:
    x_q, x_k: [B, H, W, C] query and key views (cfg.loss_form decides what each net encodes).

  Returns:
    (smashed_q, smashed_k, online_vars (running stats updated), momentum_vars, residual): the
    residual is the VJP of the online forward w.r.t. params; keep it for `client_receive`, or
    pass None there to recompute the forward. Frozen clients (cfg.c_lr == 0) build no VJP
    (residual None) and take no `client_receive`.
  """
  xin_q, xin_k = losses.client_inputs(cfg.loss_form, x_q, x_k)

  def fwd(params):
    smashed, new_vars = client_forward(net, with_params(online_vars, params), xin_q)
    return smashed, new_vars['batch_stats']

  if cfg.frozen_clients:
    smashed_q, stats = fwd(online_vars['params'])
    residual = None
  else:
    smashed_q, residual, stats = jax.vjp(fwd, online_vars['params'], has_aux=True)
  online_vars = dict(online_vars, batch_stats=stats)
  smashed_k, momentum_vars = client_keys(net, cfg.tau, momentum_vars, online_vars, xin_k)
  return smashed_q, smashed_k, online_vars, momentum_vars, residual


def server_step(net, cfg: StepConfig, tx: optax.GradientTransformation, server: ServerState,
                smashed_q: jax.Array, smashed_k: jax.Array, pool: jax.Array, epoch, *,
                client_grad: bool = True):
  """The server's half: EMA, loss on the concatenated smashed data, SGD, enqueue.

  Args:
    smashed_q / smashed_k: [P, B', ...] smashed data per pool position (B' = 2B for two_view).
    pool: int32 [P] client ids (used only by per-client queues).
    epoch: 0-based epoch (server learning rate).
    client_grad: False (static) skips dL/dsmashed_q: nobody takes it (a replayed step,
      algorithm/replay.py).

  Returns:
    (server, grad [P, B', ...] = dL/dsmashed_q per pool position, metrics); grad is None for
    frozen clients (cfg.c_lr == 0) and without client_grad: they take no gradient.
  """
  pool = jnp.asarray(pool, jnp.int32)
  p = smashed_q.shape[0]
  s_momentum, queue = server_prepare(cfg, server, pool)

  def loss_fn(a_q, s_params):
    return losses.server_loss(net, cfg.loss_form, cfg.temperature,
                              with_params(server.online, s_params), s_momentum,
                              concat_clients(a_q, p), concat_clients(smashed_k, p), queue, p)

  if cfg.frozen_clients or not client_grad:
    (loss, aux), g_s = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        smashed_q, server.online['params'])
    g_a = None
  else:
    (loss, aux), (g_a, g_s) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        smashed_q, server.online['params'])
  server, lr = server_update(cfg, tx, server, aux, g_s, epoch, pool)
  metrics = dict(loss=loss, contrastive_acc=aux['acc'], pos_logit_mean=aux['pos'], server_lr=lr)
  return server, g_a, metrics


def client_receive(net, cfg: StepConfig, tx: optax.GradientTransformation, online_vars: dict,
                   opt_state: PyTree, x_q: jax.Array, x_k: jax.Array, grad: jax.Array, lr,
                   residual: Optional[Any] = None):
  """A client's backward half: pull the server's gradient back through the online net, SGD.

  With residual=None the forward is recomputed from `online_vars` (train mode: BatchNorm uses
  batch statistics, so the recomputation is exact whatever the running stats are).

  Returns:
    (online_vars, opt_state).
  """
  if residual is None:
    xin_q, _ = losses.client_inputs(cfg.loss_form, x_q, x_k)
    _, residual = jax.vjp(
        lambda params: client_forward(net, with_params(online_vars, params), xin_q)[0],
        online_vars['params'])
  (g,) = residual(grad)
  return client_update(tx, online_vars, opt_state, g, lr)
