"""FL-MoCo, the federated MoCo baseline (every client trains the whole network), on the offline
quickstart's setting: the MocoSFL paper's comparison in miniature.

    python -m mocosfl_jax.main --config configs/flmoco.py --workdir runs/flmoco
    python -m mocosfl_jax.main --workdir runs/quickstart          # MocoSFL, the same setting

Same 20 non-IID clients, data, batch (8 per client and step), steps (900), augmentation and
model as the quickstart (mocosfl_jax/quickstart.py); every client keeps its own queue of
queue_size keys and FedAvg averages the whole online networks once per round. Argument
`local_epochs` (default 1: a round is one pass, so FedAvg comes every 9 steps as the
quickstart's; the reference's FL-MoCo default is 5, a round of 45 steps: pass
`configs/flmoco.py:local_epochs=5,num_epochs=20` to keep 900 steps). Expected (README.md, 'FL-MoCo against MocoSFL'): test
kNN 49.7% at the last step, 83.1% at its highest (step 100), against the quickstart's 95.3%:
every client trains the whole network on 8 images per step against a queue of its own two
classes; with IID clients (noniid_ratio=1.0) 75.0% (highest 86.7%).

The reference's own FL-MoCo setting (CIFAR-10, batch 128 per client, 5 local epochs, 200
rounds): `--config.dataset=cifar10 --config.image_size=-1 --config.width=64 --config.head=V2
--config.batch_size=128 --config.queue_size=6000 --config.local_epochs=5 --config.num_epochs=200
--config.num_clients=5 --config.noniid_ratio=1.0 --config.crop_min_scale=0.08`.
"""
from mocosfl_jax import config
from mocosfl_jax.quickstart import get_config as quickstart


def get_config(arg=None):
  a = config.parse_arg(arg, {"local_epochs": 1, "num_epochs": 100})
  c = quickstart()
  c.method = "flmoco"
  c.local_epochs = a["local_epochs"]
  c.num_epochs = a["num_epochs"]
  return c
