"""The bad-input catalogue: every command refuses a user error cleanly and writes nothing.

Each case runs one command on a bad command line and checks what a user sees and what is left on
disk: a non-zero exit status (2 for a refused input), no traceback on stderr, one `error:` line
that names the offending field, flag or file, and a finished run directory and an exported model
that are byte-identical afterwards (sha256 of every file, checkpoints included).

Commands run in-process through their `main(argv)` (an import costs seconds); `prepare`'s
refusals are `sys.exit(message)`, which the interpreter prints on stderr with status 1, so the
in-process runner does the same. A few cases run a real process, for the paths that only a
program takes (absl's `app.run`, the device script's argparse).
"""
import dataclasses
import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mocosfl_jax import costs, evaluate, main
from mocosfl_jax.data import prepare
from mocosfl_jax.deploy import quantize, run_client, to_onnx
from mocosfl_jax.run import train

from core_testlib import CONFIG_DIR, PACKAGE_PARENT, load_config

COMMANDS = {"main": main, "evaluate": evaluate, "to_onnx": to_onnx, "costs": costs,
            "run_client": run_client, "quantize": quantize, "prepare": prepare}
TINY = "{configs}/tiny.py"


@dataclasses.dataclass(frozen=True)
class Case:
  command: str
  argv: tuple        # '{run}', '{model}', '{tmp}', '{configs}' are filled in
  needle: str        # what stderr must name (the field, flag or file)
  status: int = 2
  max_lines: int = 2  # non-empty stderr lines

  @property
  def id(self):
    return f"{self.command}:{' '.join(self.argv)}"


def _main(*args, needle, status=2):
  """A training command line on the finished tiny run's directory (resuming it, were it valid)."""
  return Case("main", ("--config", TINY, "--workdir", "{run}", *args), needle, status)


def _field(field, value, needle=None, *extra):
  return _main(f"--config.{field}={value}", *extra, needle=needle or f"config.{field}=")


CASES = [
    # ---- main: unknown fields, bad values (each refused before anything is written) ----
    _main("--config.bogus=1", needle="bogus"),
    _main("--config.num_clients=abc", needle="num_clients"),
    _field("dataset", "mnist"),
    _field("cut", 9),
    _field("arch", "resnet99", "arch"),
    _field("num_clients", 0),
    _field("batch_size", 0),
    _field("batch_size", 100, "config.batch_size=100"),
    _field("val_fraction", 1.0),
    _field("partition", "random"),
    _field("noniid_ratio", 0.0),
    _field("noniid_ratio", 0.5, None, "--config.partition=iid"),
    _field("dirichlet_alpha", 0.1),
    _field("data_proportion", 0.0),
    _field("augmentation", "simclr"),
    _field("crop_min_scale", 0.0),
    _field("flavour", "monacosfl"),
    _field("flavour", "simclr", None, "--config.auto_adjust=True"),
    _field("sample_ratio", 1.5),
    _field("sample_ratio", 0.5, None, "--config.auto_adjust=True"),
    _field("final_protocols", "knn,svm"),
    _field("num_steps", 0),
    _field("eval_every_steps", 0),
    _field("image_size", 0),
    _field("log_every_steps", 0),
    _field("checkpoint_every_steps", 0),
    _field("keep_checkpoints", 0),
    _field("knn_k", 0),
    _field("knn_t", 0.0),
    _field("eval_batch_size", 0),
    _field("conv_impl", "fft"),
    _field("client_parallel", "pmap"),
    _field("client_chunk", -2),
    _field("queue_size", 8, "queue_size=8"),
    _field("loss_form", "triplet", "loss_form"),
    _field("lr_schedule", "linear", "lr_schedule"),
    _field("client_schedule", "never", "client_schedule"),
    _field("head", "V9", "head"),
    _field("bottleneck", "X1", "bottleneck"),
    _field("lr", -0.1, "lr"),
    _field("temperature", 0.0, "temperature"),
    _field("tau", 1.5, "tau"),
    _field("avg_freq", 0, "avg_freq"),
    # ---- main: config files, data, workdir, resume ----
    Case("main", ("--config", TINY + ":x=1", "--workdir", "{run}"), "tiny.py"),
    Case("main", ("--config", "{configs}/mocosfl_table3.py:bogus=1", "--workdir",
                  "{run}"), "bogus"),
    Case("main", ("--config", "{tmp}/no_such_config.py", "--workdir", "{run}"),
         "no_such_config.py"),
    Case("main", ("--config", TINY, "--workdir", "{run}/config.json"), "config.json"),
    # The one refusal allowed three lines: it gives the archive and the prepare command to run.
    Case("main", ("--config", TINY, "--workdir", "{run}", "--config.dataset=cifar10",
                  "--config.data_dir={tmp}/empty"), "cifar10", max_lines=3),
    _main("--config.lr=0.5", needle="lr: 0.06 -> 0.5"),
    _main("stray", needle="stray"),
    # ---- evaluate ----
    Case("evaluate", ("--workdir", "{tmp}/empty"), "empty"),
    Case("evaluate", ("--workdir", "{tmp}/no_such_run"), "no_such_run"),
    Case("evaluate", ("--workdir", "{run}/config.json"), "config.json"),
    Case("evaluate", ("--workdir", "{run}", "--checkpoint", "99"), "99"),
    Case("evaluate", ("--workdir", "{run}", "--checkpoint", "newest"), "newest"),
    Case("evaluate", ("--workdir", "{run}", "--protocol", "knn,svm"), "svm"),
    Case("evaluate", ("--workdir", "{run}", "--recipe", "fancy"), "fancy"),
    Case("evaluate", ("--workdir", "{run}", "--protocol", "linear", "--epochs", "0"), "epochs"),
    Case("evaluate", ("--checkpoint", "latest"), "--workdir"),
    # ---- to_onnx (--out inside the run directory: a refusal must not write it) ----
    Case("to_onnx", ("--workdir", "{run}", "--out", "{run}/x.onnx", "--client", "9"), "client"),
    Case("to_onnx", ("--workdir", "{run}", "--out", "{run}/x.onnx", "--client", "first"),
         "client"),
    Case("to_onnx", ("--workdir", "{run}", "--out", "{run}/x.onnx", "--checkpoint", "99"), "99"),
    Case("to_onnx", ("--workdir", "{run}", "--out", "{run}/x.onnx", "--checkpoint", "newest"),
         "newest"),
    Case("to_onnx", ("--workdir", "{run}", "--out", "{run}/x.onnx", "--copy", "target"),
         "copy"),
    Case("to_onnx", ("--workdir", "{run}", "--out", "{run}/x.onnx", "--layout", "NHCW"),
         "layout"),
    Case("to_onnx", ("--workdir", "{run}", "--out", "{run}/x.onnx", "--opset", "11"), "opset"),
    Case("to_onnx", ("--workdir", "{run}", "--out", "{run}/x.onnx", "--cut", "3"), "--cut"),
    Case("to_onnx", ("--workdir", "{run}", "--out", "{run}/x.onnx", "--batch-size", "0"),
         "batch"),
    Case("to_onnx", ("--workdir", "{run}", "--out", "{run}/x.onnx", "--mean", "0.5,0.5"), "mean"),
    Case("to_onnx", ("--workdir", "{run}", "--out", "{run}/x.onnx", "--mean", "0.5,0.5,0.5"),
         "--std"),
    Case("to_onnx", ("--workdir", "{tmp}/no_such_run", "--out", "{run}/x.onnx"), "no_such_run"),
    Case("to_onnx", ("--workdir", "{tmp}/empty", "--out", "{run}/x.onnx"), "checkpoints"),
    Case("to_onnx", ("--workdir", "{run}",), "--out"),
    Case("to_onnx", ("--workdir", "{run}", "--random-init", "{}", "--out", "{run}/x.onnx"),
         "workdir"),
    Case("to_onnx", ("--random-init", "{arch", "--out", "{run}/x.onnx"), "--random-init"),
    Case("to_onnx", ("--random-init", "[1]", "--out", "{run}/x.onnx"), "--random-init"),
    Case("to_onnx", ("--random-init", '{"arch": "resnet99", "cut": 1}', "--out",
                     "{run}/x.onnx", "--mean", "0,0,0", "--std", "1,1,1"), "resnet99"),
    # ---- costs ----
    Case("costs", ("--arch", "resnet99"), "resnet99"),
    Case("costs", ("--loss-form", "triplet"), "loss-form"),
    Case("costs", ("--input-size", "big"), "input-size"),
    Case("costs", ("--arch", "resnet_tiny", "--bottleneck", "X1"), "bottleneck"),
    Case("costs", ("--arch", "resnet_tiny", "--head", "V9"), "head"),
    # ---- run_client (its own argparse) ----
    Case("run_client", ("--model", "{tmp}/no_such.onnx", "--npy", "{tmp}/x.npy"), "no_such.onnx"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/no_such.npy"), "no_such.npy"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/wrong_size.npy"), "(2, 4, 4, 3)"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/float64.npy"), "float64"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/nchw_uint8.npy"), "(1, 3, 8, 8)"),
    Case("run_client", ("--model", "{model}", "--images", "{tmp}/no_such_dir"), "no_such_dir"),
    Case("run_client", ("--model", "{model}", "--images", "{tmp}/empty"), "empty"),
    # ---- quantize ----
    Case("quantize", ("--model", "{tmp}/no_such.onnx", "--out", "{run}/q.onnx"), "no_such.onnx"),
    Case("quantize", ("--model", "{model}", "--out", "{run}/q.onnx", "--mode", "fp16"), "mode"),
    Case("quantize", ("--model", "{model}", "--out", "{run}/q.onnx", "--mode", "static"),
         "--calib"),
    Case("quantize", ("--model", "{model}", "--out", "{run}/q.onnx", "--mode", "static",
                      "--calib", "{tmp}/no_such.npy"), "no_such.npy"),
    Case("quantize", ("--model", "{model}",), "--out"),
    # ---- prepare ----
    Case("prepare", ("--dataset", "mnist", "--data_dir", "{tmp}/data"), "dataset"),
    Case("prepare", ("--dataset", "cifar10",), "data_dir"),
    Case("prepare", ("--dataset", "tiny_imagenet", "--data_dir", "{tmp}/data", "--manual_dir",
                     "{tmp}/no_such_dir"), "no_such_dir", 1),
    Case("prepare", ("--dataset", "tiny_imagenet", "--data_dir", "{tmp}/data"), "--manual_dir",
         1),
    Case("prepare", ("--dataset", "imagenet12", "--data_dir", "{tmp}/data", "--manual_dir",
                     "{tmp}/empty"), "empty", 1),
]


def _hashes(*directories):
  return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
          for d in directories for p in sorted(Path(d).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
  """A finished tiny run, an exported model of it, and a folder of bad inputs."""
  run = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(load_config("tiny").get_config(), str(run))
  model_dir = tmp_path_factory.mktemp("model")
  model = model_dir / "client.onnx"
  to_onnx.export_onnx(str(model), workdir=str(run))
  tmp = tmp_path_factory.mktemp("inputs")
  (tmp / "empty").mkdir()
  rng = np.random.default_rng(0)
  np.save(tmp / "x.npy", rng.integers(0, 255, (1, 8, 8, 3), np.uint8))
  np.save(tmp / "wrong_size.npy", rng.integers(0, 255, (2, 4, 4, 3), np.uint8))
  np.save(tmp / "float64.npy", rng.standard_normal((1, 3, 8, 8)))
  np.save(tmp / "nchw_uint8.npy", rng.integers(0, 255, (1, 3, 8, 8), np.uint8))
  return {"run": run, "model": model, "tmp": tmp, "configs": CONFIG_DIR}


def _run_in_process(module, argv, capsys):
  capsys.readouterr()
  try:
    status = module.main(list(argv))
  except SystemExit as e:     # what the interpreter does with an uncaught SystemExit
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
      status = 1
    else:
      status = 0 if e.code is None else e.code
  return status, capsys.readouterr().err


def _check(status, err, case, before, after):
  assert status == case.status, err
  assert "Traceback" not in err, err
  assert case.needle in err, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) <= case.max_lines, err
  # The package's convention (mocosfl_jax/cli.py); prepare's sys.exit(message) has no prefix.
  assert case.status == 1 or lines[0].startswith("error: "), err
  assert after == before, "files changed"


def _fill(argv, places):
  out = []
  for a in argv:
    for key, value in places.items():
      a = a.replace(f"{{{key}}}", str(value))
    out.append(a)
  return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_clear_line_and_writes_nothing(case, places, capsys):
  dirs = (places["run"], places["model"].parent)
  before = _hashes(*dirs)
  status, err = _run_in_process(COMMANDS[case.command], _fill(case.argv, places), capsys)
  _check(status, err, case, before, _hashes(*dirs))


def test_a_refused_config_creates_no_run_directory(places, capsys):
  workdir = places["tmp"] / "new_run"
  status, err = _run_in_process(main, ["--config", str(CONFIG_DIR / "tiny.py"), "--workdir",
                                       str(workdir), "--config.cut=9"], capsys)
  assert status == 2 and "config.cut=9" in err and not workdir.exists()


def test_debug_shows_the_traceback_of_a_refused_command_line(places):
  with pytest.raises((KeyError, AttributeError)):
    main.main(["--config", str(CONFIG_DIR / "tiny.py"), "--workdir", str(places["tmp"]),
               "--config.bogus=1", "--debug"])


def test_the_catalogue_covers_every_command():
  counts = {name: sum(c.command == name for c in CASES) for name in COMMANDS}
  assert min(counts.values()) >= 3 and sum(counts.values()) >= 60, counts


PROGRAM_CASES = [
    # absl's app.run path (a program, not main(argv)).
    Case("main", ("-m", "mocosfl_jax.main", "--config", TINY + ":x=1", "--workdir", "{run}"),
         "tiny.py"),
    # The device script, run as a file beside its model, as on a device.
    Case("run_client", (str(Path(run_client.__file__)), "--model", "{tmp}/no_such.onnx", "--npy",
                        "{tmp}/x.npy"), "no_such.onnx"),
    Case("to_onnx", (str(Path(PACKAGE_PARENT) / "export" / "to_onnx.py"), "--workdir", "{run}",
                     "--out", "{run}/x.onnx", "--client", "9"), "client"),
]


@pytest.mark.parametrize("case", PROGRAM_CASES, ids=[c.id for c in PROGRAM_CASES])
def test_a_program_refuses_with_one_line(case, places):
  dirs = (places["run"], places["model"].parent)
  before = _hashes(*dirs)
  proc = subprocess.run([sys.executable, *_fill(case.argv, places)], capture_output=True,
                        text=True, env={"PYTHONPATH": PACKAGE_PARENT, "JAX_PLATFORMS": "cpu",
                                        "PATH": "/usr/bin:/bin"}, timeout=300)
  _check(proc.returncode, proc.stderr, case, before, _hashes(*dirs))


# ---- A run stopped by Ctrl-C, a full disk or a read-only directory ----------------------------

def _results(workdir):
  return json.loads((Path(workdir) / "results.json").read_text())


def _train(workdir, capsys):
  return _run_in_process(main, ["--config", str(CONFIG_DIR / "tiny.py"), "--workdir",
                                str(workdir)], capsys)


def _stop_at(monkeypatch, obj, name, after, error):
  """Makes `obj.name` raise `error` on its call number `after + 1`."""
  real, calls = getattr(obj, name), []

  def stopping(*args, **kwargs):
    calls.append(1)
    if len(calls) == after + 1:
      raise error
    return real(*args, **kwargs)

  monkeypatch.setattr(obj, name, stopping)


def _one_line(err, *needles):
  """One `error:` line, last on stderr (after the run's progress lines), naming `needles`."""
  lines = [line for line in err.splitlines() if line.strip()]
  assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
  assert "Traceback" not in err, err
  for needle in needles:
    assert needle in lines[-1], err


def test_ctrl_c_is_one_line_naming_the_last_checkpoint_and_the_rerun_resumes(
    places, tmp_path, monkeypatch, capsys):
  _stop_at(monkeypatch, train, "simulated_step", 4, KeyboardInterrupt())
  status, err = _train(tmp_path, capsys)
  assert status == 130
  _one_line(err, "interrupted", "last intact checkpoint is step 3")
  monkeypatch.undo()
  assert _train(tmp_path, capsys)[0] == 0
  assert _results(tmp_path) == _results(places["run"])


def test_a_full_disk_is_one_line_naming_the_file_and_the_rerun_resumes(
    places, tmp_path, monkeypatch, capsys):
  # The record of step 4 fails (the checkpoint of step 3 is written by then).
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.jsonl"))
  _stop_at(monkeypatch, train.metrics.MetricsWriter, "write", 3, full)
  status, err = _train(tmp_path, capsys)
  assert status == 1
  _one_line(err, "metrics.jsonl: No space left on device", "last intact checkpoint is step 3")
  monkeypatch.undo()
  assert _train(tmp_path, capsys)[0] == 0
  assert _results(tmp_path) == _results(places["run"])


def test_a_read_only_run_directory_leaves_no_half_written_results(
    places, tmp_path, monkeypatch, capsys):
  """results.json cannot be written (chmod does not bite as root: the write is made to fail)."""
  real_replace = os.replace

  def read_only(src, dst):
    if Path(dst).name == "results.json":
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
    return real_replace(src, dst)

  monkeypatch.setattr(train.metrics.os, "replace", read_only)
  status, err = _train(tmp_path, capsys)
  assert status == 1
  _one_line(err, "results.json: Read-only file system", "last intact checkpoint is step 6")
  assert sorted(p.name for p in tmp_path.iterdir() if "results" in p.name) == []
  monkeypatch.undo()
  assert _train(tmp_path, capsys)[0] == 0
  assert _results(tmp_path) == _results(places["run"])


def test_evaluate_prints_its_results_when_it_cannot_write_them(places, monkeypatch, capsys):
  def read_only(path, text):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

  monkeypatch.setattr(evaluate.metrics, "write_text_atomic", read_only)
  before = _hashes(places["run"])
  capsys.readouterr()
  status = evaluate.main(["--workdir", str(places["run"]), "--protocol", "knn"])
  out, err = capsys.readouterr()
  assert status == 1
  _one_line(err, "eval_6.json", "Read-only file system", "printed above")
  printed = json.loads(out[:out.rindex("}") + 1])
  assert printed["test_knn_accuracy"] == _results(places["run"])["last"]["test_knn_accuracy"]
  assert _hashes(places["run"]) == before
