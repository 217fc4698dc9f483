"""Client split: reference sizes, disjointness, Dirichlet skew, determinism, summary files."""
import json

import numpy as np
import pytest

from mocosfl_jax.data.partition import partition
from mocosfl_jax.data.partition import partition_summary
from mocosfl_jax.data.partition import write_partition_summary


def cifar_like_labels(n=50000, k=10, seed=0):
  return np.random.default_rng(seed).permutation(np.repeat(np.arange(k), n // k))


def assert_disjoint(parts, n):
  flat = np.concatenate(parts)
  assert len(np.unique(flat)) == len(flat), "a sample was given to two clients"
  assert flat.min() >= 0 and flat.max() < n


def test_reference_noniid_1000_clients():
  labels = cifar_like_labels()
  parts = partition(labels, 1000, method="auto", noniid_ratio=0.2, seed=0)
  assert len(parts) == 1000
  assert {len(p) for p in parts} == {50}  # 2000 shards of 25, 2 per client
  assert_disjoint(parts, len(labels))
  assert max(len(np.unique(labels[p])) for p in parts) <= 2


def test_reference_noniid_100_clients_can_repeat_a_class():
  labels = cifar_like_labels()
  parts = partition(labels, 100, method="shards", noniid_ratio=0.2, seed=1)
  assert {len(p) for p in parts} == {500}
  classes = [len(np.unique(labels[p])) for p in parts]
  # 200 pure shards of 250 (20 per class): the reference's "2 classes" is an upper bound.
  assert max(classes) == 2 and min(classes) == 1
  for p in parts:
    counts = np.bincount(labels[p], minlength=10)
    assert np.all(counts % 250 == 0)


def test_iid_blocks_and_proportion():
  labels = cifar_like_labels(1000)
  parts = partition(labels, 7, method="iid", seed=0)
  assert [len(p) for p in parts] == [1000 // 7] * 7
  assert_disjoint(parts, 1000)
  half = partition(labels, 7, method="iid", data_proportion=0.5, seed=0)
  assert [len(p) for p in half] == [500 // 7] * 7
  assert_disjoint(half, 1000)
  # The subset is a random permutation even for p = 1 (blocks are not 0..142).
  assert not np.array_equal(parts[0], np.arange(len(parts[0])))
  single = partition(labels, 1, seed=3)
  assert sorted(single[0].tolist()) == list(range(1000))


def test_dirichlet_follows_alpha():
  labels = cifar_like_labels(10000)
  skewed = partition(labels, 10, method="dirichlet", alpha=0.05, seed=0)
  uniform = partition(labels, 10, method="dirichlet", alpha=1000.0, seed=0)
  for parts in (skewed, uniform):
    assert_disjoint(parts, len(labels))
    assert sum(len(p) for p in parts) == len(labels)  # every sample assigned
  s_sum = partition_summary(skewed, labels, 10)
  u_sum = partition_summary(uniform, labels, 10)
  assert s_sum["classes_per_client_mean"] < 5
  assert u_sum["classes_per_client"] == [10] * 10
  frac = np.asarray(u_sum["class_counts"]) / np.asarray(u_sum["sizes"])[:, None]
  np.testing.assert_allclose(frac, 0.1, atol=0.03)
  # Skewed clients are dominated by few classes.
  s_frac = np.asarray(s_sum["class_counts"]) / np.maximum(np.asarray(s_sum["sizes"])[:, None], 1)
  assert np.mean(s_frac.max(1)) > 0.5


def test_deterministic_for_a_seed():
  labels = cifar_like_labels(5000)
  for method in ("iid", "shards", "dirichlet"):
    a = partition(labels, 20, method=method, noniid_ratio=0.2, seed=5)
    b = partition(labels, 20, method=method, noniid_ratio=0.2, seed=5)
    c = partition(labels, 20, method=method, noniid_ratio=0.2, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="random"), "method"),
    (dict(method="shards", noniid_ratio=0.05), "noniid_ratio"),
    (dict(noniid_ratio=0.0), "noniid_ratio"),
    (dict(data_proportion=1.5), "data_proportion"),
    (dict(method="dirichlet", alpha=0.0), "alpha"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    partition(cifar_like_labels(1000), 10, seed=0, **kwargs)


def test_too_many_clients():
  with pytest.raises(ValueError, match="num_clients"):
    partition(np.zeros(5, np.int32), 10, method="iid", seed=0)
  with pytest.raises(ValueError, match="shards"):
    partition(cifar_like_labels(100), 60, method="shards", noniid_ratio=0.2, seed=0)


def test_summary_files(tmp_path):
  labels = cifar_like_labels()
  parts = partition(labels, 1000, noniid_ratio=0.2, seed=0)
  summary = partition_summary(parts, labels, 10)
  assert summary["sizes"] == [50] * 1000 and summary["unassigned"] == 0
  assert np.asarray(summary["class_counts"]).sum() == 50000
  json_path, png_path = write_partition_summary(summary, tmp_path / "run")
  with open(json_path) as f:
    loaded = json.load(f)
  assert loaded["classes_per_client"] == summary["classes_per_client"]
  with open(png_path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
