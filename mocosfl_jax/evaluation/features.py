"""Features of a trained split network for evaluation, and the kNN monitor on them.

Features come from client 0's online slice + the server's online nets (the reference's choice;
right after a sync every client holds the same model). The kNN monitor uses the L2-normalised
projection output; the linear and semi-supervised probes use the pooled backbone features
before the head.
"""
from typing import Mapping

import jax

from mocosfl_jax import precision
from mocosfl_jax.data import sources
from mocosfl_jax.evaluation import knn


def _normalise(images, mean, std):
  return (images.astype(precision.float_dtype()) / 255.0 - mean) / std


def embed_fn(net, mean, std):
  """Jitted (client vars, server vars, uint8 images) -> L2-normalised projections."""

  @jax.jit
  def fn(client_vars, server_vars, images):
    smashed, _ = net.apply_client(client_vars, _normalise(images, mean, std))
    proj, _ = net.apply_server(server_vars, smashed)
    return knn.l2_normalize(proj)

  return fn


def features_fn(net, mean, std):
  """Jitted (client vars, server vars, uint8 images) -> pooled backbone features (no head)."""

  @jax.jit
  def fn(client_vars, server_vars, images):
    smashed, _ = net.apply_client(client_vars, _normalise(images, mean, std))
    return net.server_features(server_vars, smashed)

  return fn


def client0(clients):
  """Client 0's online variables (no client axis)."""
  return jax.tree.map(lambda a: a[0], clients.online)


def knn_accuracies(fn, clients, server, bank: sources.ArrayDataset,
                   queries: Mapping[str, sources.ArrayDataset], *, k: int, t: float,
                   batch_size: int) -> dict[str, float]:
  """Top-1 kNN accuracy (%) of each query set against `bank`, features by `fn`.

  Only labelled rows take part: unlabelled bank rows (STL-10's unlabelled part) have no class to
  vote for and unlabelled query rows none to be scored against, so neither is embedded. The bank
  is embedded once for all query sets.
  """
  args = (client0(clients), server.online)
  keep = bank.labels >= 0
  bank_images = bank.images if keep.all() else bank.images[keep]
  bank_f = knn.extract_features(fn, bank_images, batch_size, args=args)
  out = {}
  for name, query in queries.items():
    scored = query.labels >= 0
    images = query.images if scored.all() else query.images[scored]
    query_f = knn.extract_features(fn, images, batch_size, args=args)
    out[name] = knn.knn_accuracy(bank_f, bank.labels[keep], query_f, query.labels[scored],
                                 bank.num_classes, k=min(k, int(keep.sum())), t=t)
  return out


def knn_accuracy(fn, clients, server, bank: sources.ArrayDataset, query: sources.ArrayDataset,
                 *, k: int, t: float, batch_size: int) -> float:
  """Top-1 kNN accuracy (%) of `query` against the labelled rows of `bank` (`knn_accuracies`)."""
  return knn_accuracies(fn, clients, server, bank, {"query": query}, k=k, t=t,
                        batch_size=batch_size)["query"]
