"""Communication bottleneck `[K<k>]C<c>S<s>[noRELU]`: a client tail and a server head.

Client tail: s = 1 -> Conv(C_in->c, k, pad k//2); s >= 2 -> Conv(C_in->c, 3, s2, p1) then
log2(s/2) x [ReLU, Conv(c->c, 3, s2, p1)]; then ReLU. Server head mirrors it with transposed convs
(s >= 2) or Conv(c->C_in, k) (s = 1; MobileNetV2 uses 1x1), then ReLU. `noRELU` drops the ReLUs
(ResNet/VGG only, as the reference: MobileNetV2 keeps them). Plain convs with bias, xavier init.
See docs/reference.md.
"""
import dataclasses
import math
import re

import flax.linen as nn

from mocosfl_jax.models import layers as L

_PATTERN = re.compile(r"^(?:K(?P<k>\d+))?C(?P<c>\d+)S(?P<s>\d+)(?P<norelu>noRELU)?$")
FORMAT_HELP = ("'None' or [K<kernel>]C<channels>S<stride>[noRELU], stride 1 or a power of two, "
               "e.g. 'C4S2', 'C8S1', 'K5C16S1', 'C4S4noRELU'")


@dataclasses.dataclass(frozen=True)
class BottleneckSpec:
  channels: int
  stride: int
  kernel: int = 3
  relu: bool = True


def parse_bottleneck(option: str | None) -> BottleneckSpec | None:
  """Parses the reference's bottleneck string; 'None'/''/None means no bottleneck."""
  if option is None or option in ("None", "none", ""):
    return None
  m = _PATTERN.match(option)
  if not m:
    raise ValueError(f"bottleneck={option!r} is malformed; expected {FORMAT_HELP}")
  c, s, k = int(m["c"]), int(m["s"]), int(m["k"] or 3)
  if c < 1 or s < 1 or (s & (s - 1)) != 0:
    raise ValueError(f"bottleneck={option!r}: channels must be >= 1 and stride 1 or a power of "
                     f"two; expected {FORMAT_HELP}")
  if m["k"] and s != 1:
    raise ValueError(f"bottleneck={option!r}: a kernel K<k> is only used with stride S1")
  if k % 2 == 0:
    raise ValueError(f"bottleneck={option!r}: kernel must be odd")
  return BottleneckSpec(channels=c, stride=s, kernel=k, relu=m["norelu"] is None)


class BottleneckTail(nn.Module):
  """Client-side compression to `channels` at 1/stride spatial resolution.

  `conv_impl` and `remat_ws` go to its convolutions (plain, so `remat_ws` changes nothing).
  """
  spec: BottleneckSpec
  conv_impl: str = "lax"
  remat_ws: bool = False

  @nn.compact
  def __call__(self, x):
    s = self.spec
    opts = dict(use_bias=True, ws=False, conv_impl=self.conv_impl, remat_ws=self.remat_ws)
    if s.stride == 1:
      x = L.Conv(s.channels, s.kernel, 1, s.kernel // 2, name="conv0", **opts)(x)
    else:
      x = L.Conv(s.channels, 3, 2, 1, name="conv0", **opts)(x)
      for i in range(int(math.log2(s.stride // 2))):
        x = nn.relu(x) if s.relu else x
        x = L.Conv(s.channels, 3, 2, 1, name=f"conv{i + 1}", **opts)(x)
    return nn.relu(x) if s.relu else x


class BottleneckHead(nn.Module):
  """Server-side decompression back to `out_channels` at the cut's resolution.

  `conv_impl` goes to the stride-1 convolution; transposed convolutions always use XLA's.
  """
  spec: BottleneckSpec
  out_channels: int
  stride1_kernel: int | None = None  # MobileNetV2: 1x1 regardless of K<k>.
  conv_impl: str = "lax"

  @nn.compact
  def __call__(self, x):
    s = self.spec
    if s.stride == 1:
      k = self.stride1_kernel or s.kernel
      x = L.Conv(self.out_channels, k, 1, k // 2, use_bias=True, ws=False,
                 conv_impl=self.conv_impl, name="conv0")(x)
    else:
      n = int(math.log2(s.stride // 2))
      for i in range(n):
        x = L.ConvTranspose(s.channels, 3, 2, 1, 1, name=f"deconv{i}")(x)
        x = nn.relu(x) if s.relu else x
      x = L.ConvTranspose(self.out_channels, 3, 2, 1, 1, name=f"deconv{n}")(x)
    return nn.relu(x) if s.relu else x
