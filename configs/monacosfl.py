"""MonAcoSFL (momentum-aligned sync, 2024) scripts: 5, 20 or 200 clients, deeper cuts, ResNet-18.

    python -m mocosfl_jax.main --config configs/monacosfl.py:clients=20,cut=5 --workdir runs/mona

Arguments: clients 5|20|200, cut 1..9, noniid (default 0.2), dataset cifar10|cifar100,
sync_momentum 1|0 (0 = the "plain MocoSFL" baseline of that repo, same two-view loss).
As the MonAcoSFL scripts (docs/reference.md, 'MonAcoSFL scripts'): lr 0.06, V2, two-view
symmetric loss, seed 1138; 5 clients use M's auto_adjust (B = 12 // 5 = 2, avg_freq 100);
20 clients B 20, 25% sampled, avg_freq 10; 200 clients auto_adjust (B 1, 50% sampled,
avg_freq 5). Paper figure to expect: MonAcoSFL's gains over MocoSFL grow with the cut
(MocoSFL degrades "catastrophically" at deep cuts, non-IID); the repos hold no numeric table, so
compare with the paper (ECML PKDD 2024).
"""
from mocosfl_jax import config


def get_config(arg=None):
  a = config.parse_arg(arg, {"clients": 20, "cut": 5, "noniid": 0.2, "dataset": "cifar10",
                  "sync_momentum": 1})
  c = config.get_config()
  c.dataset, c.cut, c.noniid_ratio = a["dataset"], a["cut"], a["noniid"]
  c.num_clients = a["clients"]
  c.loss_form = "two_view"
  c.momentum_sync = bool(a["sync_momentum"])
  c.lr = 0.06
  c.num_epochs = 200
  c.seed = 1138
  c.final_protocols = "knn,linear"   # MonAcoSFL ends without the semi-supervised probes
  if a["clients"] == 20:
    c.batch_size, c.sample_ratio, c.avg_freq = 20, 0.25, 10
  else:
    c.auto_adjust, c.flavour = True, "monacosfl"
    c.batch_size = 12             # M's default, divided by N by its auto_adjust
  return c
