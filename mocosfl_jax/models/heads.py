"""Projection heads of the reference; they replace the classifier and live on the server.

Hidden width is key_dim x expansion (not the feature width), as in the reference. Linear layers
have bias and xavier init. largeV2's BatchNorm1d sees the whole concatenated server batch. See
docs/reference.md.
"""
import flax.linen as nn

from mocosfl_jax.models import layers as L

KEY_DIM = {"V1": 128, "smallV2": 512, "V2": 1024, "largeV2": 2048}


class ProjectionHead(nn.Module):
  version: str
  expansion: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    v, e = self.version, self.expansion
    if v == "V1":
      return L.Dense(128, name="fc")(x)
    if v in ("smallV2", "V2"):
      d = KEY_DIM[v]
      return L.Dense(d, name="fc2")(nn.relu(L.Dense(d * e, name="fc1")(x)))
    if v == "largeV2":
      h = L.BatchNorm(name="bn")(L.Dense(4096, name="fc1")(x), train)
      return L.Dense(2048, name="fc2")(nn.relu(h))
    raise ValueError(f"head={v!r} is unknown; valid: {sorted(KEY_DIM)}")
