"""The attacker's decoder: smashed data of a client slice -> the client's image.

This is the reference's `res_normN<N>C<C>` model-inversion decoder ("res_normN4C64" by default,
both in the model-inversion attack and in TAResSFL's simulated attacker):

  ResBlock(C_in -> C) + ReLU, N x [ResBlock(C -> C) + ReLU],
  two upsampling stages, each ConvT(3, stride 2, padding 1, output padding 1) + norm when the
  image is still at least twice the current size, else ResBlock(C -> C); ReLU after each;
  u - 2 further [ConvT + norm + ReLU] stages when u = log2(image size / smashed size) > 2;
  ResBlock(C -> 3), sigmoid (images on [0, 1]).

ResBlocks are pre-activation: h = ReLU(norm0(x)); h = ReLU(norm1(conv3x3(h))); h = conv3x3(h);
out = h + shortcut(x), the shortcut being the identity or a bias-free 1x1 conv + norm when the
channels change. Convs have biases and xavier-uniform init. `norm='bn'` is BatchNorm (the attack),
`norm='gn'` GroupNorm with weight-standardised convs (the reference's simulated attacker when a
client's batch is under 20 images).
"""
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from mocosfl_jax.models import layers

NORMS = ("bn", "gn")
DEFAULT_NAME = "res_normN4C64"
_NAME = re.compile(r"^res_normN(\d+)C(\d+)$")


def parse_name(name: str) -> tuple[int, int]:
  """'res_normN4C64' -> (4 residual blocks, 64 channels); other names are refused."""
  m = _NAME.match(name)
  if not m or int(m.group(1)) < 0 or int(m.group(2)) < 1:
    raise ValueError(f"decoder {name!r} is not supported; use 'res_normN<blocks>C<channels>', "
                     f"e.g. {DEFAULT_NAME!r} (the reference's attack decoder)")
  return int(m.group(1)), int(m.group(2))


def upsampling_stages(image_size: int, smashed_size: int) -> int:
  """u = log2(image size / smashed size); the decoder doubles the size u times."""
  ratio = image_size / smashed_size
  u = round(math.log2(ratio)) if ratio >= 1 else -1
  if u < 0 or 2 ** u * smashed_size != image_size:
    raise ValueError(f"the decoder needs the image size ({image_size}) to be the smashed "
                     f"data's size ({smashed_size}) times a power of 2")
  return u


class _Norm(nn.Module):
  kind: str

  @nn.compact
  def __call__(self, x, train: bool):
    if self.kind == "bn":
      return layers.BatchNorm()(x, train)
    return layers.GroupNorm()(x)


class ResBlock(nn.Module):
  """Pre-activation residual block (see the module docstring); no ReLU at the end."""
  features: int
  norm: str = "bn"
  conv_impl: str = "lax"

  @nn.compact
  def __call__(self, x, train: bool):
    ws = self.norm == "gn"
    h = nn.relu(_Norm(self.norm)(x, train))
    conv = functools.partial(layers.Conv, use_bias=True, ws=ws, conv_impl=self.conv_impl)
    h = conv(self.features, 3, 1, 1)(h)
    h = nn.relu(_Norm(self.norm)(h, train))
    h = conv(self.features, 3, 1, 1)(h)
    shortcut = x
    if x.shape[-1] != self.features:
      shortcut = layers.Conv(self.features, 1, 1, 0, use_bias=False, ws=ws,
                             conv_impl=self.conv_impl)(x)
      shortcut = _Norm(self.norm)(shortcut, train)
    return h + shortcut


class Decoder(nn.Module):
  """res_normN<num_blocks>C<channels>: smashed data [B, h, w, c] -> images [B, H, W, 3] in [0, 1].

  Attributes:
    upsample: u, the number of doublings from h to H (`upsampling_stages`).
    num_blocks, channels: N and C of the name.
    norm: 'bn' or 'gn' (see the module docstring).
    conv_impl: how the 3x3 and 1x1 convolutions compute (models/conv.py; speed and float rounding
      only). On XLA:CPU the weight gradients of 'lax' convolutions inside a loop body (a decoder
      trained under `lax.scan`) run about 20x slower than outside one; 'winograd' and 'matmul'
      turn them into matmuls.
  """
  upsample: int
  num_blocks: int = 4
  channels: int = 64
  norm: str = "bn"
  out_channels: int = 3
  conv_impl: str = "lax"

  @nn.compact
  def __call__(self, x, train: bool = True):
    c = self.channels
    block = functools.partial(ResBlock, norm=self.norm, conv_impl=self.conv_impl)
    x = nn.relu(block(c)(x, train))
    for _ in range(self.num_blocks):
      x = nn.relu(block(c)(x, train))
    for stage in range(max(2, self.upsample)):
      if stage < self.upsample:
        x = _Norm(self.norm)(layers.ConvTranspose(c, 3, 2, 1, 1)(x), train)
      else:
        x = block(c)(x, train)
      x = nn.relu(x)
    return nn.sigmoid(block(self.out_channels)(x, train))


def build(name: str, image_size: int, smashed_shape, norm: str = "bn",
          conv_impl: str = "lax") -> Decoder:
  """The decoder `name` for smashed data of shape [h, w, c] and images of `image_size`."""
  if norm not in NORMS:
    raise ValueError(f"decoder norm {norm!r} is not one of {NORMS}")
  blocks, channels = parse_name(name)
  return Decoder(upsampling_stages(image_size, smashed_shape[0]), blocks, channels, norm,
                 conv_impl=conv_impl)


def init(decoder: Decoder, key: jax.Array, smashed_shape) -> dict:
  """Decoder variables ({'params', 'batch_stats'}) for smashed data of shape [h, w, c]."""
  variables = dict(decoder.init(key, jnp.zeros((1,) + tuple(smashed_shape)), train=False))
  variables.setdefault("batch_stats", {})
  return variables
