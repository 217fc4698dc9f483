"""Dataset sources: every dataset becomes one in-memory uint8 array plus its normalisation constants.

Why in memory: augmentation and client sampling run on the accelerator, so the whole training
split is decoded once into `uint8 [n, H, W, 3]` (CIFAR-10: 150 MB) and indexed there.

tfds datasets are read **without TensorFlow** through `tfds.data_source` on a dataset prepared once in
`array_record` format (`python -m mocosfl_jax.data.prepare`, which needs TF; this module never
imports it). Records are stored shuffled, so examples are sorted by their `id` feature where the
dataset has one (CIFAR, SVHN); STL-10 has no id and keeps tfds's deterministic storage order.

Normalisation constants are the reference's (docs/reference.md, 'Datasets and normalisation'),
including its quirks: the CIFAR-10 std is the common 0.2023/0.1994/0.2010 (not the true pixel
std) and the STL-10 SSL split (`train` = train+unlabelled) is normalised with the CIFAR-10
constants while its eval splits use STL's.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import numpy as np

# (mean, std), RGB, on the [0, 1] scale, as the reference.
CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
NORMALISATION = {
    "cifar10": CIFAR10_MEAN_STD,
    "cifar100": ((0.50708, 0.48655, 0.44092), (0.26733, 0.25644, 0.27615)),
    "svhn": ((0.3522, 0.4004, 0.4463), (0.1189, 0.1377, 0.1784)),
    "stl10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "tiny_imagenet": ((0.5141, 0.5775, 0.3985), (0.2927, 0.2570, 0.1434)),
    "imagenet12": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  tfds_name: str
  splits: dict  # our split -> tuple of tfds splits (concatenated in this order)
  size: int
  num_classes: int
  archives: tuple  # ((filename, size in bytes), ...) that tfds looks for in --manual_dir


# Archive names and sizes are tfds's registered ones (tensorflow_datasets/url_checksums/*.txt);
# tests check that they still agree with the installed tfds.
TFDS_DATASETS = {
    "cifar10": _TfdsSpec("cifar10", {"train": ("train",), "test": ("test",)}, 32, 10,
                         (("cifar-10-binary.tar.gz", 170052171),)),
    "cifar100": _TfdsSpec("cifar100", {"train": ("train",), "test": ("test",)}, 32, 100,
                          (("cifar-100-binary.tar.gz", 168513733),)),
    "svhn": _TfdsSpec("svhn_cropped", {"train": ("train",), "test": ("test",), "extra": ("extra",)},
                      32, 10, (("train_32x32.mat", 182040794), ("test_32x32.mat", 64275384),
                               ("extra_32x32.mat", 1329278602))),
    "stl10": _TfdsSpec("stl10", {"train": ("train", "unlabelled"), "train_labeled": ("train",),
                                 "test": ("test",), "unlabelled": ("unlabelled",)}, 96, 10,
                       (("stl10_binary.tar.gz", 2640397119),)),
}

# Image-folder datasets: <data_dir>/<folder>/{train,val}/<class>/**/*.{jpg,jpeg,png}.
FOLDER_DATASETS = {
    "tiny_imagenet": dict(folder="tiny-imagenet-200", size=64,
                          archive=("tiny-imagenet-200.zip", "about 248 MB")),
    "imagenet12": dict(folder="imagenet12", size=224,
                       archive=("imagenet12.zip / .tar / .tar.gz (train/<class>/, val/<class>/)",
                                "size depends on the copy")),
}
FOLDER_SPLITS = {"train": "train", "test": "val"}
OTHER_DATASETS = ("digits", "synthetic")
DATASETS = tuple(TFDS_DATASETS) + tuple(FOLDER_DATASETS) + OTHER_DATASETS
# Unlabelled, training split only: usable as an auxiliary set (config.aux_dataset), not as the
# dataset a run is evaluated on.
AUX_ONLY_DATASETS = ("sample_photos",)
SAMPLE_PHOTOS_CROPS = 2048
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


class DatasetNotPreparedError(RuntimeError):
  """A dataset is missing, unprepared, in the wrong format or corrupt; the message says how to fix it."""


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """A whole split in memory.

  Attributes:
    images: uint8 [n, H, W, 3].
    labels: int32 [n]; -1 marks unlabelled examples (STL-10 `unlabelled`).
    num_classes: number of label classes.
    mean, std: float32 (3,) RGB normalisation constants on the [0, 1] scale.
    input_size: H (== W).
    name: dataset name (e.g. 'cifar10').
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  input_size: int
  name: str

  def __post_init__(self):
    imgs, labels = self.images, self.labels
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3:
      raise ValueError(f"images must be uint8 [n,H,W,3], got {imgs.dtype} {imgs.shape}")
    if labels.dtype != np.int32 or labels.shape != (imgs.shape[0],):
      raise ValueError(f"labels must be int32 [{imgs.shape[0]}], got {labels.dtype} {labels.shape}")
    if imgs.shape[1] != self.input_size or imgs.shape[2] != self.input_size:
      raise ValueError(f"input_size={self.input_size} but images are {imgs.shape[1:3]}")
    for field in ("mean", "std"):
      value = np.asarray(getattr(self, field), np.float32)
      if value.shape != (3,):
        raise ValueError(f"{field} must have shape (3,), got {value.shape}")
      object.__setattr__(self, field, value)

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def subset(self, indices) -> "ArrayDataset":
    """Rows `indices` (any int array), same constants."""
    indices = np.asarray(indices, np.int64)
    return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])


def prepare_command(name: str, data_dir, manual_dir: str | None = "MANUAL_DIR") -> str:
  cmd = f"python -m mocosfl_jax.data.prepare --dataset {name} --data_dir {data_dir}"
  return cmd + (f" --manual_dir {manual_dir}" if manual_dir else "")


def _not_prepared(name: str, data_dir, problem: str) -> DatasetNotPreparedError:
  """Two lines: what is wrong and where the archive goes, then the command alone on its line
  (to copy and run)."""
  if name in TFDS_DATASETS:
    files = ", ".join(f"{f} ({s:,} bytes)" for f, s in TFDS_DATASETS[name].archives)
    where = (f"place {files} in MANUAL_DIR (tfds uses the local copy, no network; without "
             "--manual_dir it downloads), then run once (needs TensorFlow: pip install .[prepare]):")
  else:
    spec = FOLDER_DATASETS[name]
    archive, size = spec["archive"]
    where = (f"place {archive} ({size}) in MANUAL_DIR, or an extracted folder with "
             f"train/<class>/ and val/<class>/ at {data_dir}/{spec['folder']}, then run:")
  return DatasetNotPreparedError(
      f"Dataset {name!r} is not usable in {data_dir}: {problem}; {where}\n  "
      f"{prepare_command(name, data_dir)}")


def _resolved_data_dir(data_dir) -> str:
  if data_dir is not None:
    return str(data_dir)
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
  """PIL bilinear resize of uint8 [n,h,w,c] to [n,size,size,c] (PIL antialiases when shrinking)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if images.shape[1] == size and images.shape[2] == size:
    return images
  out = np.empty((images.shape[0], size, size, images.shape[3]), np.uint8)
  for i, img in enumerate(images):
    mode_img = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    resized = np.asarray(mode_img.resize((size, size), Image.BILINEAR))
    out[i] = resized[..., None] if resized.ndim == 2 else resized
  return out


def _read_source(src, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Decodes a tfds random-access source into (images, labels, ids or None), chunk by chunk into
  preallocated arrays (STL-10 unlabelled is 2.8 GB decoded; a list of dicts would double that)."""
  n = len(src)
  images = labels = ids = None
  for start in range(0, n, chunk):
    keys = list(range(start, min(n, start + chunk)))
    try:
      examples = src.__getitems__(keys)
    except TypeError:  # tfds mock sources do not implement batched reads
      examples = [src[i] for i in keys]
    if images is None:
      first = np.asarray(examples[0]["image"])
      images = np.empty((n,) + first.shape, np.uint8)
      labels = np.empty((n,), np.int32)
      ids = np.empty((n,), object) if "id" in examples[0] else None
    for offset, e in enumerate(examples):
      images[start + offset] = e["image"]
      labels[start + offset] = int(e["label"])
      if ids is not None:
        ids[start + offset] = e["id"].decode() if isinstance(e["id"], bytes) else str(e["id"])
  if images is None:
    return np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0,), np.int32), None
  return images, labels, (ids.astype(str) if ids is not None else None)


def _load_tfds(name: str, split: str, data_dir, image_size):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  spec = TFDS_DATASETS[name]
  resolved = _resolved_data_dir(data_dir)
  all_images, all_labels = [], []
  for tfds_split in spec.splits[split]:
    try:
      src = tfds.data_source(spec.tfds_name, split=tfds_split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises NotImplementedError/AssertionError/FileNotFoundError here
      problem = _diagnose_tfds_dir(spec.tfds_name, resolved)
      if (pathlib.Path(resolved) / spec.tfds_name).exists():  # tfds's own text helps only then
        problem += f" ({type(e).__name__}: {e})"
      raise _not_prepared(name, resolved, problem) from e
    try:
      images, labels, ids = _read_source(src)
    except Exception as e:  # truncated/corrupt array_record shards or undecodable images
      raise _not_prepared(name, resolved, f"split {tfds_split!r} could not be decoded, the prepared "
                          f"files look corrupt; delete {resolved}/{spec.tfds_name} and re-prepare "
                          f"({type(e).__name__}: {e})") from e
    if ids is not None:
      order = np.argsort(ids, kind="stable")
      images, labels = images[order], labels[order]
    all_images.append(images)
    all_labels.append(labels)
  images = np.concatenate(all_images) if len(all_images) > 1 else all_images[0]
  labels = np.concatenate(all_labels) if len(all_labels) > 1 else all_labels[0]
  if images.shape[1:] != (spec.size, spec.size, 3):
    raise _not_prepared(name, resolved, f"unexpected image shape {images.shape[1:]}")
  size = image_size or spec.size
  images = _resize_uint8(images, size)
  mean, std = NORMALISATION[name]
  if name == "stl10" and split == "train":
    mean, std = CIFAR10_MEAN_STD  # reference quirk: the SSL split uses CIFAR-10's constants
  return ArrayDataset(images, labels, spec.num_classes, np.array(mean), np.array(std), size, name)


def _diagnose_tfds_dir(tfds_name: str, data_dir: str) -> str:
  root = pathlib.Path(data_dir) / tfds_name
  if not root.exists():
    return f"{root} does not exist (dataset not prepared)"
  files = [p.name for p in root.rglob("*") if p.is_file()]
  if any(".tfrecord" in f for f in files) and not any(".array_record" in f for f in files):
    return (f"{root} was prepared in TFRECORD format, which cannot be read without TensorFlow; "
            "delete it and re-prepare (prepare uses array_record)")
  if not any(".array_record" in f for f in files):
    return f"{root} holds no array_record files (preparation incomplete?)"
  return f"{root} exists but tfds could not open it (incomplete or corrupt)"


def _folder_root(name: str, data_dir) -> pathlib.Path:
  if data_dir is None:
    raise _not_prepared(name, "DATA_DIR", "image-folder datasets need an explicit data_dir")
  root = pathlib.Path(data_dir) / FOLDER_DATASETS[name]["folder"]
  if not root.is_dir() and (pathlib.Path(data_dir) / "train").is_dir():
    root = pathlib.Path(data_dir)
  return root


def _class_dirs(split_dir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else []


def _raise(error: OSError):
  raise error


def _image_files(top: pathlib.Path) -> list[pathlib.Path]:
  """Image files under `top`, recursively, sorted; [] if `top` does not exist.

  Not `Path.rglob`: it silently skips a folder it may not list, and the run would then train on
  part of the data. Here a folder that cannot be listed raises its OSError.
  """
  try:
    os.stat(top)
  except FileNotFoundError:
    return []
  files = []
  for folder, _, names in os.walk(top, onerror=_raise):
    files += [pathlib.Path(folder, n) for n in names
              if os.path.splitext(n)[1].lower() in _IMAGE_EXTS]
  return sorted(files)


def _read_image(path: pathlib.Path, size: int) -> np.ndarray:
  """Shorter side to `size` (bilinear), centre crop size x size, RGB uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    im = im.convert("RGB")
    w, h = im.size
    if (w, h) != (size, size):
      scale = size / min(w, h)
      nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
      im = im.resize((nw, nh), Image.BILINEAR)
      left, top = (nw - size) // 2, (nh - size) // 2
      im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, np.uint8)


def _load_folder(name: str, split: str, data_dir, image_size):
  try:
    return _load_folder_files(name, split, data_dir, image_size)
  except OSError as e:  # a folder that cannot be listed (permissions, I/O error)
    where = e.filename if e.filename is not None else data_dir
    raise DatasetNotPreparedError(
        f"Dataset {name!r} in {data_dir}: cannot list {where} ({e.strerror or e}); make every "
        "folder of the dataset readable (chmod -R a+rX), a folder left out would silently drop "
        "its images from the run") from e


def _load_folder_files(name: str, split: str, data_dir, image_size):
  spec = FOLDER_DATASETS[name]
  root = _folder_root(name, data_dir)
  classes = _class_dirs(root / "train")  # class index mapping always from train/
  split_dir = root / FOLDER_SPLITS[split]
  if not classes:
    raise _not_prepared(name, data_dir, f"{root / 'train'} has no class subfolders")
  if not set(_class_dirs(split_dir)) & set(classes):
    raise _not_prepared(name, data_dir, f"{split_dir} has no class subfolders named like train/'s "
                        "(tiny-imagenet's raw val/ must be regrouped by class: prepare does it)")
  size = image_size or spec["size"]
  paths, labels = [], []
  for label, cls in enumerate(classes):
    files = _image_files(split_dir / cls)
    paths += files
    labels += [label] * len(files)
  if not paths:
    raise _not_prepared(name, data_dir, f"no images under {split_dir}")
  images = np.empty((len(paths), size, size, 3), np.uint8)
  for i, path in enumerate(paths):
    try:
      images[i] = _read_image(path, size)
    except Exception as e:  # PIL raises many types for broken files
      raise _not_prepared(name, data_dir, f"cannot decode {path} ({e})") from e
  mean, std = NORMALISATION[name]
  return ArrayDataset(images, np.asarray(labels, np.int32), len(classes), np.array(mean),
                      np.array(std), size, name)


@functools.lru_cache(maxsize=4)
def _digits_arrays(size: int):
  """(train images, train labels, test images, test labels, mean, std); cached, read-only arrays."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  train_idx, test_idx = train_test_split(np.arange(len(grey)), test_size=0.2, random_state=0,
                                         stratify=digits.target)
  out = []
  for rows in (train_idx, test_idx):
    out += [np.repeat(_resize_uint8(grey[rows], size), 3, axis=-1),
            digits.target[rows].astype(np.int32)]
  # Constants from the train split so test normalisation never looks at test data.
  pixels = out[0].reshape(-1, 3).astype(np.float64) / 255.0
  out += [pixels.mean(0), pixels.std(0)]
  for a in out:
    a.setflags(write=False)
  return tuple(out)


def _load_digits(split: str, image_size):
  """sklearn digits: 8x8 grey 0..16 -> uint8 RGB, bilinear to image_size, stratified 80/20 (seed 0)."""
  size = image_size or 32
  tr_x, tr_y, te_x, te_y, mean, std = _digits_arrays(size)
  images, labels = (tr_x, tr_y) if split == "train" else (te_x, te_y)
  return ArrayDataset(images, labels, 10, mean, std, size, "digits")


def _load_synthetic(split: str, image_size, n=None, num_classes=10, seed=0, noise=48.0):
  """Random images whose class is learnable: a per-class colour/gradient prototype plus noise.

  Prototypes depend only on (num_classes, image_size, seed); train/test draw different noise.
  """
  size = image_size or 16
  n = n if n is not None else (256 if split == "train" else 64)
  if n < 0 or num_classes < 1:
    raise ValueError(f"synthetic needs n >= 0 and num_classes >= 1, got n={n}, "
                     f"num_classes={num_classes}")
  proto_rng = np.random.default_rng([seed, size, num_classes])
  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
  base = proto_rng.uniform(50, 205, (num_classes, 1, 1, 3))
  slopes = proto_rng.uniform(-50, 50, (num_classes, 2, 1, 1, 3))
  protos = base + slopes[:, 0] * yy[None, :, :, None] + slopes[:, 1] * xx[None, :, :, None]
  rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split] + 2])
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  images = protos[labels] + rng.normal(0.0, noise, (n, size, size, 3))
  images = np.clip(np.round(images), 0, 255).astype(np.uint8)
  return ArrayDataset(images, labels, num_classes, np.full(3, 0.5), np.full(3, 0.25), size,
                      "synthetic")


@functools.lru_cache(maxsize=4)
def _sample_photo_crops(size: int, n: int, seed: int = 0) -> np.ndarray:
  """n seeded random square crops of scikit-learn's two sample photographs, resized to size.

  Crop sides are uniform between a tenth and all of the photo's height (427 px), positions
  uniform, the photo chosen at random; PIL bilinear resize (antialiased when shrinking).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = [Image.fromarray(np.asarray(p, np.uint8)) for p in load_sample_images().images]
  rng = np.random.default_rng([seed, size, n])
  out = np.empty((n, size, size, 3), np.uint8)
  for i in range(n):
    photo = photos[int(rng.integers(len(photos)))]
    w, h = photo.size
    side = int(rng.integers(max(size, h // 10), h + 1))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = photo.crop((left, top, left + side, top + side))
    out[i] = np.asarray(crop.resize((size, size), Image.BILINEAR))
  out.setflags(write=False)
  return out


def _load_sample_photos(image_size):
  """`sample_photos`: unlabelled crops of the photographs that ship with scikit-learn (china.jpg,
  flower.jpg), an offline auxiliary set disjoint from digits; mean / std of its own pixels."""
  size = image_size or 32
  images = _sample_photo_crops(size, SAMPLE_PHOTOS_CROPS)
  pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
  return ArrayDataset(images, np.full(len(images), -1, np.int32), 0, pixels.mean(0),
                      pixels.std(0), size, "sample_photos")


def valid_splits(name: str) -> tuple[str, ...]:
  if name in TFDS_DATASETS:
    return tuple(TFDS_DATASETS[name].splits)
  if name in FOLDER_DATASETS:
    return tuple(FOLDER_SPLITS)
  if name in OTHER_DATASETS:
    return ("train", "test")
  if name in AUX_ONLY_DATASETS:
    return ("train",)
  raise ValueError(f"dataset={name!r} is unknown; valid: "
                   f"{', '.join(DATASETS + AUX_ONLY_DATASETS)}")


def load(name: str, split: str, *, data_dir=None, image_size: int | None = None,
         **kwargs) -> ArrayDataset:
  """Loads one split into memory.

  Args:
    name: one of `DATASETS` ('cifar10', 'cifar100', 'svhn', 'stl10', 'tiny_imagenet',
      'imagenet12', 'digits', 'synthetic') or `AUX_ONLY_DATASETS` ('sample_photos': unlabelled
      crops of scikit-learn's sample photographs, 'train' only).
    split: see `valid_splits(name)`; always 'train' and 'test' ('test' is val/ for image folders).
      stl10: 'train' = train+unlabelled (CIFAR-10 constants, as the reference's SSL loader),
      'train_labeled', 'test', 'unlabelled' (STL constants).
    data_dir: tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets) or the parent of the
      image folder.
    image_size: resize to this square size (PIL bilinear); default the dataset's reference size.
    **kwargs: only for 'synthetic': n, num_classes, seed, noise.

  Raises:
    DatasetNotPreparedError: missing, unprepared or corrupt data; the message names the command.
    ValueError: unknown name/split or bad kwargs.
  """
  if split not in valid_splits(name):
    raise ValueError(f"split={split!r} is not valid for {name}; valid: {valid_splits(name)}")
  if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
    raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
  if kwargs and name != "synthetic":
    raise ValueError(f"extra arguments {sorted(kwargs)} are only accepted by 'synthetic'")
  if name in TFDS_DATASETS:
    return _load_tfds(name, split, data_dir, image_size)
  if name in FOLDER_DATASETS:
    return _load_folder(name, split, data_dir, image_size)
  if name == "digits":
    return _load_digits(split, image_size)
  if name == "sample_photos":
    return _load_sample_photos(image_size)
  return _load_synthetic(split, image_size, **kwargs)


def cifar_stand_in(name: str, split: str, data_dir=None, image_size=None) -> ArrayDataset:
  """A CIFAR split of the real size and classes without its pixels, in place of `load`.

  The images are one zero image broadcast to every row (no memory), the labels balanced. A paper
  config resolved against it has the real schedule (the partition depends on the labels only),
  and its steps take the real time, so schedules can be checked and steps timed without the
  dataset (tests/test_paper_schedule.py, benchmarks/eval_share.py).
  """
  del data_dir, image_size
  if name not in ("cifar10", "cifar100"):
    raise ValueError(f"no stand-in for {name!r}; valid: cifar10, cifar100")
  n, classes = (50_000 if split == "train" else 10_000), (10 if name == "cifar10" else 100)
  images = np.broadcast_to(np.zeros((1, 32, 32, 3), np.uint8), (n, 32, 32, 3))
  mean, std = NORMALISATION[name]
  return ArrayDataset(images, (np.arange(n) % classes).astype(np.int32), classes,
                      np.asarray(mean), np.asarray(std), 32, name)


def holdout(ds: ArrayDataset, fraction: float, seed: int, *,
            labelled_only: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
  """Splits a validation set off the *training* data (checkpoint selection must not see test data).

  A seeded random `fraction` of the rows becomes `val`; both parts keep the original row order.
  labelled_only: draw `val` from the labelled rows only (a fraction of those), so a split with
  unlabelled rows (STL-10's train+unlabelled) gives a validation set that kNN can score; the
  unlabelled rows all stay in the training part. On fully labelled data the split is the same.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must be in (0, 1), got {fraction}")
  rows = np.flatnonzero(ds.labels >= 0) if labelled_only else np.arange(len(ds))
  n = len(rows)
  n_val = int(round(fraction * n))
  if n_val == 0 or n_val == len(ds):
    raise ValueError(f"fraction={fraction} of {n} rows leaves an empty train or val part")
  val_rows = np.sort(rows[np.random.default_rng(seed).permutation(n)[:n_val]])
  keep = np.ones(len(ds), bool)
  keep[val_rows] = False
  return ds.subset(np.flatnonzero(keep)), ds.subset(val_rows)

