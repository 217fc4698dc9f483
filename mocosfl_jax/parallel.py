"""How the pool's client work is mapped: vmap on one device, or shard_map over a device mesh.

    par = ClientParallel()                                  # vmap over the pool (default)
    par = ClientParallel('vmap', chunk=10)                  # lax.map over chunks of 10 clients
    par = ClientParallel('shard_map', mesh=client_mesh())   # pool sharded over every device
    step.train_step(net, cfg, clients, server, ..., par=par)

shard_map: the pool axis is split over a 1-D mesh axis 'clients' (each device runs its local
clients with vmap, or chunks of them with lax.map, inside), the server is replicated, and FedAvg
is a psum over the axis. A pool that does not divide by the device count is padded with masked
clients: they compute on zeros, are cut off before the server, excluded from FedAvg and never
written back. `client_chunk` bounds memory: only one chunk's activations are live at a time
(the chunk function is rematerialised in the backward pass).

The pool's client state moves between the client-ordered state [N] and the pool-ordered slots
[P'] in D ppermute rounds (`gather_pool` / `scatter_pool`), so a device holds its own clients
and its own slots, never the whole pool.

Multi-host: `maybe_initialize_distributed` calls `jax.distributed.initialize` when asked by the
config or the environment, before any other JAX call. The state is initialised with its
shardings (state.init_state(mesh=...)) and the training images are placed one row per client
(data.sampler.TrainImages.sharded_by_client), so each process's devices hold only their own
clients' state and images (see bench/README.md for the two-process commands).
"""
import dataclasses
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'clients'
MODES = ('vmap', 'shard_map')
PyTree = Any


def client_mesh(devices=None) -> Mesh:
  """1-D mesh with axis 'clients' over `devices` (default: all devices of all processes).

  Auto axis type: plain jit/GSPMD keeps working around the shard_map (toolchain.md §4).
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


@dataclasses.dataclass(frozen=True)
class ClientParallel:
  """Static choice of how the step maps its per-client work (hashable: a jit static argument).

  Attributes:
    mode: 'vmap' (one device) or 'shard_map' (pool split over `mesh`'s 'clients' axis).
    chunk: 0 runs all (local) clients at once; k > 0 runs them k at a time with lax.map
      (memory-bounded: one chunk's activations live at once, rematerialised for the backward).
    mesh: the mesh for 'shard_map' (None: `client_mesh()` over all devices).
  """
  mode: str = 'vmap'
  chunk: int = 0
  mesh: Optional[Mesh] = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'client_parallel={self.mode!r}; valid: {MODES}.')
    if not isinstance(self.chunk, int) or self.chunk < 0:
      raise ValueError(f'client_chunk={self.chunk!r} must be an int >= 0 (0 = all at once).')
    if self.mode == 'shard_map' and self.mesh is None:
      object.__setattr__(self, 'mesh', client_mesh())
    if self.mesh is not None and AXIS not in self.mesh.axis_names:
      raise ValueError(f'mesh axes {self.mesh.axis_names} lack the {AXIS!r} axis.')

  @property
  def num_shards(self) -> int:
    return self.mesh.shape[AXIS] if self.mode == 'shard_map' else 1

  def padded(self, pool_size: int) -> int:
    """Pool size rounded up to a multiple of the shard count (masked padding clients)."""
    return math.ceil(pool_size / self.num_shards) * self.num_shards


def from_config(client_parallel: str = 'vmap', client_chunk: int = 0) -> ClientParallel:
  """ClientParallel from the config fields `client_parallel` and `client_chunk`."""
  return ClientParallel(client_parallel, int(client_chunk))


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


def _local_map(fn: Callable, chunk: int, args: tuple):
  lead = jax.tree.leaves(args)[0].shape[0]
  if chunk <= 0 or chunk >= lead:
    return jax.vmap(fn)(*args)
  # Remat: the backward pass keeps only each chunk's inputs, not its activations.
  return lax.map(jax.checkpoint(lambda a: fn(*a)), args, batch_size=chunk)


def map_clients(par: ClientParallel, fn: Callable, *args):
  """fn mapped over the leading (pool) axis of every arg: vmap / lax.map chunks / shard_map."""
  if par.mode == 'vmap':
    return _local_map(fn, par.chunk, args)
  spec = P(AXIS)
  body = lambda *a: _local_map(fn, par.chunk, a)
  return jax.shard_map(body, mesh=par.mesh, in_specs=(spec,) * len(args), out_specs=spec,
                       check_vma=False)(*args)


def reduce_clients(par: ClientParallel, fn: Callable, *args):
  """fn(*local stacked args) -> tree of local partial sums, psum'ed over the mesh if sharded."""
  if par is None or par.mode == 'vmap':
    return fn(*args)
  spec = P(AXIS)

  def body(*a):
    return jax.tree.map(lambda x: lax.psum(x, AXIS), fn(*a))

  return jax.shard_map(body, mesh=par.mesh, in_specs=(spec,) * len(args), out_specs=P(),
                       check_vma=False)(*args)


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


def state_shardings(clients: PyTree, server: PyTree, mesh: Mesh):
  """(client shardings, server shardings) for state trees of arrays or ShapeDtypeStructs:
  clients split on their leading axis (`client_spec`), the server replicated."""
  return (jax.tree.map(lambda x: NamedSharding(mesh, client_spec(x.shape, mesh)), clients),
          jax.tree.map(lambda x: NamedSharding(mesh, P()), server))


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
