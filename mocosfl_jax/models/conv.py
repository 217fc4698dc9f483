"""The convolution implementations behind `layers.Conv` and the dispatch between them.

Every implementation computes the same NHWC x HWIO convolution with explicit symmetric padding;
they differ in speed and float rounding only, never in parameters:

* 'lax': XLA's own convolution, the right choice on GPU/TPU.
* 'matmul': one matmul over k*k explicitly shifted views of the input. On XLA:CPU the weight
  gradient becomes one large GEMM instead of XLA's slow weight-gradient convolution, and under
  `vmap` over per-client weights it stays a batched matmul where XLA would lower grouped
  convolutions.
* 'winograd': 3x3 stride-1 convolutions of large enough calls with Winograd F(4x4, 3x3)
  (`winograd.py`), every other convolution as 'matmul'.
* 'auto': 'winograd' on CPU, 'lax' elsewhere (`resolve_conv_impl`).

bench/README.md has the measured trade-offs.
"""
import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax.models import winograd

CONV_IMPLS = ("auto", "lax", "matmul", "winograd")


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> 'winograd' on CPU, 'lax' (XLA's convolution) elsewhere; other names unchanged."""
  if impl == "auto":
    return "winograd" if jax.default_backend() == "cpu" else "lax"
  return impl


def conv_lax(x, kernel, stride: int, padding: int, groups: int = 1):
  """NHWC x HWIO convolution by XLA's `conv_general_dilated`."""
  return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)


def _shifted_views(x, k: int, stride: int, padding: int):
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho = (x.shape[1] + 2 * padding - k) // stride + 1
  wo = (x.shape[2] + 2 * padding - k) // stride + 1
  return [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
          for i in range(k) for j in range(k)]


def conv_matmul(x, kernel, stride: int, padding: int, groups: int = 1):
  """NHWC x HWIO convolution as shifted views: one matmul (groups=1) or a weighted sum (depthwise).

  Other grouped convolutions (none of the backbones has one) use XLA's convolution.
  """
  k, _, cin_g, out = kernel.shape
  if k == 1 and padding == 0:
    return jnp.einsum("bhwc,co->bhwo", x[:, ::stride, ::stride], kernel[0, 0])
  views = _shifted_views(x, k, stride, padding)
  if groups == 1:
    patches = jnp.concatenate(views, axis=-1)
    return jnp.einsum("bhwc,co->bhwo", patches, kernel.reshape(k * k * cin_g, out))
  if cin_g == 1 and groups == out == x.shape[-1]:  # depthwise
    w = kernel.reshape(k * k, out)
    return sum(v * w[i] for i, v in enumerate(views))
  return conv_lax(x, kernel, stride, padding, groups)


def conv_winograd(x, kernel, stride: int, padding: int, groups: int = 1, m: int = 4):
  """Winograd F(m x m, 3 x 3) where `winograd.applies`, the shifted-view matmul otherwise."""
  if m not in winograd.TILES:
    raise ValueError(f"m={m!r}: valid Winograd tile sizes are {winograd.TILES}.")
  if winograd.applies(kernel.shape, stride, padding, groups, x.shape, m):
    return winograd.conv3x3(x, kernel, m)
  return conv_matmul(x, kernel, stride, padding, groups)


_IMPLS = {"lax": conv_lax, "matmul": conv_matmul, "winograd": conv_winograd}


def conv(x, kernel, stride: int, padding: int, groups: int = 1, *, impl: str = "lax"):
  """NHWC x HWIO convolution computed by `impl`, one of CONV_IMPLS."""
  resolved = resolve_conv_impl(impl)
  if resolved not in _IMPLS:
    raise ValueError(f"conv_impl={impl!r} is unknown; valid: {list(CONV_IMPLS)}")
  return _IMPLS[resolved](x, kernel, stride, padding, groups)
