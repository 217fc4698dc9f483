"""The jitted pieces of a training step whose pool holds remote clients, and the server's loop.

A step with remote clients runs the per-party functions of algorithm/parties.py (the same
pieces as `step.split_train_step`) with the remote rows' smashed data coming over the network:

  `prepare`        every pool row's batch and two views (the simulated clients use them), and
                   for the remote rows what they need to make the same views themselves: the
                   batch's positions within the client's own images and the uniforms of the
                   augmentation (data.augment.view_uniforms);
  `deployed_step`  the present rows' forward (the remote rows' smashed data replaces theirs),
                   the server's loss, update and enqueue, the simulated rows' backward and SGD;
                   returns the remote rows' gradients;
  `sync_rows`      FedAvg of the rows that took part, the remote rows as they uploaded them.

A remote client that is absent (not connected, or late) is left out of the step: its row is
not in `rows`, so the server's batch is that of the present clients (as a pool with masked
padding clients, parallel.py), and its state, draws included, stays as it was. Each distinct
number of present clients compiles its own step.

`RemoteStepper` is the training loop's step function (run/train.py's `stepper`): per step it
opens a round on the coordinator, waits for the uploads, runs the jitted pieces and publishes
gradients and averaged models.
"""
from __future__ import annotations

import functools
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mocosfl_jax.algorithm import parties
from mocosfl_jax.algorithm import plan
from mocosfl_jax.algorithm import sync as sync_lib
from mocosfl_jax.data import augment, sampler
from mocosfl_jax.remote import coordinator as coordinator_lib


def row_tensors(tree, prefix: str) -> dict:
  """One client's pytree -> {prefix + key path: numpy array} (message tensors)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {prefix + jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def tensor_spec(tree, prefix: str) -> dict:
  """{name: (dtype, shape)} of `row_tensors(tree, prefix)` (a per-client template tree)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {prefix + jax.tree_util.keystr(p): (np.dtype(x.dtype), tuple(x.shape))
          for p, x in leaves}


def from_tensors(template, tensors: dict, prefix: str):
  """Inverse of `row_tensors`: the template's tree with its leaves taken from `tensors`."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(tensors[prefix + jax.tree_util.keystr(p)]) for p, _ in leaves])


def row(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


@functools.partial(jax.jit, static_argnums=(0, 1))
def prepare(cfg: plan.StepConfig, aug, state, images: sampler.TrainImages,
            table: sampler.ClientTable, data_key, aug_key, ids):
  """(views_q, views_k [P, B, ...], positions int32 [P, B], uniforms float32 [2, P, B, U]) of the
  pool `ids`: the batches and views `run.train.simulated_step` draws for these clients."""
  b = cfg.batch_size
  draws = state.clients.draws[ids]
  step_key = jax.random.fold_in(aug_key, state.server.step)
  batch = images.batch(table, ids, draws, b, data_key)
  q, k = augment.two_views(step_key, batch, jnp.asarray(aug.mean), jnp.asarray(aug.std),
                           aug.pipeline, crop_scale=aug.crop_scale)
  positions = sampler.batch_positions(table, ids, draws, b, data_key)
  return q, k, positions, augment.view_uniforms(step_key, (ids.shape[0], b))


def rows_where(mask, new, old):
  """Per row of the leading axis: `new` where mask (bool [n]) is set, else `old` (pytrees of
  the same structure; `new` is cast to `old`'s dtypes)."""
  return jax.tree.map(
      lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (o.ndim - 1)), n.astype(o.dtype), o),
      new, old)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def deployed_step(net, cfg: plan.StepConfig, state, rows, views_q, views_k, remote_q, remote_k,
                  is_remote, epoch):
  """One step of the present pool rows `rows` (client ids, pool order).

  Args:
    views_q, views_k: [n, B, ...] the rows' views (used by the simulated rows).
    remote_q, remote_k: [n, B', ...] the remote rows' uploaded smashed data (0 elsewhere).
    is_remote: bool [n].

  Returns:
    (state, grads [n, B', ...] (None for frozen clients), client_lrs [n], metrics).
  """
  clients, server, tx = state.clients, state.server, state.tx
  sub = jax.tree.map(lambda x: x[rows], clients)
  a_q, a_k, online, momentum, residual = jax.vmap(
      functools.partial(parties.client_send, net, cfg))(sub.online, sub.momentum,
                                                        views_q, views_k)
  a_q, a_k = rows_where(is_remote, (remote_q, remote_k), (a_q, a_k))
  server, grads, m = parties.server_step(net, cfg, tx, server, a_q, a_k, rows, epoch)
  lrs = parties.client_lrs(cfg, sub, epoch)
  opt_state = sub.opt_state
  if not cfg.frozen_clients:
    online, opt_state = jax.vmap(functools.partial(parties.client_receive, net, cfg, tx))(
        online, sub.opt_state, views_q, views_k, grads, lrs, residual)
  # The remote rows' own state lives on their devices: the server's copy changes at syncs.
  kept = rows_where(is_remote, (sub.online, sub.momentum, sub.opt_state),
                    (online, momentum, opt_state))
  sub = sub.replace(online=kept[0], momentum=kept[1], opt_state=kept[2], count=sub.count + 1,
                    draws=sub.draws + 1)
  clients = jax.tree.map(lambda full, part: full.at[rows].set(part), clients, sub)
  metrics = dict(m, client_lr=jnp.mean(lrs), client_lrs=lrs)
  return state.replace(clients=clients, server=server), grads, lrs, metrics


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def sync_rows(cfg: plan.StepConfig, state, rows, uploaded, has_upload, take_part):
  """FedAvg of the rows `rows` whose `take_part` is set; remote rows as uploaded.

  Args:
    uploaded: ClientState-like {'online', 'momentum'} stacked [n, ...] (rows without an
      upload hold anything).
    has_upload: bool [n] rows whose `uploaded` replaces the server's copy.
    take_part: bool [n] rows that are averaged and receive the average (simulated rows, and
      remote rows that uploaded).

  Returns:
    (state, divergences).
  """
  clients = state.clients
  sub = jax.tree.map(lambda x: x[rows], clients)
  sub = sub.replace(online=rows_where(has_upload, uploaded['online'], sub.online),
                    momentum=rows_where(has_upload, uploaded['momentum'], sub.momentum))
  mask = take_part.astype(jax.tree.leaves(sub.online)[0].dtype)
  synced, divergences = sync_lib.fedavg_if(True, sub, cfg.momentum_sync, mask,
                                           keep_params=cfg.frozen_clients)
  sub = synced.replace(online=rows_where(take_part, synced.online, sub.online),
                       momentum=rows_where(take_part, synced.momentum, sub.momentum))
  clients = jax.tree.map(lambda full, part: full.at[rows].set(part), clients, sub)
  return state.replace(clients=clients), divergences


class RemoteStepper:
  """The training loop's step for a federation with remote clients (run/train.py `stepper`)."""

  def __init__(self, exp, net, coordinator: coordinator_lib.Coordinator, remote, *,
               deadline_s: float, server=None, on_start=None):
    """`server`: the gRPC server serving `coordinator` (stopped by its owner); `on_start()`:
    called once the remote clients' models are set, before the first step."""
    self.exp, self.net, self.coord = exp, net, coordinator
    self.remote = sorted(int(c) for c in remote)
    self.deadline_s = deadline_s
    self.server, self.on_start = server, on_start

  def models(self, state, clients) -> dict:
    """client -> its current model tensors (online, momentum and optimizer state)."""
    out = {}
    for c in clients:
      r = row(state.clients, c)
      out[c] = {**row_tensors(r.online, "online"), **row_tensors(r.momentum, "momentum"),
                **row_tensors(r.opt_state, "opt")}
    return out

  def start(self, state) -> None:
    """Called once before the first step: the remote clients' models for their Join."""
    self.coord.set_models(self.models(state, self.remote))
    if self.on_start is not None:
      self.on_start()

  def __call__(self, state, s: int, epoch: int, b: int, pool, images, table, data_key, aug_key):
    cfg, net = self.exp.step, self.net
    ids = np.arange(cfg.num_clients, dtype=np.int32) if pool is None else np.asarray(pool)
    q, k, positions, uniforms = prepare(cfg, self.exp.aug, state, images, table, data_key,
                                        aug_key, jnp.asarray(ids))
    sync = bool(plan.sync_now(cfg, b))
    in_pool = [c for c in ids.tolist() if c in self.remote]
    got, waited = {}, 0.0
    if in_pool:
      positions, uniforms = np.asarray(positions), np.asarray(uniforms)
      where = {c: i for i, c in enumerate(ids.tolist())}
      tasks = {c: (positions[where[c]], uniforms[:, where[c]]) for c in in_pool}
      while True:
        self.coord.open_round(s, epoch, b, sync, tasks)
        t0 = time.monotonic()
        got = self.coord.wait_smashed(self.deadline_s)
        waited += time.monotonic() - t0
        missing = [c for c in in_pool if c not in got]
        if missing:
          logging.warning("step %d: remote client(s) %s absent (not connected, or no smashed "
                          "data within the %.0f s deadline); the step runs without them", s + 1,
                          missing, self.deadline_s)
        if got or len(in_pool) < len(ids):
          break
        # Every client of this step is remote and none is here: the step waits for them.
        logging.warning("step %d: no client of the pool is present; waiting for remote "
                        "client(s) %s", s + 1, in_pool)
        self.coord.wait_connected(in_pool, self.deadline_s)
    present = np.array([i for i, c in enumerate(ids.tolist())
                        if c not in self.remote or c in got], np.int32)
    rows = ids[present]
    is_remote = np.array([c in got for c in rows.tolist()])
    shape = (len(rows), cfg.rows_per_client) + tuple(net.smashed_shape)
    rq, rk = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for i, c in enumerate(rows.tolist()):
      if c in got:
        rq[i], rk[i] = got[c]
    present_j = jnp.asarray(present)
    state, grads, lrs, m = deployed_step(
        net, cfg, state, jnp.asarray(rows), q[present_j], k[present_j], jnp.asarray(rq),
        jnp.asarray(rk), jnp.asarray(is_remote), jnp.int32(epoch))
    remote_rows = [i for i, c in enumerate(rows.tolist()) if c in got]
    if in_pool:
      if cfg.frozen_clients:
        self.coord.publish_grads({})
      else:
        g, l = np.asarray(grads), np.asarray(lrs)
        self.coord.publish_grads({int(rows[i]): (g[i], l[i]) for i in remote_rows})
    divergences = {key: jnp.zeros((), jnp.float32) for key in sync_lib.DIVERGENCE_KEYS}
    if sync:
      state, divergences = self._sync(state, rows, remote_rows)
    # Seconds the step waited for the remote uploads (their clients' work and the messages),
    # and how many remote clients of the pool were left out.
    return state, dict(m, synced=jnp.asarray(float(sync)), remote_wait_s=waited,
                       remote_absent=float(len(in_pool) - len(got)), **divergences)

  def _sync(self, state, rows, remote_rows):
    cfg = self.exp.step
    template = row(state.clients, int(rows[0]))
    uploads = {}
    if remote_rows and not cfg.frozen_clients:
      uploads = self.coord.wait_models([int(rows[i]) for i in remote_rows], self.deadline_s)
      late = [int(rows[i]) for i in remote_rows if int(rows[i]) not in uploads]
      if late:
        logging.warning("sync at step %d: no model from remote client(s) %s within %.0f s; "
                        "they keep theirs and the average is taken without them",
                        int(state.server.step), late, self.deadline_s)
    n = len(rows)
    has_upload = np.array([int(c) in uploads for c in rows])
    take_part = np.array([int(c) not in self.remote or int(c) in uploads for c in rows])
    if cfg.frozen_clients:         # nothing travels: frozen rows average their statistics
      take_part = np.ones(n, bool)
    stacked = {}
    for part in ("online", "momentum"):
      tmpl = getattr(template, part)
      leaves = []
      for c in rows.tolist():
        leaves.append(from_tensors(tmpl, uploads[c], part) if c in uploads else tmpl)
      stacked[part] = jax.tree.map(lambda *x: jnp.stack(x), *leaves)
    state, divergences = sync_rows(cfg, state, jnp.asarray(rows), stacked,
                                   jnp.asarray(has_upload), jnp.asarray(take_part))
    if uploads:
      averaged = {}
      for c in uploads:
        r = row(state.clients, c)
        averaged[c] = {**row_tensors(r.online, "online"), **row_tensors(r.momentum, "momentum")}
      self.coord.publish_models(averaged)
    return state, divergences
