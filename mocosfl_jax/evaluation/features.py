"""Features of a trained split network for evaluation, and the kNN monitor on them.

Features come from client 0's online slice + the server's online nets (the reference's choice;
right after a sync every client holds the same model). The kNN monitor uses the L2-normalised
projection output; the linear and semi-supervised probes use the pooled backbone features
before the head.
"""
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


def knn_accuracy(fn, clients, server, bank: sources.ArrayDataset, query: sources.ArrayDataset,
                 *, k: int, t: float, batch_size: int) -> float:
  """Top-1 kNN accuracy (%) of `query` against the labelled rows of `bank`, features by `fn`."""
  args = (client0(clients), server.online)
  bank_f = knn.extract_features(fn, bank.images, batch_size, args=args)
  query_f = knn.extract_features(fn, query.images, batch_size, args=args)
  keep = bank.labels >= 0
  return knn.knn_accuracy(bank_f[keep], bank.labels[keep], query_f, query.labels,
                          bank.num_classes, k=min(k, int(keep.sum())), t=t)
