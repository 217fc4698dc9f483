"""GroupNorm + Weight-Standardised ResNets of the reference, as a list of layers.

Layer 0 is the stem, layer j >= 1 the j-th residual block; a cut at N puts layers[0:N] on the
client. Reference quirks kept on purpose: the stem conv is always WS, the Bottleneck projection
shortcut conv is always WS (even with ws=False), and `c_residual=False` removes the skip (and its
projection) only from client-side blocks. See docs/reference.md.

Every layer carries the `layers.Conv` fields `conv_impl` and `remat_ws` and hands them to its
convolutions; the split networks set them.
"""
import functools

import flax.linen as nn

from mocosfl_jax.models import layers as L

# name -> (block kind, blocks per stage)
RESNET_STAGES = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet_tiny": ("basic", (1, 1, 1)),  # test-only: 3 stages of one block.
}
EXPANSION = {"basic": 1, "bottleneck": 4}


class Stem(nn.Module):
  """Conv + GN + ReLU: 3x3 s1 for 32 px (and any size but 64/224), 3x3 s2 for 64 px, 7x7 s2
  (no max-pool) for 224."""
  width: int
  input_size: int
  conv_impl: str = "lax"
  remat_ws: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    opts = dict(conv_impl=self.conv_impl, remat_ws=self.remat_ws)
    if self.input_size == 224:
      conv = L.Conv(self.width, kernel_size=7, stride=2, padding=3, ws=True, name="conv", **opts)
    else:
      conv = L.Conv(self.width, 3, stride=2 if self.input_size == 64 else 1, padding=1, ws=True,
                    name="conv", **opts)
    return nn.relu(L.group_norm("norm")(conv(x)))


class BasicBlock(nn.Module):
  """conv3x3(s)-GN-ReLU-conv3x3-GN (+ shortcut) - ReLU; 1x1 projection when shape changes."""
  planes: int
  stride: int = 1
  residual: bool = True
  ws: bool = True
  conv_impl: str = "lax"
  remat_ws: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    opts = dict(conv_impl=self.conv_impl, remat_ws=self.remat_ws)
    out = nn.relu(L.group_norm("norm1")(L.Conv(self.planes, 3, self.stride, 1, ws=self.ws,
                                               name="conv1", **opts)(x)))
    out = L.group_norm("norm2")(L.Conv(self.planes, 3, 1, 1, ws=self.ws, name="conv2", **opts)(out))
    if self.residual:
      if self.stride != 1 or x.shape[-1] != self.planes:
        x = L.group_norm("shortcut_norm")(
            L.Conv(self.planes, 1, self.stride, 0, ws=self.ws, name="shortcut_conv", **opts)(x))
      out = out + x
    return nn.relu(out)


class Bottleneck(nn.Module):
  """1x1-GN-ReLU-3x3(s)-GN-ReLU-1x1(x4)-GN (+ shortcut) - ReLU.

  The shortcut conv is always WS, even with ws=False (reference quirk).
  """
  planes: int
  stride: int = 1
  residual: bool = True
  ws: bool = True
  conv_impl: str = "lax"
  remat_ws: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_planes = 4 * self.planes
    opts = dict(conv_impl=self.conv_impl, remat_ws=self.remat_ws)
    out = nn.relu(L.group_norm("norm1")(L.Conv(self.planes, 1, 1, 0, ws=self.ws, name="conv1",
                                               **opts)(x)))
    out = nn.relu(L.group_norm("norm2")(L.Conv(self.planes, 3, self.stride, 1, ws=self.ws,
                                               name="conv2", **opts)(out)))
    out = L.group_norm("norm3")(L.Conv(out_planes, 1, 1, 0, ws=self.ws, name="conv3", **opts)(out))
    if self.residual:
      if self.stride != 1 or x.shape[-1] != out_planes:
        x = L.group_norm("shortcut_norm")(
            L.Conv(out_planes, 1, self.stride, 0, ws=True, name="shortcut_conv", **opts)(x))
      out = out + x
    return nn.relu(out)


def resnet_layers(arch: str, cut: int, *, width: int, input_size: int, ws: bool,
                  c_residual: bool):
  """Returns (layer factories, feature_dim, expansion); each factory takes `name=` and the conv
  fields `conv_impl=`, `remat_ws=`."""
  kind, stages = RESNET_STAGES[arch]
  block = BasicBlock if kind == "basic" else Bottleneck
  factories = [functools.partial(Stem, width=width, input_size=input_size)]
  index = 1
  for stage, num_blocks in enumerate(stages):
    planes = width * 2**stage
    for b in range(num_blocks):
      stride = 2 if (stage > 0 and b == 0) else 1
      residual = True if index >= cut else c_residual  # only client blocks can lose the skip.
      factories.append(functools.partial(block, planes=planes, stride=stride, residual=residual,
                                         ws=ws))
      index += 1
  expansion = EXPANSION[kind]
  feature_dim = width * 2**(len(stages) - 1) * expansion
  return factories, feature_dim, expansion
