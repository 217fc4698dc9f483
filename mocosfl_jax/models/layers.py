"""Building blocks shared by every backbone: WS convolutions, GroupNorm, plain convs, transposed convs.

Initialisation follows the reference (spec §3.1) so learning dynamics match: weight-standardised
convs keep PyTorch's default init (kaiming-uniform a=sqrt(5), i.e. U(+-1/sqrt(fan_in))), plain
convs, transposed convs and linear layers use xavier-uniform weights and zero bias.
All tensors are NHWC; kernels HWIO. Padding is always explicit and symmetric, as in PyTorch
(flax's 'SAME' pads stride-2 convs asymmetrically, which would change the numbers).
"""
import contextlib
import contextvars

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# PyTorch's default Conv2d init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
xavier_uniform = nn.initializers.xavier_uniform()

WS_EPS = 1e-5  # added to the (unbiased) std, not to the variance, as the reference does.


CONV_IMPLS = ("auto", "lax", "matmul", "winograd")
_CONV_IMPL = contextvars.ContextVar("conv_impl", default="lax")


def resolve_conv_impl(impl: str) -> str:
  """'auto' -> 'winograd' on CPU, 'lax' (XLA's convolution) elsewhere; other names unchanged."""
  if impl == "auto":
    return "winograd" if jax.default_backend() == "cpu" else "lax"
  return impl


@contextlib.contextmanager
def conv_impl(impl: str):
  """Selects how `Conv` computes while a split network traces (set from its SplitConfig).

  'matmul' writes each conv as one matmul over k*k explicitly shifted views of the input. On
  XLA:CPU this is ~2x faster for a shared batch (the weight gradient becomes one large GEMM
  instead of XLA's slow wgrad convolution) and orders of magnitude faster under `vmap` over
  per-client weights, which XLA otherwise lowers to grouped convolutions. 'winograd' computes
  3x3 stride-1 convs of large enough calls with Winograd F(4x4, 3x3) (4x fewer multiplies, a
  custom VJP; mocosfl_jax/winograd.py) and every other conv as 'matmul': about 2x faster again
  for the server's 3x3 convs. 'auto' = winograd on CPU, XLA's conv elsewhere.
  Same parameters and maths; only float rounding differs.
  """
  token = _CONV_IMPL.set(resolve_conv_impl(impl))
  try:
    yield
  finally:
    _CONV_IMPL.reset(token)


def _shifted_views(x, k: int, stride: int, padding: int):
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho = (x.shape[1] + 2 * padding - k) // stride + 1
  wo = (x.shape[2] + 2 * padding - k) // stride + 1
  return [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
          for i in range(k) for j in range(k)]


def conv_matmul(x, kernel, stride: int, padding: int, groups: int = 1):
  """NHWC x HWIO convolution as shifted views: one matmul (groups=1) or a weighted sum (depthwise)."""
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
  return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)


def torch_default_bias_init(fan_in: int):
  bound = 1.0 / jnp.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def standardize_kernel(kernel: jax.Array) -> jax.Array:
  """Weight Standardisation per output channel over (kh, kw, in): (w - mean) / (std_unbiased + eps)."""
  mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  centred = kernel - mean
  std = jnp.std(centred, axis=(0, 1, 2), keepdims=True, ddof=1)
  return centred / (std + WS_EPS)


_standardize_kernel_remat = jax.checkpoint(standardize_kernel)
_REMAT_WS = contextvars.ContextVar("remat_ws", default=False)


@contextlib.contextmanager
def remat_weight_standardisation():
  """Makes `Conv` recompute its standardised kernel in the backward pass.

  Set by the client slice: vmapped over N clients, its standardised and centred kernels would
  otherwise stay alive from the forward pass as copies of every client's parameters (100
  clients at cut 9: 21.9 -> 9.5 GiB of XLA scratch). The server's kernels exist once; there the
  recomputation would only cost time (2.4% of a cut-1 step), so it keeps them.
  Trade-off measured at 20 clients, cut 9 (bench/README.md): peak 9.8 -> 7.4 GiB at the same
  non-sync step time. Sync steps then looked ~1.2 s slower, most of which was the old FedAvg's
  slow client-axis reduction: with the dot-product FedAvg they take 3.32 s against 3.11 s.
  """
  token = _REMAT_WS.set(True)
  try:
    yield
  finally:
    _REMAT_WS.reset(token)


class Conv(nn.Module):
  """2-D convolution with explicit symmetric padding, optional Weight Standardisation.

  `ws=True` reproduces the reference's WSConv2d (PyTorch default init); `ws=False` is a plain
  Conv2d that the reference's `init_weights` re-initialises with xavier-uniform / zero bias.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  groups: int = 1
  use_bias: bool = False
  ws: bool = True

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    k = self.kernel_size
    shape = (k, k, in_features // self.groups, self.features)
    fan_in = shape[0] * shape[1] * shape[2]
    kernel_init = torch_default_kernel_init if self.ws else xavier_uniform
    kernel = self.param("kernel", kernel_init, shape)
    if self.ws:
      kernel = (_standardize_kernel_remat if _REMAT_WS.get() else standardize_kernel)(kernel)
    impl = _CONV_IMPL.get()
    if impl == "winograd":
      from mocosfl_jax.models import winograd  # pylint: disable=g-import-not-at-top
      y = winograd.conv(x, kernel, self.stride, self.padding, self.groups)
    elif impl == "matmul":
      y = conv_matmul(x, kernel, self.stride, self.padding, self.groups)
    else:
      y = lax.conv_general_dilated(
          x, kernel, (self.stride, self.stride), [(self.padding, self.padding)] * 2,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
    if self.use_bias:
      bias_init = torch_default_bias_init(fan_in) if self.ws else nn.initializers.zeros
      y = y + self.param("bias", bias_init, (self.features,))
    return y


class ConvTranspose(nn.Module):
  """PyTorch ConvTranspose2d(k, stride, padding, output_padding) with bias, xavier init.

  `kernel` has PyTorch semantics laid out HWIO (in = input channels); the op is a stride-1
  convolution of the stride-dilated input with the spatially flipped kernel.
  """
  features: int
  kernel_size: int = 3
  stride: int = 2
  padding: int = 1
  output_padding: int = 1

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", xavier_uniform, (k, k, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    lo = k - 1 - self.padding
    y = lax.conv_general_dilated(
        x, kernel[::-1, ::-1], (1, 1), [(lo, lo + self.output_padding)] * 2,
        lhs_dilation=(self.stride, self.stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def group_norm(name: str | None = None) -> nn.Module:
  """GroupNorm with 4 channels per group (groups = max(C // 4, 1)), eps 1e-5, as the reference."""
  return _GroupNorm4(name=name)


class _GroupNorm4(nn.Module):

  @nn.compact
  def __call__(self, x):
    groups = max(x.shape[-1] // 4, 1)
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, name="gn")(x)


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch defaults (momentum 0.1 -> flax 0.9, eps 1e-5)."""

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)


class Dense(nn.Module):
  """Linear layer with the reference's `init_weights`: xavier-uniform weight, zero bias."""
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros,
                    name="dense")(x)


def max_pool_2x2(x):
  return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def global_avg_pool(x):
  return jnp.mean(x, axis=(1, 2))


def count_params(tree) -> int:
  return int(sum(leaf.size for leaf in jax.tree.leaves(tree)))
