"""Building blocks shared by every backbone: WS convs, GroupNorm, plain and transposed convs.

These are the primitive layers: the backbones (resnet, mobilenetv2, vgg, bottleneck, heads) are
built from them, ReLU, additions and max-pooling only, which is what lets deploy/onnx_export.py
translate any client slice while knowing only these classes.

Initialisation follows the reference (see docs/reference.md) so learning dynamics match:
weight-standardised convs keep PyTorch's default init (kaiming-uniform a=sqrt(5), i.e.
U(+-1/sqrt(fan_in))), plain convs, transposed convs and linear layers use xavier-uniform weights
and zero bias. All tensors are NHWC; kernels HWIO. Padding is always explicit and symmetric, as
in PyTorch (flax's 'SAME' pads stride-2 convs asymmetrically, which would change the numbers).

Parameters and running statistics are created in `precision.float_dtype()` (float64 under JAX's
x64 mode) and every layer computes in the promoted type of its input and parameters, so float32
images meet float64 weights without a dtype error and activations are float64 from the first
layer on.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax import precision
from mocosfl_jax.models import conv

# PyTorch's default Conv2d init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
xavier_uniform = nn.initializers.xavier_uniform()

WS_EPS = 1e-5  # added to the (unbiased) std, not to the variance, as the reference does.
GN_CHANNELS_PER_GROUP = 4
GN_EPS = 1e-5
BN_EPS = 1e-5


def torch_default_bias_init(fan_in: int):
  bound = 1.0 / jnp.sqrt(fan_in)

  def init(key, shape, dtype=None):
    dtype = precision.float_dtype() if dtype is None else dtype
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def standardize_kernel(kernel: jax.Array) -> jax.Array:
  """Weight Standardisation per output channel over (kh, kw, in): (w - mean) / (std + eps).

  std is the unbiased standard deviation, as the reference computes it.
  """
  mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  centred = kernel - mean
  std = jnp.std(centred, axis=(0, 1, 2), keepdims=True, ddof=1)
  return centred / (std + WS_EPS)


_standardize_kernel_remat = jax.checkpoint(standardize_kernel)


class Conv(nn.Module):
  """2-D convolution with explicit symmetric padding, optional Weight Standardisation.

  `ws=True` reproduces the reference's WSConv2d (PyTorch default init); `ws=False` is a plain
  Conv2d that the reference's `init_weights` re-initialises with xavier-uniform / zero bias.

  Attributes:
    features, kernel_size, stride, padding, groups, use_bias: as PyTorch's Conv2d.
    ws: standardise the kernel per output channel before convolving.
    conv_impl: how the convolution computes, one of conv.CONV_IMPLS; speed and float rounding
      only, never parameters.
    remat_ws: recompute the standardised kernel in the backward pass instead of keeping it from
      the forward pass. The client slice sets it: vmapped over N clients, the standardised and
      centred kernels would otherwise stay alive as copies of every client's parameters. The
      server's kernels exist once, so there it would only cost time.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  groups: int = 1
  use_bias: bool = False
  ws: bool = True
  conv_impl: str = "lax"
  remat_ws: bool = False

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    k = self.kernel_size
    shape = (k, k, in_features // self.groups, self.features)
    fan_in = shape[0] * shape[1] * shape[2]
    kernel_init = torch_default_kernel_init if self.ws else xavier_uniform
    kernel = self.param("kernel", kernel_init, shape)
    x, kernel = nn.dtypes.promote_dtype(x, kernel)
    if self.ws:
      kernel = (_standardize_kernel_remat if self.remat_ws else standardize_kernel)(kernel)
    y = conv.conv(x, kernel, self.stride, self.padding, self.groups, impl=self.conv_impl)
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
    x, kernel = nn.dtypes.promote_dtype(x, kernel)
    lo = k - 1 - self.padding
    y = lax.conv_general_dilated(
        x, kernel[::-1, ::-1], (1, 1), [(lo, lo + self.output_padding)] * 2,
        lhs_dilation=(self.stride, self.stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def group_norm(name: str | None = None) -> nn.Module:
  """GroupNorm with 4 channels per group (groups = max(C // 4, 1)), eps 1e-5, as the reference."""
  return GroupNorm(name=name)


def gn_groups(channels: int) -> int:
  """Number of GroupNorm groups for `channels`: 4 channels per group, at least one group."""
  return max(channels // GN_CHANNELS_PER_GROUP, 1)


class GroupNorm(nn.Module):
  """flax GroupNorm (params under 'gn') with the reference's grouping and eps; see group_norm."""

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=gn_groups(x.shape[-1]), epsilon=GN_EPS,
                        param_dtype=precision.float_dtype(), name="gn")(x)


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch defaults (momentum 0.1 -> flax 0.9, eps 1e-5).

  Running statistics are kept in the parameters' type (flax would keep them in float32 even
  when everything else is float64); float32 runs compute exactly as flax's default.
  """

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPS,
                        param_dtype=precision.float_dtype(), force_float32_reductions=False,
                        name="bn")(x)


class Dense(nn.Module):
  """Linear layer with the reference's `init_weights`: xavier-uniform weight, zero bias."""
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros,
                    param_dtype=precision.float_dtype(), name="dense")(x)


def max_pool_2x2(x):
  return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def global_avg_pool(x):
  return jnp.mean(x, axis=(1, 2))


def count_params(tree) -> int:
  return int(sum(leaf.size for leaf in jax.tree.leaves(tree)))
