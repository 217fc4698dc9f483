"""Augmentation ops vs direct references (numpy, colorsys, PIL, scipy) and pipeline statistics."""
import colorsys
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from PIL import ImageEnhance
from scipy.ndimage import gaussian_filter1d

from mocosfl_jax.data import augment as A

RNG = np.random.default_rng(0)
IMG_U8 = RNG.integers(0, 256, (6, 7, 3)).astype(np.uint8)
IMG = IMG_U8.astype(np.float32) / 255.0
GREY_W = np.array([0.2989, 0.587, 0.114])


def np_grey(x):
  return (x @ GREY_W)[..., None]


def pil_enhance(enhancer, factor):
  return np.asarray(enhancer(Image.fromarray(IMG_U8)).enhance(factor), np.float64) / 255.0


@pytest.mark.parametrize("factor", [0.6, 1.37])
def test_brightness(factor):
  ours = np.asarray(jax.jit(A.adjust_brightness)(IMG, factor))
  np.testing.assert_allclose(ours, np.clip(IMG * factor, 0, 1), atol=1e-6)
  np.testing.assert_allclose(ours, pil_enhance(ImageEnhance.Brightness, factor), atol=1 / 255)


@pytest.mark.parametrize("factor", [0.6, 1.4])
def test_contrast_blends_with_grey_mean(factor):
  ours = np.asarray(jax.jit(A.adjust_contrast)(IMG, factor))
  ref = np.clip(factor * IMG + (1 - factor) * np_grey(IMG).mean(), 0, 1)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  # PIL rounds the grey mean to an integer level: within ~1 level of torchvision-on-PIL.
  np.testing.assert_allclose(ours, pil_enhance(ImageEnhance.Contrast, factor), atol=1.5 / 255)


@pytest.mark.parametrize("factor", [0.6, 1.4])
def test_saturation_blends_with_grey(factor):
  ours = np.asarray(jax.jit(A.adjust_saturation)(IMG, factor))
  np.testing.assert_allclose(ours, np.clip(factor * IMG + (1 - factor) * np_grey(IMG), 0, 1),
                             atol=1e-5)
  np.testing.assert_allclose(ours, pil_enhance(ImageEnhance.Color, factor), atol=1.5 / 255)


@pytest.mark.parametrize("delta", [0.07, -0.1, 0.5])
def test_hue_shift_vs_colorsys(delta):
  ours = np.asarray(jax.jit(A.adjust_hue)(IMG, delta))
  ref = np.empty_like(IMG)
  for idx in np.ndindex(IMG.shape[:2]):
    h, s, v = colorsys.rgb_to_hsv(*IMG[idx])
    ref[idx] = colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_grayscale_is_rec601_three_channels():
  ours = np.asarray(jax.jit(A.rgb_to_grayscale)(IMG))
  chex.assert_shape(ours, IMG.shape)
  np.testing.assert_allclose(ours, np.repeat(np_grey(IMG), 3, -1), atol=1e-6)
  pil = np.asarray(Image.fromarray(IMG_U8).convert("L"), np.float64) / 255
  np.testing.assert_allclose(ours[..., 0], pil, atol=1 / 255)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_gaussian_blur_vs_scipy(sigma):
  ours = np.asarray(jax.jit(A.gaussian_blur)(IMG, sigma))
  trunc = A.BLUR_RADIUS / sigma  # same fixed radius, edge replication == scipy mode 'nearest'
  ref = gaussian_filter1d(IMG.astype(np.float64), sigma, axis=0, mode="nearest", truncate=trunc)
  ref = gaussian_filter1d(ref, sigma, axis=1, mode="nearest", truncate=trunc)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_flip():
  np.testing.assert_array_equal(np.asarray(A.hflip(jnp.asarray(IMG))), IMG[:, ::-1])


@pytest.mark.parametrize("box, out", [((1, 2, 4, 3), (6, 7)), ((0, 0, 6, 7), (3, 4)),
                                      ((2, 1, 3, 5), (8, 8))])
def test_resized_crop_matches_pil(box, out):
  i, j, h, w = box
  pil = Image.fromarray(IMG_U8).crop((j, i, j + w, i + h)).resize(out[::-1], Image.BILINEAR)
  crop = jax.jit(A.resized_crop, static_argnums=2)
  ours = np.asarray(crop(IMG_U8.astype(np.float32), np.array(box), out))
  np.testing.assert_allclose(ours, np.asarray(pil, np.float64), atol=1.0)  # PIL rounds to uint8


def torchvision_get_params(u, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """RandomResizedCrop.get_params with its random draws replaced by the uniforms u."""
  attempts = (len(u) - 2) // 2
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for a in range(attempts):
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[a])
    aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[attempts + a])
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(u[-2] * (height - h + 1)), int(u[-1] * (width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height, width", [(32, 32), (12, 40)])
def test_crop_box_maths_vs_torchvision(height, width):
  u = RNG.random((300, A.CROP_UNIFORMS)).astype(np.float32)
  u[:20, :A.CROP_ATTEMPTS] = 0.999  # force every attempt to fail -> central fallback
  u[:20, A.CROP_ATTEMPTS:2 * A.CROP_ATTEMPTS] = 0.999
  ours = np.asarray(jax.vmap(lambda v: A.crop_box_from_uniforms(v, height, width))(u))
  ref = np.array([torchvision_get_params(v.astype(np.float64), height, width) for v in u])
  mismatch = np.flatnonzero(np.any(ours != ref, axis=1))
  assert len(mismatch) <= 3, (ours[mismatch], ref[mismatch])  # float32 vs float64 ties in round()
  np.testing.assert_array_equal(ours[:20], np.tile(ref[0], (20, 1)))


def test_crop_box_statistics():
  boxes = np.asarray(jax.vmap(lambda k: A.sample_crop_box(k, 32, 32))(
      jax.random.split(jax.random.key(0), 4000)))
  i, j, h, w = boxes.T
  assert np.all((i >= 0) & (j >= 0) & (i + h <= 32) & (j + w <= 32) & (h > 0) & (w > 0))
  frac = h * w / 1024
  assert frac.min() >= 0.07 and frac.max() <= 1.0  # 0.08 up to rounding of h and w
  assert 0.45 < frac.mean() < 0.6  # U(0.08, 1) mean 0.54, slightly cut by the fit rule
  aspect = w / h
  assert np.mean((aspect > 0.7) & (aspect < 1.45)) > 0.97


def test_jitter_applies_ops_in_sampled_order():
  u = np.array([0.2, 0.9, 0.4, 0.8, 0.3, 0.1, 0.9, 0.5], np.float32)  # order: c, b, hue, s
  b, c, s = 0.6 + 0.8 * u[:3]
  hue = -0.1 + 0.2 * u[3]

  @jax.jit
  def chains(x):
    ref = A.adjust_saturation(A.adjust_hue(A.adjust_brightness(A.adjust_contrast(x, c), b), hue), s)
    other = A.adjust_contrast(A.adjust_brightness(A.adjust_saturation(A.adjust_hue(x, hue), s), b),
                              c)
    return ref, other, A.jitter_from_uniforms(jnp.asarray(u), x)

  ref, other, ours = chains(IMG)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  assert np.abs(np.asarray(ours) - np.asarray(other)).max() > 1e-3  # order matters


def _views(images, pipeline, n, seed=0):
  """n augmentations of each image with mean 0 / std 1, so outputs are the [0,1] images."""
  keys = jax.random.split(jax.random.key(seed), n)
  fn = jax.jit(jax.vmap(lambda k: A.augment(k, images, np.zeros(3), np.ones(3), pipeline)))
  return np.asarray(fn(keys))


@pytest.mark.parametrize("pipeline", ["mocov2", "mocov1"])
def test_grayscale_and_flip_rates(pipeline):
  n = 2000
  # A grey horizontal ramp: every op keeps it left-to-right increasing unless flipped (jitter on
  # grey pixels is monotone, crop/blur average neighbours), so the flip is visible after any crop.
  ramp = np.repeat(np.tile(np.linspace(30, 225, 8), (8, 1))[..., None], 3, -1).astype(np.uint8)
  out = _views(jnp.asarray(ramp), pipeline, n)
  assert np.all(np.isfinite(out)) and out.min() >= -1e-5 and out.max() <= 1 + 1e-5
  left, right = out[:, :, 0, 0].mean(1), out[:, :, -1, 0].mean(1)
  flipped = np.mean(left > right + 1e-6)
  assert np.mean(np.abs(left - right) <= 1e-6) < 0.03  # few ambiguous (fully clipped) crops
  assert abs(flipped - 0.5) < 0.05
  colour = jnp.asarray(IMG_U8[:6, :6])
  out = _views(colour, pipeline, n, seed=1)
  grey = np.all(np.abs(out - out[..., :1]) < 1e-6, axis=(1, 2, 3))
  assert abs(grey.mean() - 0.2) < 0.04


def test_two_views_shapes_independence_and_range():
  images = jnp.asarray(RNG.integers(0, 256, (2, 3, 8, 8, 3)).astype(np.uint8))
  mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
  q, k = A.two_views(jax.random.key(0), images, mean, std)
  chex.assert_shape([q, k], (2, 3, 8, 8, 3))
  chex.assert_type([q, k], jnp.float32)
  chex.assert_tree_all_finite((q, k))
  raw = np.asarray(q) * std + mean
  assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
  assert not np.allclose(q, k)
  flat = np.asarray(q).reshape(6, -1)
  assert len({row.tobytes() for row in flat}) == 6  # each image drew its own parameters
  q2, _ = A.two_views(jax.random.key(0), images, mean, std)
  np.testing.assert_array_equal(q, q2)
  q_small, _ = A.two_views(jax.random.key(0), images, mean, std, pipeline="mocov1", out_size=4)
  chex.assert_shape(q_small, (2, 3, 4, 4, 3))


def test_none_pipeline_is_normalise_only():
  mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
  out = A.augment(jax.random.key(0), jnp.asarray(IMG_U8), mean, std, "none")
  np.testing.assert_allclose(out, (IMG - mean) / std, atol=1e-5)
  with pytest.raises(ValueError, match="pipeline"):
    A.augment(jax.random.key(0), jnp.asarray(IMG_U8), mean, std, "simclr")


def test_planar_ops_match_hwc_ops():
  """The pipeline runs on CHW planes; every op must agree with its HWC form."""
  ops = [lambda x, ax: A.adjust_brightness(x, 1.3, ax), lambda x, ax: A.adjust_contrast(x, 0.7, ax),
         lambda x, ax: A.adjust_saturation(x, 1.4, ax), lambda x, ax: A.adjust_hue(x, -0.08, ax),
         lambda x, ax: A.rgb_to_grayscale(x, ax), lambda x, ax: A.hflip(x, ax),
         lambda x, ax: A.gaussian_blur(x, 1.3, channel_axis=ax),
         lambda x, ax: A.jitter_from_uniforms(jnp.linspace(0.1, 0.9, 8), x, channel_axis=ax)]

  @jax.jit
  def both(x):
    return [(op(x, -1), jnp.moveaxis(op(jnp.moveaxis(x, -1, 0), 0), 0, -1)) for op in ops]

  for hwc, chw in both(IMG):
    np.testing.assert_allclose(hwc, chw, atol=1e-6)
  planar = A.resized_crop(IMG, jnp.array([1, 2, 4, 3]), (5, 5), planar_out=True)
  np.testing.assert_allclose(jnp.moveaxis(planar, 0, -1),
                             A.resized_crop(IMG, jnp.array([1, 2, 4, 3]), (5, 5)), atol=1e-6)
