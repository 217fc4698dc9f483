"""experiment.resolve: the settings a config reaches, and the ones it refuses by name.

Unlabelled data (STL-10's train+unlabelled), the auto_adjust rules and their switches, and
settings that would otherwise be ignored without a word.
"""
import numpy as np
import pytest

from mocosfl_jax import experiment
from mocosfl_jax.data import sources

from core_testlib import load_config

tiny = load_config("tiny")


def _stl_like(name, split, data_dir=None, image_size=None):
  """An STL-10-shaped stand-in at 8 px: the train split is 10% labelled, 90% unlabelled."""
  del name, data_dir, image_size
  rng = np.random.default_rng(0 if split == "train" else 1)
  n = 400 if split == "train" else 60
  labels = rng.integers(0, 10, n).astype(np.int32)
  if split == "train":
    labels[40:] = -1
  images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
  return sources.ArrayDataset(images, labels, 10, np.full(3, 0.5), np.full(3, 0.25), 8, "stl10")


def test_unlabelled_training_data_works_with_the_default_partition(monkeypatch):
  monkeypatch.setattr(sources, "load", _stl_like)
  config = tiny.get_config()
  config.dataset = "stl10"
  config.val_fraction = 0.25
  exp = experiment.resolve(config)                  # partition='auto' (iid): no error
  assert exp.config.partition == "auto"
  # Validation draws from the labelled rows only: every row can be scored by kNN.
  assert len(exp.val) == 10 and (exp.val.labels >= 0).all()
  assert len(exp.train) == 390 and (exp.train.labels == -1).sum() == 360


def test_unlabelled_training_data_cannot_be_split_by_label(monkeypatch):
  monkeypatch.setattr(sources, "load", _stl_like)
  config = tiny.get_config()
  config.dataset, config.noniid_ratio = "stl10", 0.2
  with pytest.raises(ValueError, match=r"config.partition='auto': stl10's training split has "
                     r"unlabelled rows"):
    experiment.resolve(config)


def _adjusted(**fields):
  config = tiny.get_config()
  config.num_steps = -1
  for k, v in fields.items():
    config[k] = v
  return experiment.resolve(config).step


def _labelled(name, split, data_dir=None, image_size=None):
  """2 400 labelled 8 px images: two per client for 1 200 clients."""
  del name, data_dir, image_size
  n = 2400 if split == "train" else 40
  rng = np.random.default_rng(0)
  return sources.ArrayDataset(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                              (np.arange(n) % 10).astype(np.int32), 10, np.full(3, 0.5),
                              np.full(3, 0.25), 8, "synthetic")


def test_auto_adjust_keeps_the_users_avg_freq_above_1000_clients(monkeypatch):
  # MocoSFL's auto_adjust sets avg_freq only for N <= 1000; above, the user's value stays.
  monkeypatch.setattr(sources, "load", _labelled)
  step = _adjusted(num_clients=1200, auto_adjust=True, avg_freq=2, queue_size=4096)
  assert (step.batch_size, step.pool_size, step.steps_per_epoch, step.avg_freq) == (1, 100, 2, 2)
  step = _adjusted(num_clients=1000, auto_adjust=True, avg_freq=2, queue_size=4096)
  assert step.avg_freq == 1                                  # 1000 // (B N)


def test_monacosfl_auto_adjust_switch_is_reachable():
  base = dict(num_clients=60, auto_adjust=True, flavour="monacosfl", batch_size=120,
              queue_size=4096)
  assert _adjusted(**base).batch_size == 1                   # N > 50: B = 1
  assert _adjusted(**base, adjust_batch_for_large_clients=False).batch_size == 2   # B // N


@pytest.mark.parametrize("fields,match", [
    (dict(flavour="monacosfl"), r"config.flavour='monacosfl': .* no effect without "
                                r"config.auto_adjust=True"),
    (dict(adjust_batch_for_large_clients=False), r"config.adjust_batch_for_large_clients=False"),
    (dict(auto_adjust=True, sample_ratio=0.5), r"config.sample_ratio=0.5: auto_adjust sets"),
    (dict(partition="iid", noniid_ratio=0.2), r"config.noniid_ratio=0.2: only partition="),
    (dict(dirichlet_alpha=0.1), r"config.dirichlet_alpha=0.1: only partition='dirichlet'"),
    (dict(num_steps=-5), r"config.num_steps=-5: must be >= 1, or -1"),
    (dict(num_steps=0), r"config.num_steps=0: must be >= 1, or -1"),
    (dict(eval_every_steps=0), r"config.eval_every_steps=0"),
    (dict(log_every_steps=0), r"config.log_every_steps=0: must be an int >= 1"),
    (dict(checkpoint_every_steps=-1), r"config.checkpoint_every_steps=-1"),
    (dict(keep_checkpoints=0), r"config.keep_checkpoints=0"),
    (dict(knn_k=0), r"config.knn_k=0"),
    (dict(knn_t=0.0), r"config.knn_t=0.0: must be > 0"),
    (dict(eval_batch_size=0), r"config.eval_batch_size=0"),
    (dict(partition="random"), r"config.partition='random': valid"),
    (dict(data_proportion=0.0), r"config.data_proportion=0.0"),
    (dict(image_size=0), r"config.image_size=0"),
])
def test_meaningless_or_contradictory_settings_are_refused_by_name(fields, match):
  config = tiny.get_config()
  for k, v in fields.items():
    config[k] = v
  with pytest.raises(ValueError, match=match):
    experiment.check_fields(config)
