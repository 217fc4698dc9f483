"""The training pipeline's two-view augmentation in numpy, for edge clients without JAX.

A remote client draws no random numbers of its own: with each task the server sends the
positions of the batch within the client's images and the uniform vectors the simulated run
would draw (`data.augment.view_uniforms`), so a remote client's views are the simulated run's.
This module applies those uniforms exactly as `data.augment.augment_from_uniforms` does (same
float32 formulas, dm-pix's HSV conversion written out), so an ONNX client on a device needs
numpy only. tests/test_remote_augment.py pins it against the JAX pipeline.

Imports numpy only (no JAX): export/edge_client.py runs on devices that have no JAX.
"""
from __future__ import annotations

import math

import numpy as np


from mocosfl_jax.view_draws import (BLUR_RADIUS, BLUR_SIGMA, CROP_RATIO, CROP_UNIFORMS,  # noqa: F401
                                    JITTER, NUM_UNIFORMS, P_BLUR, P_FLIP, P_GRAY, P_JITTER,
                                    PIPELINES, U_BLUR, U_CROP, U_FLIP, U_GRAY, U_JITTER,
                                    U_P_JITTER, U_SIGMA, fallback_box)

_LUMA = np.array([0.2989, 0.5870, 0.1140], np.float32)
_F = np.float32


def grey(img: np.ndarray) -> np.ndarray:
  """Rec.601 luma of a CHW image, [1, H, W]."""
  return np.tensordot(_LUMA, img, axes=(0, 0))[None].astype(np.float32)


def adjust_hue(img: np.ndarray, delta) -> np.ndarray:
  """RGB -> HSV, hue + delta mod 1, HSV -> RGB (dm-pix's formulas), CHW."""
  r, g, b = img
  value = np.maximum(np.maximum(r, g), b)
  range_ = value - np.minimum(np.minimum(r, g), b)
  safe_value = np.where(value > 0, value, _F(1))
  safe_range = np.where(range_ > 0, range_, _F(1))
  sat = np.where(value > 0, range_ / safe_value, _F(0))
  norm = _F(1) / (_F(6) * safe_range)
  hue = np.where(value == g, norm * (b - r) + _F(2 / 6), norm * (r - g) + _F(4 / 6))
  hue = np.where(value == r, norm * (g - b), hue)
  hue = np.where(range_ > 0, hue, _F(0)) + (hue < 0).astype(np.float32)
  dh = ((hue + _F(delta)) % _F(1)) % _F(1) * _F(6)
  dr = np.clip(np.abs(dh - _F(3)) - _F(1), 0, 1)
  dg = np.clip(_F(2) - np.abs(dh - _F(2)), 0, 1)
  db = np.clip(_F(2) - np.abs(dh - _F(4)), 0, 1)
  one_minus_s = _F(1) - sat
  out = np.stack([value * (one_minus_s + sat * d) for d in (dr, dg, db)])
  return np.clip(out, 0, 1).astype(np.float32)


def crop_box(u: np.ndarray, height: int, width: int, scale, ratio=CROP_RATIO):
  """(i, j, h, w) from the crop's 2 * attempts + 2 uniforms (augment.crop_box_from_uniforms)."""
  attempts = (u.shape[0] - 2) // 2
  target = _F(height * width) * (_F(scale[0]) + _F(scale[1] - scale[0]) * u[:attempts])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = np.exp(_F(log_lo) + _F(log_hi - log_lo) * u[attempts:2 * attempts]).astype(_F)
  w = np.round(np.sqrt(target * aspect)).astype(np.int32)
  h = np.round(np.sqrt(target / aspect)).astype(np.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  if not ok.any():
    return fallback_box(height, width, ratio)
  first = int(np.argmax(ok))
  w, h = int(w[first]), int(h[first])
  i = min(int(np.floor(u[-2] * _F(height - h + 1))), height - h)
  j = min(int(np.floor(u[-1] * _F(width - w + 1))), width - w)
  return i, j, h, w


def _resize_weights(start: int, length: int, in_size: int, out_size: int) -> np.ndarray:
  scale = _F(length) / _F(out_size)
  support = max(scale, _F(1))
  centre = _F(start) + (np.arange(out_size, dtype=_F) + _F(0.5)) * scale
  pixel = np.arange(in_size, dtype=_F)
  w = np.maximum(_F(0), _F(1) - np.abs(pixel[None, :] + _F(0.5) - centre[:, None]) / support)
  inside = (pixel >= start) & (pixel < start + length)
  w = np.where(inside[None, :], w, _F(0))
  return (w / np.sum(w, axis=1, keepdims=True)).astype(_F)


def resized_crop(img: np.ndarray, box, out_size) -> np.ndarray:
  """HWC float image -> CHW crop of box resized bilinearly (PIL's triangle filter)."""
  i, j, h, w = box
  wy = _resize_weights(i, h, img.shape[0], out_size[0])
  wx = _resize_weights(j, w, img.shape[1], out_size[1])
  return np.einsum("oh,hwc,pw->cop", wy, img, wx).astype(_F)


def jitter(u: np.ndarray, img: np.ndarray) -> np.ndarray:
  """ColorJitter from 8 uniforms: factors from u[:4], op order argsort(u[4:8])."""
  b, c, s, hue = JITTER
  lo = np.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -hue], _F)
  hi = np.array([1 + b, 1 + c, 1 + s, hue], _F)
  factors = lo + (hi - lo) * u[:4]
  for op in np.argsort(u[4:8], kind="stable"):
    f = factors[op]
    if op == 3:
      img = adjust_hue(img, f)
      continue
    degenerate = (_F(0) if op == 0 else np.mean(grey(img), dtype=_F) if op == 1
                  else grey(img))
    img = np.clip(f * img + (_F(1) - f) * degenerate, 0, 1).astype(_F)
  return img


def _blur_matrix(size: int, sigma, radius: int = BLUR_RADIUS) -> np.ndarray:
  taps = np.arange(-radius, radius + 1, dtype=_F)
  weights = np.exp(_F(-0.5) * (taps / _F(sigma)) ** 2).astype(_F)
  weights = weights / np.sum(weights, dtype=_F)
  cum = np.concatenate([np.zeros(1, _F), np.cumsum(weights, dtype=_F)])
  out = np.arange(size)
  d = out[None, :] - out[:, None]
  base = np.where(np.abs(d) <= radius, weights[np.clip(d + radius, 0, 2 * radius)], _F(0))
  base[:, 0] += cum[np.clip(radius - out, 0, 2 * radius + 1)]
  base[:, size - 1] += _F(1) - cum[np.clip(size + radius - out, 0, 2 * radius + 1)]
  return base.astype(_F)


def gaussian_blur(img: np.ndarray, sigma) -> np.ndarray:
  by, bx = _blur_matrix(img.shape[1], sigma), _blur_matrix(img.shape[2], sigma)
  return np.einsum("oh,chw,pw->cop", by, img, bx).astype(_F)


def augment(u: np.ndarray, image: np.ndarray, mean, std, pipeline: str = "mocov2",
            out_size=None, crop_scale=(0.08, 1.0)) -> np.ndarray:
  """One normalised view float32 [out_h, out_w, 3] of a uint8 [H, W, 3] image from its
  float32 [NUM_UNIFORMS] draws (data.augment.augment_from_uniforms in numpy)."""
  if pipeline not in PIPELINES:
    raise ValueError(f"pipeline={pipeline!r} is not one of {PIPELINES}")
  height, width = image.shape[0], image.shape[1]
  out_size = (height, width) if out_size is None else (
      (out_size, out_size) if isinstance(out_size, int) else tuple(out_size))
  mean, std = np.asarray(mean, _F), np.asarray(std, _F)
  img = image.astype(_F) / _F(255)
  if pipeline == "none":
    return ((img - mean) / std).astype(_F)
  u = np.asarray(u, _F)
  img = resized_crop(img, crop_box(u[U_CROP], height, width, crop_scale), out_size)
  if pipeline == "mocov1" and u[U_FLIP] < P_FLIP:
    img = img[:, :, ::-1]
  if u[U_P_JITTER] < P_JITTER:
    img = jitter(u[U_JITTER], img)
  if u[U_GRAY] < P_GRAY:
    img = np.repeat(grey(img), 3, axis=0)
  if pipeline == "mocov2":
    if u[U_BLUR] < P_BLUR:
      sigma = _F(BLUR_SIGMA[0]) + _F(BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[U_SIGMA]
      img = gaussian_blur(img, sigma)
    if u[U_FLIP] < P_FLIP:
      img = img[:, :, ::-1]
  return ((np.moveaxis(img, 0, -1) - mean) / std).astype(_F)


def two_views(uniforms: np.ndarray, images: np.ndarray, mean, std, pipeline: str = "mocov2",
              out_size=None, crop_scale=(0.08, 1.0)):
  """(q, k) float32 [B, h, w, 3] of uint8 images [B, H, W, 3] from uniforms [2, B, U]."""
  views = [np.stack([augment(u, img, mean, std, pipeline, out_size, crop_scale)
                     for u, img in zip(uniforms[v], images)]) for v in range(2)]
  return views[0], views[1]
