"""The bad-input catalogue: every command refuses a user error cleanly and writes nothing.

Each case runs one command on a bad command line and checks what a user sees and what is left on
disk: a non-zero exit status (2 for a refused input), no traceback on stderr, one `error:` line
that names the offending field, flag or file, and a finished run directory, copies of it with
damaged checkpoints, an exported model and the input files that are byte-identical afterwards
(sha256 of every file, checkpoints included; only `prepare`'s output folder {out} may change).

Commands run in-process through their `main(argv)` (an import costs seconds). A few cases run a
real process, for the paths that only a program takes (absl's `app.run`, the device script's
argparse). A case that needs the file system to misbehave (a folder that cannot be listed) names
a patch, applied only while its command runs.
"""
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mocosfl_jax import attack, costs, evaluate, main
from mocosfl_jax.data import prepare
from mocosfl_jax.deploy import quantize, run_client, to_onnx
from mocosfl_jax.run import train

from core_testlib import CONFIG_DIR, PACKAGE_PARENT, load_config, stop_at

COMMANDS = {"main": main, "evaluate": evaluate, "to_onnx": to_onnx, "costs": costs,
            "run_client": run_client, "quantize": quantize, "prepare": prepare, "attack": attack}
TINY = "{configs}/tiny.py"


@dataclasses.dataclass(frozen=True)
class Case:
  command: str
  argv: tuple        # '{run}', '{model}', '{tmp}', '{configs}' are filled in
  needle: str        # what stderr must name (the field, flag or file)
  status: int = 2
  max_lines: int = 2  # non-empty stderr lines
  patch: str | None = None  # a key of PATCHES, applied while the command runs

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
    _field("attack_fraction", 0.0),
    _field("attack_fraction", 0.5),      # without 'attack' in final_protocols it does nothing
    _main("--config.final_protocols=knn,attack", "--config.attack_fraction=0.004",
          needle="config.attack_fraction >= 0.00782"),
    # ---- main: config files, data, workdir, resume ----
    Case("main", ("--config", TINY + ":x=1", "--workdir", "{run}"), "tiny.py"),
    Case("main", ("--config", "{configs}/mocosfl_table3.py:bogus=1", "--workdir",
                  "{run}"), "bogus"),
    Case("main", ("--config", "{tmp}/no_such_config.py", "--workdir", "{run}"),
         "no_such_config.py"),
    Case("main", ("--config", TINY, "--workdir", "{run}/config.json"), "config.json"),
    # Missing data: what and where on the first line, the prepare command to run on the second.
    Case("main", ("--config", TINY, "--workdir", "{run}", "--config.dataset=cifar10",
                  "--config.data_dir={tmp}/empty"),
         "python -m mocosfl_jax.data.prepare --dataset cifar10 --data_dir "),
    Case("main", ("--config", TINY, "--workdir", "{tmp}/folder_run",
                  "--config.dataset=tiny_imagenet", "--config.data_dir={tmp}/empty"),
         "python -m mocosfl_jax.data.prepare --dataset tiny_imagenet --data_dir "),
    # An image folder whose class folder cannot be listed (it would silently drop its images).
    Case("main", ("--config", TINY, "--workdir", "{tmp}/folder_run",
                  "--config.dataset=tiny_imagenet", "--config.data_dir={tmp}/folders"),
         "tiny-imagenet-200/train/n02 (Permission denied)", patch="unlistable_class"),
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
    # Damaged checkpoints (copies of the run): a damaged step asked for by number is refused
    # (no fallback); with every step damaged nothing is left to fall back to.
    Case("evaluate", ("--workdir", "{damaged}", "--checkpoint", "6"), "checkpoint step 6 in "),
    Case("evaluate", ("--workdir", "{all_damaged}", "--checkpoint", "3"), "checkpoint step 3 in "),
    Case("evaluate", ("--workdir", "{all_damaged}", "--checkpoint", "latest"),
         "no intact checkpoint for 'latest'"),
    # The default, 'best', of a run without validation is its latest step.
    Case("evaluate", ("--workdir", "{all_damaged}"), "no intact checkpoint for 'latest'"),
    Case("evaluate", ("--workdir", "{run}", "--protocol", "attack"), "python -m mocosfl_jax.attack"),
    # ---- attack (refused before the decoder trains) ----
    Case("attack", ("--workdir", "{tmp}/empty"),
         "python -m mocosfl_jax.main --config CONFIG --workdir"),
    Case("attack", ("--workdir", "{run}", "--client", "4"), "the run has 4 clients"),
    Case("attack", ("--workdir", "{run}", "--checkpoint", "99"), "available steps: [3, 6]"),
    Case("attack", ("--workdir", "{run}", "--fraction", "0.004"), "--fraction >= 0.00782"),
    Case("attack", ("--workdir", "{run}", "--decoder", "custom"), "'custom'"),
    Case("attack", ("--workdir", "{run}", "--epochs", "0"), "--epochs"),
    Case("attack", ("--workdir", "{damaged}", "--checkpoint", "6"), "checkpoint step 6 in "),
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
    Case("to_onnx", ("--workdir", "{damaged}", "--out", "{damaged}/x.onnx", "--checkpoint", "6"),
         "checkpoint step 6 in "),
    Case("to_onnx", ("--workdir", "{all_damaged}", "--out", "{all_damaged}/x.onnx"),
         "no intact checkpoint for 'latest'"),
    # ---- costs ----
    Case("costs", ("--arch", "resnet99"), "resnet99"),
    Case("costs", ("--loss-form", "triplet"), "loss-form"),
    Case("costs", ("--input-size", "big"), "input-size"),
    Case("costs", ("--arch", "resnet_tiny", "--bottleneck", "X1"), "bottleneck"),
    Case("costs", ("--arch", "resnet_tiny", "--head", "V9"), "head"),
    Case("costs", ("--arch", "resnet_tiny", "--cuts", "99"), "cut=99"),
    Case("costs", ("--arch", "resnet_tiny", "--cuts", "0"), "cut=0"),
    Case("costs", ("--arch", "resnet_tiny", "--cuts", "1,99"), "cut=99"),
    Case("costs", ("--arch", "resnet_tiny", "--cuts", "1-x"), "--cuts '1-x': '1-x'"),
    Case("costs", ("--arch", "resnet_tiny", "--cuts", "x"), "--cuts 'x'"),
    Case("costs", ("--arch", "resnet_tiny", "--cuts", "3-1"), "--cuts '3-1'"),
    Case("costs", ("--arch", "resnet_tiny", "--cuts", "2-"), "--cuts '2-'"),
    Case("costs", ("--arch", "resnet_tiny", "--cuts", "1,,2"), "--cuts '1,,2'"),
    # ---- run_client (its own argparse) ----
    Case("run_client", ("--model", "{tmp}/no_such.onnx", "--npy", "{tmp}/x.npy"), "no_such.onnx"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/no_such.npy"), "no_such.npy"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/wrong_size.npy"), "(2, 4, 4, 3)"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/float64.npy"), "float64"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/nchw_uint8.npy"), "(1, 3, 8, 8)"),
    Case("run_client", ("--model", "{model}", "--images", "{tmp}/no_such_dir"), "no_such_dir"),
    Case("run_client", ("--model", "{model}", "--images", "{tmp}/empty"), "empty"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/nan.npy"), "NaN/Inf"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/inf.npy"), "NaN/Inf"),
    Case("run_client", ("--model", "{tmp}/x.npy", "--npy", "{tmp}/x.npy"),
         "not an ONNX model: {tmp}/x.npy"),
    Case("run_client", ("--model", "{tmp}/empty.onnx", "--npy", "{tmp}/x.npy"),
         "not an ONNX model: {tmp}/empty.onnx"),
    Case("run_client", ("--model", "{run}/config.json", "--npy", "{tmp}/x.npy"),
         "not an ONNX model: {run}/config.json"),
    Case("run_client", ("--model", "{tmp}/bad_graph.onnx", "--npy", "{tmp}/x.npy"),
         "cannot load the ONNX model {tmp}/bad_graph.onnx: "),
    # argparse's own refusals: one `error:` line too, not usage + error.
    Case("run_client", ("--npy", "{tmp}/x.npy"), "--model"),
    Case("run_client", ("--model", "{model}"), "--images --npy"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/x.npy", "--images", "{tmp}"),
         "--images"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/x.npy", "--bench", "-1"),
         "--bench"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/x.npy", "--threads", "two"),
         "--threads"),
    Case("run_client", ("--model", "{model}", "--npy", "{tmp}/x.npy", "--bogus"), "--bogus"),
    # ---- quantize ----
    Case("quantize", ("--model", "{tmp}/no_such.onnx", "--out", "{run}/q.onnx"), "no_such.onnx"),
    Case("quantize", ("--model", "{model}", "--out", "{run}/q.onnx", "--mode", "fp16"), "mode"),
    Case("quantize", ("--model", "{model}", "--out", "{run}/q.onnx", "--mode", "static"),
         "--calib"),
    Case("quantize", ("--model", "{model}", "--out", "{run}/q.onnx", "--mode", "static",
                      "--calib", "{tmp}/no_such.npy"), "no_such.npy"),
    Case("quantize", ("--model", "{model}",), "--out"),
    Case("quantize", ("--model", "{model}", "--out", "{model}"), "--model"),
    Case("quantize", ("--model", "{model}", "--out", "{tmp}/x.npy", "--mode", "static",
                      "--calib", "{tmp}/x.npy"), "--calib"),
    Case("quantize", ("--model", "{model}", "--out", "{tmp}/x.npy", "--eval", "{tmp}/x.npy"),
         "--eval"),
    Case("quantize", ("--model", "{tmp}/x.npy", "--out", "{run}/q.onnx"),
         "not an ONNX model: {tmp}/x.npy"),
    Case("quantize", ("--model", "{tmp}/bad_graph.onnx", "--out", "{run}/q.onnx"),
         "cannot load the ONNX model {tmp}/bad_graph.onnx: "),
    # ---- prepare ----
    Case("prepare", ("--dataset", "mnist", "--data_dir", "{tmp}/data"), "dataset"),
    Case("prepare", ("--dataset", "cifar10",), "data_dir"),
    Case("prepare", ("--dataset", "tiny_imagenet", "--data_dir", "{tmp}/data", "--manual_dir",
                     "{tmp}/no_such_dir"), "no_such_dir"),
    Case("prepare", ("--dataset", "tiny_imagenet", "--data_dir", "{tmp}/data"), "--manual_dir"),
    Case("prepare", ("--dataset", "imagenet12", "--data_dir", "{tmp}/data", "--manual_dir",
                     "{tmp}/empty"), "empty"),
    # Crafted archives: refused before a file lands outside the data folder ({tmp} is hashed).
    Case("prepare", ("--dataset", "tiny_imagenet", "--data_dir", "{out}/crafted", "--manual_dir",
                     "{tmp}/crafted"), "val_annotations.txt:2: class '../../../../escaped'"),
    Case("prepare", ("--dataset", "tiny_imagenet", "--data_dir", "{out}/zip_slip", "--manual_dir",
                     "{tmp}/zip_slip"), "member 'tiny-imagenet-200/../../../evil.txt'"),
    Case("prepare", ("--dataset", "tiny_imagenet", "--data_dir", "{out}/truncated",
                     "--manual_dir", "{tmp}/truncated"), "tiny-imagenet-200.zip: not a readable"),
]


def _hashes(*directories, skip=None):
  return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
          for d in directories for p in sorted(Path(d).rglob("*"))
          if p.is_file() and not (skip and p.is_relative_to(skip))}


def _watched(places):
  """sha256 of every file a refusal must leave alone: all but `prepare`'s output folder."""
  return _hashes(*(places[k] for k in ("run", "damaged", "all_damaged", "tmp")),
                 places["model"].parent, skip=places["out"])


def _truncate_arrays(run, step):
  """Halves the largest file of a checkpoint step (its array bytes)."""
  arrays = max((p for p in (run / "checkpoints" / str(step) / "state").rglob("*")
                if p.is_file()), key=lambda p: p.stat().st_size)
  arrays.write_bytes(arrays.read_bytes()[:arrays.stat().st_size // 2])


def _tiny_imagenet_zip(manual, annotation, extra=()):
  """manual/tiny-imagenet-200.zip: a train class, val/images/val_0.JPEG, one annotation line
  and `extra` (member name, bytes) pairs. Image bytes are not decoded before the refusals."""
  manual.mkdir()
  with zipfile.ZipFile(manual / "tiny-imagenet-200.zip", "w") as zf:
    zf.writestr("tiny-imagenet-200/train/n01/images/n01_0.JPEG", b"x")
    zf.writestr("tiny-imagenet-200/val/images/val_0.JPEG", b"x")
    zf.writestr("tiny-imagenet-200/val/val_annotations.txt",
                "val_0.JPEG\tn01\t0\t0\t63\t63\n" + annotation)
    for name, data in extra:
      zf.writestr(name, data)


def _model_with_unknown_op() -> bytes:
  """A well-formed ONNX model that onnxruntime cannot load: its one node's op does not exist."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper  # pylint: disable=g-import-not-at-top
  x, y = (helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy")
  graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g", [x], [y])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  model.ir_version = 8
  return model.SerializeToString()


@pytest.fixture(scope="module")
def places(tmp_path_factory):
  """A finished tiny run, copies of it with damaged checkpoints (the newest step; every
  step), an exported model of it, a folder of bad inputs and one for `prepare`'s output."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  run = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(load_config("tiny").get_config(), str(run))
  assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["3", "6"]
  damaged, all_damaged = (tmp_path_factory.mktemp(n) for n in ("damaged", "all_damaged"))
  for copy, steps in ((damaged, (6,)), (all_damaged, (3, 6))):
    shutil.copytree(run, copy, dirs_exist_ok=True)
    for step in steps:
      _truncate_arrays(copy, step)
  model_dir = tmp_path_factory.mktemp("model")
  model = model_dir / "client.onnx"
  to_onnx.export_onnx(str(model), workdir=str(run))
  tmp = tmp_path_factory.mktemp("inputs")
  (tmp / "empty").mkdir()
  (tmp / "empty.onnx").write_bytes(b"")
  (tmp / "bad_graph.onnx").write_bytes(_model_with_unknown_op())
  rng = np.random.default_rng(0)
  np.save(tmp / "x.npy", rng.integers(0, 255, (1, 8, 8, 3), np.uint8))
  np.save(tmp / "wrong_size.npy", rng.integers(0, 255, (2, 4, 4, 3), np.uint8))
  np.save(tmp / "float64.npy", rng.standard_normal((1, 3, 8, 8)))
  np.save(tmp / "nchw_uint8.npy", rng.integers(0, 255, (1, 3, 8, 8), np.uint8))
  for name, bad in (("nan", np.nan), ("inf", np.inf)):
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)   # the model's NCHW layout
    x[0, 1, 2, 3] = bad
    np.save(tmp / f"{name}.npy", x)
  for split in ("train", "val"):     # an image-folder dataset, 2 classes of 2 images
    for cls in ("n01", "n02"):
      folder = tmp / "folders" / "tiny-imagenet-200" / split / cls / "images"
      folder.mkdir(parents=True)
      for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
  # prepare writes under tmp/out (not watched); what climbs out of it lands in tmp (watched):
  # '../../../../escaped' from out/crafted/tiny-imagenet-200/val/ is tmp/escaped.
  out = tmp / "out"
  out.mkdir()
  _tiny_imagenet_zip(tmp / "crafted", "val_0.JPEG\t../../../../escaped\t0\t0\t63\t63")
  _tiny_imagenet_zip(tmp / "zip_slip", "", [("tiny-imagenet-200/../../../evil.txt", b"x")])
  (tmp / "truncated").mkdir()
  (tmp / "truncated" / "tiny-imagenet-200.zip").write_bytes(
      (tmp / "crafted" / "tiny-imagenet-200.zip").read_bytes()[:100])
  return {"run": run, "damaged": damaged, "all_damaged": all_damaged, "model": model, "tmp": tmp,
          "out": out, "configs": CONFIG_DIR}


def _unlistable_class(monkeypatch, places):
  """train/n02 of the image-folder dataset cannot be listed (as root chmod 0 would not bite)."""
  folder = places["tmp"] / "folders" / "tiny-imagenet-200" / "train" / "n02"
  real_scandir = os.scandir

  def scandir(path="."):
    if Path(path) == folder:
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return real_scandir(path)

  monkeypatch.setattr(os, "scandir", scandir)


PATCHES = {"unlistable_class": _unlistable_class}


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


def _check(status, err, case, before, after, places):
  assert status == case.status, err
  assert "Traceback" not in err, err
  assert _fill([case.needle], places)[0] in err, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) <= case.max_lines, err
  assert lines[0].startswith("error: "), err   # the package's convention (mocosfl_jax/cli.py)
  assert after == before, "files changed"


def _fill(argv, places):
  out = []
  for a in argv:
    for key, value in places.items():
      a = a.replace(f"{{{key}}}", str(value))
    out.append(a)
  return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_clear_line_and_writes_nothing(case, places, capsys, monkeypatch):
  before = _watched(places)
  with monkeypatch.context() as patched:
    if case.patch:
      PATCHES[case.patch](patched, places)
    status, err = _run_in_process(COMMANDS[case.command], _fill(case.argv, places), capsys)
  _check(status, err, case, before, _watched(places), places)


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
    Case("to_onnx", (str(CONFIG_DIR.parent / "export" / "to_onnx.py"), "--workdir", "{run}",
                     "--out", "{run}/x.onnx", "--client", "9"), "client"),
    # A read-only checkpoint reader as a program: orbax's 'read only' warning is not shown.
    Case("evaluate", ("-m", "mocosfl_jax.evaluate", "--workdir", "{run}", "--checkpoint", "99"),
         "99"),
    # argparse's refusal as the device sees it, and a file that is not a model.
    Case("run_client", (str(Path(run_client.__file__)), "--npy", "{tmp}/x.npy"), "--model"),
    Case("run_client", (str(Path(run_client.__file__)), "--model", "{tmp}/x.npy", "--npy",
                        "{tmp}/x.npy"), "not an ONNX model"),
    Case("prepare", ("-m", "mocosfl_jax.data.prepare", "--dataset", "tiny_imagenet", "--data_dir",
                     "{out}/crafted_program", "--manual_dir", "{tmp}/crafted"),
         "is not a plain name"),
]


@pytest.mark.parametrize("case", PROGRAM_CASES, ids=[c.id for c in PROGRAM_CASES])
def test_a_program_refuses_with_one_line(case, places):
  before = _watched(places)
  proc = subprocess.run([sys.executable, *_fill(case.argv, places)], capture_output=True,
                        text=True, env={"PYTHONPATH": PACKAGE_PARENT, "JAX_PLATFORMS": "cpu",
                                        "PATH": "/usr/bin:/bin"}, timeout=300)
  _check(proc.returncode, proc.stderr, case, before, _watched(places), places)


# ---- A run stopped by Ctrl-C, a full disk or a read-only directory ----------------------------

def _results(workdir):
  return json.loads((Path(workdir) / "results.json").read_text())


def _train(workdir, capsys):
  return _run_in_process(main, ["--config", str(CONFIG_DIR / "tiny.py"), "--workdir",
                                str(workdir)], capsys)


def _one_line(err, *needles):
  """One `error:` line, last on stderr (after the run's progress lines), naming `needles`."""
  lines = [line for line in err.splitlines() if line.strip()]
  assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
  assert "Traceback" not in err, err
  for needle in needles:
    assert needle in lines[-1], err


def _stops_then_resumes(places, workdir, monkeypatch, capsys, status, *needles,
                        while_stopped=lambda: None):
  """The tiny run, with `monkeypatch`'s failure in place, ends with `status` and one `error:`
  line naming `needles`; `while_stopped` checks the directory it left; the same command, rerun
  without the failure, ends with the uninterrupted run's results."""
  got, err = _train(workdir, capsys)
  assert got == status
  _one_line(err, *needles)
  while_stopped()
  monkeypatch.undo()
  assert _train(workdir, capsys)[0] == 0
  assert _results(workdir) == _results(places["run"])


def test_ctrl_c_is_one_line_naming_the_last_checkpoint_and_the_rerun_resumes(
    places, tmp_path, monkeypatch, capsys):
  stop_at(monkeypatch, train, "simulated_step", 4, KeyboardInterrupt())
  _stops_then_resumes(places, tmp_path, monkeypatch, capsys, 130, "interrupted",
                      "latest complete checkpoint is step 3")


def test_a_full_disk_is_one_line_naming_the_file_and_the_rerun_resumes(
    places, tmp_path, monkeypatch, capsys):
  # The record of step 4 fails (the checkpoint of step 3 is written by then).
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "metrics.jsonl"))
  stop_at(monkeypatch, train.metrics.MetricsWriter, "write", 3, full)
  _stops_then_resumes(places, tmp_path, monkeypatch, capsys, 1,
                      "metrics.jsonl: No space left on device",
                      "latest complete checkpoint is step 3")


def test_a_read_only_run_directory_leaves_no_half_written_results(
    places, tmp_path, monkeypatch, capsys):
  """results.json cannot be written (chmod does not bite as root: the write is made to fail)."""
  real_replace = os.replace

  def read_only(src, dst):
    if Path(dst).name == "results.json":
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
    return real_replace(src, dst)

  monkeypatch.setattr(train.metrics.os, "replace", read_only)

  def no_results_file():
    assert sorted(p.name for p in tmp_path.iterdir() if "results" in p.name) == []

  _stops_then_resumes(places, tmp_path, monkeypatch, capsys, 1,
                      "results.json: Read-only file system",
                      "latest complete checkpoint is step 6", while_stopped=no_results_file)


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
  printed = json.loads(out[out.index("{"):out.rindex("}") + 1])  # after 'evaluated checkpoint'
  assert printed["test_knn_accuracy"] == _results(places["run"])["last"]["test_knn_accuracy"]
  assert _hashes(places["run"]) == before
