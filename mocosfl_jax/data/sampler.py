"""Stateless, resumable per-client batch sampling on device.

The reference gives each client a shuffled DataLoader (drop_last=False, but the partial last batch is
skipped by its iterator logic) and re-creates the iterator when it is exhausted. Here a client's stream
is a pure function of (key, client id, number of batches drawn so far):

  pass e = draws // S_c, position j = draws % S_c, S_c = floor(n_c / B)
  order  = permutation of the client's n_c samples from fold_in(fold_in(key, c), e)
  batch  = order[j*B : (j+1)*B]

(a "pass" is one shuffle of the client's data, not a training epoch of S steps).

so checkpoints only need the per-client draw counters, any client subset can be sampled in one
vmapped call, and different client ids / counters never trigger a recompile.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_PAD_KEY = np.uint32(0xFFFFFFFF)


@flax.struct.dataclass
class ClientTable:
  """Padded per-client index table (a pytree: pass it into jitted functions).

  Attributes:
    indices: int32 [N, max_n] global sample indices, row c valid in [:counts[c]], -1 padding.
    counts: int32 [N] samples per client.
    min_count: static smallest count, used to reject batch sizes no client can fill.
    first_id: static client id of row 0: a table of clients first_id.. (heterogeneous clients
      keep a table per batch size) gives row j the stream of client first_id + j.
  """
  indices: jax.Array
  counts: jax.Array
  min_count: int = flax.struct.field(pytree_node=False, default=0)
  first_id: int = flax.struct.field(pytree_node=False, default=0)

  @classmethod
  def from_partition(cls, parts: Sequence[np.ndarray], batch_size: int | None = None,
                     first_id: int = 0):
    """Builds the table; with batch_size, checks every client can fill at least one batch.
    `first_id`: the client id of parts[0] (the rows are clients first_id, first_id + 1, ...)."""
    if not len(parts):
      raise ValueError("parts is empty: need at least one client")
    counts = np.array([len(p) for p in parts], np.int32)
    if batch_size is not None:
      _check_batch_size(int(counts.min()), batch_size, counts)
    table = np.full((len(parts), max(1, int(counts.max()))), -1, np.int32)
    for c, part in enumerate(parts):
      table[c, :len(part)] = np.asarray(part, np.int64)
    return cls(jnp.asarray(table), jnp.asarray(counts), int(counts.min()), int(first_id))

  @property
  def num_clients(self) -> int:
    return self.indices.shape[0]


def _check_batch_size(min_count: int, batch_size: int, counts=None) -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if min_count < batch_size:
    which = "" if counts is None else f" (clients {np.flatnonzero(counts < batch_size)[:10].tolist()})"
    raise ValueError(f"batch_size={batch_size} but some client has only {min_count} samples{which}; "
                     "each client needs at least one full batch (partial batches are skipped)")


def num_batches_per_epoch(counts, batch_size: int, client: int = 0, drop_last: bool = False) -> int:
  """Steps per training epoch as the reference counts them: S = len(client 0's loader).

  The reference's loaders use drop_last=False, so S = ceil(n_client / B), although each
  shuffle pass of the stream only yields floor(n_c / B) full batches (the short batch triggers a
  reshuffle); `drop_last=True` returns that pass length instead. Training epochs and shuffle passes
  therefore drift apart, which `batch_indices` handles through the per-client draw counters.
  """
  n = int(np.asarray(counts)[client])
  return n // batch_size if drop_last else -(-n // batch_size)


def _client_positions(count, client, draw, batch_size, key, width):
  nb = count // batch_size
  epoch = draw // nb
  j = draw % nb
  epoch_key = jax.random.fold_in(jax.random.fold_in(key, client), epoch)
  bits = jax.random.bits(epoch_key, (width,), jnp.uint32)
  valid = jnp.arange(width) < count
  # Padding gets the maximal key; a stable sort keeps real entries that tie with it in front.
  order = jnp.argsort(jnp.where(valid, bits, _PAD_KEY), stable=True)
  return jax.lax.dynamic_slice_in_dim(order, j * batch_size, batch_size).astype(jnp.int32)


def _positions(table: ClientTable, client_ids, draws, batch_size: int, key) -> jax.Array:
  _check_batch_size(table.min_count, batch_size)
  client_ids = jnp.asarray(client_ids, jnp.int32)
  draws = jnp.asarray(draws, jnp.int32)
  fn = functools.partial(_client_positions, batch_size=batch_size, key=key,
                         width=table.indices.shape[1])
  stream_ids = client_ids + table.first_id if table.first_id else client_ids
  return jax.vmap(fn)(table.counts[client_ids], stream_ids, draws)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def batch_positions(table: ClientTable, client_ids, draws, batch_size: int, key) -> jax.Array:
  """int32 [P, B]: positions within each listed client's own samples (row of `table.indices`)
  of its next batch; same arguments as `batch_indices`."""
  return _positions(table, client_ids, draws, batch_size, key)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def batch_indices(table: ClientTable, client_ids, draws, batch_size: int, key) -> jax.Array:
  """Global sample indices of the next batch of each listed client.

  Args:
    table: ClientTable.
    client_ids: int [P] client ids.
    draws: int [P] batches each of these clients has drawn so far (0 for a fresh client).
    batch_size: B (static).
    key: typed PRNG key shared by the run (per-client/epoch keys are derived by fold_in).

  Returns:
    int32 [P, B] global indices into the training arrays.
  """
  pos = _positions(table, client_ids, draws, batch_size, key)
  return jnp.take_along_axis(table.indices[jnp.asarray(client_ids, jnp.int32)], pos, axis=1)


@flax.struct.dataclass
class TrainImages:
  """The uint8 training images as the jitted step reads them.

  Two layouts, same batches: `flat` [n, H, W, C] read by global sample index (one device), or
  `by_client` [N, M, H, W, C], one zero-padded row of M = max samples per client, placed with
  the client state's sharding (parallel.client_spec), so that under shard_map each device, and
  each process of a multi-host run, holds only its own clients' images. The step's read of the
  pool's batches then compiles to a masked local gather plus an all-reduce of the [P, B, ...]
  batch (no device gathers the table).
  """
  images: jax.Array
  by_client: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def flat(cls, images: np.ndarray) -> "TrainImages":
    return cls(jnp.asarray(images), False)

  def batch(self, table: ClientTable, client_ids, draws, batch_size: int, key) -> jax.Array:
    """uint8 [P, B, H, W, C]: the next batch of each listed client (see `batch_indices`)."""
    client_ids = jnp.asarray(client_ids, jnp.int32)
    if not self.by_client:
      return self.images[batch_indices(table, client_ids, draws, batch_size, key)]
    pos = batch_positions(table, client_ids, draws, batch_size, key)
    return self.images[client_ids[:, None], pos]
