"""The model-inversion attack on a trained run's client slice (the reference's MIA evaluation).

    result, grid = attack.attack(workdir, "latest", client=0, settings=attack.Settings())
    attack.write_outputs(workdir, result, grid)

An attacker who holds a few of the training images and sees what a client sends for them (its
smashed data) trains a decoder from smashed data back to images, then inverts the smashed data
of images it never saw. As the reference measures it:

1. Pairs: a random `fraction` (default 1%, int(n x fraction) images) of the run's training images
   goes through client K's online slice in eval mode, normalised at the model's input size; the
   smashed data is the decoder's input, the image (uint8 / 255, on [0, 1]) its target. The pairs
   are split 90/10 into training and validation pairs in the reference's order (numpy's legacy
   shuffle with seed 123; the first floor(0.9 n) train), so 2 pairs is the least that leaves one
   of each.
2. The decoder (privacy/decoder.py; res_normN4C64 with BatchNorm by default) trains with Adam
   (lr 1e-3), batch 32, 50 epochs, MSE loss. Every epoch visits the training pairs in a fresh
   random order, in full batches and a last partial one (a PyTorch loader without drop_last).
   After each epoch the validation MSE (eval mode, mean over the validation pairs) is measured
   and the weights of the epoch with the lowest one are kept.
3. Test: the first `num_test` (128) images of the test split through the same client slice and
   the kept decoder (eval mode); MSE, SSIM and PSNR per image (privacy/similarity.py), averaged.

`jpeg=True` gives the reference's lossy targets: every target image (training, validation and
test) is saved as a JPEG at PIL's default quality (75) and read back; the client slice still sees
the original image. docs/reference.md ('Model-inversion attack') lists where we differ from the
reference and why.

One training epoch is one compiled call (`lax.scan` over its full batches, then the partial one);
the validation MSE is a second call. Nothing here writes until `write_outputs`.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from PIL import Image

from mocosfl_jax import precision
from mocosfl_jax.evaluation import knn, protocols
from mocosfl_jax.models import conv
from mocosfl_jax.privacy import decoder as decoder_lib
from mocosfl_jax.privacy import similarity
from mocosfl_jax.run import checkpoints, metrics

TRAIN_SHARE = 0.9        # the reference's 90/10 split of the pairs
SPLIT_SEED = 123         # ... made with numpy's legacy global shuffle under this seed
MIN_PAIRS = 2            # floor(0.9 n) >= 1 and n - floor(0.9 n) >= 1
JPEG_QUALITY = 75        # PIL's default, what the reference's save_image to .jpg gives
GRID_IMAGES = 16         # test images shown in attack.png
GRID_MIN_PIXELS = 64     # small images are scaled up (nearest neighbour) to at least this
EVAL_CHUNK = 256         # rows per decoder call when reconstructing (eval mode: rows independent)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The attack's settings; the defaults are the reference's."""
  fraction: float = 0.01             # of the training images the attacker holds
  decoder: str = decoder_lib.DEFAULT_NAME
  epochs: int = 50
  batch_size: int = 32
  lr: float = 1e-3
  num_test: int = 128                # the first num_test images of the test split
  jpeg: bool = False                 # the reference's JPEG round trip of the targets
  seed: int = 0                      # which training images, decoder init, batch order


def _flag(name: str, names: dict | None) -> str:
  """How the user sets `name`: a command-line flag by default, or `names[name]`."""
  return (names or {}).get(name, "--" + name.replace("_", "-"))


def _round_up(x: float, digits: int = 3) -> float:
  """`x` rounded up to `digits` significant digits (a minimum that still satisfies the rule)."""
  step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
  return round(math.ceil(x / step - 1e-9) * step, 12)


def num_pairs(num_images: int, fraction: float) -> int:
  """How many training images the attacker holds: int(n x fraction), as the reference."""
  return int(num_images * fraction)


def check_options(settings: Settings, names: dict | None = None) -> None:
  """Refuses settings that are wrong whatever the run (ValueError naming the flag)."""
  decoder_lib.parse_name(settings.decoder)
  for field, low in (("epochs", 1), ("batch_size", 1), ("num_test", 1)):
    value = getattr(settings, field)
    if not isinstance(value, int) or value < low:
      raise ValueError(f"{_flag(field, names)} {value!r}: must be an int >= {low}")
  if not settings.lr > 0:
    raise ValueError(f"{_flag('lr', names)} {settings.lr!r}: must be > 0")
  if not 0.0 < settings.fraction <= 1.0:
    raise ValueError(f"{_flag('fraction', names)} {settings.fraction!r}: must be in (0, 1]")


def check_data(settings: Settings, num_images: int, image_size: int, smashed_shape,
               names: dict | None = None) -> None:
  """Refuses settings that do not fit the run: too few pairs, a decoder that cannot reach the
  image size from the smashed data's."""
  n = num_pairs(num_images, settings.fraction)
  if n < MIN_PAIRS:
    raise ValueError(
        f"{_flag('fraction', names)} {settings.fraction} takes {n} of the {num_images} training "
        f"images; the 90/10 split into decoder training and validation pairs needs at least "
        f"{MIN_PAIRS} ({_flag('fraction', names)} >= {_round_up(MIN_PAIRS / num_images)})")
  decoder_lib.upsampling_stages(image_size, smashed_shape[0])


def check_settings(settings: Settings, num_images: int, image_size: int, smashed_shape,
                   names: dict | None = None) -> None:
  """`check_options` and `check_data`."""
  check_options(settings, names)
  check_data(settings, num_images, image_size, smashed_shape, names)


# ---- data ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _smash_fn(net):
  def fn(client_vars, mean, std, images):
    x = (images.astype(precision.float_dtype()) / 255.0 - mean) / std
    return net.apply_client(client_vars, x, train=False)[0]
  return jax.jit(fn)


def smash(net, client_vars, images: np.ndarray, mean, std, batch_size: int = 256) -> np.ndarray:
  """Smashed data [n, h, w, c] of uint8 images [n, H, W, 3] through a client slice, eval mode."""
  dtype = precision.float_dtype()
  return knn.extract_features(_smash_fn(net), images, batch_size, args=(
      client_vars, jnp.asarray(mean, dtype), jnp.asarray(std, dtype)))


def jpeg_round_trip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
  """A uint8 [H, W, 3] image saved as a JPEG and read back (what the reference trains on)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  buf.seek(0)
  with Image.open(buf) as im:
    return np.asarray(im.convert("RGB"))


def targets(images: np.ndarray, jpeg: bool = False) -> np.ndarray:
  """The decoder's targets: uint8 images / 255 on [0, 1]; `jpeg`: after a JPEG round trip."""
  if jpeg:
    images = np.stack([jpeg_round_trip(im) for im in images])
  return np.asarray(images, precision.float_dtype()) / 255.0


def split_indices(n: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """(training, validation) indices of n pairs, exactly as the reference splits them."""
  indices = list(range(n))
  np.random.RandomState(seed).shuffle(indices)   # == np.random.seed(seed); np.random.shuffle
  split = int(np.floor(TRAIN_SHARE * n))
  return np.asarray(indices[:split], np.int64), np.asarray(indices[split:], np.int64)


# ---- decoder training -------------------------------------------------------------------------

def build_decoder(name: str, image_size: int, smashed_shape) -> decoder_lib.Decoder:
  """The attack's decoder (BatchNorm). Its convolutions are 'auto' (models/conv.py): Winograd
  on CPU, where XLA's weight-gradient convolution inside the epoch's `lax.scan` runs about 80x
  slower than Winograd's matmuls; XLA's convolution elsewhere. Speed and rounding only."""
  return decoder_lib.build(name, image_size, smashed_shape, "bn",
                           conv_impl=conv.resolve_conv_impl("auto"))


def _loss(dec, params, batch_stats, x, y):
  out, new = dec.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                       mutable=["batch_stats"])
  return jnp.mean(jnp.square(out - y)), new.get("batch_stats", batch_stats)


def train_step(dec, tx, carry, x, y):
  """One Adam step on MSE: ((variables, opt_state), batch) -> ((variables, opt_state), loss)."""
  variables, opt_state = carry
  (loss, stats), grads = jax.value_and_grad(functools.partial(_loss, dec), has_aux=True)(
      variables["params"], variables["batch_stats"], x, y)
  updates, opt_state = tx.update(grads, opt_state, variables["params"])
  params = optax.apply_updates(variables["params"], updates)
  return ({"params": params, "batch_stats": stats}, opt_state), loss


def optimizer(lr: float) -> optax.GradientTransformation:
  """Adam with PyTorch's defaults (betas 0.9, 0.999, eps 1e-8), no weight decay."""
  return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


def epoch_order(key, n: int, batch_size: int):
  """(full batches [n // B, B], the rest [n % B]): indices of one epoch's random order."""
  perm = jax.random.permutation(key, n)
  full = (n // batch_size) * batch_size
  return perm[:full].reshape(n // batch_size, batch_size), perm[full:]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def train_epoch(dec, lr: float, batch_size: int, variables, opt_state, key, x, y):
  """One epoch in one call: (variables, opt_state, mean training MSE over the epoch's pairs)."""
  tx = optimizer(lr)
  full, rest = epoch_order(key, x.shape[0], batch_size)

  def step(carry, idx):
    return train_step(dec, tx, carry, x[idx], y[idx])

  carry, total = (variables, opt_state), jnp.zeros((), x.dtype)
  if full.shape[0]:
    carry, losses = lax.scan(step, carry, full)
    total = total + jnp.sum(losses) * batch_size
  if rest.shape[0]:
    carry, loss = step(carry, rest)
    total = total + loss * rest.shape[0]
  return carry[0], carry[1], total / x.shape[0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _reconstruct(dec, variables, smashed, chunk: int):
  n = smashed.shape[0]
  k = -(-n // chunk)
  padded = jnp.concatenate([smashed, jnp.zeros((k * chunk - n,) + smashed.shape[1:],
                                               smashed.dtype)])
  out = lax.map(lambda s: dec.apply(variables, s, train=False),
                padded.reshape((k, chunk) + smashed.shape[1:]))
  return out.reshape((k * chunk,) + out.shape[2:])[:n]


def reconstruct(dec, variables, smashed) -> jax.Array:
  """The decoder's images of `smashed` in eval mode (in chunks; rows are independent)."""
  return _reconstruct(dec, variables, jnp.asarray(smashed), min(len(smashed), EVAL_CHUNK))


def validation_mse(dec, variables, x, y) -> float:
  """Mean over the validation pairs of the per-image MSE, eval mode."""
  return float(jnp.mean(similarity.mse(reconstruct(dec, variables, x), jnp.asarray(y))))


class DecoderFit(NamedTuple):
  variables: dict            # the kept (best validation) decoder variables
  best_epoch: int            # 1-based
  best_val_mse: float
  untrained_val_mse: float
  val_mse: list              # per epoch
  train_mse: list            # per epoch, mean over the epoch's training pairs


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def train_decoder(dec, variables, train_pairs, val_pairs, *, epochs: int, batch_size: int,
                  lr: float, key, log: Callable[[str], None] | None = _stderr) -> DecoderFit:
  """Trains `dec` from `variables` on (smashed, target) pairs; keeps the best validation epoch.

  Epoch e (1-based) orders the training pairs with `fold_in(key, e)`; `log` gets one line per
  epoch (None: silent).
  """
  x, y = map(jnp.asarray, train_pairs)
  vx, vy = map(jnp.asarray, val_pairs)
  opt_state = optimizer(lr).init(variables["params"])
  untrained = validation_mse(dec, variables, vx, vy)
  best_val, best_epoch, best = math.inf, 0, variables
  vals, trains = [], []
  t_start = time.time()
  for epoch in range(1, epochs + 1):
    variables, opt_state, train_mse = train_epoch(dec, float(lr), batch_size, variables,
                                                  opt_state, jax.random.fold_in(key, epoch), x, y)
    val = validation_mse(dec, variables, vx, vy)
    vals.append(val)
    trains.append(float(train_mse))
    if val < best_val:     # strict: the earliest of equal epochs, as the reference
      best_val, best_epoch, best = val, epoch, variables
    if log is not None:
      elapsed = time.time() - t_start
      log(f"attack epoch {epoch}/{epochs} | train MSE {trains[-1]:.5f} | val MSE {val:.5f} | "
          f"best {best_val:.5f} (epoch {best_epoch}) | {elapsed:.1f} s")
  return DecoderFit(best, best_epoch, best_val, untrained, vals, trains)


# ---- test and outputs -------------------------------------------------------------------------

def score(dec, variables, smashed, target_images) -> tuple[np.ndarray, dict]:
  """(reconstructions, {'mse', 'ssim', 'psnr': per-image arrays}) of the kept decoder."""
  recon = reconstruct(dec, variables, smashed)
  t = jnp.asarray(target_images, recon.dtype)
  per_image = {"mse": similarity.mse(recon, t), "ssim": similarity.ssim(recon, t),
               "psnr": similarity.psnr(recon, t)}
  return np.asarray(recon), {k: np.asarray(v, np.float64) for k, v in per_image.items()}


def baselines(train_targets: np.ndarray, train_labels: np.ndarray, test_targets: np.ndarray,
              test_labels: np.ndarray) -> dict:
  """What an attacker scores without inverting anything, from its own training pairs' images.

  'mean_image': the mean of its training targets for every test image (it knows nothing about
  the image); 'class_mean': the mean of its training targets of the test image's class (all it
  knows is the label, what a contrastive representation is trained to keep; a class the
  attacker holds no image of falls back to the mean image). An attack's SSIM is only evidence
  of inversion above these. On 8x8 digits scaled to 16 px the class mean alone reaches SSIM
  0.72 (README, 'Privacy'). 'class_mean' is left out when any label is unknown (-1).
  Returns {name: {'mse', 'ssim', 'psnr'}} (means over the test images).
  """
  train_targets = np.asarray(train_targets)
  mean = train_targets.mean(axis=0)
  guesses = {"mean_image": np.broadcast_to(mean, test_targets.shape)}
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  if (train_labels >= 0).all() and (test_labels >= 0).all():
    by_class = {c: train_targets[train_labels == c].mean(axis=0)
                for c in np.unique(train_labels)}
    guesses["class_mean"] = np.stack([by_class.get(c, mean) for c in test_labels])
  t = jnp.asarray(test_targets)
  out = {}
  for name, guess in guesses.items():
    g = jnp.asarray(guess, t.dtype)
    out[name] = {"mse": float(jnp.mean(similarity.mse(g, t))),
                 "ssim": float(jnp.mean(similarity.ssim(g, t))),
                 "psnr": float(jnp.mean(similarity.psnr(g, t)))}
  return out


def _to_uint8(images) -> np.ndarray:
  return np.clip(np.round(np.asarray(images, np.float64) * 255.0), 0, 255).astype(np.uint8)


def image_grid(originals, reconstructions, max_images: int = GRID_IMAGES,
               min_pixels: int = GRID_MIN_PIXELS, gap: int = 2) -> np.ndarray:
  """uint8 [H, W, 3]: originals in the top row, their reconstructions below, white gaps;
  images smaller than `min_pixels` are scaled up by an integer factor (nearest neighbour)."""
  n = min(len(originals), max_images)
  size = originals.shape[1]
  scale = max(1, -(-min_pixels // size))
  s = size * scale
  canvas = np.full((2 * s + 3 * gap, n * s + (n + 1) * gap, 3), 255, np.uint8)
  for row, images in enumerate((originals, reconstructions)):
    tiles = _to_uint8(images[:n]).repeat(scale, axis=1).repeat(scale, axis=2)
    top = gap + row * (s + gap)
    for i in range(n):
      left = gap + i * (s + gap)
      canvas[top:top + s, left:left + s] = tiles[i]
  return canvas


def attack(workdir, checkpoint="best", client: int = 0, settings: Settings = Settings(), *,
           log: Callable[[str], None] | None = _stderr,
           names: dict | None = None) -> tuple[dict, np.ndarray]:
  """Attacks client `client` of a run's checkpoint; returns (result, attack.png's image).

  Every refusal (no checkpoint, a client or step the run does not have, settings that do not fit
  the run) is raised before the decoder trains: ValueError or FileNotFoundError, one line naming
  the flag (`names` maps a setting to how the caller's user sets it, e.g. a config field).
  """
  t0 = time.time()
  check_options(settings, names)
  ckpt_dir = Path(workdir) / "checkpoints"
  if checkpoints.latest_step(ckpt_dir) is None:
    raise FileNotFoundError(
        f"no checkpoint under {ckpt_dir}; `python -m mocosfl_jax.main --config CONFIG "
        f"--workdir {workdir}` trains a run there and writes them")
  exp, net, clients, _, step = protocols.restore_for_eval(workdir, checkpoint)
  if exp.step.method == "flmoco":
    raise ValueError(f"{workdir} is an FL-MoCo run (method='flmoco'): its clients send no "
                     "smashed data, so there is nothing to invert; attack a split run "
                     "(method='mocosfl')")
  num_clients = int(jax.tree.leaves(clients.online)[0].shape[0])
  if not 0 <= client < num_clients:
    raise ValueError(f"{_flag('client', names)} {client} is out of range: the run has "
                     f"{num_clients} clients (0..{num_clients - 1})")
  train_images, size = exp.train.images, exp.model.input_size
  check_data(settings, len(train_images), size, net.smashed_shape, names)

  client_vars = jax.tree.map(lambda a: a[client], clients.online)
  batch = exp.config.eval_batch_size
  n = num_pairs(len(train_images), settings.fraction)
  chosen = np.random.default_rng(settings.seed).permutation(len(train_images))[:n]
  smashed = smash(net, client_vars, train_images[chosen], exp.aug.mean, exp.aug.std, batch)
  target = targets(train_images[chosen], settings.jpeg)
  train_idx, val_idx = split_indices(n)
  dec = build_decoder(settings.decoder, size, net.smashed_shape)
  init_key, train_key = jax.random.split(jax.random.key(settings.seed))
  if log is not None:
    log(f"attack: step {step}, client {client}, {settings.decoder}, {len(train_idx)} training / "
        f"{len(val_idx)} validation pairs, smashed {tuple(net.smashed_shape)} -> {size}x{size}")
  fit = train_decoder(dec, decoder_lib.init(dec, init_key, net.smashed_shape),
                      (smashed[train_idx], target[train_idx]), (smashed[val_idx], target[val_idx]),
                      epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                      key=train_key, log=log)

  num_test = min(settings.num_test, len(exp.test.images))
  test_images = exp.test.images[:num_test]
  test_target = targets(test_images, settings.jpeg)
  recon, per_image = score(dec, fit.variables,
                           smash(net, client_vars, test_images, exp.aug.mean, exp.aug.std, batch),
                           test_target)
  result = {
      "workdir": str(Path(workdir).absolute()), "checkpoint": str(checkpoint), "step": step,
      "client": client, "num_clients": num_clients, "dataset": exp.train.name,
      "image_size": size, "smashed_shape": list(net.smashed_shape), "decoder": settings.decoder,
      "decoder_conv_impl": dec.conv_impl,
      "settings": dataclasses.asdict(settings),
      "mse": float(per_image["mse"].mean()), "ssim": float(per_image["ssim"].mean()),
      "psnr": float(per_image["psnr"].mean()),
      "test_images": f"the first {num_test} of the test split", "num_test": num_test,
      "num_pairs": n, "num_train": len(train_idx), "num_val": len(val_idx),
      "best_epoch": fit.best_epoch, "best_val_mse": fit.best_val_mse,
      "untrained_val_mse": fit.untrained_val_mse, "val_mse": fit.val_mse,
      "train_mse": fit.train_mse,
      # Without inverting: the attacker's mean image, and its class means given the label.
      "baselines": baselines(target[train_idx], exp.train.labels[chosen][train_idx],
                             test_target, exp.test.labels[:num_test]),
      "seconds": time.time() - t0,
  }
  return result, image_grid(test_target, recon)


def output_names(result: dict) -> tuple[str, str]:
  """('attack_<step>_c<client>.json', '.png'): one pair per attacked checkpoint and client."""
  stem = f"attack_{result['step']}_c{result['client']}"
  return f"{stem}.json", f"{stem}.png"


def write_png_atomic(path, image: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] PNG whole or not at all (temporary file, fsync, rename)."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    with tmp.open("wb") as f:
      Image.fromarray(image).save(f, format="PNG")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_outputs(workdir, result: dict, grid: np.ndarray) -> list[Path]:
  """Writes attack_<step>_c<K>.json/.png and copies them to attack.json/.png (the latest attack).

  Attacks of other checkpoints or clients keep their own files; attacking the same checkpoint and
  client again replaces its pair. Each file is written whole or not at all.
  """
  workdir = Path(workdir)
  text = json.dumps(result, indent=1)
  json_name, png_name = output_names(result)
  paths = []
  for name in (json_name, "attack.json"):
    metrics.write_text_atomic(workdir / name, text)
    paths.append(workdir / name)
  for name in (png_name, "attack.png"):
    write_png_atomic(workdir / name, grid)
    paths.append(workdir / name)
  return paths
