"""Trains a run: `python -m mocosfl_jax.main [--config FILE[:ARGS]] [--config.F=V] [--workdir DIR]`.

Kept short on purpose (as flax's examples): flags in, `train.train_and_evaluate` out. Without
--config it runs the offline quickstart, whose config ships with the package
(mocosfl_jax/quickstart.py), into runs/quickstart. --config takes any config file by path
(configs/*.py, anything after ':' goes to its get_config), and each --config.FIELD=VALUE
overrides one field of whichever config is used. A --workdir that holds checkpoints is resumed.
The flags follow the package's command-line convention (mocosfl_jax/cli.py).
"""
import json
import os

from absl import flags
from ml_collections import config_flags

from mocosfl_jax import cli, quickstart
from mocosfl_jax.data import sources
from mocosfl_jax.run import workdir_lock

DEFAULT_CONFIG = quickstart.__file__
DEFAULT_WORKDIR = "runs/quickstart"


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Run config file (default: the "
                                  "packaged quickstart).", flag_values=flag_values,
                                  lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string("workdir", DEFAULT_WORKDIR, "Run directory (resumes if it holds "
                      "checkpoints).", flag_values=flag_values)


def train(args) -> int:
  from mocosfl_jax.run import train as train_lib  # pylint: disable=g-import-not-at-top  (--help stays fast)
  results = train_lib.train_and_evaluate(args.config, args.workdir)
  print(json.dumps(results, indent=1))
  line = f"final test kNN accuracy: {results['last']['test_knn_accuracy']:.2f}% (last step)"
  if "best" in results:
    line += (f", {results['best']['test_knn_accuracy']:.2f}% (selected on validation, step "
             f"{results['best']['step']})")
  print(f"{line}; run directory: {os.path.abspath(args.workdir)}")
  return 0


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  # User errors: bad config values, missing or unprepared data, a busy workdir, a diverged run
  # (train.NonFiniteLossError is a FloatingPointError). --debug shows their tracebacks.
  return cli.run(define_flags, train, argv,
                 errors=(ValueError, FileNotFoundError, sources.DatasetNotPreparedError,
                         FloatingPointError, workdir_lock.WorkdirLockedError))


if __name__ == "__main__":
  main()
