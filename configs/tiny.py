"""A few steps of a tiny network on synthetic data: for tests and smoke checks (seconds on a CPU).

    python -m mocosfl_jax.main --config configs/tiny.py --workdir /tmp/tiny

Expected: finishes in well under a minute on 2 CPU cores; kNN accuracy is not meaningful.
"""
from mocosfl_jax import config


def get_config():
  c = config.get_config()
  c.dataset = "synthetic"
  c.image_size = 8
  c.arch = "resnet_tiny"
  c.width = 4
  c.cut = 2
  c.head = "V1"
  c.num_clients = 4
  c.batch_size = 2
  c.queue_size = 64
  c.num_epochs = 2
  c.num_steps = 6
  c.avg_freq = 2
  c.log_every_steps = 2
  c.eval_every_steps = 6
  c.checkpoint_every_steps = 3
  c.eval_batch_size = 64
  c.knn_k = 10
  c.final_protocols = "knn"
  c.seed = 0
  return c
