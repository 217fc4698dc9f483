"""MobileNetV2, CIFAR variant of the reference, as a list of 9 layers.

Layers: 0 = stem, 1..7 = the seven stages of inverted-residual blocks, 8 = final 1x1 conv to 1280.
A cut at N puts layers[0:N] on the client (cut 1 = stem, cut 9 = everything).

Reference quirks reproduced on purpose (they change the numbers, so a faithful port keeps them):
- no ReLU after the stem conv+GN, and none after the final 1x1 conv+GN;
- projection shortcuts (stride 1, in != out) are a *plain* 1x1 conv (no WS, xavier init) followed by
  **BatchNorm** even though everything else uses GroupNorm; so client-side BN running statistics
  exist from cut 4 on (per client under vmap);
- `c_residual=False` removes the skip from *all* blocks, server ones included (ResNet only client);
- `ws=False` (the reference's --disable_WS) makes every conv plain, stem and final 1x1 included
  (xavier init, as the reference re-initialises plain convs);
- the server pooling is avg_pool2d(4) on the final 4x4 map, so only 32x32 inputs are valid
  (the reference also passes `input_size` as the stem width, which only works at 32);
- with a bottleneck, the stride-1 server-side bottleneck conv is 1x1.
See docs/reference.md.

Every layer carries the `layers.Conv` fields `conv_impl` and `remat_ws` and hands them to its
convolutions; the split networks set them.
"""
import functools

import flax.linen as nn

from mocosfl_jax.models import layers as L

# (expansion, out_planes, num_blocks, stride) -- kuangliu's CIFAR config (stage 2 stride 1).
CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
       (6, 160, 3, 2), (6, 320, 1, 1))
STEM_WIDTH = 32
FEATURE_DIM = 1280


class Stem(nn.Module):
  """3x3 conv (WS when `ws`) to 32 channels + GN, no ReLU (reference quirk)."""
  ws: bool = True
  conv_impl: str = "lax"
  remat_ws: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = L.Conv(STEM_WIDTH, 3, 1, 1, ws=self.ws, conv_impl=self.conv_impl,
                  remat_ws=self.remat_ws, name="conv")
    return L.group_norm("norm")(conv(x))


class InvertedResidual(nn.Module):
  """1x1 expand-GN-ReLU-3x3 depthwise (stride)-GN-ReLU-1x1 project-GN (+ shortcut).

  The three block convs are WS when `ws`; the projection shortcut conv never is.
  """
  expansion: int
  out_planes: int
  stride: int
  residual: bool = True
  ws: bool = True
  conv_impl: str = "lax"
  remat_ws: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    in_planes = x.shape[-1]
    planes = self.expansion * in_planes
    opts = dict(conv_impl=self.conv_impl, remat_ws=self.remat_ws)
    out = nn.relu(L.group_norm("norm1")(L.Conv(planes, 1, 1, 0, ws=self.ws, name="conv1",
                                               **opts)(x)))
    out = nn.relu(L.group_norm("norm2")(L.Conv(planes, 3, self.stride, 1, groups=planes,
                                               ws=self.ws, name="conv2", **opts)(out)))
    out = L.group_norm("norm3")(L.Conv(self.out_planes, 1, 1, 0, ws=self.ws, name="conv3",
                                       **opts)(out))
    if self.residual and self.stride == 1:
      if in_planes != self.out_planes:
        x = L.BatchNorm(name="shortcut_bn")(
            L.Conv(self.out_planes, 1, 1, 0, ws=False, name="shortcut_conv", **opts)(x), train)
      out = out + x
    return out


class Stage(nn.Module):
  """`num_blocks` inverted residual blocks; the first one has the stage's stride."""
  expansion: int
  out_planes: int
  num_blocks: int
  stride: int
  residual: bool = True
  ws: bool = True
  conv_impl: str = "lax"
  remat_ws: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(self.num_blocks):
      x = InvertedResidual(self.expansion, self.out_planes, self.stride if i == 0 else 1,
                           self.residual, self.ws, conv_impl=self.conv_impl,
                           remat_ws=self.remat_ws, name=f"block{i}")(x, train)
    return x


class FinalConv(nn.Module):
  """1x1 conv (WS when `ws`) to 1280 channels + GN, no ReLU (reference quirk)."""
  ws: bool = True
  conv_impl: str = "lax"
  remat_ws: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = L.Conv(FEATURE_DIM, 1, 1, 0, ws=self.ws, conv_impl=self.conv_impl,
                  remat_ws=self.remat_ws, name="conv")
    return L.group_norm("norm")(conv(x))


def mobilenetv2_layers(c_residual: bool, ws: bool = True):
  """Layer factories; `ws` switches Weight Standardisation of every conv but the shortcuts."""
  factories = [functools.partial(Stem, ws=ws)]
  for expansion, out_planes, num_blocks, stride in CFG:
    factories.append(functools.partial(Stage, expansion=expansion, out_planes=out_planes,
                                       num_blocks=num_blocks, stride=stride, residual=c_residual,
                                       ws=ws))
  factories.append(functools.partial(FinalConv, ws=ws))
  return factories


def avg_pool_4(x):
  """The reference's hard-coded avg_pool2d(4): a 4x4 map becomes 1x1, then flattened."""
  pooled = nn.avg_pool(x, window_shape=(4, 4), strides=(4, 4), padding="VALID")
  return pooled.reshape(x.shape[0], -1)
