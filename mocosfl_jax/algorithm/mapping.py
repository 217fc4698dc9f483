"""How per-client work is mapped over the pool axis: vmap, chunks of clients, or a device mesh.

Every per-client function of the algorithm takes ONE client's variables; the step maps it over
the leading (pool) axis of the stacked client state with `map_clients`, and sums over clients
with `reduce_clients`. The choice of mapping is a static `ClientParallel`:

    ClientParallel()                                  # vmap over the pool (default)
    ClientParallel('vmap', chunk=10)                  # lax.map over chunks of 10 clients
    ClientParallel('shard_map', mesh=client_mesh())   # pool split over every device

Under 'shard_map' the pool axis is split over the 1-D mesh axis 'clients' (each device runs its
local clients with vmap, or chunks of them with lax.map, inside) and sums are psum'ed over that
axis. `chunk` bounds memory: only one chunk's activations are live at a time (the chunk function
is rematerialised in the backward pass). Every mapping gives the same numbers up to float
summation order.
"""
import dataclasses
import math
from typing import Callable, Optional

import jax
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

AXIS = 'clients'
MODES = ('vmap', 'shard_map')


def client_mesh(devices=None) -> Mesh:
  """1-D mesh with axis 'clients' over `devices` (default: all devices of all processes).

  Auto axis type, so plain jit/GSPMD keeps working around the shard_map regions.
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


def _local_map(fn: Callable, chunk: int, args: tuple):
  lead = jax.tree.leaves(args)[0].shape[0]
  if chunk <= 0 or chunk >= lead:
    return jax.vmap(fn)(*args)
  # Remat: the backward pass keeps only each chunk's inputs, not its activations.
  return lax.map(jax.checkpoint(lambda a: fn(*a)), args, batch_size=chunk)


def map_clients(par: Optional[ClientParallel], fn: Callable, *args):
  """fn mapped over the leading (pool) axis of every arg: vmap / lax.map chunks / shard_map."""
  par = ClientParallel() if par is None else par
  if par.mode == 'vmap':
    return _local_map(fn, par.chunk, args)
  spec = P(AXIS)
  body = lambda *a: _local_map(fn, par.chunk, a)
  return jax.shard_map(body, mesh=par.mesh, in_specs=(spec,) * len(args), out_specs=spec,
                       check_vma=False)(*args)


def reduce_clients(par: Optional[ClientParallel], fn: Callable, *args):
  """fn(*local stacked args) -> tree of local partial sums, psum'ed over the mesh if sharded."""
  if par is None or par.mode == 'vmap':
    return fn(*args)
  spec = P(AXIS)

  def body(*a):
    return jax.tree.map(lambda x: lax.psum(x, AXIS), fn(*a))

  return jax.shard_map(body, mesh=par.mesh, in_specs=(spec,) * len(args), out_specs=P(),
                       check_vma=False)(*args)
