"""MocoSFL Table 2 (cross-silo): 5 or 20 clients, ResNet-18, V2, lr 0.06 (reference scripts/table2).

    python -m mocosfl_jax.main --config configs/mocosfl_table2.py:clients=5,cut=1,noniid=0.2,dataset=cifar10 \
        --workdir runs/t2_5c_cut1_noniid --config.data_dir=~/tensorflow_datasets

Arguments (comma list after ':'): clients 5|20, cut 1|2, noniid 1.0|0.2, dataset cifar10|cifar100.
5 clients use the reference's auto_adjust (B 20, avg_freq 10, 200 epochs); 20 clients use B 20,
25% sampled per epoch, avg_freq 10 (E becomes 800). As in the reference, every training image
goes to the clients: 500 or 125 steps per epoch, a sync every 50 or 12 steps, 100k steps of 100
images, kNN on the test set every epoch, linear and semi-supervised probes at the end, nothing
selected on test (docs/reference.md, 'Step-count invariant of the provided configurations').
Paper figure to expect: the matching row of MocoSFL's Table 2 (ICLR 2023), linear probe on
CIFAR; the reference repository holds no per-row numbers, so compare against the paper. Needs a
GPU. Prepare CIFAR first (README).
"""
from mocosfl_jax import config


def get_config(arg=None):
  a = config.parse_arg(arg, {"clients": 5, "cut": 1, "noniid": 1.0, "dataset": "cifar10"})
  c = config.get_config()
  c.dataset, c.cut, c.noniid_ratio = a["dataset"], a["cut"], a["noniid"]
  c.num_clients = a["clients"]
  c.lr = 0.06
  c.num_epochs = 200
  if a["clients"] <= 5:
    c.auto_adjust = True          # B = 100 // N = 20, avg_freq = 1000 // (B N) = 10
  else:
    c.batch_size, c.sample_ratio, c.avg_freq = 20, 0.25, 10
  return c
