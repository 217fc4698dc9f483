"""Tests for mocosfl_jax.models.winograd: F(2,3) and F(4,3) equal a direct conv in value and in both
gradients (custom VJP), for odd sizes, under vmap over per-client kernels, and the dispatch
(conv.conv_winograd: Winograd where it applies, the shifted-view matmul elsewhere)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from core_testlib import fast_compile  # noqa: F401  pylint: disable=unused-import
from mocosfl_jax.models import conv, winograd

pytestmark = pytest.mark.usefixtures('fast_compile')


def _direct(x, k, stride=1, padding=1):
  return lax.conv_general_dilated(x, k, (stride, stride), [(padding, padding)] * 2,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=lax.Precision.HIGHEST)


def _value_and_grads(f, x, k, g):
  y, vjp = jax.vjp(f, x, k)
  return (y,) + vjp(g)


def _rel_close(got, ref, tol):
  for a, b in zip(got, ref):
    err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    assert err < tol, err


@pytest.mark.parametrize('m,tol', [(2, 1e-5), (4, 1e-4)])
@pytest.mark.parametrize('shape', [(3, 7, 5, 3, 2), (1, 8, 8, 8, 8)])
def test_matches_direct_conv_and_its_gradients(m, tol, shape):
  n, h, w, c, o = shape
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (n, h, w, c))
  k = jax.random.normal(kk, (3, 3, c, o))
  g = jax.random.normal(kg, (n, h, w, o))
  got = _value_and_grads(lambda a, b: winograd.conv3x3(a, b, m), x, k, g)
  ref = _value_and_grads(_direct, x, k, g)
  chex.assert_equal_shape([got[0], ref[0]])
  _rel_close(got, ref, tol)


def test_vmapped_per_client_kernels():
  kx, kk = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (3, 2, 8, 8, 4))          # 3 clients x batch 2
  k = jax.random.normal(kk, (3, 3, 3, 4, 5))          # a kernel per client
  loss = lambda f: lambda x, k: jnp.sum(jax.vmap(f)(x, k) ** 2)
  got = jax.grad(loss(winograd.conv3x3), argnums=(0, 1))(x, k)
  ref = jax.grad(loss(_direct), argnums=(0, 1))(x, k)
  _rel_close(got, ref, 1e-4)


def test_dispatch_falls_back_for_other_convs():
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
  assert winograd.applies((3, 3, 4, 4), 1, 1) and not winograd.applies((3, 3, 4, 4), 2, 1)
  assert not winograd.applies((1, 1, 4, 4), 1, 0)
  assert not winograd.applies((3, 3, 4, 4), 1, 1, x_shape=(1, 32, 32, 4))   # 64 tiles: matmul
  assert winograd.applies((3, 3, 4, 4), 1, 1, x_shape=(2, 32, 32, 4))
  # Maps padded to whole tiles: 2x2 in one F(4x4) tile multiplies as often as the direct conv
  # (36 = 9 * 4), so the matmul conv computes it; 4x4 (36 < 144) and 3x3 (36 < 81) stay.
  assert not winograd.applies((3, 3, 4, 4), 1, 1, x_shape=(640, 2, 2, 4))
  assert winograd.applies((3, 3, 4, 4), 1, 1, x_shape=(640, 4, 4, 4))
  assert winograd.applies((3, 3, 4, 4), 1, 1, x_shape=(640, 3, 3, 4))
  assert winograd.applies((3, 3, 4, 4), 1, 1, x_shape=(640, 2, 2, 4), m=2)   # 16 < 36
  for shape, s, p in [((3, 3, 4, 6), 2, 1), ((1, 1, 4, 6), 2, 0), ((3, 3, 4, 6), 1, 1)]:
    k = jax.random.normal(jax.random.key(3), shape)
    np.testing.assert_allclose(conv.conv_winograd(x, k, s, p), _direct(x, k, s, p), rtol=1e-4,
                               atol=1e-4)
  with pytest.raises(ValueError, match='tile'):
    conv.conv_winograd(x, jnp.zeros((3, 3, 4, 4)), 1, 1, m=3)
