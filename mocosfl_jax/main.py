"""Trains a run: `python -m mocosfl_jax.main [--config FILE[:ARGS]] [--config.F=V] [--workdir DIR]`.

Kept short on purpose (as flax's examples): flags in, `train.train_and_evaluate` out. Without
--config it runs the offline quickstart, whose config ships with the package
(mocosfl_jax/quickstart.py), into runs/quickstart. --config takes any config file by path
(configs/*.py, anything after ':' goes to its get_config), and each --config.FIELD=VALUE
overrides one field of whichever config is used. A --workdir that holds checkpoints is resumed.
The flags follow the package's command-line convention (mocosfl_jax/cli.py). A run stopped by
Ctrl-C (status 130) or by a file it cannot write (a full disk, a read-only directory; status 1)
ends with one line naming the checkpoint that the same command resumes from.
"""
import json
import os
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from mocosfl_jax import cli, config as config_lib, hugepages, quickstart
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


INTERRUPTED = 130   # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)
WRITE_FAILED = 1


class RunStoppedError(RuntimeError):
  """A run stopped by Ctrl-C or by a file it could not write (a full disk, a read-only directory).

  Training leaves nothing a resume trips on (checkpoints and JSON files are written whole or not
  at all, a cut metrics line is dropped on resume), so the message names the checkpoint the same
  command resumes from.
  """

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status


def resume_hint(workdir) -> str:
  """What rerunning the command does: resume from the latest complete checkpoint (or, if that one
  turns out damaged, the newest intact one before it), or start over."""
  from mocosfl_jax.run import checkpoints  # pylint: disable=g-import-not-at-top  (fast --help)
  ckpt_dir = Path(workdir).expanduser().absolute() / "checkpoints"
  step = checkpoints.latest_step(ckpt_dir)
  if step is None:
    return "no checkpoint was written; the same command starts the run again"
  return (f"the latest complete checkpoint is step {step} in {ckpt_dir}; the same command "
          "resumes from it")


def explain_config_error(e: BaseException) -> str | None:
  """One line for a bad --config file, config argument or --config.FIELD override; else None.

  ml_collections loads the config file and applies the overrides while absl parses the command
  line, and reports a missing field as KeyError/AttributeError, a missing file as OSError and an
  error inside get_config as a message holding the whole traceback.
  """
  root = cli.root_cause(e)
  text = str(e)
  if isinstance(root, (KeyError, AttributeError)):
    field = str(root.args[0] if root.args else root).strip("'\"")
    valid = ", ".join(sorted(config_lib.get_config().keys()))
    return f"config.{field}: unknown config field; valid: {valid}"
  if isinstance(root, OSError) and "Failed loading config file" in str(root):
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    tried = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("Attempted")]
    return (f"--config {' or '.join(tried) or '?'}: cannot load the config file "
            f"({lines[-1]}); pass the path of a config file, e.g. configs/tiny.py")
  if "Error whilst parsing config file" in text:
    value = text.split(": Error whilst", 1)[0].replace("flag --config=", "", 1)
    path, _, arg = value.partition(":")
    if isinstance(root, TypeError) and "get_config() takes 0 positional" in str(root):
      return f"--config {value}: {path} takes no config argument; drop ':{arg}'"
    what = str(root) if isinstance(root, ValueError) else f"{type(root).__name__}: {root}"
    return f"--config {value}: {what}"
  return None


def train(args) -> int:
  from mocosfl_jax.run import train as train_lib  # pylint: disable=g-import-not-at-top  (--help stays fast)
  try:
    args.config.keys()   # a config file that failed to load raises only when first used
  except OSError as e:
    raise ValueError(explain_config_error(e) or str(e)) from None
  if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    raise ValueError(f"--workdir {args.workdir} is a file, not a directory; pass a run "
                     "directory (a new one starts a run, an existing one resumes it)")
  try:
    results = train_lib.train_and_evaluate(args.config, args.workdir)
  except KeyboardInterrupt as e:   # chained: --debug shows where the run stopped
    raise RunStoppedError(f"interrupted; {resume_hint(args.workdir)}", INTERRUPTED) from e
  except OSError as e:
    if isinstance(e, FileNotFoundError):   # missing data or config: reported as it is
      raise
    where = e.filename or args.workdir
    raise RunStoppedError(f"{where}: {e.strerror or e}; {resume_hint(args.workdir)}",
                          WRITE_FAILED) from e
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
  # (train.NonFiniteLossError is a FloatingPointError), a run stopped by Ctrl-C or a failed
  # write (RunStoppedError, status 130 or 1). --debug shows their tracebacks.
  if argv is None:                 # as a program: 2 MiB pages for XLA's temporaries (once)
    hugepages.reexec_with_huge_pages()
  return cli.run(define_flags, train, argv,
                 errors=(ValueError, FileNotFoundError, sources.DatasetNotPreparedError,
                         FloatingPointError, workdir_lock.WorkdirLockedError,
                         RunStoppedError),
                 explain=explain_config_error)


if __name__ == "__main__":
  main()
