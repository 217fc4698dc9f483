"""How close a reconstruction is to the original image: SSIM, PSNR and MSE on [0, 1] images.

They measure what the reference's model-inversion attack and TAResSFL regulariser measure:

  SSIM  Gaussian window 11 x 11, sigma 1.5, applied per channel as a zero-padded convolution
        (the output map has the image's size), C1 = 0.01^2, C2 = 0.03^2, data range 1; the SSIM
        of an image pair is the mean of its map over pixels and channels.
  PSNR  10 log10(1 / MSE) (peak 1), per image.
  MSE   mean squared error per image.

SSIM is dm-pix's `ssim` given the zero-padded window as its filter: dm-pix's own filter is
'valid' (a smaller map, no border pixels), which is a different quantity on small images. dm-pix
also clips variances at float32's eps^2 and covariances to the Cauchy-Schwarz bound; both hold
for the exact values, so the clipping only moves rounding (tests/test_privacy_similarity.py pins
the result against a direct computation). Images are NHWC (or HWC), values in [0, 1].
"""
import functools

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

WINDOW = 11
SIGMA = 1.5


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
  """The normalised 1-D Gaussian the 2-D window is the outer product of."""
  x = np.arange(size, dtype=np.float64) - size // 2
  g = np.exp(-x ** 2 / (2.0 * sigma ** 2))
  return g / g.sum()


def zero_padded_blur(z: jax.Array, size: int = WINDOW, sigma: float = SIGMA) -> jax.Array:
  """Per-channel Gaussian blur of NHWC (or HWC) images, zero padding, same output size."""
  z = jnp.asarray(z)
  squeeze = z.ndim == 3
  if squeeze:
    z = z[None]
  c = z.shape[-1]
  g = jnp.asarray(gaussian_window(size, sigma), z.dtype)
  pad = size // 2
  dn = ("NHWC", "HWIO", "NHWC")
  ky = jnp.tile(g.reshape(size, 1, 1, 1), (1, 1, 1, c))
  kx = jnp.tile(g.reshape(1, size, 1, 1), (1, 1, 1, c))
  z = lax.conv_general_dilated(z, ky, (1, 1), [(pad, pad), (0, 0)], dimension_numbers=dn,
                               feature_group_count=c, precision=lax.Precision.HIGHEST)
  z = lax.conv_general_dilated(z, kx, (1, 1), [(0, 0), (pad, pad)], dimension_numbers=dn,
                               feature_group_count=c, precision=lax.Precision.HIGHEST)
  return z[0] if squeeze else z


def ssim(a: jax.Array, b: jax.Array, return_map: bool = False) -> jax.Array:
  """SSIM per image pair ([N] for NHWC input, a scalar for HWC), or the SSIM maps."""
  return dm_pix.ssim(a, b, max_val=1.0, k1=0.01, k2=0.03, return_map=return_map,
                     filter_fn=functools.partial(zero_padded_blur))


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean squared error per image."""
  return jnp.mean(jnp.square(a - b), axis=(-3, -2, -1))


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
  """PSNR in dB per image, peak 1 (dm-pix's psnr: -10 log10 MSE)."""
  return dm_pix.psnr(a, b)
