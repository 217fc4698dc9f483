"""The simulated step on the whole federation: the pool's rows in and out, over one or many devices.

    state = parallel.create_train_state(net, cfg, key)                  # one device
    state, metrics = parallel.train_step(net, cfg, state, pool, views_q, views_k, epoch, b)

    mesh = parallel.client_mesh()                                       # every device
    par = parallel.ClientParallel('shard_map', mesh=mesh)
    state = parallel.create_train_state(net, cfg, key, mesh=mesh)
    state, metrics = parallel.train_step(..., par=par)

`train_step` wraps the pure per-pool step (algorithm/step.py): it gathers the pool's rows from
the state of all N clients, pads the pool with masked clients up to a multiple of the device
count, runs the step, writes the rows back (other clients stay bit-identical) and, on sync
steps, gives every client the average. With full participation (`pool=None`: all clients in
natural order) the rows are the state itself, read and written in place.

On a mesh the pool axis is split over the 'clients' axis (algorithm/mapping.py), the server is
replicated, and the pool's rows move between the client-ordered state [N] and the pool-ordered
slots [P'] in D ppermute rounds (`gather_pool` / `scatter_pool`), so a device holds its own
clients and its own slots, never the whole pool. Padding clients compute on zeros, are cut off
before the server, excluded from FedAvg and never written back.

Multi-host: `maybe_initialize_distributed` calls `jax.distributed.initialize` when asked by the
config or the environment, before any other JAX call; the state is created with its shardings
and the training images are placed one row per client (`place_images_by_client`), so each
process's devices hold only their own clients' state and images.
"""
import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mocosfl_jax.algorithm import state as state_lib
from mocosfl_jax.algorithm import step as step_lib
from mocosfl_jax.algorithm import sync as sync_lib
from mocosfl_jax.algorithm.mapping import AXIS, MODES, ClientParallel, client_mesh
from mocosfl_jax.algorithm.plan import StepConfig
from mocosfl_jax.algorithm.state import TrainState
from mocosfl_jax.data.sampler import TrainImages

__all__ = ['AXIS', 'MODES', 'ClientParallel', 'client_mesh', 'create_train_state', 'train_step',
           'train_step_fn']
PyTree = Any


# ---- the step on the whole federation ----------------------------------------------------------

def train_step_fn(net, cfg: StepConfig, state: TrainState, pool: Optional[jax.Array],
                  views_q: jax.Array, views_k: jax.Array, epoch, batch_idx,
                  sync: Optional[jax.Array] = None, par: Optional[ClientParallel] = None,
                  train_clients: bool = True, keep_smashed: bool = False):
  """One simulated step on the state of all N clients (un-jitted; see `train_step`).

  Args:
    net, cfg: split network and StepConfig (static).
    state: TrainState of all N clients.
    pool: int32 [P] distinct client ids of this epoch's pool, in pool order; or None for all N
      clients in natural order (pool_size == num_clients, what `plan.sample_pool` gives then):
      the state is then updated in place, without the gather and scatter of every client's
      state (and on several devices the rounds that move it).
    views_q, views_k: float [P, B, H, W, C] normalised query / key views per pool position.
    epoch, batch_idx, sync: as `step.train_step`.
    par: how client work is mapped (ClientParallel, static); None = vmap, all at once.
    train_clients, keep_smashed: as `step.train_step` (static; the loss-threshold saving).

  Returns:
    (state, metrics) as `step.train_step`.
  """
  natural = pool is None
  if natural:
    if cfg.pool_size != cfg.num_clients:
      raise ValueError(f'pool=None means all {cfg.num_clients} clients in natural order, but '
                       f'pool_size={cfg.pool_size}; pass the pool\'s client ids.')
    pool = jnp.arange(cfg.num_clients, dtype=jnp.int32)
  _check_inputs(cfg, pool, views_q, views_k)
  par = ClientParallel() if par is None else par
  pool = jnp.asarray(pool, jnp.int32)
  p_pad = par.padded(cfg.pool_size)   # shard_map: masked padding clients up to a multiple of D
  ids, mask = pad_pool(pool, cfg.num_clients, p_pad)
  views_q, views_k = pad_rows(views_q, p_pad), pad_rows(views_k, p_pad)
  in_place = natural and mask is None   # pool slot j is client j: no gather / scatter

  clients = state.clients
  rows = clients if in_place else gather_pool(par, clients, ids)
  client0 = None
  if cfg.fedavg_set == 'reference':   # client 0 + pool[1:]: client 0 as it is before the step
    client0 = jax.tree.map(lambda x: x[0], (clients.online, clients.momentum))
  new, metrics, global_online = step_lib.pool_step(
      net, cfg, state.replace(clients=rows), views_q, views_k, jnp.asarray(epoch, jnp.int32),
      batch_idx, sync, pool=pool, mask=mask, par=par, client0=client0,
      train_clients=train_clients, keep_smashed=keep_smashed)
  if in_place:
    return new, metrics
  if global_online is not None:
    # Divergence-aware: the pool's rows keep (part of) their local models; every other client
    # gets the global one, then the pool's rows are written back.
    clients = lax.cond(metrics['synced'] > 0,
                       lambda c: c.replace(online=_every(c, global_online)), lambda c: c,
                       clients)
    return new.replace(clients=scatter_pool(par, clients, new.clients, ids)), metrics
  clients = scatter_pool(par, clients, new.clients, ids)
  # Sync step: every pool row now holds the average; the other clients get it too.
  clients = lax.cond(metrics['synced'] > 0,
                     lambda c: sync_lib.give_all(c, new.clients, cfg.momentum_sync),
                     lambda c: c, clients)
  return new.replace(clients=clients), metrics


@functools.partial(jax.jit, static_argnums=(0, 1),
                   static_argnames=('par', 'train_clients', 'keep_smashed'), donate_argnums=(2,))
def train_step(net, cfg: StepConfig, state: TrainState, pool: Optional[jax.Array],
               views_q: jax.Array, views_k: jax.Array, epoch, batch_idx,
               sync: Optional[jax.Array] = None, par: Optional[ClientParallel] = None,
               train_clients: bool = True, keep_smashed: bool = False):
  """Jitted `train_step_fn` (same arguments); `net`, `cfg`, `par`, `train_clients` and
  `keep_smashed` static; the state donated.

  Pass epoch / batch_idx as int32 arrays (e.g. jnp.int32(e)) and keep `sync` either always None
  or always an array, so every step reuses one compiled executable.
  """
  return train_step_fn(net, cfg, state, pool, views_q, views_k, epoch, batch_idx, sync, par,
                       train_clients, keep_smashed)


def _every(clients, tree):
  """`tree` (one client's variables) copied to every client of `clients`."""
  n = clients.count.shape[0]
  return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (n,) + x.shape), tree)


def _check_inputs(cfg: StepConfig, pool, views_q, views_k) -> None:
  """Static shape checks (trace time) so misuse fails with a readable ValueError."""
  p, b = cfg.pool_size, cfg.batch_size
  if tuple(pool.shape) != (p,):
    raise ValueError(f'pool has shape {tuple(pool.shape)}, expected ({p},) = (pool_size,).')
  for name, v in (('views_q', views_q), ('views_k', views_k)):
    if v.ndim != 5 or tuple(v.shape[:2]) != (p, b):
      raise ValueError(f'{name} has shape {tuple(v.shape)}, expected ({p}, {b}, H, W, C) = '
                       '(pool_size, batch_size, ...).')


# ---- state and data placement ------------------------------------------------------------------

def create_train_state(net, cfg: StepConfig, key: jax.Array,
                       mesh: Optional[Mesh] = None) -> TrainState:
  """Initial TrainState, deterministic in `key` (the values do not depend on `mesh`).

  With `mesh`, it is compiled with `state_shardings` as outputs, so each device only ever
  materialises its own clients' rows (multi-host: no process builds the whole [N, ...] state).
  """
  if mesh is None:
    return state_lib.create_train_state(net, cfg, key)
  return _sharded_init(net, cfg, mesh)(key)


@functools.lru_cache(maxsize=8)
def _sharded_init(net, cfg: StepConfig, mesh: Mesh):
  shapes = state_lib.abstract_train_state(net, cfg)
  return jax.jit(functools.partial(state_lib.init_fn, net, cfg),
                 out_shardings=state_shardings(shapes, mesh))


def place_images_by_client(images: np.ndarray, parts: Sequence[np.ndarray],
                           mesh: Mesh) -> TrainImages:
  """Training images one row per client [N, max samples, H, W, C], split like the client state.

  Built shard by shard: a process only ever copies the rows its devices hold.
  """
  images = np.asarray(images)
  shape = (len(parts), max(1, max(len(p) for p in parts))) + images.shape[1:]
  sharding = NamedSharding(mesh, client_spec(shape, mesh))

  def rows(index):
    ids = range(shape[0])[index[0]]
    out = np.zeros((len(ids),) + shape[1:], images.dtype)
    for r, c in enumerate(ids):
      out[r, :len(parts[c])] = images[np.asarray(parts[c], np.int64)]
    return out[(slice(None),) + tuple(index[1:])]

  return TrainImages(jax.make_array_from_callback(shape, sharding, rows), True)


# ---- the pool's rows ---------------------------------------------------------------------------

def pad_pool(pool: jax.Array, num_clients: int, padded: int):
  """Pool ids padded to `padded` with id N (out of range: gathers clamp, scatters drop).

  Returns (ids [padded], mask [padded] float32 with 1 for real clients, or None when nothing
  was padded).
  """
  p = pool.shape[0]
  if padded == p:
    return pool, None
  ids = jnp.concatenate([pool, jnp.full((padded - p,), num_clients, pool.dtype)])
  mask = jnp.concatenate([jnp.ones((p,), jnp.float32), jnp.zeros((padded - p,), jnp.float32)])
  return ids, mask


def pad_rows(x: jax.Array, padded: int) -> jax.Array:
  """Zero rows appended on the leading axis up to `padded`."""
  extra = padded - x.shape[0]
  if extra == 0:
    return x
  return jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])


def gather_pool(par: Optional[ClientParallel], tree: PyTree, ids: jax.Array) -> PyTree:
  """Rows `ids` [P'] of a stacked per-client tree, laid out as the pool (split over 'clients'
  under shard_map). Out-of-range ids (padding, id N) get some real row (masked later).

  shard_map with the clients split over D devices: device d computes pool slots
  [d*P'/D, (d+1)*P'/D) and holds clients [d*N/D, (d+1)*N/D); the rows travel in D ppermute rounds
  of one slot block each, so a device never holds more than its own slots' rows plus one block
  in flight (a plain `x[ids]` under GSPMD gives every device all P' rows: with full
  participation that is every client's state on every device).
  """
  if par is None or par.mode == 'vmap':
    return jax.tree.map(lambda x: x[ids], tree)
  d, n = par.num_shards, jax.tree.leaves(tree)[0].shape[0]
  slots = ids.shape[0] // d
  split = client_spec((n,), par.mesh) == P(AXIS)

  def body(local, ids):
    me = lax.axis_index(AXIS)
    mine = lax.dynamic_slice_in_dim(ids, me * slots, slots)
    if not split:                       # every device holds all clients
      return jax.tree.map(lambda x: x[mine], local)
    n_local = n // d
    out = None
    for r in range(d):                  # round r: send the rows device me+r needs from me
      want = lax.dynamic_slice_in_dim(ids, ((me + r) % d) * slots, slots)
      rows = jax.tree.map(lambda x: x[jnp.clip(want - me * n_local, 0, n_local - 1)], local)
      if r:
        rows = lax.ppermute(rows, AXIS, [(s, (s + r) % d) for s in range(d)])
      if out is None:
        out = rows
      else:                             # keep the rows whose client lives on the sender
        take = mine // n_local == (me - r) % d
        out = jax.tree.map(lambda o, x: jnp.where(_rows(take, x), x, o), out, rows)
    return out

  return jax.shard_map(body, mesh=par.mesh, in_specs=(P(AXIS) if split else P(), P()),
                       out_specs=P(AXIS), check_vma=False)(tree, ids)


def scatter_pool(par: Optional[ClientParallel], full: PyTree, part: PyTree,
                 ids: jax.Array) -> PyTree:
  """Writes the pool's rows `part` [P'] into rows `ids` of `full` [N]; other rows untouched,
  out-of-range ids (padding) dropped. The inverse of `gather_pool`, in the same D rounds."""
  put = lambda f, p, i: f.at[i].set(p.astype(f.dtype), mode='drop')
  if par is None or par.mode == 'vmap':
    return jax.tree.map(lambda f, p: put(f, p, ids), full, part)
  d, n = par.num_shards, jax.tree.leaves(full)[0].shape[0]
  slots = ids.shape[0] // d
  split = client_spec((n,), par.mesh) == P(AXIS)

  def body(local, part, ids):
    if not split:                       # replicas stay equal: every device writes every row
      rows = jax.tree.map(lambda x: lax.all_gather(x, AXIS, tiled=True), part)
      return jax.tree.map(lambda f, p: put(f, p, ids), local, rows)
    me, n_local = lax.axis_index(AXIS), n // d
    for r in range(d):                  # round r: receive the slots of device me-r
      rows = part if r == 0 else lax.ppermute(part, AXIS, [(s, (s + r) % d) for s in range(d)])
      src = lax.dynamic_slice_in_dim(ids, ((me - r) % d) * slots, slots)
      idx = jnp.where(src // n_local == me, src - me * n_local, n_local)   # not mine: dropped
      local = jax.tree.map(lambda f, p: put(f, p, idx), local, rows)
    return local

  spec = P(AXIS) if split else P()
  return jax.shard_map(body, mesh=par.mesh, in_specs=(spec, P(AXIS), P()), out_specs=spec,
                       check_vma=False)(full, part, ids)


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def _place(x, sharding):
  """x (same value in every process) as a global array with `sharding`.

  Built shard by shard from a host copy, so it also works when the mesh spans processes
  (device_put of a process-local array cannot target other hosts' devices).
  """
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def client_spec(shape, mesh: Mesh) -> P:
  """P('clients') for a stacked per-client leaf whose leading size divides by the device count,
  else P() (replicated: every device holds all clients)."""
  return P(AXIS) if len(shape) and shape[0] % mesh.shape[AXIS] == 0 else P()


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """Shardings of a TrainState of arrays or ShapeDtypeStructs: clients split on their leading
  axis (`client_spec`), the server replicated."""
  return state.replace(
      clients=jax.tree.map(lambda x: NamedSharding(mesh, client_spec(x.shape, mesh)),
                           state.clients),
      server=jax.tree.map(lambda x: NamedSharding(mesh, P()), state.server))


def shard_clients(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a stacked per-client tree with its leading axis over 'clients' (`client_spec`)."""
  return jax.tree.map(lambda x: _place(x, NamedSharding(mesh, client_spec(np.shape(x), mesh))),
                      tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a tree replicated on every device of `mesh` (the server state)."""
  return jax.tree.map(lambda x: _place(x, NamedSharding(mesh, P())), tree)


def addressable_bytes(tree: PyTree) -> int:
  """Bytes this process holds on its devices for `tree` (all replicas of its local shards)."""
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
             for s in x.addressable_shards)


DISTRIBUTED_ENV = 'MOCOSFL_DISTRIBUTED'


def maybe_initialize_distributed(enabled: Optional[bool] = None, **kwargs) -> bool:
  """`jax.distributed.initialize(**kwargs)` when enabled (config) or $MOCOSFL_DISTRIBUTED=1.

  Must run before any other JAX call. Coordinator address, process count and id come from
  kwargs or JAX's own environment variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID) or a cluster auto-detector. Returns True if it initialised.
  """
  if enabled is None:
    enabled = os.environ.get(DISTRIBUTED_ENV, '0').lower() in ('1', 'true', 'yes')
  if not enabled:
    return False
  if jax.distributed.is_initialized():   # e.g. main.py already did, before touching devices
    return True
  env = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS', 'num_processes': 'JAX_NUM_PROCESSES',
         'process_id': 'JAX_PROCESS_ID'}
  for k, var in env.items():
    if k not in kwargs and var in os.environ:
      kwargs[k] = os.environ[var] if k == 'coordinator_address' else int(os.environ[var])
  jax.distributed.initialize(**kwargs)
  return True
