"""Dataset sources: tfds mock data (no TF), digits, synthetic, image folders, clear errors, holdout."""
import errno
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mocosfl_jax.data import prepare
from mocosfl_jax.data import sources
from mocosfl_jax.data.sources import DatasetNotPreparedError
from mocosfl_jax.data.sources import holdout
from mocosfl_jax.data.sources import load

DATA_DIR = pathlib.Path(sources.__file__).parent


def test_cifar10_from_tfds_mock(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    ds = load("cifar10", "train", data_dir=tmp_path)
    again = load("cifar10", "train", data_dir=tmp_path)
    small = load("cifar10", "test", data_dir=tmp_path, image_size=16)
  assert ds.images.shape == (12, 32, 32, 3) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32 and ds.labels.min() >= 0 and ds.labels.max() < 10
  assert ds.num_classes == 10 and ds.input_size == 32 and ds.name == "cifar10"
  np.testing.assert_allclose(ds.mean, [0.4914, 0.4822, 0.4465])
  np.testing.assert_allclose(ds.std, [0.2023, 0.1994, 0.2010])
  np.testing.assert_array_equal(ds.images, again.images)  # stable order
  assert small.images.shape == (12, 16, 16, 3) and small.input_size == 16


def test_records_are_sorted_by_id():
  class Src:  # a data source whose records come in shuffled storage order
    rows = [{"id": b"train_00002", "image": np.full((2, 2, 3), 2, np.uint8), "label": 2},
            {"id": b"train_00000", "image": np.zeros((2, 2, 3), np.uint8), "label": 0},
            {"id": b"train_00001", "image": np.ones((2, 2, 3), np.uint8), "label": 1}]

    def __len__(self):
      return 3

    def __getitems__(self, keys):
      return [self.rows[k] for k in keys]

  images, labels, ids = sources._read_source(Src())  # pylint: disable=protected-access
  order = np.argsort(ids, kind="stable")
  assert labels[order].tolist() == [0, 1, 2] and images[order][:, 0, 0, 0].tolist() == [0, 1, 2]


def test_stl10_train_uses_cifar_constants(tmp_path):
  with tfds.testing.mock_data(num_examples=4):
    train = load("stl10", "train", data_dir=tmp_path)
    test = load("stl10", "test", data_dir=tmp_path)
  assert train.images.shape == (8, 96, 96, 3)  # train + unlabelled
  np.testing.assert_allclose(train.std, sources.CIFAR10_MEAN_STD[1])
  np.testing.assert_allclose(test.std, [0.2471, 0.2435, 0.2616])


def test_missing_dataset_names_the_command(tmp_path):
  with pytest.raises(DatasetNotPreparedError) as err:
    load("cifar10", "train", data_dir=tmp_path)
  msg = str(err.value)
  assert isinstance(err.value, RuntimeError)
  assert f"python -m mocosfl_jax.data.prepare --dataset cifar10 --data_dir {tmp_path}" in msg
  assert "cifar-10-binary.tar.gz (170,052,171 bytes)" in msg
  # Two lines: what is wrong and what to do, then the command alone (to copy).
  first, command = msg.split("\n")
  assert first.startswith("Dataset 'cifar10' is not usable") and "pip install .[prepare]" in first
  assert command.strip().startswith("python -m mocosfl_jax.data.prepare --dataset cifar10")


def test_tfrecord_prepared_dataset_is_explained(tmp_path):
  version_dir = tmp_path / "cifar10" / "3.0.2"
  version_dir.mkdir(parents=True)
  (version_dir / "cifar10-train.tfrecord-00000-of-00001").write_bytes(b"x")
  with pytest.raises(DatasetNotPreparedError, match="TFRECORD"):
    load("cifar10", "train", data_dir=tmp_path)


def test_archive_table_matches_tfds_checksums():
  for name, spec in sources.TFDS_DATASETS.items():
    infos = tfds.builder_cls(spec.tfds_name).url_infos.values()
    assert dict(spec.archives) == {i.filename: int(i.size) for i in infos}, name


def test_digits():
  train, test = load("digits", "train"), load("digits", "test")
  assert len(train) == 1437 and len(test) == 360
  assert train.images.shape[1:] == (32, 32, 3) and train.num_classes == 10
  assert np.array_equal(train.images[..., 0], train.images[..., 2])  # grey as RGB
  # Stratified: every class keeps ~20% in test.
  frac = np.bincount(test.labels, minlength=10) / (np.bincount(train.labels, minlength=10) +
                                                   np.bincount(test.labels, minlength=10))
  np.testing.assert_allclose(frac, 0.2, atol=0.02)
  pixels = train.images.astype(np.float64) / 255
  np.testing.assert_allclose(train.mean, pixels.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(test.std, pixels.std((0, 1, 2)), rtol=1e-5)  # train-split constants
  np.testing.assert_array_equal(load("digits", "train").images, train.images)
  assert load("digits", "test", image_size=8).images.shape == (360, 8, 8, 3)


def test_synthetic_is_learnable():
  train = load("synthetic", "train", n=200, image_size=8, num_classes=4, seed=1)
  test = load("synthetic", "test", n=100, image_size=8, num_classes=4, seed=1)
  assert train.images.shape == (200, 8, 8, 3) and set(np.unique(train.labels)) == {0, 1, 2, 3}
  x_tr = train.images.reshape(200, -1).astype(np.float64)
  x_te = test.images.reshape(100, -1).astype(np.float64)
  centroids = np.stack([x_tr[train.labels == k].mean(0) for k in range(4)])
  pred = np.argmin(((x_te[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  assert np.mean(pred == test.labels) > 0.9
  assert not np.array_equal(train.images[:100], test.images)


def write_folder(root, split, classes, n=2, size=(10, 12)):
  for c, cls in enumerate(classes):
    d = root / split / cls / "images"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
      Image.fromarray(np.full(size + (3,), 40 * c + i, np.uint8)).save(d / f"{cls}_{i}.JPEG",
                                                                      format="PNG")


def test_image_folder(tmp_path):
  root = tmp_path / "tiny-imagenet-200"
  write_folder(root, "train", ["n02", "n01"], n=3)
  write_folder(root, "val", ["n01", "n02"], n=1)
  train = load("tiny_imagenet", "train", data_dir=tmp_path, image_size=8)
  test = load("tiny_imagenet", "test", data_dir=tmp_path, image_size=8)
  assert train.images.shape == (6, 8, 8, 3) and test.images.shape == (2, 8, 8, 3)
  assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]  # classes sorted by folder name
  assert train.images[0, 0, 0, 0] == 40 and train.images[3, 0, 0, 0] == 0
  np.testing.assert_allclose(train.mean, [0.5141, 0.5775, 0.3985])


@pytest.mark.parametrize("locked", ["n02", "n02/images"])
def test_image_folder_unreadable_folder_is_an_error(tmp_path, monkeypatch, locked):
  root = tmp_path / "tiny-imagenet-200"
  write_folder(root, "train", ["n01", "n02"], n=2)
  folder = root / "train" / locked
  folder.chmod(0)
  try:
    try:
      os.listdir(folder)
    except PermissionError:
      pass
    else:  # root lists anything: refuse the listing the way the kernel refuses other users
      real_scandir = os.scandir

      def scandir(path="."):
        if pathlib.Path(path) == folder:
          raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_scandir(path)

      monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetNotPreparedError,
                       match=rf"^Dataset 'tiny_imagenet' in .*: cannot list "
                       rf"{re.escape(str(folder))} \(Permission denied\); make every folder of "
                       "the dataset readable") as err:
      load("tiny_imagenet", "train", data_dir=tmp_path, image_size=8)
    assert "\n" not in str(err.value)
  finally:
    folder.chmod(0o755)


def test_image_folder_missing(tmp_path):
  with pytest.raises(DatasetNotPreparedError, match="tiny-imagenet-200.zip") as err:
    load("tiny_imagenet", "train", data_dir=tmp_path)
  assert "--dataset tiny_imagenet" in str(err.value)


def test_prepare_tiny_imagenet_regroups_val(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  staging = tmp_path / "staging" / "tiny-imagenet-200"
  write_folder(staging, "train", ["n01", "n02"], n=2, size=(64, 64))
  (staging / "val" / "images").mkdir(parents=True)
  lines = []
  for i, cls in enumerate(["n02", "n01", "n02"]):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(staging / "val" / "images" / f"val_{i}.JPEG",
                                                          format="PNG")
    lines.append(f"val_{i}.JPEG\t{cls}\t0\t0\t63\t63")
  (staging / "val" / "val_annotations.txt").write_text("\n".join(lines))
  with zipfile.ZipFile(manual / "tiny-imagenet-200.zip", "w") as zf:
    for path in staging.rglob("*"):
      zf.write(path, path.relative_to(staging.parent))
  data = tmp_path / "data"
  prepare.main(["--dataset", "tiny_imagenet", "--data_dir", str(data), "--manual_dir", str(manual)])
  test = load("tiny_imagenet", "test", data_dir=data)
  assert test.images.shape == (3, 64, 64, 3) and sorted(test.labels.tolist()) == [0, 1, 1]


def _prepare_refuses(capsys, argv, pattern):
  """prepare.main(argv) refuses: status 2 and one `error:` line matching `pattern`."""
  capsys.readouterr()
  assert prepare.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
  assert re.search(pattern, err), err


def _tiny_imagenet_zip(tmp_path, annotations, extra=()):
  """manual/tiny-imagenet-200.zip with 2 train classes, val/images/val_0.JPEG, `annotations`
  as val_annotations.txt and `extra` (member name, bytes) pairs; returns the manual dir."""
  manual = tmp_path / "manual"
  manual.mkdir()
  staging = tmp_path / "staging" / "tiny-imagenet-200"
  write_folder(staging, "train", ["n01", "n02"], n=1, size=(64, 64))
  (staging / "val" / "images").mkdir(parents=True)
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(staging / "val" / "images" / "val_0.JPEG",
                                                        format="PNG")
  (staging / "val" / "val_annotations.txt").write_text("\n".join(annotations))
  with zipfile.ZipFile(manual / "tiny-imagenet-200.zip", "w") as zf:
    for path in staging.rglob("*"):
      zf.write(path, path.relative_to(staging.parent))
    for name, data in extra:
      zf.writestr(name, data)
  return manual


@pytest.mark.parametrize("line,field", [
    ("val_0.JPEG\t../../../../escaped", "class '../../../../escaped'"),
    ("../../../../outside.JPEG\tn01", "file name '../../../../outside.JPEG'"),
    ("val_0.JPEG\tn01/../../../x", "class 'n01/../../../x'"),
])
def test_prepare_refuses_annotation_paths_leaving_the_data_dir(tmp_path, line, field, capsys):
  outside = tmp_path / "outside.JPEG"
  outside.write_bytes(b"not yours")
  manual = _tiny_imagenet_zip(tmp_path, ["val_0.JPEG\tn02\t0\t0\t63\t63", line + "\t0\t0\t63\t63"])
  data = tmp_path / "data"
  _prepare_refuses(capsys, ["--dataset", "tiny_imagenet", "--data_dir", str(data),
                            "--manual_dir", str(manual)],
                   rf"val_annotations.txt:2: {re.escape(field)} is not a plain name; refusing a "
                   r"path that could leave .*nothing was moved")
  assert outside.read_bytes() == b"not yours"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "manual", "outside.JPEG",
                                                        "staging"]
  assert (data / "tiny-imagenet-200" / "val" / "images" / "val_0.JPEG").is_file()


@pytest.mark.parametrize("member", ["tiny-imagenet-200/../../evil.txt", "/tmp/evil.txt",
                                    "tiny-imagenet-200\\..\\..\\evil.txt"])
def test_prepare_refuses_zip_members_leaving_the_data_dir(tmp_path, member, capsys):
  manual = _tiny_imagenet_zip(tmp_path, ["val_0.JPEG\tn01"], extra=[(member, b"x")])
  data = tmp_path / "data"
  _prepare_refuses(capsys, ["--dataset", "tiny_imagenet", "--data_dir", str(data),
                            "--manual_dir", str(manual)],
                   rf"tiny-imagenet-200.zip: member {re.escape(repr(member))} would be written "
                   r"outside .*nothing was extracted")
  assert not (data / "tiny-imagenet-200").exists()


def _tar(path, members):
  import io
  import tarfile
  with tarfile.open(path, "w") as tf:
    for name, kind, target in members:
      info = tarfile.TarInfo(name)
      if kind == "file":
        info.size = len(target)
        tf.addfile(info, io.BytesIO(target))
      else:
        info.type, info.linkname = (tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE,
                                    target)
        tf.addfile(info)


@pytest.mark.parametrize("bad,message", [
    (("../evil.txt", "file", b"x"), "would be written outside"),
    (("/evil.txt", "file", b"x"), "would be written outside"),
    (("train/n01/link", "symlink", "/etc"), "is a link to an absolute path"),
    (("train/n01/up", "symlink", "../../../../.."), "would link to"),
    (("train/n01/hard", "hardlink", "../../outside"), "would link to"),
])
def test_prepare_refuses_tar_members_leaving_the_data_dir(tmp_path, bad, message, capsys):
  manual = tmp_path / "manual"
  manual.mkdir()
  _tar(manual / "imagenet12.tar", [("train/n01/a.png", "file", b"x"), bad])
  data = tmp_path / "data"
  _prepare_refuses(capsys, ["--dataset", "imagenet12", "--data_dir", str(data),
                            "--manual_dir", str(manual)],
                   rf"imagenet12.tar: member .*{message}.*nothing was extracted")
  assert not (data / "imagenet12" / "train").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "manual"]


def test_prepare_refusal_is_one_line_without_traceback(tmp_path):
  manual = _tiny_imagenet_zip(tmp_path, ["val_0.JPEG\t../escaped"])
  proc = subprocess.run([sys.executable, "-m", "mocosfl_jax.data.prepare", "--dataset",
                         "tiny_imagenet", "--data_dir", str(tmp_path / "data"), "--manual_dir",
                         str(manual)], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr   # as the package's other commands (cli.py)
  assert "Traceback" not in proc.stderr and "is not a plain name" in proc.stderr
  assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TF installed")
def test_prepare_without_tensorflow_names_the_extra(tmp_path, capsys):
  _prepare_refuses(capsys, ["--dataset", "cifar10", "--data_dir", str(tmp_path)],
                   re.escape("pip install .[prepare]"))


def test_runtime_modules_never_import_tensorflow():
  pattern = re.compile(r"^\s*(import tensorflow\b(?!_)|from tensorflow\b(?!_))", re.M)
  for module in ("sources", "sampler", "augment", "partition", "__init__"):
    assert not pattern.search((DATA_DIR / f"{module}.py").read_text()), module


def test_holdout():
  ds = load("synthetic", "train", n=100, image_size=4)
  train, val = holdout(ds, 0.1, seed=0)
  assert len(train) == 90 and len(val) == 10
  rows = {r.tobytes() for r in ds.images}
  assert {r.tobytes() for r in train.images} | {r.tobytes() for r in val.images} <= rows
  train2, val2 = holdout(ds, 0.1, seed=0)
  np.testing.assert_array_equal(val.images, val2.images)
  assert not np.array_equal(holdout(ds, 0.1, seed=1)[1].images, val.images)
  with pytest.raises(ValueError, match="fraction"):
    holdout(ds, 1.0, seed=0)


def test_bad_arguments():
  with pytest.raises(ValueError, match="dataset='mnist'"):
    load("mnist", "train")
  with pytest.raises(ValueError, match="split='validation'"):
    load("cifar10", "validation")
  with pytest.raises(ValueError, match="images must be uint8"):
    sources.ArrayDataset(np.zeros((2, 4, 4, 3)), np.zeros(2, np.int32), 2, np.zeros(3),
                         np.ones(3), 4, "x")
