"""Every paper config, with every argument it takes, runs the reference's schedule by default.

The reference's scripts give each setting a number of steps per epoch S, a sync period and a
total step count (docs/reference.md, 'Step-count invariant of the provided configurations');
they follow from the 50 000 CIFAR training images, which all go to the clients. The configs are
resolved here against a stand-in CIFAR training split of that size
(`sources.cifar_stand_in`: balanced labels, images that take no memory), so the whole schedule is
checked without the dataset.
"""
import itertools

import pytest

from mocosfl_jax import experiment
from mocosfl_jax.algorithm import plan
from mocosfl_jax.data import sources

from core_testlib import load_config as _config_module


@pytest.fixture(autouse=True)
def cifar_stand_in(monkeypatch):
  monkeypatch.setattr(sources, "load", sources.cifar_stand_in)


def _sync_period(step):
  syncs = [b for b in range(step.steps_per_epoch)
           if plan.is_sync_step(b, step.steps_per_epoch, step.avg_freq)]
  return syncs[0] + 1


# (config, argument string) -> the reference's (S, sync period, total steps, P x B, E).
MOCOSFL = {5: (500, 50, 100_000, 100, 200), 20: (125, 12, 100_000, 100, 800),
           100: (500, 50, 100_000, 100, 200), 200: (250, 50, 100_000, 100, 400),
           1000: (50, 50, 100_000, 100, 2000)}
MONACOSFL = {5: (5000, 50, 1_000_000, 10, 200), 20: (125, 12, 100_000, 100, 800),
             200: (250, 50, 100_000, 100, 400)}
# CIFAR-100 non-IID 0.2: the reference's shards (c = 20 per client, int(50000 / (N c)) images each)
# leave images out at 200 and 1000 clients: 240 and 40 per client instead of 250 and 50, so S,
# the sync period and the total shrink in the reference too.
CIFAR100_NONIID = {200: (240, 48, 96_000, 100, 400), 1000: (40, 40, 80_000, 100, 2000)}
CASES = []
for clients, cut, noniid, dataset in itertools.product((5, 20), (1, 2), (1.0, 0.2),
                                                       ("cifar10", "cifar100")):
  CASES.append(("mocosfl_table2", f"clients={clients},cut={cut},noniid={noniid},"
                f"dataset={dataset}", MOCOSFL[clients]))
for clients, cut, noniid, dataset in itertools.product((100, 200, 1000), (1, 2), (1.0, 0.2),
                                                       ("cifar10", "cifar100")):
  CASES.append(("mocosfl_table3", f"clients={clients},cut={cut},noniid={noniid},"
                f"dataset={dataset}", MOCOSFL[clients]))
for clients, cut, dataset in itertools.product((5, 20, 200), (1, 5, 9), ("cifar10", "cifar100")):
  for sync in (1, 0):
    CASES.append(("monacosfl", f"clients={clients},cut={cut},dataset={dataset},"
                  f"sync_momentum={sync}", MONACOSFL[clients]))
# TAResSFL's expert: one client, S = the CIFAR-100 loader's 391 batches of 128, one sync per
# epoch (FedAvg of one client), 256 rows per step with target images (dp > 0), else 128.
for cut, dp in itertools.product((1, 2, 3), (0.0, 0.005, 0.01)):
  CASES.append(("taressfl_expert", f"cut={cut},dp={dp}", (391, 391, 78_200, 256 if dp else 128,
                                                          200)))
for arg in ("alpha=1.0,ssim=0.5", "alpha=4.0"):
  CASES.append(("taressfl_expert", arg, (391, 391, 78_200, 256, 200)))
for cut, noniid in itertools.product((1, 2), (1.0, 0.2)):
  CASES.append(("taressfl_deploy", f"expert=runs/expert,cut={cut},noniid={noniid}",
                MOCOSFL[100]))
for noniid in (1.0, 0.2):
  CASES.append(("vgg13", f"noniid={noniid}", MOCOSFL[100]))
  CASES.append(("mobilenetv2", f"paper=mocosfl,noniid={noniid}", MOCOSFL[100]))
  CASES.append(("mobilenetv2", f"paper=monacosfl,noniid={noniid}", MONACOSFL[20]))


@pytest.mark.parametrize("name,arg,expect", CASES, ids=[f"{n}:{a}" for n, a, _ in CASES])
def test_paper_config_runs_the_reference_schedule(name, arg, expect):
  config = _config_module(name).get_config(arg)
  exp = experiment.resolve(config)
  step = exp.step
  if config.dataset == "cifar100" and config.noniid_ratio < 1:
    expect = CIFAR100_NONIID.get(config.num_clients, expect)
  got = (step.steps_per_epoch, _sync_period(step), exp.num_steps,
         step.pool_size * step.batch_size, step.num_epochs)
  assert got == expect
  assert exp.val is None and len(exp.train) == 50_000            # every image can train
  assert exp.eval_every == step.steps_per_epoch                    # kNN once per epoch
  assert "linear" in exp.config.final_protocols


def test_validation_hold_out_is_opt_in_and_changes_the_schedule():
  config = _config_module("mocosfl_table2").get_config("clients=5")
  config.val_fraction = 0.1
  exp = experiment.resolve(config)
  assert len(exp.val) == 5000 and exp.step.steps_per_epoch == 450 and exp.num_steps == 90_000
