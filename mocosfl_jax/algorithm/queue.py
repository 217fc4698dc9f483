"""MoCo key queue (feature memory), shared or per client (docs/reference.md, 'Key queue').

Layout differs from the reference on purpose: rows are keys ([K, D]) instead of the reference's
columns (D x K); the arithmetic is identical. Enqueueing b <= K keys writes rows
[p, p + b) with wrap-around and advances p <- (p + b) mod K; K need not be a multiple of b.

Per-client queues ([N, K // N, D], one pointer per client) are *indexed by pool position*: the
rows of pool position j (client pool[j]) are scored against, and enqueued into, queue pool[j].
The reference slices rows by client *id* (`[c*B, (c+1)*B)`), which mixes clients up whenever the
pool is not range(N); it also leaves MocoSFL's per-client queues unnormalised and drops the k2
half of the keys with the original symmetric loss. Here per-client queues are L2-normalised at
init (as MonAcoSFL's code) and each client enqueues all of its own keys (`StepConfig.keys_per_client`).
`StepConfig.client_queues='reference'` reproduces MocoSFL's queues where they are well defined
(every client in the pool, so pool position j is client j): raw N(0, 1) init, and only the k1
block of the keys enqueued under the 'original' loss (algorithm/parties.py).
"""
import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax import precision


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps), as torch.nn.functional.normalize."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def init_queue(key: jax.Array, size: int, dim: int) -> jax.Array:
  """Shared queue [K, D]: N(0, 1) entries, then every key (row) L2-normalised."""
  return l2_normalize(jax.random.normal(key, (size, dim), precision.float_dtype()))


def init_client_queues(key: jax.Array, num_clients: int, size: int, dim: int,
                       normalise: bool = True) -> jax.Array:
  """Per-client queues [N, K // N, D] of N(0, 1) entries, normalised per key (as MonAcoSFL's
  code) unless normalise=False (MocoSFL's code left them raw: `client_queues='reference'`)."""
  q = jax.random.normal(key, (num_clients, size, dim), precision.float_dtype())
  return l2_normalize(q) if normalise else q


def enqueue(queue: jax.Array, ptr: jax.Array, keys: jax.Array):
  """Writes `keys` [b, D] at rows [ptr, ptr + b) modulo K; returns (queue, (ptr + b) % K).

  Implemented with `dynamic_update_slice` on a queue padded by b rows, so the write never gets
  clamped, then the overflow rows are folded back onto the start of the queue. `ptr` is a traced
  int32 scalar, so the compiled step does not depend on the pointer value.
  """
  k, d = queue.shape
  b = keys.shape[0]
  if b > k:
    raise ValueError(f'cannot enqueue {b} keys into a queue of size {k} (need b <= K).')
  if keys.shape[1] != d:
    raise ValueError(f'keys have dim {keys.shape[1]}, queue has dim {d}.')
  ptr = jnp.asarray(ptr, jnp.int32)
  keys = keys.astype(queue.dtype)
  padded = jnp.concatenate([queue, jnp.zeros((b, d), queue.dtype)], axis=0)
  padded = lax.dynamic_update_slice(padded, keys, (ptr, jnp.int32(0)))
  out, overflow = padded[:k], padded[k:]
  n_wrap = ptr + b - k            # rows that belong at the start of the queue (<= 0: none)
  head = jnp.where((jnp.arange(b) < n_wrap)[:, None], overflow, out[:b])
  out = lax.dynamic_update_slice(out, head, (jnp.int32(0), jnp.int32(0)))
  return out, (ptr + b) % k


def enqueue_clients(queues: jax.Array, ptrs: jax.Array, pool: jax.Array, keys: jax.Array):
  """Per-client enqueue: pool position j writes keys[j] into queue pool[j].

  Args:
    queues: [N, K', D]; ptrs: int32 [N]; pool: int32 [P] distinct client ids;
    keys: [P, b, D] keys of each pool position.

  Returns:
    (queues, ptrs) with only the pool's queues and pointers changed.
  """
  sub_q, sub_p = jax.vmap(enqueue)(queues[pool], ptrs[pool], keys)
  return queues.at[pool].set(sub_q), ptrs.at[pool].set(sub_p)
