"""One-off dataset preparation: `python -m mocosfl_jax.data.prepare --dataset NAME --data_dir DIR`.

tfds datasets (cifar10, cifar100, svhn, stl10) are built once in `array_record` format, the only format
that `tfds.data_source` can read back without TensorFlow. Building needs TensorFlow (tfds extracts
archives and encodes PNGs with it), so it is an optional extra, imported lazily here only:
`pip install .[prepare]`. With `--manual_dir` tfds takes the archive from that folder (checksum-checked
against tfds's registered checksum) and never touches the network. We never pass
`register_checksums=True` (it rewrites files inside site-packages).

Image-folder datasets need no TensorFlow: tiny_imagenet is extracted from `tiny-imagenet-200.zip` and
its val/ images are regrouped into class folders (val_annotations.txt), which is the layout the
reference's ImageFolder loader assumed; imagenet12 is extracted from an archive (or already in place)
and its layout checked.

A problem the user must fix (a missing or incomplete archive, a crafted archive or annotation
file, a missing extra) is a `PrepareError`: the command prints it as one `error:` line and exits
with status 2, as the package's other commands do (mocosfl_jax/cli.py).
"""
from __future__ import annotations

import importlib.util
import pathlib
import re
import shutil
import tarfile
import zipfile

from absl import flags

from mocosfl_jax import cli
from mocosfl_jax.data import sources

PREPARE_EXTRA = "pip install .[prepare] (or: pip install tensorflow-cpu)"


class PrepareError(Exception):
  """A problem the user must fix before the dataset can be prepared; the message says how."""


def _require_tensorflow() -> None:
  if importlib.util.find_spec("tensorflow") is None:
    raise PrepareError("preparing tfds datasets needs TensorFlow, which is not installed (the "
                       f"training runtime never needs it); install the optional extra: "
                       f"{PREPARE_EXTRA}")
  if importlib.util.find_spec("importlib_resources") is None:  # tfds builders need it
    raise PrepareError("preparing tfds datasets needs importlib_resources: "
                       "pip install importlib_resources")


def _check_manual_dir(name: str, manual_dir: pathlib.Path) -> None:
  for filename, size in sources.TFDS_DATASETS[name].archives:
    path = manual_dir / filename
    if not path.is_file():
      raise PrepareError(f"{path} is missing: place {filename} ({size:,} bytes) in {manual_dir}")
    if path.stat().st_size != size:
      raise PrepareError(f"{path} has {path.stat().st_size:,} bytes, expected {size:,} "
                         "(incomplete download?)")


def prepare_tfds(name: str, data_dir: pathlib.Path, manual_dir: pathlib.Path | None) -> None:
  """Builds the tfds dataset in array_record format (needs TensorFlow)."""
  _require_tensorflow()
  if manual_dir is not None:
    _check_manual_dir(name, manual_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = sources.TFDS_DATASETS[name]
  builder = tfds.builder(spec.tfds_name, data_dir=str(data_dir), file_format="array_record")
  config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
  builder.download_and_prepare(download_config=config)
  for tfds_split in sorted({s for group in spec.splits.values() for s in group}):
    src = tfds.data_source(spec.tfds_name, split=tfds_split, data_dir=str(data_dir),
                           download=False)
    _ = src[0]  # decodes one example: proves the TF-free read path works
    print(f"{name}/{tfds_split}: {len(src)} examples readable without TensorFlow")


def _refuse(archive: pathlib.Path, what: str) -> None:
  raise PrepareError(f"{archive}: {what}; refusing the whole archive, nothing was extracted "
                     "(corrupt or crafted archive?)")


def _leaves(name: str) -> bool:
  """Whether an archive member name is absolute or climbs out with '..' (either separator)."""
  path = pathlib.PurePosixPath(name.replace("\\", "/"))
  return path.is_absolute() or bool(re.match(r"^[A-Za-z]:", name)) or ".." in path.parts


def _safe_extract(archive: pathlib.Path, dest: pathlib.Path) -> None:
  """Extracts `archive` into `dest` after checking every member lands inside `dest`.

  zip: a member with an absolute path or '..' is refused (ZipFile would silently rewrite it);
  zipfile writes no links. tar: the same, plus tarfile's 'data' filter (links leaving `dest`,
  device files, ...) applied to every member before anything is written.
  """
  try:  # a truncated or mislabelled download fails here, before anything is written
    opened = zipfile.ZipFile(archive) if archive.suffix == ".zip" else tarfile.open(archive)
  except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
    raise PrepareError(f"{archive}: not a readable {'zip' if archive.suffix == '.zip' else 'tar'} "
                       f"archive ({e}); nothing was extracted (incomplete download?)") from e
  dest.mkdir(parents=True, exist_ok=True)
  if archive.suffix == ".zip":
    with opened as zf:
      for name in zf.namelist():
        if _leaves(name):
          _refuse(archive, f"member {name!r} would be written outside {dest}")
      zf.extractall(dest)
  else:
    with opened as tf:
      for member in tf.getmembers():
        if _leaves(member.name):
          _refuse(archive, f"member {member.name!r} would be written outside {dest}")
        try:
          tarfile.data_filter(member, str(dest))
        except tarfile.FilterError as e:  # links leaving dest, absolute links, special files
          _refuse(archive, f"member {member.name!r}: {e}")
      tf.extractall(dest, filter="data")


def _plain_name(text: str) -> bool:
  """A single file or folder name: no separator, not '.'/'..', nothing that can leave a folder."""
  return text not in ("", ".", "..") and not any(c in text for c in "/\\\0")


def _inside(root: pathlib.Path, path: pathlib.Path) -> bool:
  """Whether `path`, symlinks resolved, is `root` or below it."""
  return path.resolve().is_relative_to(root.resolve())


def _regroup_tiny_imagenet_val(root: pathlib.Path) -> None:
  """val/images/*.JPEG + val_annotations.txt -> val/<wnid>/images/*.JPEG (idempotent).

  The annotations come from the archive: every line is checked before anything moves, so a
  file or class name that would reach outside `root` ('../', a separator, a symlink out) is
  refused with nothing moved.
  """
  val = root / "val"
  annotations = val / "val_annotations.txt"
  images = val / "images"
  if not images.is_dir():
    return  # already regrouped
  if not annotations.is_file():
    raise PrepareError(f"{annotations} is missing; cannot assign val images to classes")
  moves = []
  for number, line in enumerate(annotations.read_text().splitlines(), 1):
    parts = line.split("\t")
    if len(parts) < 2:
      continue
    filename, wnid = parts[0], parts[1]
    for field, value in (("file name", filename), ("class", wnid)):
      if not _plain_name(value):
        raise PrepareError(f"{annotations}:{number}: {field} {value!r} is not a plain name; "
                           f"refusing a path that could leave {root}, nothing was moved (corrupt "
                           "or crafted archive?)")
    src, dest = images / filename, val / wnid / "images" / filename
    if not (_inside(root, src) and _inside(root, dest.parent.parent)):
      raise PrepareError(f"{annotations}:{number}: {src} or {dest.parent} resolves outside "
                         f"{root} (a symlink?); nothing was moved")
    moves.append((src, dest))
  for src, dest in moves:
    if src.is_file():
      dest.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(src), str(dest))
  if not any(images.iterdir()):
    images.rmdir()


def prepare_folder(name: str, data_dir: pathlib.Path, manual_dir: pathlib.Path | None) -> None:
  spec = sources.FOLDER_DATASETS[name]
  root = data_dir / spec["folder"]
  if not (root / "train").is_dir():
    if manual_dir is None:
      raise PrepareError(f"{root}/train not found and no --manual_dir given: place "
                         f"{spec['archive'][0]} in MANUAL_DIR and rerun with --manual_dir "
                         "MANUAL_DIR")
    candidates = sorted(p for p in manual_dir.iterdir()
                        if p.name.endswith((".zip", ".tar", ".tar.gz", ".tgz")))
    preferred = [p for p in candidates if p.name.startswith(spec["folder"])]
    if not candidates:
      raise PrepareError(f"no archive (.zip/.tar/.tar.gz) in {manual_dir}; expected "
                         f"{spec['archive'][0]}")
    archive = (preferred or candidates)[0]
    print(f"extracting {archive} ...")
    if name == "tiny_imagenet":
      _safe_extract(archive, data_dir)  # the zip holds tiny-imagenet-200/
    else:
      _safe_extract(archive, root)
      subdirs = [p for p in root.iterdir() if p.is_dir()]
      if not (root / "train").is_dir() and len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        for child in subdirs[0].iterdir():  # archive had one top-level folder: flatten it
          shutil.move(str(child), str(root / child.name))
        subdirs[0].rmdir()
  if name == "tiny_imagenet":
    _regroup_tiny_imagenet_val(root)
  for split, folder in sources.FOLDER_SPLITS.items():
    classes = sources._class_dirs(root / folder)  # pylint: disable=protected-access
    if not classes:
      raise PrepareError(f"{root / folder} has no class subfolders; expected "
                         f"{folder}/<class>/*.JPEG")
    print(f"{name}/{split}: {len(classes)} classes in {root / folder}")


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_enum("dataset", None, sources.DATASETS, "Dataset to prepare.",
                    flag_values=flag_values, required=True)
  flags.DEFINE_string("data_dir", None, "Where the prepared dataset goes (the training "
                      "config's data_dir).", flag_values=flag_values, required=True)
  flags.DEFINE_string("manual_dir", None, "Folder holding the downloaded archive(s); no network "
                      "is used then.", flag_values=flag_values)


def prepare_command(args) -> None:
  """Prepares one dataset; a problem the user must fix raises PrepareError."""
  data_dir = pathlib.Path(args.data_dir)
  manual_dir = None if args.manual_dir is None else pathlib.Path(args.manual_dir)
  if manual_dir is not None and not manual_dir.is_dir():
    raise PrepareError(f"--manual_dir {manual_dir} is not a directory")
  if args.dataset in sources.TFDS_DATASETS:
    prepare_tfds(args.dataset, data_dir, manual_dir)
  elif args.dataset in sources.FOLDER_DATASETS:
    prepare_folder(args.dataset, data_dir, manual_dir)
  else:
    print(f"{args.dataset} is generated in memory; nothing to prepare.")


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, prepare_command, argv, errors=(PrepareError,))


if __name__ == "__main__":
  main()
