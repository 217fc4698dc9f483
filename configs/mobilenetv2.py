"""MobileNetV2 settings: MocoSFL (100 clients, cut 2, lr 0.03) or MonAcoSFL (20 clients).

    python -m mocosfl_jax.main --config configs/mobilenetv2.py:paper=mocosfl,noniid=0.2 --workdir runs/mbv2

MocoSFL: N 100, auto_adjust, cut 2, lr 0.03, non-IID 1.0 or 0.2 (its scripts). MonAcoSFL: N 20,
B 20, 25% sampled, avg_freq 10, original (two-term) symmetric loss, momentum sync (its
mobilenet_20_clients script). Paper figure: the MobileNetV2 rows of the respective papers.
Settings: docs/reference.md, 'Paper settings' and 'MonAcoSFL scripts'.
"""
from mocosfl_jax import config


def get_config(arg=None):
  a = config.parse_arg(arg, {"paper": "mocosfl", "noniid": 0.2, "cut": 2, "dataset": "cifar10"})
  c = config.get_config()
  c.arch, c.dataset, c.cut, c.noniid_ratio = "mobilenetv2", a["dataset"], a["cut"], a["noniid"]
  if a["paper"] == "mocosfl":
    c.num_clients, c.auto_adjust, c.lr = 100, True, 0.03
  elif a["paper"] == "monacosfl":
    c.num_clients, c.batch_size, c.sample_ratio, c.avg_freq = 20, 20, 0.25, 10
    c.momentum_sync, c.lr, c.seed = True, 0.06, 1138
    c.final_protocols = "knn,linear"   # MonAcoSFL ends without the semi-supervised probes
  else:
    raise ValueError(f"paper={a['paper']!r}; valid: mocosfl, monacosfl")
  return c
