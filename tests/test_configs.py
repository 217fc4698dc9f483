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


def _load(path):
  spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_config_file_is_valid(path):
  module = _load(path)
  assert module.__doc__ and "python -m mocosfl_jax.main" in module.__doc__
  config = module.get_config()
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
