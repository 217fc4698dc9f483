"""VGG-13, cut 2, 100 clients with auto_adjust; lr 0.03 IID, 0.02 non-IID 0.2 (reference scripts).

    python -m mocosfl_jax.main --config configs/vgg13.py:noniid=0.2 --workdir runs/vgg13

Paper figure: MocoSFL's VGG-13 rows (compare with the paper; docs/reference.md, 'Published
figures').
"""
from mocosfl_jax import config


def get_config(arg=None):
  a = config.parse_arg(arg, {"noniid": 1.0, "dataset": "cifar10"})
  c = config.get_config()
  c.arch, c.cut, c.dataset, c.noniid_ratio = "vgg13", 2, a["dataset"], a["noniid"]
  c.num_clients, c.auto_adjust = 100, True
  c.lr = 0.03 if a["noniid"] >= 1.0 else 0.02
  return c
