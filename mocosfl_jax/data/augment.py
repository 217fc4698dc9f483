"""MoCo v1 / v2 two-view augmentation as pure, jit- and vmap-friendly JAX.

The reference runs torchvision transforms on PIL images on the CPU, one image at a time; here every
random decision is drawn from an explicit key and applied with `where`-selects, so a whole
[clients, batch] block is augmented in one fused device computation.

Pipelines (torchvision defaults, view q and view k drawn independently; docs/reference.md,
'Augmentation'):
  mocov1: RandomResizedCrop -> HorizontalFlip(0.5) -> ColorJitter(0.4,0.4,0.4,0.1) p 0.8
          -> RandomGrayscale(0.2) -> Normalize
  mocov2: RandomResizedCrop -> ColorJitter p 0.8 -> RandomGrayscale(0.2)
          -> GaussianBlur(sigma ~ U(0.1, 2)) p 0.5 -> HorizontalFlip(0.5) -> Normalize
  none:   ToTensor -> Normalize (evaluation loaders)

Deliberate differences from torchvision-on-PIL (all small, none changes the distribution of the
random parameters):
* Arithmetic is float32 in [0, 1] throughout, also under JAX's x64 mode (the same random draws,
  views equal up to float32 rounding; the networks promote them to their parameters' type); PIL
  rounds to uint8 after every op (crop-resize, each jitter op, grayscale, blur). PIL's contrast
  uses the grey mean rounded to an integer and PIL's hue shift works on an 8-bit HSV image (hue
  quantised to 1/255 steps, shift truncated to int(h*255)); ours is the exact formula (the same
  as torchvision's tensor path).
* Crop box: the same algorithm (10 attempts, first fitting box, central fallback), but area and
  aspect are computed in float32 (torch: Python doubles), so a box size can differ by 1 px when a
  value sits on a .5 rounding tie. The resize is PIL's bilinear (triangle filter widened when
  shrinking, restricted to the crop), i.e. matches PIL up to its uint8 rounding.
* Gaussian blur is a true separable Gaussian truncated at a fixed radius (static shapes for jit;
  6 px = 3 * sigma_max) with edge replication; PIL's `GaussianBlur(radius=sigma)` is a 3-pass
  extended box blur with the same variance and edge replication, so kernels differ slightly in
  shape, not in width (on a uniform-noise image at sigma 2: max |diff| 0.08, mean 0.006).
* Randomness: each view draws one uniform vector from its own key (its layout, shared with edge
  clients, is in mocosfl_jax/view_draws.py); a flip / grey / blur / jitter decision is `u < p`.
  Streams are obviously not torch's.
* dm-pix is used where its semantics equal torchvision's (hue shift, Rec.601 grayscale, flip).
  dm-pix's brightness (additive), contrast (per-channel mean, no clamp), saturation (HSV scaling)
  and blur (zero padding at the border) follow TensorFlow instead, so those are written here.
"""
from __future__ import annotations

import functools
import math

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

# The constants and the layout of each view's uniforms: shared with edge clients' numpy pipeline.
from mocosfl_jax.view_draws import (BLUR_RADIUS, BLUR_SIGMA, CROP_ATTEMPTS, CROP_RATIO,  # noqa: F401
                                    CROP_SCALE, CROP_UNIFORMS, JITTER, JITTER_UNIFORMS,
                                    NUM_UNIFORMS, P_BLUR, P_FLIP, P_GRAY, P_JITTER, PIPELINES,
                                    U_BLUR, U_CROP, U_FLIP, U_GRAY, U_JITTER, U_P_JITTER,
                                    U_SIGMA, fallback_box)


# ------------------------------------------------------------------ deterministic ops (float [0,1])
# Every op takes `channel_axis` (-1: HWC, 0: CHW). The pipeline runs planar (CHW): XLA:CPU
# vectorises [3, H, W] elementwise chains far better than a trailing size-3 axis, and the
# crop-resize einsum writes CHW directly at no cost.

def _spatial_axes(img, channel_axis):
  return (-3, -2) if channel_axis in (-1, img.ndim - 1) else (-2, -1)


def rgb_to_grayscale(img, channel_axis: int = -1):
  """Rec.601 luma (0.2989, 0.587, 0.114) tiled to 3 channels (torchvision Grayscale(3)); dm-pix."""
  return pix.rgb_to_grayscale(img, keep_dims=True, channel_axis=channel_axis)


def adjust_brightness(img, factor, channel_axis: int = -1):
  """torchvision: blend with black, i.e. clip(img * factor)."""
  del channel_axis
  return jnp.clip(img * factor, 0.0, 1.0)


def adjust_contrast(img, factor, channel_axis: int = -1):
  """torchvision: blend with the mean of the *grayscale* image (one scalar), clipped."""
  grey = pix.rgb_to_grayscale(img, channel_axis=channel_axis)
  return jnp.clip(factor * img + (1.0 - factor) * jnp.mean(grey), 0.0, 1.0)


def adjust_saturation(img, factor, channel_axis: int = -1):
  """torchvision: blend with the grayscale image, clipped."""
  grey = pix.rgb_to_grayscale(img, channel_axis=channel_axis)
  return jnp.clip(factor * img + (1.0 - factor) * grey, 0.0, 1.0)


def adjust_hue(img, delta, channel_axis: int = -1):
  """torchvision (tensor path): RGB -> HSV, h = (h + delta) mod 1, HSV -> RGB; dm-pix."""
  return jnp.clip(pix.adjust_hue(img, delta, channel_axis=channel_axis), 0.0, 1.0)


def hflip(img, channel_axis: int = -1):
  return pix.flip_left_right(img, channel_axis=channel_axis)


def normalise(img, mean, std):
  """HWC (trailing channel axis) normalisation."""
  return (img - jnp.asarray(mean, img.dtype)) / jnp.asarray(std, img.dtype)


def _blur_matrix(size: int, sigma, radius: int):
  """[size, size] matrix applying a 1-D Gaussian with edge replication (taps beyond the border
  land on the border pixel), built without [size, taps, size] one-hots so it scales to 224 px."""
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * (taps / sigma) ** 2)
  weights = weights / jnp.sum(weights)
  # cum[k] = sum(weights[:k])
  cum = jnp.concatenate([jnp.zeros(1, weights.dtype), jnp.cumsum(weights)])
  out = jnp.arange(size)
  d = out[None, :] - out[:, None]  # column - row
  base = jnp.where(jnp.abs(d) <= radius, weights[jnp.clip(d + radius, 0, 2 * radius)], 0.0)
  left = cum[jnp.clip(radius - out, 0, 2 * radius + 1)]  # taps t < -o land on pixel 0
  right = 1.0 - cum[jnp.clip(size + radius - out, 0, 2 * radius + 1)]  # taps t > size-1-o
  base = base.at[:, 0].add(left)
  return base.at[:, size - 1].add(right)


def gaussian_blur(img, sigma, radius: int = BLUR_RADIUS, channel_axis: int = -1):
  """Separable Gaussian (std `sigma` px, traced ok), truncated at static `radius`, edge-replicated."""
  ay, ax = _spatial_axes(img, channel_axis)
  by = _blur_matrix(img.shape[ay], sigma, radius)
  bx = _blur_matrix(img.shape[ax], sigma, radius)
  spec = "oh,hwc,pw->opc" if (ay, ax) == (-3, -2) else "oh,chw,pw->cop"
  return jnp.einsum(spec, by, img, bx)


def _resize_weights(start, length, in_size: int, out_size: int):
  """[out, in] PIL-bilinear weights resampling pixels [start, start+length) to out_size pixels.

  PIL's triangle filter: output x samples at centre start + (x + 0.5) * length / out; the filter
  support widens by the scale when shrinking (antialias) and is restricted to the crop, then
  renormalised, which equals PIL's crop-then-resize (and clamp-to-edge when enlarging).
  """
  length = length.astype(jnp.float32)
  scale = length / out_size
  support = jnp.maximum(scale, 1.0)
  centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pixel = jnp.arange(in_size, dtype=jnp.float32)
  w = jnp.maximum(0.0, 1.0 - jnp.abs(pixel[None, :] + 0.5 - centre[:, None]) / support)
  inside = (pixel >= start) & (pixel < start + length)
  w = jnp.where(inside[None, :], w, 0.0)
  return w / jnp.sum(w, axis=1, keepdims=True)


def resized_crop(img, box, out_size, planar_out: bool = False):
  """Crops box = (top i, left j, height h, width w) (ints, traced ok) and resizes bilinearly.

  Args:
    img: float [H, W, C].
    box: int32 (4,) as returned by `sample_crop_box`.
    out_size: static (out_h, out_w).
    planar_out: return [C, out_h, out_w] instead of [out_h, out_w, C].
  """
  i, j, h, w = box[0], box[1], box[2], box[3]
  wy = _resize_weights(i, h, img.shape[0], out_size[0])
  wx = _resize_weights(j, w, img.shape[1], out_size[1])
  return jnp.einsum("oh,hwc,pw->cop" if planar_out else "oh,hwc,pw->opc", wy, img, wx)


# ------------------------------------------------------------------ random parameters

def crop_box_from_uniforms(u, height: int, width: int, scale=CROP_SCALE, ratio=CROP_RATIO):
  """torchvision RandomResizedCrop.get_params driven by explicit uniforms, vectorised over attempts.

  Args:
    u: float [2 * attempts + 2] U(0,1): area fractions, log-aspect draws, then row and column.
    height, width: static input size.

  Returns:
    int32 (4,) = (i, j, h, w): the first attempt (area ~ U(scale) * H * W, log aspect ~ U(log
    ratio)) whose rounded box fits, at a uniform integer position; else the central fallback crop.
  """
  attempts = (u.shape[0] - 2) // 2
  target = height * width * (scale[0] + (scale[1] - scale[0]) * u[:attempts])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[attempts:2 * attempts])
  w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)  # half to even, like Python round
  h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(ok)
  w, h = w[first], h[first]
  # randint(0, H - h + 1) == floor(U * (H - h + 1)), clamped in case of float rounding.
  i = jnp.minimum(jnp.floor(u[-2] * (height - h + 1)).astype(jnp.int32), height - h)
  j = jnp.minimum(jnp.floor(u[-1] * (width - w + 1)).astype(jnp.int32), width - w)
  box = jnp.stack([i, j, h, w])
  return jnp.where(jnp.any(ok), box, jnp.asarray(np.array(fallback_box(height, width, ratio), np.int32)))


def sample_crop_box(key, height: int, width: int, scale=CROP_SCALE, ratio=CROP_RATIO,
                    attempts: int = CROP_ATTEMPTS):
  """Random (i, j, h, w) crop box with torchvision's RandomResizedCrop distribution."""
  u = jax.random.uniform(key, (2 * attempts + 2,), jnp.float32)
  return crop_box_from_uniforms(u, height, width, scale, ratio)


def jitter_from_uniforms(u, img, strengths=JITTER, channel_axis: int = -1):
  """torchvision ColorJitter from 8 uniforms: factors b, c, s ~ U(1 -/+ x), hue ~ U(-/+ x) from u[:4],
  the order of the four ops = argsort(u[4:8]) (a uniform random permutation, like torch.randperm).

  One loop step applies whichever op comes next (brightness, contrast and saturation are all
  `clip(f * img + (1 - f) * D)` with D = 0, grey mean, grey image), so the hue code is traced once.
  """
  b, c, s, hue = strengths
  lo = jnp.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -hue], u.dtype)
  hi = jnp.array([1 + b, 1 + c, 1 + s, hue], u.dtype)
  factors = lo + (hi - lo) * u[:4]
  order = jnp.argsort(u[4:8])

  def step(t, x):
    op = order[t]
    f = factors[op]
    grey = pix.rgb_to_grayscale(x, channel_axis=channel_axis)
    degenerate = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(grey), grey))
    blended = jnp.clip(f * x + (1.0 - f) * degenerate, 0.0, 1.0)
    return jnp.where(op == 3, adjust_hue(x, f, channel_axis), blended)

  return jax.lax.fori_loop(0, 4, step, img)


def _maybe(u, p, fn, img):
  """Applies fn with probability p (u ~ U(0,1); same rule as jax.random.bernoulli)."""
  return jnp.where(u < p, fn(img), img)


# ------------------------------------------------------------------ pipelines

def augment(key, image, mean, std, pipeline: str = "mocov2", out_size=None,
            crop_scale=CROP_SCALE):
  """One augmented, normalised view of one image.

  Args:
    key: typed PRNG key.
    image: uint8 [H, W, 3].
    mean, std: (3,) normalisation constants on the [0, 1] scale.
    pipeline: 'mocov2', 'mocov1' or 'none' (static).
    out_size: int or (h, w) output size of the random resized crop (static); default (H, W).
    crop_scale: (min, max) area fraction of the random resized crop; the reference's (0.08, 1)
      by default. Tiny images (8x8 digits) keep more class content with a larger minimum.

  Returns:
    float32 [out_h, out_w, 3].
  """
  if pipeline not in PIPELINES:
    raise ValueError(f"pipeline={pipeline!r} is not one of {PIPELINES}")
  height, width = image.shape[0], image.shape[1]
  if out_size is None:
    out_size = (height, width)
  elif isinstance(out_size, int):
    out_size = (out_size, out_size)
  if pipeline == "none":
    if tuple(out_size) != (height, width):
      raise ValueError(f"pipeline='none' does not resize; out_size={out_size} != {(height, width)}")
    return normalise(image.astype(jnp.float32) / 255.0, mean, std)
  u = jax.random.uniform(key, (NUM_UNIFORMS,), jnp.float32)
  return augment_from_uniforms(u, image, mean, std, pipeline, out_size, crop_scale)


def augment_from_uniforms(u, image, mean, std, pipeline: str = "mocov2", out_size=None,
                          crop_scale=CROP_SCALE):
  """`augment` with its random draws given: u is the float32 [NUM_UNIFORMS] vector `augment`
  draws from its key (layout: view_draws.U_*). A remote client receives these from the server, so its
  views are those of the simulated run (deploy/remote)."""
  height, width = image.shape[0], image.shape[1]
  if out_size is None:
    out_size = (height, width)
  elif isinstance(out_size, int):
    out_size = (out_size, out_size)
  img = image.astype(jnp.float32) / 255.0
  if pipeline == "none":
    return normalise(img, mean, std)
  box = crop_box_from_uniforms(u[U_CROP], height, width, scale=tuple(crop_scale))
  img = resized_crop(img, box, tuple(out_size), planar_out=True)  # CHW from here on
  chw = dict(channel_axis=0)
  if pipeline == "mocov1":
    img = _maybe(u[U_FLIP], P_FLIP, functools.partial(hflip, **chw), img)
  jitter = functools.partial(jitter_from_uniforms, u[U_JITTER], **chw)
  img = _maybe(u[U_P_JITTER], P_JITTER, jitter, img)
  img = _maybe(u[U_GRAY], P_GRAY, functools.partial(rgb_to_grayscale, **chw), img)
  if pipeline == "mocov2":
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[U_SIGMA]
    img = _maybe(u[U_BLUR], P_BLUR, lambda x: gaussian_blur(x, sigma, **chw), img)
    img = _maybe(u[U_FLIP], P_FLIP, functools.partial(hflip, **chw), img)
  return normalise(jnp.moveaxis(img, 0, -1), mean, std)


@functools.partial(jax.jit, static_argnames=("pipeline", "out_size", "crop_scale"))
def two_views(key, images, mean, std, pipeline: str = "mocov2", out_size=None,
              crop_scale=CROP_SCALE):
  """Query and key views of uint8 images [..., H, W, 3] (any leading axes, e.g. [clients, batch]).

  Every image and view gets its own key (split from `key`), so views are independent draws.
  Returns (q, k), each float32 [..., out_h, out_w, 3].
  """
  lead = images.shape[:-3]
  flat = images.reshape((-1,) + images.shape[-3:])
  fn = functools.partial(augment, mean=mean, std=std, pipeline=pipeline, out_size=out_size,
                         crop_scale=crop_scale)
  keys = jax.random.split(key, 2 * flat.shape[0])  # view q: first half, view k: second half
  # One flat vmap over both views: one traced body, and no view vmap nested over broadcast
  # images, whose batched einsums XLA:CPU lays out badly.
  out = jax.vmap(fn)(keys, jnp.concatenate([flat, flat]))
  out = out.reshape((2,) + lead + out.shape[1:])
  return out[0], out[1]


def view_uniforms(key, lead_shape) -> jax.Array:
  """float32 [2, *lead_shape, NUM_UNIFORMS]: the draws `two_views(key, images)` makes for images
  of leading shape `lead_shape` (view q, then view k), for `augment_from_uniforms`."""
  n = math.prod(lead_shape)
  keys = jax.random.split(key, 2 * n)
  u = jax.vmap(lambda k: jax.random.uniform(k, (NUM_UNIFORMS,), jnp.float32))(keys)
  return u.reshape((2,) + tuple(lead_shape) + (NUM_UNIFORMS,))
