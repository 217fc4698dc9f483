"""SSIM, PSNR and MSE against a direct numpy computation of the reference's definitions."""
import dm_pix
import jax
import numpy as np
import pytest

from mocosfl_jax.privacy import similarity


def _direct_ssim(a, b):
  """The reference's SSIM written out: 2-D Gaussian window (outer product), zero padding,
  per channel, no clipping, mean of the map."""
  g = similarity.gaussian_window()
  w2 = np.outer(g, g)
  h, w, c = a.shape
  pad = w2.shape[0] // 2

  def blur(x):
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    out = np.zeros_like(x)
    for i in range(h):
      for j in range(w):
        out[i, j] = np.einsum('uv,uvc->c', w2, xp[i:i + 2 * pad + 1, j:j + 2 * pad + 1])
    return out

  mu_a, mu_b = blur(a), blur(b)
  s_aa = blur(a * a) - mu_a ** 2
  s_bb = blur(b * b) - mu_b ** 2
  s_ab = blur(a * b) - mu_a * mu_b
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / (
      (mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
  return ssim_map.mean()


def _pairs(seed, n, size, channels=3):
  rng = np.random.RandomState(seed)
  a = rng.rand(n, size, size, channels)
  b = np.clip(a + 0.2 * rng.randn(*a.shape), 0, 1)
  # A flat region (zero variance) as the digits' background has.
  a[0, :size // 2, :size // 2] = 0.0
  return a, b


@pytest.mark.parametrize('size', [8, 16, 32])
def test_ssim_matches_direct_computation(size):
  a, b = _pairs(size, 3, size)
  got = np.asarray(similarity.ssim(a.astype(np.float32), b.astype(np.float32)))
  want = np.array([_direct_ssim(x, y) for x, y in zip(a, b)])
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert got.shape == (3,)


def test_ssim_is_one_on_identical_images_and_lower_otherwise():
  a, b = _pairs(0, 2, 16)
  np.testing.assert_allclose(similarity.ssim(a, a), 1.0, atol=1e-6)
  assert (np.asarray(similarity.ssim(a, b)) < 0.9).all()


def test_ssim_differs_from_dm_pix_valid_window():
  """dm-pix's default window is 'valid': another quantity; ours pads with zeros."""
  a, b = _pairs(1, 2, 16)
  ours = np.asarray(similarity.ssim(a, b))
  valid = np.asarray(dm_pix.ssim(a, b))
  assert np.abs(ours - valid).max() > 1e-3


def test_psnr_and_mse_match_direct_computation():
  a, b = _pairs(2, 4, 16)
  m = ((a - b) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(similarity.mse(a, b), m, rtol=1e-5)
  np.testing.assert_allclose(similarity.psnr(a, b), 10 * np.log10(1.0 / m), rtol=1e-5)


def test_ssim_gradient_is_finite_on_flat_images():
  """The regulariser differentiates SSIM; flat (zero-variance) regions must not give NaN."""
  a = np.zeros((1, 16, 16, 3), np.float32)
  b = np.full((1, 16, 16, 3), 0.5, np.float32)
  g = jax.grad(lambda x: similarity.ssim(x, b).mean())(a)
  assert np.isfinite(np.asarray(g)).all()
