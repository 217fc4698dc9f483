"""TAResSFL phase 2, deployment: frozen clients warm-started from an expert run; the server trains.

    python -m mocosfl_jax.main --config configs/taressfl_deploy.py:expert=runs/expert,cut=1,noniid=0.2 \
        --workdir runs/taressfl_cut1_noniid --config.data_dir=~/tensorflow_datasets

The reference's scripts/table4 deployment (run_sflmoco.py --initialze_path EXPERT --load_server):
every client starts from the expert's client 0 and never trains (c_lr 0: no client backward, no
client optimizer, params bit-identical over the run), the server starts from the expert's server
and trains with lr 0.001; 100 clients with auto_adjust (B 1, a sync every 50 steps, 100k steps),
ResNet-18 with the C4S2 bottleneck, V2, CIFAR-10, non-IID 0.2 or IID, cut 1 or 2, seed 1234
(docs/reference.md, 'Warm start and frozen clients').

Arguments: expert DIR, DIR:STEP, DIR:best or DIR:latest (required: the expert run, of the same
model: ResNet-18, cut, bottleneck, V2, 32 px; configs/taressfl_expert.py trains one, and any run
of that model serves), cut 1|2, noniid 0.2|1.0, bottleneck C4S2 (the ablations: C2S2, C8S2,
C16S2), momentum copy|random (what the momentum nets start from: copies of the loaded nets, or
this run's random init as the reference), digits 0|1, seed.
Paper figure to expect: the deployment rows of MocoSFL's Table 4 (compare with the paper; the
reference repository holds no deployment logs). Needs a GPU and prepared CIFAR-10 (README).

digits=1: the offline quickstart's setting (mocosfl_jax/quickstart.py: 20 non-IID clients on
scikit-learn's digits, 16 px, width-16 ResNet-18, smallV2 head, 900 steps of 8 images per client)
with the C4S2 bottleneck, frozen clients and server lr 0.001, on a CPU. Its expert is
`configs/taressfl_expert.py:digits=1`, or any run of that model, e.g. the quickstart trained with
the bottleneck:

    python -m mocosfl_jax.main --config.bottleneck=C4S2 --workdir runs/digits_expert
    python -m mocosfl_jax.main --config configs/taressfl_deploy.py:expert=runs/digits_expert,digits=1 \
        --workdir runs/digits_deploy

Expected with that quickstart expert (test kNN 91.9%, linear probe 93.1% on the 360 test
digits): the deployment starts at the expert's kNN, 91.9% (every client holds the expert's
client 0, the server its server), and ends at about 93% test kNN, linear probe about 93.6%,
semi-supervised 10% / 1% labels about 90% / 54% (expert: 88.9% / 51.1%); the clients' params end
bit-identical to the expert's client 0. A CPU run, about as long as the quickstart.
"""
from mocosfl_jax import config, quickstart


def get_config(arg=None):
  a = config.parse_arg(arg, {"expert": "", "cut": 2, "noniid": 0.2, "bottleneck": "C4S2",
                             "momentum": "copy", "digits": 0, "seed": 1234})
  if not a["expert"]:
    raise ValueError("expert=DIR is required: the run whose client 0 and server the deployment "
                     "starts from, e.g. configs/taressfl_deploy.py:expert=runs/expert (DIR:STEP, "
                     "DIR:best or DIR:latest pick its checkpoint)")
  if a["digits"]:
    c = quickstart.get_config()
  else:
    c = config.get_config()
    c.dataset = "cifar10"
    c.num_clients = 100
    c.auto_adjust = True
    c.num_epochs = 200
  c.cut, c.noniid_ratio, c.bottleneck, c.seed = a["cut"], a["noniid"], a["bottleneck"], a["seed"]
  c.init_from = a["expert"]
  c.init_momentum = a["momentum"]
  c.c_lr = 0.0                      # frozen clients
  c.lr = 0.001
  return c
