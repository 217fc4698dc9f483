"""The command-line convention shared by every `python -m mocosfl_jax.<command>`: absl flags.

Training (`mocosfl_jax.main`) takes an ml_collections config file with per-field overrides
(`--config configs/x.py --config.num_clients=5`), and those are absl flags; so every command of
the package uses absl flags, through `run`, and behaves the same way:

* flags are `--name value` or `--name=value`, booleans `--name` / `--noname`; `--help` lists the
  command's flags and `--helpfull` adds absl's own (`--verbosity`, `--log_dir`, `--flagfile`, ...);
* a bad flag or value, a stray positional argument, or an error the command reports (one of the
  exception types it passes as `errors`) prints one line, `error: <what>`, on stderr and exits
  with status 2 (or the exception's `exit_status`, e.g. 130 for an interrupted run); success
  exits with 0; `--debug` shows the traceback of a reported error instead (other exceptions are
  bugs and always show theirs);
* flags whose parsing runs user code (ml_collections' config files) may raise more than
  `flags.Error` while the command line is parsed; the command's `explain` turns those it
  recognises into the one-line message (the rest are bugs and propagate);
* run as a program, the command goes through `absl.app.run`, which logs at INFO through absl's
  handler. orbax logs every checkpoint file it writes at INFO, so its records below WARNING are
  dropped, and so is its warning that a directory is read only (evaluate and to_onnx open the
  checkpoints read-only on purpose); everything else the library logs (plan, compilation,
  resume) stays visible.

A command module provides `define_flags(flag_values, argv)` and a body `fn(args) -> int | None`,
and its `main(argv=None)` returns `run(define_flags, fn, argv)`. `args` holds the value of every
flag the command defined, under the flag's name with '-' replaced by '_'. Called with an explicit
`argv` list (tests, notebooks), the flags are parsed into a fresh `FlagValues` and the exit
status is returned, so several commands that share flag names can run in one process.

The device script `deploy/run_client.py` is the exception: it must run with numpy and
onnxruntime alone, so it keeps the standard library's argparse.
"""
from __future__ import annotations

import logging
import os
import sys
import types
from typing import Callable, Sequence

from absl import app, flags

Define = Callable[[flags.FlagValues, Sequence[str]], None]
Body = Callable[[types.SimpleNamespace], "int | None"]
Explain = Callable[[BaseException], "str | None"]
DEFAULT_ERRORS = (ValueError, FileNotFoundError)
USAGE_ERROR = 2


class _DropOrbaxInfo(logging.Filter):
  """Drops orbax's INFO/DEBUG records (orbax logs through absl's logger, one line per file) and
  its 'read only' warning for a checkpoint directory opened read-only on purpose."""

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    return (record.levelno >= logging.WARNING
            and not record.getMessage().startswith("Given directory is read only"))


def quiet_orbax() -> None:
  """Installs the orbax filter on absl's logger (idempotent)."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxInfo) for f in logger.filters):
    logger.addFilter(_DropOrbaxInfo())


def root_cause(e: BaseException) -> BaseException:
  """The innermost exception of `e`'s cause/context chain: wrappers (absl, ml_collections, orbax)
  re-raise with a generic message, and the first exception says what is wrong."""
  seen = {id(e)}
  while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
    e = inner
    seen.add(id(e))
  return e


def _error(message) -> None:
  print(f"error: {message}", file=sys.stderr)


def _namespace(flag_values: flags.FlagValues, names) -> types.SimpleNamespace:
  return types.SimpleNamespace(**{n.replace("-", "_"): flag_values[n].value for n in names})


def _call(body: Body, args, errors, debug: bool = False) -> int:
  try:
    status = body(args)
  except errors as e:  # pylint: disable=catching-non-exception  (a tuple of exception types)
    if debug:
      raise
    _error(e)
    return int(getattr(e, "exit_status", USAGE_ERROR))
  return 0 if status is None else int(status)


def _parse(flag_values: flags.FlagValues, argv, names, explain: Explain | None):
  """(rest of argv, flag namespace), or the one-line message of a bad command line."""
  try:
    rest = flag_values(argv)
    return rest, _namespace(flag_values, names), None
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless recognised)
    message = explain(e) if explain is not None else None
    if message is None and isinstance(e, flags.Error):
      message = str(e)
    if message is None or "--debug" in argv:
      raise
    return None, None, message


def run(define: Define, body: Body, argv: Sequence[str] | None = None, *,
        errors: tuple = DEFAULT_ERRORS, explain: Explain | None = None) -> int:
  """Parses the command line with absl flags and runs `body`; returns (or exits with) the status.

  Args:
    define: defines the command's flags on the `FlagValues` it is given; it also gets the full
      command line, for flags that read it while being defined (ml_collections' config flags).
    body: the command; gets the parsed flag values, returns an exit status (None means 0).
    argv: the arguments without the program name. None: `sys.argv`, run as a program through
      `absl.app.run` (absl logging set up, never returns). A list: parsed in-process into a fresh
      `FlagValues`; the status is returned.
    errors: exception types `body` raises for a user error; reported as one `error:` line, status 2
      (or the exception's `exit_status` attribute).
    explain: maps an exception raised while the command line is parsed to its one-line message,
      or None for a bug (which propagates); `flags.Error`s it returns None for keep their own.
  """
  if argv is None:
    _run_program(define, body, errors, explain)
  argv = [sys.argv[0] if sys.argv and sys.argv[0] else "mocosfl_jax", *map(str, argv)]
  flag_values = flags.FlagValues()
  define(flag_values, argv)
  names = list(flag_values)
  flags.DEFINE_bool("help", False, "Show the command's flags.", flag_values=flag_values)
  _define_debug(flag_values)
  rest, args, message = _parse(flag_values, argv, names, explain)
  if message is not None:
    _error(message)
    return USAGE_ERROR
  if flag_values.help:
    print(flag_values.get_help(include_special_flags=False))
    return 0
  if len(rest) > 1:
    _error(f"unexpected arguments {rest[1:]}; every argument is a --flag")
    return USAGE_ERROR
  return _call(body, args, errors, flag_values.debug)


def _define_debug(flag_values: flags.FlagValues) -> None:
  if "debug" not in flag_values:
    flags.DEFINE_bool("debug", False, "Show the traceback of a reported error instead of its "
                      "one-line message.", flag_values=flag_values)


def _run_program(define: Define, body: Body, errors, explain) -> None:
  names = []
  parsed = {}

  def parse(argv):
    before = set(flags.FLAGS)
    define(flags.FLAGS, argv)
    _define_debug(flags.FLAGS)
    names.extend(n for n in flags.FLAGS if n not in before)
    for name in names:  # --help lists them also when a wrapper script is the main module
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    rest, parsed["args"], message = _parse(flags.FLAGS, argv, names, explain)
    if message is not None:
      _error(message)
      sys.exit(USAGE_ERROR)
    return rest

  def main(rest):
    if len(rest) > 1:
      _error(f"unexpected arguments {rest[1:]}; every argument is a --flag")
      return USAGE_ERROR
    return _call(body, parsed["args"], errors, flags.FLAGS.debug)

  quiet_orbax()
  app.run(main, flags_parser=parse)
