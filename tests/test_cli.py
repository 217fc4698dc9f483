"""The package's one command-line convention (mocosfl_jax.cli) and main's packaged default config."""
import logging
from pathlib import Path

import pytest
from absl import flags

import mocosfl_jax
from mocosfl_jax import cli, main, quickstart

from core_testlib import CONFIG_DIR, load_config


def _define(flag_values, argv):
  del argv
  flags.DEFINE_string("workdir", None, "Run directory.", flag_values=flag_values, required=True)
  flags.DEFINE_integer("batch-size", 1, "Batch.", flag_values=flag_values)
  flags.DEFINE_bool("no-verify", False, "Skip the check.", flag_values=flag_values)


def _record(seen):
  return lambda args: seen.update(vars(args))


def test_flag_values_reach_the_command_under_underscored_names():
  seen = {}
  assert cli.run(_define, _record(seen), ["--workdir", "w", "--batch-size=3", "--no-verify"]) == 0
  assert seen == {"workdir": "w", "batch_size": 3, "no_verify": True}
  seen.clear()  # a second command with the same flag names, in the same process, from defaults
  assert cli.run(_define, _record(seen), ["--workdir", "v"]) == 0
  assert seen == {"workdir": "v", "batch_size": 1, "no_verify": False}


@pytest.mark.parametrize("argv,needle", [
    (["--workdir", "w", "--batch-size", "x"], "flag --batch-size=x"),
    ([], "--workdir"),
    (["--workdir", "w", "stray"], "unexpected arguments ['stray']"),
    (["--workdir", "w", "--bogus"], "Unknown command line flag 'bogus'"),
])
def test_bad_command_lines_are_one_error_line_and_status_2(capsys, argv, needle):
  assert cli.run(_define, _record({}), argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


def test_declared_errors_are_one_line_others_propagate(capsys):
  def fail(args):
    raise ValueError(f"{args.workdir} is not a run directory")
  assert cli.run(_define, fail, ["--workdir", "w"]) == 2
  assert capsys.readouterr().err == "error: w is not a run directory\n"

  def crash(args):
    raise KeyError(args.workdir)
  with pytest.raises(KeyError):
    cli.run(_define, crash, ["--workdir", "w"])


def test_main_defaults_to_the_packaged_quickstart(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ folder here: nothing to find on the filesystem
  seen = {}
  assert cli.run(main.define_flags, _record(seen), ["--config.num_steps=3"]) == 0
  expected = quickstart.get_config()
  expected.num_steps = 3
  assert seen["config"].to_dict() == expected.to_dict()
  assert seen["workdir"] == main.DEFAULT_WORKDIR
  assert load_config("quickstart").get_config().to_dict() == quickstart.get_config().to_dict()


def test_main_takes_a_config_file_by_path_with_arguments_and_overrides():
  seen = {}
  argv = ["--config", f"{CONFIG_DIR / 'mocosfl_table3.py'}:clients=200", "--config.seed=7",
          "--workdir", "w"]
  assert cli.run(main.define_flags, _record(seen), argv) == 0
  assert (seen["config"].num_clients, seen["config"].seed, seen["workdir"]) == (200, 7, "w")


def test_orbax_info_is_dropped_and_everything_else_kept():
  keep = cli._DropOrbaxInfo().filter  # pylint: disable=protected-access
  record = lambda level, path: logging.LogRecord("absl", level, path, 1, "msg", None, None)
  orbax_file = str(Path("site-packages", "orbax", "checkpoint", "checkpoint_manager.py").absolute())
  assert not keep(record(logging.INFO, orbax_file))
  assert keep(record(logging.WARNING, orbax_file))
  assert keep(record(logging.INFO, str(Path(mocosfl_jax.__file__).parent / "run" / "train.py")))


def test_one_cli_style_and_no_path_hacks_in_the_package():
  """Only the device script keeps argparse (it must run without the package); nothing edits
  sys.path."""
  package = Path(mocosfl_jax.__file__).parent
  sources = {str(p.relative_to(package)): p.read_text() for p in package.rglob("*.py")}
  assert [name for name, text in sources.items() if "import argparse" in text] == [
      str(Path("deploy", "run_client.py"))]
  assert not [name for name, text in sources.items() if "sys.path" in text]
