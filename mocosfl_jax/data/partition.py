"""Client data split: data_proportion subset, then IID blocks, label shards or Dirichlet.

The reference's rules are in docs/reference.md, 'Client partitions'; Dirichlet is our addition.

All randomness comes from one `np.random.default_rng(seed)`, so a seed fixes the split on every
machine. The reference draws from torch's and numpy's *global* RNGs instead, so the same seed does not
reproduce the reference's exact assignment; the distributions (block sizes, shards per client,
shard sizes, without-replacement draws) are the same.
"""
from __future__ import annotations

import json
import os

import numpy as np

METHODS = ("iid", "shards", "dirichlet", "auto")


def _subset(n: int, data_proportion: float, rng: np.random.Generator) -> np.ndarray:
  """Random subset of int(p*n) indices; the permutation is taken even for p = 1 (as the reference)."""
  if not 0.0 <= data_proportion <= 1.0:
    raise ValueError(f"data_proportion must be in [0, 1], got {data_proportion}")
  return rng.permutation(n)[:int(data_proportion * n)]


def _iid(subset: np.ndarray, num_clients: int) -> list[np.ndarray]:
  block = len(subset) // num_clients
  if block == 0 and len(subset):
    raise ValueError(f"num_clients={num_clients} exceeds the {len(subset)} samples (iid)")
  return [subset[i * block:(i + 1) * block] for i in range(num_clients)]


def _shards(subset, labels, num_clients, num_classes, noniid_ratio, rng) -> list[np.ndarray]:
  """Reference non-IID: c = int(ratio*K) label-sorted shards of size int(n/(N*c)) per client."""
  c = int(noniid_ratio * num_classes)
  if c < 1:
    raise ValueError(f"noniid_ratio={noniid_ratio} gives int(ratio*num_classes)={c} shards per "
                     "client; need >= 1")
  num_shards = c * num_clients
  size = len(subset) // num_shards
  if size == 0:
    raise ValueError(f"{len(subset)} samples cannot fill {num_shards} shards "
                     f"(num_clients={num_clients}, {c} shards each)")
  # Stable sort (the reference's quicksort is unstable, irrelevant since subset is already permuted).
  by_label = subset[np.argsort(labels[subset], kind="stable")]
  shards = by_label[:num_shards * size].reshape(num_shards, size)
  remaining = np.arange(num_shards)
  parts = []
  for _ in range(num_clients):  # client order, c distinct shards each, without replacement
    pick = rng.choice(len(remaining), c, replace=False)
    parts.append(shards[remaining[pick]].reshape(-1))
    remaining = np.delete(remaining, pick)
  return parts


def _hetero_iid(subset: np.ndarray, num_clients: int, rich: int, rich_data: float):
  """The reference's hetero IID split: the first int(d*n) samples of the permuted subset are
  split evenly over the `rich` clients, the rest over the poor ones (block i of the poor ones:
  [v + i*(n-v)//(N-R), v + (i+1)*(n-v)//(N-R)), so poor blocks may differ by one sample)."""
  n = len(subset)
  volume = int(rich_data * n)
  per_rich = volume // rich
  if per_rich == 0 or (n - volume) // (num_clients - rich) == 0:
    raise ValueError(f"hetero: {n} samples leave a rich client {per_rich} and a poor client "
                     f"{(n - volume) // (num_clients - rich)} samples (iid); need >= 1 each")
  parts = [subset[i * per_rich:(i + 1) * per_rich] for i in range(rich)]
  poor = num_clients - rich
  for i in range(poor):
    parts.append(subset[volume + i * (n - volume) // poor:volume + (i + 1) * (n - volume) // poor])
  return parts


def _hetero_shards(subset, labels, num_clients, num_classes, noniid_ratio, rich, poor_data, rng):
  """The reference's hetero non-IID split: shards 1/e times more numerous (e times smaller);
  `rich` clients draw int((1-e)/e) groups of c shards each, poor clients one group, in client
  order (a rich client's groups are drawn one after the other)."""
  c = int(noniid_ratio * num_classes)
  if c < 1:
    raise ValueError(f"noniid_ratio={noniid_ratio} gives int(ratio*num_classes)={c} shards per "
                     "client; need >= 1")
  groups = int((1 - poor_data) / poor_data)  # the reference's expression (e = 0.2 -> 4)
  if groups < 1:
    raise ValueError(f"hetero: e={poor_data} gives int((1-e)/e)={groups} shard groups per rich "
                     "client; need e <= 0.5")
  num_shards = int(c * num_clients / poor_data)
  size = int(len(subset) / num_clients / c * poor_data)
  draws = rich * groups + num_clients - rich          # the reference's "virtual" clients
  if size == 0 or draws * c > num_shards:
    raise ValueError(f"hetero: {len(subset)} samples in {num_shards} shards of {size} cannot "
                     f"give {rich} rich clients {groups} groups and the other "
                     f"{num_clients - rich} one group of {c} shards; lower num_clients, raise "
                     "data_proportion or change the hetero string")
  by_label = subset[np.argsort(labels[subset], kind="stable")]
  shards = by_label[:num_shards * size].reshape(num_shards, size)
  remaining = np.arange(num_shards)
  owned = [[] for _ in range(num_clients)]
  for v in range(draws):
    pick = rng.choice(len(remaining), c, replace=False)
    owner = v // groups if v < rich * groups else v - rich * groups + rich
    owned[owner].append(shards[remaining[pick]].reshape(-1))
    remaining = np.delete(remaining, pick)
  return [np.concatenate(p) for p in owned]


def _dirichlet(subset, labels, num_clients, num_classes, alpha, min_samples, rng,
               max_tries=1000) -> list[np.ndarray]:
  """Per-class label skew: class k is split over clients by proportions ~ Dir(alpha * 1_N).

  Resampled (whole allocation) until every client has >= min_samples, as common FL code does.
  """
  if alpha <= 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  sub_labels = labels[subset]
  for _ in range(max_tries):
    parts = [[] for _ in range(num_clients)]
    for k in range(num_classes):
      members = subset[sub_labels == k]
      if not len(members):
        continue
      props = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(props)[:-1] * len(members)).astype(np.int64)
      for client, chunk in enumerate(np.split(members, cuts)):
        parts[client].append(chunk)
    parts = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
    if min(len(p) for p in parts) >= min_samples:
      return parts
  raise ValueError(f"dirichlet alpha={alpha}: no split in {max_tries} tries gave every one of "
                   f"{num_clients} clients >= {min_samples} samples; raise alpha or lower min_samples")


def resolve_method(method: str, noniid_ratio: float) -> str:
  """The method 'auto' stands for: 'iid' if noniid_ratio == 1 else 'shards' (the reference)."""
  if method == "auto":
    return "iid" if noniid_ratio == 1.0 else "shards"
  return method


def partition(labels, num_clients: int, *, method: str = "auto", noniid_ratio: float = 1.0,
              alpha: float = 0.5, data_proportion: float = 1.0, seed: int = 0,
              num_classes: int | None = None, min_samples: int = 1,
              hetero: tuple | None = None) -> list[np.ndarray]:
  """Splits sample indices over clients.

  Args:
    labels: int [n] labels of the whole training split (-1 rows are treated as class -1 by 'iid' and
      rejected by 'shards'/'dirichlet').
    num_clients: N >= 1.
    method: 'iid' (contiguous blocks of floor(n/N) of the permuted subset), 'shards' (reference
      non-IID), 'dirichlet' (per-class Dir(alpha) skew), 'auto' (iid if noniid_ratio == 1 else shards,
      the reference's rule).
    noniid_ratio: fraction of classes per client for 'shards' (c = int(ratio * num_classes)).
    alpha: Dirichlet concentration (small -> few classes per client, large -> near uniform).
    data_proportion: fraction of the training set used at all (seeded permutation, taken even for 1).
    seed: numpy Generator seed.
    num_classes: defaults to labels.max() + 1.
    min_samples: 'dirichlet' only; resample until every client has at least this many.
    hetero: None, or (rich clients R, rich data share d, e = 1 - d): the reference's rich / poor
      split (clients 0..R-1 rich) for 'iid' (d of the subset to the rich) and 'shards' (shards
      e times smaller, int((1-e)/e) groups per rich client); algorithm/hetero.py.

  Returns:
    N int64 arrays of global sample indices; disjoint; leftovers (n mod N, shard remainders) unused.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if method not in METHODS:
    raise ValueError(f"method={method!r} is not one of {METHODS}")
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f"num_clients must be a positive int, got {num_clients!r}")
  if not 0.0 < noniid_ratio <= 1.0:
    raise ValueError(f"noniid_ratio must be in (0, 1], got {noniid_ratio}")
  method = resolve_method(method, noniid_ratio)
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if labels.size else 0
  rng = np.random.default_rng(seed)
  subset = _subset(len(labels), data_proportion, rng)
  if hetero is not None:
    rich, rich_data, poor_data = hetero
    if not 1 <= rich < num_clients:
      raise ValueError(f"hetero: {rich} rich clients of {num_clients}; need 1 <= R < N")
    if method == "dirichlet":
      raise ValueError("hetero has the reference's iid and shards splits only, not dirichlet")
    if method == "iid":
      return _hetero_iid(subset, num_clients, rich, rich_data)
    if labels[subset].min() < 0:
      raise ValueError(f"method={method!r} needs labels >= 0 (unlabelled rows found)")
    return _hetero_shards(subset, labels, num_clients, num_classes, noniid_ratio, rich,
                          poor_data, rng)
  if method == "iid" or not len(subset):
    return _iid(subset, num_clients)
  if labels[subset].min() < 0:
    raise ValueError(f"method={method!r} needs labels >= 0 (unlabelled rows found)")
  if method == "shards":
    return _shards(subset, labels, num_clients, num_classes, noniid_ratio, rng)
  return _dirichlet(subset, labels, num_clients, num_classes, alpha, min_samples, rng)


def partition_summary(parts, labels, num_classes: int) -> dict:
  """Sizes, client x class count matrix and classes per client (JSON-serialisable)."""
  labels = np.asarray(labels)
  counts = np.zeros((len(parts), num_classes), np.int64)
  for i, part in enumerate(parts):
    lab = labels[np.asarray(part, np.int64)]
    lab = lab[lab >= 0]
    counts[i] = np.bincount(lab, minlength=num_classes)[:num_classes]
  sizes = np.array([len(p) for p in parts], np.int64)
  classes = (counts > 0).sum(1)
  return {
      "num_clients": len(parts),
      "num_classes": int(num_classes),
      "total_assigned": int(sizes.sum()),
      "unassigned": int(len(labels) - sizes.sum()),
      "sizes": sizes.tolist(),
      "size_min": int(sizes.min()) if len(sizes) else 0,
      "size_max": int(sizes.max()) if len(sizes) else 0,
      "size_mean": float(sizes.mean()) if len(sizes) else 0.0,
      "classes_per_client": classes.tolist(),
      "classes_per_client_mean": float(classes.mean()) if len(classes) else 0.0,
      "class_counts": counts.tolist(),
  }


def _heatmap_rows(counts: np.ndarray, max_rows: int):
  """Rows to draw: clients sorted by dominant class then size; > max_rows are summed in groups."""
  order = np.lexsort((-counts.sum(1), counts.argmax(1)))
  rows = counts[order].astype(np.float64)
  if len(rows) <= max_rows:
    return rows, "client (sorted by dominant class)"
  groups = np.array_split(rows, max_rows)
  per = int(np.ceil(len(rows) / max_rows))
  return np.stack([g.sum(0) for g in groups]), f"group of ~{per} clients (sorted by dominant class)"


def write_partition_summary(summary: dict, run_dir, max_rows: int = 100) -> tuple[str, str]:
  """Writes run_dir/partition.json and run_dir/partition.png (class-fraction heat map)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(run_dir, exist_ok=True)
  json_path = os.path.join(run_dir, "partition.json")
  with open(json_path, "w") as f:
    json.dump(summary, f)
  counts = np.asarray(summary["class_counts"], np.float64).reshape(
      summary["num_clients"], summary["num_classes"])
  rows, ylabel = _heatmap_rows(counts, max_rows)
  frac = rows / np.maximum(rows.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(min(12, 2 + 0.12 * frac.shape[1]) + 2,
                                  min(10, 2 + 0.08 * frac.shape[0])))
  im = ax.imshow(frac, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
  ax.set_xlabel("class")
  ax.set_ylabel(ylabel)
  ax.set_title(f"{summary['num_clients']} clients, {summary['size_min']}-{summary['size_max']} "
               f"samples, {summary['classes_per_client_mean']:.2f} classes/client")
  fig.colorbar(im, ax=ax, label="fraction of the row's samples")
  png_path = os.path.join(run_dir, "partition.png")
  fig.savefig(png_path, dpi=80, bbox_inches="tight")
  plt.close(fig)
  return json_path, png_path
