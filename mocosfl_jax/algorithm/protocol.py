"""The training step split into the pure functions a real deployment runs on each party (§1.3).

client_forward (on a client)  ->  smashed q/k upload  ->  server_step (on the server)  ->
per-client gradient download  ->  client_backward (on the client); FedAvg happens at sync steps
(sync.py). `split_step` composes them for simulation and is tested to give the same new state as
the fused `step.train_step` (which differentiates end to end in one pass).

Per-client functions are unbatched (one client); vmap them over the pool in simulation.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mocosfl_jax.algorithm import losses
from mocosfl_jax.algorithm import optim
from mocosfl_jax import parallel
from mocosfl_jax.algorithm import step as step_lib
from mocosfl_jax.algorithm.plan import StepConfig
from mocosfl_jax.algorithm.state import ClientState, ServerState

PyTree = Any


def client_forward(net, cfg: StepConfig, online_vars: dict, momentum_vars: dict,
                   x_q: jax.Array, x_k: jax.Array):
  """One client's forward half: online forward, EMA of its momentum net, momentum forward.

  Args:
    net, cfg: split network and step config (loss_form decides [q;k] / [k;q] inputs, tau).
    online_vars / momentum_vars: this client's variables.
    x_q, x_k: [B, H, W, C] query and key views.

  Returns:
    (smashed_q, smashed_k, online_vars (running stats updated), momentum_vars (EMA'd, stats
    updated), residual): residual is the VJP of the online forward w.r.t. params (a pytree,
    can be kept by the client and passed to `client_backward`; pass None there to recompute).
  """
  xin_q, xin_k = losses.client_inputs(cfg.loss_form, x_q, x_k)

  def fwd(params):
    smashed, new_vars = step_lib.client_apply(net, step_lib.with_params(online_vars, params),
                                              xin_q)
    return smashed, new_vars['batch_stats']

  smashed_q, residual, stats = jax.vjp(fwd, online_vars['params'], has_aux=True)
  online_vars = dict(online_vars, batch_stats=stats)
  momentum_vars = optim.ema(momentum_vars, online_vars, cfg.tau)
  smashed_k, momentum_vars = step_lib.client_apply(net, momentum_vars, xin_k)
  return smashed_q, jax.lax.stop_gradient(smashed_k), online_vars, momentum_vars, residual


def server_step(net, cfg: StepConfig, server: ServerState, smashed_q: jax.Array,
                smashed_k: jax.Array, pool: jax.Array, epoch):
  """Server half: EMA, loss on the concatenated smashed data, SGD, enqueue.

  Args:
    server: server state.
    smashed_q / smashed_k: [P, B', ...] smashed data per pool position (B' = 2B for two_view).
    pool: int32 [P] client ids (used only by per-client queues).
    epoch: 0-based epoch (server LR).

  Returns:
    (server, grad [P, B', ...] = dL/dsmashed_q per pool position, metrics).
  """
  pool = jnp.asarray(pool, jnp.int32)
  p = smashed_q.shape[0]
  s_momentum, queue_in = step_lib.server_prepare(cfg, server, pool)

  def loss_fn(a_q, s_params):
    return losses.server_loss(net, cfg.loss_form, cfg.temperature,
                              step_lib.with_params(server.online, s_params), s_momentum,
                              a_q.reshape((-1,) + a_q.shape[2:]),
                              smashed_k.reshape((-1,) + smashed_k.shape[2:]), queue_in, p)

  (loss, aux), (g_a, g_s) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      smashed_q, server.online['params'])
  server, lr = step_lib.server_finish(cfg, server, aux, g_s, epoch, pool)
  metrics = dict(loss=loss, contrastive_acc=aux['acc'], pos_logit_mean=aux['pos'], server_lr=lr)
  return server, g_a, metrics


def client_backward(net, cfg: StepConfig, online_vars: dict, opt_state: PyTree, x_q: jax.Array,
                    x_k: jax.Array, grad: jax.Array, lr, residual: Optional[Any] = None):
  """Client backward half: pull the server's gradient back through the client net, SGD step.

  With residual=None the forward is recomputed from `online_vars` (train mode: BN uses batch
  statistics, so the recomputation is exact whatever the running stats are).

  Returns:
    (online_vars, opt_state).
  """
  if residual is None:
    xin_q, _ = losses.client_inputs(cfg.loss_form, x_q, x_k)

    def fwd(params):
      return step_lib.client_apply(net, step_lib.with_params(online_vars, params), xin_q)[0]

    _, residual = jax.vjp(fwd, online_vars['params'])
  (g,) = residual(grad)
  tx = optim.make_sgd(cfg.momentum, cfg.weight_decay)
  params, opt_state = optim.sgd_update(tx, online_vars['params'], opt_state, g, lr)
  return step_lib.with_params(online_vars, params), opt_state


def split_step(net, cfg: StepConfig, clients: ClientState, server: ServerState, pool: jax.Array,
               views_q: jax.Array, views_k: jax.Array, epoch, batch_idx,
               sync: Optional[jax.Array] = None, keep_residual: bool = True):
  """`step.train_step_fn` built from the protocol functions (vmapped over the pool).

  keep_residual=False makes clients recompute their forward in `client_backward`.
  """
  step_lib.check_inputs(cfg, pool, views_q, views_k)
  pool = jnp.asarray(pool, jnp.int32)
  epoch = jnp.asarray(epoch, jnp.int32)
  on_pool, mom_pool, opt_pool = parallel.gather_pool(
      None, (clients.online, clients.momentum, clients.opt_state), pool)

  fwd = lambda o, m, q, k: client_forward(net, cfg, o, m, q, k)
  a_q, a_k, on_pool, mom_pool, residual = jax.vmap(fwd)(on_pool, mom_pool, views_q, views_k)
  server, grads, m = server_step(net, cfg, server, a_q, a_k, pool, epoch)
  c_lrs = step_lib.client_lrs(cfg, clients, pool, epoch)
  if not keep_residual:
    residual = None
  bwd = lambda o, s, q, k, g, lr, r: client_backward(net, cfg, o, s, q, k, g, lr, r)
  on_pool, opt_pool = jax.vmap(bwd)(on_pool, opt_pool, views_q, views_k, grads, c_lrs, residual)
  clients = step_lib.clients_finish(clients, pool, on_pool, mom_pool, opt_pool)

  sync = step_lib.resolve_sync(cfg, batch_idx, sync)
  clients, divs = step_lib.apply_sync(cfg, clients, on_pool, mom_pool, sync)
  aux = dict(acc=m['contrastive_acc'], pos=m['pos_logit_mean'])
  return clients, server, step_lib.step_metrics(m['loss'], aux, m['server_lr'], c_lrs, sync,
                                                divs)
