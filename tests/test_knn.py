"""Tests for mocosfl_jax.evaluation.knn against a brute-force numpy kNN monitor."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.benchmarks.compiles import count_compiles
from mocosfl_jax.evaluation import knn

N, Q, D, C = 300, 70, 8, 5


def _brute_force_scores(queries, bank, labels, num_classes, k, t):
  """The reference knn_predict, written with numpy in float64."""
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  sim = q.astype(np.float64) @ b.astype(np.float64).T
  scores = np.zeros((len(q), num_classes))
  for i in range(len(q)):
    top = np.argsort(-sim[i])[:k]
    np.add.at(scores[i], labels[top], np.exp(sim[i, top] / t))
  return scores


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(C, D))
  bank_y = rng.integers(0, C, N)
  q_y = rng.integers(0, C, Q)
  bank = (centers[bank_y] + 0.8 * rng.normal(size=(N, D))).astype(np.float32)
  queries = (centers[q_y] + 0.8 * rng.normal(size=(Q, D))).astype(np.float32)
  return bank, bank_y, queries, q_y


def test_matches_brute_force(data):
  bank, bank_y, queries, q_y = data
  k, t = 20, 0.1
  scores = knn.knn_scores(queries, bank, bank_y, C, k=k, t=t, chunk_size=32)
  expected = _brute_force_scores(queries, bank, bank_y, C, k, t)
  np.testing.assert_allclose(scores, expected, rtol=1e-4)
  acc = knn.knn_accuracy(bank, bank_y, queries, q_y, C, k=k, t=t, chunk_size=32)
  assert acc == pytest.approx(100 * np.mean(expected.argmax(1) == q_y))
  assert 40 < acc < 100  # informative data, not trivially separable


def test_chunked_equals_unchunked_and_no_recompile(data):
  bank, bank_y, queries, _ = data
  scores_fn = knn._chunk_scores  # pylint: disable=protected-access  (the jitted chunk scorer)
  with count_compiles(scores_fn) as first:
    chunked = knn.knn_scores(queries, bank, bank_y, C, k=10, chunk_size=16)  # 5 chunks, last padded
  assert first.count <= 1  # one shape for all chunks, padded tail included
  with count_compiles(scores_fn) as second:
    knn.knn_scores(queries[:37], bank, bank_y, C, k=10, chunk_size=16)  # another padded tail
  assert second.count == 0
  whole = knn.knn_scores(queries, bank, bank_y, C, k=10, chunk_size=Q)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6)
  chex.assert_shape(chunked, (Q, C))


def test_default_k_clamped_to_bank_and_scale_invariant(data):
  bank, bank_y, queries, _ = data
  small = bank[:50]
  scores = knn.knn_scores(queries, small, bank_y[:50], C)  # k=200 > 50 bank entries
  np.testing.assert_allclose(scores, _brute_force_scores(queries, small, bank_y[:50], C, 50, 0.1),
                             rtol=1e-4)
  np.testing.assert_array_equal(knn.knn_predict(7.0 * queries, bank, bank_y, C, k=20),
                                knn.knn_predict(queries, bank, bank_y, C, k=20))


def test_bad_inputs_raise(data):
  bank, bank_y, queries, q_y = data
  with pytest.raises(ValueError, match="bank_labels must lie"):
    knn.knn_scores(queries, bank, bank_y + C, C)
  with pytest.raises(ValueError, match="feature dims"):
    knn.knn_scores(queries[:, :3], bank, bank_y, C)
  with pytest.raises(ValueError, match="query_labels shape"):
    knn.knn_accuracy(bank, bank_y, queries, q_y[:3], C)


def test_extract_features_pads_uint8_batches_without_retracing():
  images = np.random.default_rng(0).integers(0, 256, size=(23, 4, 4, 3), dtype=np.uint8)
  traces = []

  def feature_fn(scale, x):
    traces.append(x.shape)
    return (x.astype(jnp.float32) / 255.0).reshape(x.shape[0], -1) * scale

  feats = knn.extract_features(feature_fn, images, batch_size=8, args=(jnp.float32(2.0),))
  chex.assert_shape(feats, (23, 48))
  np.testing.assert_allclose(feats, images.reshape(23, -1) / 255.0 * 2.0, rtol=1e-6)
  assert traces == [(8, 4, 4, 3)]  # 3 batches (last one padded), one trace
  on_device = knn.extract_features(feature_fn, jnp.asarray(images), batch_size=8,
                                   args=(jnp.float32(2.0),))
  np.testing.assert_allclose(on_device, feats)


def test_extract_features_with_knn_end_to_end(data):
  bank, bank_y, queries, q_y = data
  identity = jax.jit(lambda x: x)
  b = knn.extract_features(identity, bank, batch_size=64)
  q = knn.extract_features(identity, queries, batch_size=64)
  np.testing.assert_array_equal(b, bank)
  assert knn.knn_accuracy(b, bank_y, q, q_y, C, k=20) == knn.knn_accuracy(bank, bank_y, queries,
                                                                          q_y, C, k=20)


def test_unlabelled_rows_are_neither_votes_nor_misses():
  """STL-10 style data: unlabelled bank rows do not vote, unlabelled query rows are not scored."""
  import types
  from mocosfl_jax.data import sources
  from mocosfl_jax.evaluation import features

  rng = np.random.default_rng(0)
  centres = rng.integers(0, 256, (3, 1, 1, 3))

  def dataset(n, unlabelled):
    labels = (np.arange(n) % 3).astype(np.int32)
    images = np.clip(centres[labels] + rng.integers(-20, 20, (n, 4, 4, 3)), 0, 255)
    labels[:unlabelled] = -1
    return sources.ArrayDataset(images.astype(np.uint8), labels, 3, np.zeros(3), np.ones(3), 4,
                                "synthetic")

  def fn(client_vars, server_vars, images):
    del client_vars, server_vars
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) - 128.0
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)

  clients = types.SimpleNamespace(online={"w": np.zeros((1, 1))})
  server = types.SimpleNamespace(online={})
  bank, query = dataset(60, unlabelled=30), dataset(30, unlabelled=20)
  accs = features.knn_accuracies(fn, clients, server, bank, {"q": query, "all": dataset(30, 0)},
                                 k=5, t=0.1, batch_size=16)
  assert accs["q"] == 100.0 and accs["all"] == 100.0     # misses would give 33.3%
