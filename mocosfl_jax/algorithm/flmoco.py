"""FL-MoCo: the federated MoCo baseline that the MocoSFL paper compares against.

    state = flmoco.create_state(net, cfg, key)
    state, metrics = flmoco.simulated_step(net, cfg, aug, state, images, table, data_key,
                                           aug_key, pool, epoch, batch_idx, step)

Every client holds the whole network (its first layers and the rest of the backbone with the
projection head), an online and a momentum copy, its own SGD state and its own queue of K keys.
In each local step every pool client, on its own batch: its momentum network follows the online
one (EMA, before the loss), it computes MoCo's loss against its own queue (the symmetric
two-term sum for loss_form 'original', one term for 'single'), enqueues its own keys and takes
an SGD step on the whole network. A round is `local_epochs` passes over a client's data
(S = local_epochs x ceil(n_0 / B) steps, client 0's loader as the reference); the online models
of the pool are averaged at the sync rule (avg_freq syncs per round; 1, the reference's
default, averages at the end of each round) and loaded into all N clients. Momentum networks,
optimizer states and queues are never averaged. The learning rate is c_lr on the per-round
schedule (schedules.flmoco_lr). All of it is one jitted call: the local step of every pool
client is `jax.vmap`ped over the stacked models.

State layout: a `TrainState` whose `clients` are every client's first layers exactly as in
MocoSFL and whose `server` is every client's copy of the rest, its queue [N, K, D], pointer,
step and epoch counters: every leaf carries the leading client axis N. Checkpoints, resume and
the training loop therefore work unchanged; `global_model` gives the (clients, server) pair that
evaluation reads (client 0, which holds the average right after a sync).

Written from the reference's run_flmoco.py and functions/flmoco_functions.py (SonyResearch/
MocoSFL); docs/reference.md, 'FL-MoCo baseline', lists what we reproduce and where we differ.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax import precision
from mocosfl_jax.algorithm import losses
from mocosfl_jax.algorithm import optim
from mocosfl_jax.algorithm import parties
from mocosfl_jax.algorithm import queue as queue_lib
from mocosfl_jax.algorithm import schedules
from mocosfl_jax.algorithm import state as state_lib
from mocosfl_jax.algorithm import sync as sync_lib
from mocosfl_jax.algorithm.parties import with_params
from mocosfl_jax.algorithm.plan import StepConfig, sync_now
from mocosfl_jax.algorithm.state import ClientState, ServerState, TrainState
from mocosfl_jax.data import augment


def _check(cfg: StepConfig) -> None:
  if cfg.method != 'flmoco':
    raise ValueError(f"method={cfg.method!r}: algorithm/flmoco.py runs method='flmoco' only; "
                     'the split step is algorithm/step.py.')


def init_fn(net, cfg: StepConfig, key: jax.Array) -> TrainState:
  """The initial FL-MoCo state (un-jitted; `create_state` jits it).

  All clients start from one random network (the reference deep-copies it), each with its own
  random queue of K normalised keys (each reference client draws its own).
  """
  _check(cfg)
  split = state_lib.init_fn(net, cfg, key)     # N clients' first layers; one server part
  n = cfg.num_clients
  stack = lambda tree: jax.tree.map(lambda x: jnp.repeat(x[None], n, axis=0), tree)
  server = split.server
  server = ServerState(
      online=stack(server.online), momentum=stack(server.momentum),
      opt_state=stack(server.opt_state),
      queue=queue_lib.init_client_queues(jax.random.fold_in(key, 0xF1), n, cfg.queue_size,
                                         net.key_dim),
      ptr=jnp.zeros((n,), jnp.int32), step=jnp.zeros((n,), jnp.int32),
      epoch=jnp.zeros((n,), jnp.int32))
  return TrainState(clients=split.clients, server=server, tx=split.tx)


@functools.partial(jax.jit, static_argnums=(0, 1))
def create_state(net, cfg: StepConfig, key: jax.Array) -> TrainState:
  """Initial FL-MoCo TrainState, deterministic in `key`, as one jitted computation."""
  return init_fn(net, cfg, key)


def abstract_state(net, cfg: StepConfig) -> TrainState:
  """The FL-MoCo TrainState's shapes and dtypes, without computing anything."""
  return jax.eval_shape(functools.partial(init_fn, net, cfg), jax.random.key(0))


def global_model(clients: ClientState, server: ServerState):
  """(clients, server) as evaluation reads them: `features.client0` takes client 0's first
  layers, and the server part is client 0's rest of the network (no client axis)."""
  return clients, jax.tree.map(lambda x: x[0], server)


def _has_batch_stats(*variables) -> bool:
  return any(losses.has_batch_stats(v) for v in variables)


def local_step(net, cfg: StepConfig, tx, client: ClientState, server: ServerState,
               x_q: jax.Array, x_k: jax.Array, lr, epoch):
  """One local step of one client (no client axis): EMA, loss, enqueue, SGD on the whole net.

  Args:
    client / server: this client's first layers and its rest of the network (with its queue).
    x_q, x_k: [B, H, W, C] the two normalised views of its batch.
    lr: learning rate of this step; epoch: 0-based round (recorded in the state).

  Returns:
    (client, server, metrics): loss (sum of the two terms for 'original'), acc (% rows whose
    positive is the top logit, of the last term computed, as the reference), pos (mean
    positive cosine).
  """
  # The momentum network follows the online one before the loss (the reference's compute()).
  mom_c = optim.ema(client.momentum, client.online, cfg.tau)
  mom_s = optim.ema(server.momentum, server.online, cfg.tau)
  queue, temp = server.queue, cfg.temperature
  # One pass per network on both views when every op is per-row (GroupNorm nets); with
  # BatchNorm the reference's four calls, in its order, for its running statistics.
  fuse = not _has_batch_stats(client.online, server.online)

  def project(c_vars, s_vars, x):
    smashed, c_vars = parties.client_forward(net, c_vars, x)
    z, s_vars = losses.embed(net, s_vars, smashed)
    return z, c_vars, s_vars

  def loss_fn(c_params, s_params):
    on_c, on_s = with_params(client.online, c_params), with_params(server.online, s_params)
    m_c, m_s = mom_c, mom_s
    if cfg.loss_form == 'single':
      q1, on_c, on_s = project(on_c, on_s, x_q)
      k2, m_c, m_s = project(m_c, m_s, x_k)
      loss, acc, pos = losses.info_nce(q1, lax.stop_gradient(k2), queue, temp)
      return loss, (on_c, on_s, m_c, m_s, lax.stop_gradient(k2), acc, pos)
    b = x_q.shape[0]
    if fuse:
      q, on_c, on_s = project(on_c, on_s, jnp.concatenate([x_q, x_k], axis=0))
      k, m_c, m_s = project(m_c, m_s, jnp.concatenate([x_k, x_q], axis=0))
      q1, q2, k2, k1 = q[:b], q[b:], k[:b], k[b:]
    else:
      q1, on_c, on_s = project(on_c, on_s, x_q)
      k2, m_c, m_s = project(m_c, m_s, x_k)
      q2, on_c, on_s = project(on_c, on_s, x_k)
      k1, m_c, m_s = project(m_c, m_s, x_q)
    k1, k2 = lax.stop_gradient(k1), lax.stop_gradient(k2)
    # l(q, k') + l(k, q'): both views reach the online network (unlike MocoSFL's 'original'
    # form, whose second term starts from the client's momentum activations).
    loss1, _, pos1 = losses.info_nce(q1, k2, queue, temp)
    loss2, acc, pos2 = losses.info_nce(q2, k1, queue, temp)
    keys = jnp.concatenate([k1, k2], axis=0)                # k1 block first, as the reference
    return loss1 + loss2, (on_c, on_s, m_c, m_s, keys, acc, 0.5 * (pos1 + pos2))

  (loss, aux), (g_c, g_s) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      client.online['params'], server.online['params'])
  on_c, on_s, m_c, m_s, keys, acc, pos = aux
  on_c, opt_c = parties.client_update(tx, on_c, client.opt_state, g_c, lr)
  on_s, opt_s = parties.client_update(tx, on_s, server.opt_state, g_s, lr)
  queue, ptr = queue_lib.enqueue(server.queue, server.ptr, keys)
  client = client.replace(online=on_c, momentum=m_c, opt_state=opt_c, count=client.count + 1,
                          draws=client.draws + 1)
  server = server.replace(online=on_s, momentum=m_s, opt_state=opt_s, queue=queue, ptr=ptr,
                          step=server.step + 1, epoch=jnp.asarray(epoch, jnp.int32))
  return client, server, dict(loss=loss, acc=acc, pos=pos)


def _whole(clients: ClientState, server: ServerState, which: str) -> dict:
  """The pool's whole networks as one variables tree {'params': ..., 'batch_stats': ...}."""
  c, s = getattr(clients, which), getattr(server, which)
  return {k: {'client': c.get(k, {}), 'server': s.get(k, {})} for k in ('params', 'batch_stats')}


def fedavg_if(synced, clients: ClientState, server: ServerState, pool_clients: ClientState,
              pool_server: ServerState):
  """When `synced`: every client's online network (both parts, BatchNorm statistics included)
  becomes the mean of the pool's; momentum networks, optimizer states and queues stay.

  Returns (clients, server, divergence metrics measured before averaging, 0 without sync).
  """
  n = jax.tree.leaves(clients.online)[0].shape[0]

  def do_sync(args):
    cl, sv = args
    avg, _, divs = sync_lib.fedavg_masked(None, _whole(pool_clients, pool_server, 'online'),
                                          _whole(pool_clients, pool_server, 'momentum'), None,
                                          False)
    avg = sync_lib.broadcast_clients(avg, n)
    cl = cl.replace(online={k: avg[k]['client'] for k in cl.online})
    sv = sv.replace(online={k: avg[k]['server'] for k in sv.online})
    return (cl, sv), {k: v.astype(precision.float_dtype()) for k, v in divs.items()}

  def no_sync(args):
    return args, {k: jnp.zeros((), precision.float_dtype()) for k in sync_lib.DIVERGENCE_KEYS}

  (clients, server), divs = lax.cond(jnp.asarray(synced, bool), do_sync, no_sync,
                                     (clients, server))
  return clients, server, divs


def train_step(net, cfg: StepConfig, state: TrainState, views_q: jax.Array, views_k: jax.Array,
               epoch, batch_idx, pool: Optional[jax.Array] = None, sync=None):
  """One FL-MoCo step of the pool on given views (pure; `simulated_step` draws the views).

  Args:
    state: all N clients (leading client axis on every leaf).
    views_q, views_k: [P, B, H, W, C] normalised views of the pool's batches, pool order.
    epoch: 0-based round; batch_idx: 0-based step within the round (the sync rule).
    pool: int32 [P] client ids, or None for all N clients in natural order.
    sync: optional bool overriding the sync rule.

  Returns:
    (state, metrics): pool means of loss, contrastive_acc, pos_logit_mean; client_lr; synced;
    the divergences of sync.py at sync steps.
  """
  _check(cfg)
  rows = (lambda t: t) if pool is None else (lambda t: jax.tree.map(lambda x: x[pool], t))
  lr = schedules.flmoco_lr(cfg, epoch)
  step = functools.partial(local_step, net, cfg, state.tx)
  pool_clients, pool_server, m = jax.vmap(step, in_axes=(0, 0, 0, 0, None, None))(
      rows(state.clients), rows(state.server), views_q, views_k, lr, epoch)
  if pool is None:
    clients, server = pool_clients, pool_server
  else:
    put = lambda full, part: jax.tree.map(lambda f, p: f.at[pool].set(p), full, part)
    clients, server = put(state.clients, pool_clients), put(state.server, pool_server)
  synced = sync_now(cfg, batch_idx, sync)
  clients, server, divs = fedavg_if(synced, clients, server, pool_clients, pool_server)
  metrics = dict(loss=jnp.mean(m['loss']), contrastive_acc=jnp.mean(m['acc']),
                 pos_logit_mean=jnp.mean(m['pos']), client_lr=lr,
                 synced=synced.astype(precision.float_dtype()), **divs)
  return state.replace(clients=clients, server=server), metrics


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3,))
def simulated_step(net, cfg: StepConfig, aug, state: TrainState, images, table, data_key,
                   aug_key, pool, epoch, batch_idx, step):
  """Batch indices -> gather -> two views -> `train_step`, in one compiled call.

  Every pool client draws its next batch from its own stream (data/sampler.py, at its draw
  counter); `step` (the run's global step) keys the augmentation, so a resumed run draws the
  same views.
  """
  ids = jnp.arange(cfg.num_clients, dtype=jnp.int32) if pool is None else pool
  batch = images.batch(table, ids, state.clients.draws[ids], cfg.batch_size, data_key)
  views_q, views_k = augment.two_views(jax.random.fold_in(aug_key, step), batch,
                                       jnp.asarray(aug.mean), jnp.asarray(aug.std),
                                       aug.pipeline, crop_scale=aug.crop_scale)
  return train_step(net, cfg, state, views_q, views_k, epoch, batch_idx, pool)
