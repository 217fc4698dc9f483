"""VGG-11/13/16/19 of the reference: cfg entries are the layers, 'M' entries included.

A cut at N puts the first N cfg entries (conv or max-pool) on the client: VGG-13 cut 2 = two
64-channel convs. Each conv entry is WS conv3x3 *with bias* (PyTorch default init) + GN + ReLU;
with `ws=False` (the reference's --disable_WS) a plain conv3x3 with bias (xavier, zero bias).
The server flattens the final map (the reference assumes 1x1 spatial, i.e. 32x32 input: 512-d
features); `c_residual` has no meaning here and is ignored, as in the reference. See
docs/reference.md.
"""
import functools

import flax.linen as nn

from mocosfl_jax.models import layers as L

CFGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
              "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512,
              512, 512, 512, "M"),
}
FEATURE_DIM = 512


class ConvGNReLU(nn.Module):
  """conv3x3 with bias (WS when `ws`) + GN + ReLU; `conv_impl` and `remat_ws` go to the conv."""
  features: int
  ws: bool = True
  conv_impl: str = "lax"
  remat_ws: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = L.Conv(self.features, 3, 1, 1, use_bias=True, ws=self.ws, conv_impl=self.conv_impl,
               remat_ws=self.remat_ws, name="conv")(x)
    return nn.relu(L.group_norm("norm")(y))


class MaxPool(nn.Module):
  """2x2 max-pool. It has no convolution; it takes the conv fields every backbone layer takes."""
  conv_impl: str = "lax"
  remat_ws: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    return L.max_pool_2x2(x)


def vgg_layers(arch: str, ws: bool = True):
  return [MaxPool if v == "M" else functools.partial(ConvGNReLU, features=v, ws=ws)
          for v in CFGS[arch]]
