"""Entry point: `python -m mocosfl_jax.main [--config configs/NAME.py] [--workdir DIR]`.

Kept short on purpose (as flax's examples): flags in, `train.train_and_evaluate` out. With no
arguments it runs the offline quickstart (configs/quickstart.py) into runs/quickstart.
"""
import json
import os
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

def _default_config() -> str:
  """configs/quickstart.py of the checkout (cwd first, then next to the package)."""
  for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
    if (root / "configs" / "quickstart.py").exists():
      return str(root / "configs" / "quickstart.py")
  return "configs/quickstart.py"  # config_flags then reports the missing file by name


_DEFAULT_CONFIG = _default_config()
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Run config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Run directory (resumes if it "
                               "holds checkpoints).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # after flags, so --help stays fast
  from mocosfl_jax import parallel
  from mocosfl_jax.run import train
  # Multi-host: jax.distributed must start before anything touches the backend (jax.devices).
  parallel.maybe_initialize_distributed(_CONFIG.value.get("distributed", None) or None)
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(results, indent=1))
  print(f"final test kNN accuracy: {results['last']['test_knn_accuracy']:.2f}% (last), "
        f"{results['best']['test_knn_accuracy']:.2f}% (selected on validation, step "
        f"{results['best']['step']}); run directory: {os.path.abspath(_WORKDIR.value)}")


def run():
  # orbax logs every checkpoint write at INFO; progress and results are printed instead.
  logging.set_verbosity(logging.WARNING)
  app.run(main)


if __name__ == "__main__":
  run()
