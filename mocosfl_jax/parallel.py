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

Multi-host: `maybe_initialize_distributed` calls `jax.distributed.initialize` when asked by the
config or the environment, before any other JAX call; each process then holds only its
addressable shards (see bench/README.md for the two-process commands).
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
  if par.mode == 'vmap':
    return fn(*args)
  spec = P(AXIS)

  def body(*a):
    return jax.tree.map(lambda x: lax.psum(x, AXIS), fn(*a))

  return jax.shard_map(body, mesh=par.mesh, in_specs=(spec,) * len(args), out_specs=P(),
                       check_vma=False)(*args)


def _place(x, sharding):
  """x (same value in every process) as a global array with `sharding`.

  Built shard by shard from a host copy, so it also works when the mesh spans processes
  (device_put of a process-local array cannot target other hosts' devices).
  """
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_clients(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a stacked per-client tree with its leading axis over 'clients' (replicated if the
  leading size does not divide by the device count: then every device holds all clients)."""
  n = mesh.shape[AXIS]

  def put(x):
    spec = P(AXIS) if x.ndim and x.shape[0] % n == 0 else P()
    return _place(x, NamedSharding(mesh, spec))

  return jax.tree.map(put, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a tree replicated on every device of `mesh` (the server state)."""
  return jax.tree.map(lambda x: _place(x, NamedSharding(mesh, P())), tree)


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
