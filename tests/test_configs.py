"""Every config file loads by path (as the entry point does) and passes validation."""
import importlib.util
from pathlib import Path

import pytest

from mocosfl_jax import config
from mocosfl_jax.algorithm import plan
from mocosfl_jax import experiment
from mocosfl_jax.models import SplitConfig, build

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if p.name != "__init__.py")
# Configs that cannot run without an argument (a run to start from) get one here.
REQUIRED_ARGS = {"taressfl_deploy": "expert=runs/expert"}


def _load(path):
  spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_config_file_is_valid(path):
  module = _load(path)
  assert module.__doc__ and "python -m mocosfl_jax.main" in module.__doc__
  arg = REQUIRED_ARGS.get(path.stem)
  config = module.get_config(arg) if arg else module.get_config()
  experiment.check_fields(config)
  build(SplitConfig(arch=config.arch, cut=config.cut, width=config.width, head=config.head,
                    bottleneck=config.bottleneck,
                    input_size=32 if config.image_size == -1 else config.image_size))
  if config.auto_adjust:
    adj = plan.auto_adjust(config.num_clients, config.flavour, batch_size=config.batch_size)
    assert adj["batch_size"] >= 1


def test_paper_settings_follow_the_reference():
  t3 = _load(CONFIG_DIR / "mocosfl_table3.py").get_config("clients=1000,cut=2")
  adj = plan.auto_adjust(t3.num_clients, t3.flavour)
  assert (adj["batch_size"], adj["avg_freq"], adj["sample_ratio"], adj["num_epochs"]) == (
      1, 1, 0.1, 2000)
  mona = _load(CONFIG_DIR / "monacosfl.py").get_config("clients=5,cut=7")
  assert mona.loss_form == "two_view" and mona.momentum_sync and mona.cut == 7
  assert plan.auto_adjust(5, "monacosfl", batch_size=mona.batch_size)["batch_size"] == 2


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match=r"config argument 'clinets' is unknown; valid"):
    config.parse_arg("clinets=5", {"clients": 5})


def test_taressfl_deployment_follows_the_reference_and_needs_its_expert():
  module = _load(CONFIG_DIR / "taressfl_deploy.py")
  with pytest.raises(ValueError, match=r"expert=DIR is required: the run whose client 0 and "
                     r"server the deployment starts from"):
    module.get_config()
  c = module.get_config("expert=runs/e:best,cut=1,noniid=1.0,momentum=random")
  assert (c.init_from, c.init_momentum, c.cut, c.noniid_ratio) == ("runs/e:best", "random", 1,
                                                                   1.0)
  assert (c.c_lr, c.lr, c.num_clients, c.auto_adjust, c.bottleneck, c.arch, c.head,
          c.dataset, c.seed) == (0.0, 0.001, 100, True, "C4S2", "resnet18", "V2", "cifar10", 1234)
  # The offline variant is the quickstart's model with the bottleneck, so a quickstart run
  # trained with --config.bottleneck=C4S2 is an expert it accepts (init_from.MODEL_FIELDS).
  digits = module.get_config("expert=runs/e,digits=1")
  expert = _load(CONFIG_DIR / "quickstart.py").get_config()
  expert.bottleneck = "C4S2"
  fields = ("arch", "cut", "bottleneck", "width", "ws", "c_residual", "head", "image_size",
            "dataset")
  assert [digits[f] for f in fields] == [expert[f] for f in fields]
  assert (digits.c_lr, digits.lr, digits.num_clients) == (0.0, 0.001, 20)
