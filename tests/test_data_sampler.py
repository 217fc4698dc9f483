"""On-device per-client sampler: membership, epochs without repeats, partial batches, determinism."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.benchmarks.compiles import count_compiles
from mocosfl_jax.data.sampler import batch_indices
from mocosfl_jax.data.sampler import ClientTable
from mocosfl_jax.data.sampler import num_batches_per_epoch

B = 4
# Uneven clients: 13 -> 3 batches (1 sample skipped per epoch), 8 -> 2, 21 -> 5.
PARTS = [np.arange(100, 113), np.arange(200, 208), np.arange(300, 321)]
TABLE = ClientTable.from_partition(PARTS, batch_size=B)
K = 12  # draws per client covered by one call (>= 2 epochs for every client)


def stream(table, client, key, start=0, count=K):
  ids = jnp.full((count,), client, jnp.int32)
  return np.asarray(batch_indices(table, ids, jnp.arange(start, start + count), B, key))


def test_table_layout():
  chex.assert_shape(TABLE.indices, (3, 21))
  np.testing.assert_array_equal(TABLE.counts, [13, 8, 21])
  assert TABLE.indices[1, 8:].tolist() == [-1] * 13
  assert num_batches_per_epoch(TABLE.counts, B) == 4  # reference: S = ceil(n_0 / B), client 0
  assert num_batches_per_epoch(TABLE.counts, B, drop_last=True) == 3  # one shuffle pass
  assert num_batches_per_epoch(TABLE.counts, B, client=2) == 6


@pytest.mark.parametrize("client", [0, 1, 2])
def test_epochs_cover_client_without_repeats(client):
  key = jax.random.key(0)
  batches = stream(TABLE, client, key)
  chex.assert_shape(batches, (K, B))
  assert set(batches.ravel()) <= set(PARTS[client].tolist())
  nb = len(PARTS[client]) // B
  for epoch in range(K // nb):
    epoch_idx = batches[epoch * nb:(epoch + 1) * nb].ravel()
    assert len(set(epoch_idx.tolist())) == nb * B  # no repeats within an epoch
  # Partial last batch skipped: exactly n mod B samples are missing in each epoch.
  first = set(batches[:nb].ravel().tolist())
  assert len(set(PARTS[client].tolist()) - first) == len(PARTS[client]) % B


def test_epoch_rollover_reshuffles():
  key = jax.random.key(1)
  batches = stream(TABLE, 2, key, count=15)  # 3 epochs of 5 batches
  epochs = [batches[e * 5:(e + 1) * 5].ravel() for e in range(3)]
  assert all(len(set(e.tolist())) == 20 for e in epochs)
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_deterministic_resumable_and_vmapped():
  key = jax.random.key(2)
  full = stream(TABLE, 0, key)
  resumed = stream(TABLE, 0, key, start=5, count=K - 5)
  np.testing.assert_array_equal(full[5:], resumed)
  np.testing.assert_array_equal(full, stream(TABLE, 0, key))
  assert not np.array_equal(full, stream(TABLE, 0, jax.random.key(3)))
  # One call over several clients at different positions == per-client streams.
  ids = jnp.array([2, 0, 1, 0], jnp.int32)
  draws = jnp.array([7, 3, 0, 11], jnp.int32)
  mixed = np.asarray(batch_indices(TABLE, ids, draws, B, key))
  for row, (c, d) in enumerate(zip(ids.tolist(), draws.tolist())):
    np.testing.assert_array_equal(mixed[row], stream(TABLE, c, key, start=d, count=1)[0])


def test_no_recompile_for_new_values():
  key = jax.random.key(4)
  ids = jnp.array([0, 1, 2], jnp.int32)
  batch_indices(TABLE, ids, jnp.array([0, 0, 0]), B, key)
  with count_compiles(batch_indices) as compiles:
    batch_indices(TABLE, ids[::-1], jnp.array([5, 9, 1]), B, jax.random.key(5))
  assert compiles.count == 0


def test_jit_inside_a_step():
  @jax.jit
  def step(table, draws, key):
    return batch_indices(table, jnp.arange(3), draws, B, key)
  out = step(TABLE, jnp.array([0, 1, 2]), jax.random.key(0))
  chex.assert_shape(out, (3, B))
  chex.assert_type(out, jnp.int32)


def test_too_small_client_is_rejected():
  with pytest.raises(ValueError, match="batch_size=9"):
    ClientTable.from_partition(PARTS, batch_size=9)
  table = ClientTable.from_partition(PARTS)  # no batch size given: checked when sampling
  with pytest.raises(ValueError, match="only 8 samples"):
    batch_indices(table, jnp.array([0]), jnp.array([0]), 9, jax.random.key(0))
  with pytest.raises(ValueError, match="parts"):
    ClientTable.from_partition([])
