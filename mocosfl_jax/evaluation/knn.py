"""Weighted kNN monitor (docs/reference.md, 'kNN monitor') and batched feature extraction.

The monitor is the InstDisc/MoCo-demo classifier the reference runs every epoch: features are
L2-normalised (as torch's F.normalize; the function that normalises the MoCo keys), each test
query takes its k = 200 most cosine-similar bank entries, weights them by exp(sim / t) with
t = 0.1, sums the weights per class and predicts the argmax; the result is top-1 accuracy in
percent. Queries are processed in fixed-size, zero-padded chunks by one jitted
function, so memory is O(chunk x bank) and every chunk reuses one compilation.

Deliberate differences from the reference: k is clamped to the bank size (the reference crashes
when k > N); the similarity matmul uses full f32 precision (GPUs would otherwise use TF32 and could
reorder near-tied neighbours), f64 under JAX's x64 mode. Class-score ties go to the lowest class
index.
"""
from __future__ import annotations

import collections
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mocosfl_jax import precision
from mocosfl_jax.algorithm.queue import l2_normalize

DEFAULT_K = 200
DEFAULT_T = 0.1


@jax.jit
def _normalize_bank(bank):
  return l2_normalize(bank.astype(precision.float_dtype()))


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "normalize"))
def _chunk_scores(queries, bank, bank_labels, t, *, num_classes: int, k: int, normalize: bool):
  """Class scores [Q, C] for one chunk of queries against the (already normalised) bank."""
  q = queries.astype(precision.float_dtype())
  if normalize:
    q = l2_normalize(q)
  sim = jnp.matmul(q, bank.T, precision=jax.lax.Precision.HIGHEST)  # [Q, N]
  top_sim, top_idx = jax.lax.top_k(sim, k)  # [Q, k]
  weights = jnp.exp(top_sim / t)
  labels = bank_labels[top_idx]  # [Q, k]
  return jnp.einsum("qk,qkc->qc", weights, jax.nn.one_hot(labels, num_classes, dtype=q.dtype),
                    precision=jax.lax.Precision.HIGHEST)


def _check_inputs(queries, bank, bank_labels, num_classes, k, t, chunk_size):
  if bank.ndim != 2 or queries.ndim != 2:
    raise ValueError(f"features must be 2-D [N, D]; got bank {bank.shape}, queries {queries.shape}")
  if bank.shape[1] != queries.shape[1]:
    raise ValueError(f"feature dims differ: bank D={bank.shape[1]}, queries D={queries.shape[1]}")
  if bank_labels.shape != (bank.shape[0],):
    raise ValueError(f"bank_labels shape {bank_labels.shape} must be ({bank.shape[0]},)")
  if bank.shape[0] == 0:
    raise ValueError("bank is empty")
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes}: must be >= 1")
  if k < 1:
    raise ValueError(f"k={k}: must be >= 1")
  if not t > 0:
    raise ValueError(f"t={t}: must be > 0")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
  labels = np.asarray(bank_labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"bank_labels must lie in [0, {num_classes}); got range "
                     f"[{labels.min()}, {labels.max()}]")


def knn_scores(queries, bank, bank_labels, num_classes: int, *, k: int = DEFAULT_K,
               t: float = DEFAULT_T, chunk_size: int = 256, normalize: bool = True) -> np.ndarray:
  """Weighted kNN class scores [Q, C] (sum of exp(sim/t) over the top-k neighbours per class).

  Args:
    queries: [Q, D] query features (test set). Numpy or jax.
    bank: [N, D] bank features (train set).
    bank_labels: [N] int labels in [0, num_classes).
    num_classes: number of classes C.
    k: neighbours (clamped to N). t: temperature.
    chunk_size: queries per jitted call; the last chunk is zero-padded to this size.
    normalize: L2-normalise both feature sets first (set False if already normalised).
  """
  queries, bank = jnp.asarray(queries), jnp.asarray(bank)
  bank_labels = jnp.asarray(bank_labels).astype(jnp.int32)
  _check_inputs(queries, bank, bank_labels, num_classes, k, t, chunk_size)
  k = min(k, bank.shape[0])
  bank = _normalize_bank(bank) if normalize else bank.astype(precision.float_dtype())
  n = queries.shape[0]
  chunk_size = min(chunk_size, max(n, 1))
  t = jnp.asarray(t, precision.float_dtype())
  out = []
  for start in range(0, n, chunk_size):
    chunk = queries[start:start + chunk_size]
    valid = chunk.shape[0]
    if valid < chunk_size:
      chunk = jnp.pad(chunk, ((0, chunk_size - valid), (0, 0)))
    scores = _chunk_scores(chunk, bank, bank_labels, t, num_classes=num_classes, k=k,
                           normalize=normalize)
    out.append(scores[:valid])
  if not out:
    return np.zeros((0, num_classes), precision.float_dtype())
  return np.asarray(jnp.concatenate(out))


def knn_predict(queries, bank, bank_labels, num_classes: int, **kwargs) -> np.ndarray:
  """Predicted labels [Q] (argmax of `knn_scores`; ties -> lowest class index)."""
  return np.argmax(knn_scores(queries, bank, bank_labels, num_classes, **kwargs), axis=-1)


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes: int, *,
                 k: int = DEFAULT_K, t: float = DEFAULT_T, chunk_size: int = 256,
                 normalize: bool = True) -> float:
  """Top-1 weighted-kNN accuracy in percent: bank = train features, queries = test (or val)."""
  query_labels = np.asarray(query_labels)
  if query_labels.shape != (np.shape(queries)[0],):
    raise ValueError(f"query_labels shape {query_labels.shape} must be ({np.shape(queries)[0]},)")
  if query_labels.size == 0:
    raise ValueError("no queries")
  pred = knn_predict(queries, bank, bank_labels, num_classes, k=k, t=t, chunk_size=chunk_size,
                     normalize=normalize)
  return float(100.0 * np.mean(pred == query_labels))


def extract_features(fn: Callable, images, batch_size: int = 256, *, args: Sequence = (),
                     max_in_flight: int = 2) -> np.ndarray:
  """Runs `fn(*args, batch)` over `images` in fixed-size, zero-padded batches; returns [N, ...].

  `images` may be uint8 (then `fn` should convert/normalise on device, which moves 4x fewer bytes)
  or float. `fn` is jitted here; pass model variables through `args` rather than closing over
  them, so they are jit arguments and not constants baked into (and recompiled with) the program.
  Batches are dispatched asynchronously, at most `max_in_flight` ahead of the host copy.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: must be >= 1")
  n = len(images)
  if n == 0:
    raise ValueError("images is empty")
  jfn = fn if hasattr(fn, "lower") else jax.jit(fn)
  batch_size = min(batch_size, n)
  pending: collections.deque = collections.deque()
  out = []
  xp = jnp if isinstance(images, jax.Array) else np  # device-resident data stays on device
  for start in range(0, n, batch_size):
    batch = xp.asarray(images[start:start + batch_size])
    valid = batch.shape[0]
    if valid < batch_size:
      pad = xp.zeros((batch_size - valid,) + batch.shape[1:], batch.dtype)
      batch = xp.concatenate([batch, pad])
    pending.append((jfn(*args, batch), valid))
    while len(pending) > max_in_flight:
      feats, v = pending.popleft()
      out.append(np.asarray(feats)[:v])
  while pending:
    feats, v = pending.popleft()
    out.append(np.asarray(feats)[:v])
  return np.concatenate(out)
