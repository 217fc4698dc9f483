"""The offline quickstart run: the config `python -m mocosfl_jax.main` uses when --config is absent.

20 non-IID clients on scikit-learn's digits (bundled with scikit-learn, so no download): a narrow
ResNet-18 (width 16) at 16x16 px, cut 2, MocoSFL's original symmetric loss, 2 label shards per
client (the reference's non-IID 0.2), 900 steps (100 epochs of 9), kNN every 100 steps, and
the linear and semi-supervised probes at the end; small enough for a laptop CPU. It lives in the
package so an installed copy finds it without a checkout or a search of the filesystem;
configs/quickstart.py re-exports it, so `--config configs/quickstart.py` is the same run. README.md
gives its expected accuracy and run time.
"""
from mocosfl_jax import config


def get_config():
  c = config.get_config()
  c.dataset = "digits"
  c.image_size = 16
  c.arch = "resnet18"
  c.width = 16
  c.cut = 2
  c.head = "smallV2"
  c.num_clients = 20
  c.noniid_ratio = 0.2
  c.batch_size = 8
  c.queue_size = 1024
  c.crop_min_scale = 0.35         # the reference's 0.08 crops 8x8 digits down to a few pixels
  c.lr = 0.06
  c.num_epochs = 100
  c.avg_freq = 1
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  c.knn_k = 20
  c.seed = 0
  return c
