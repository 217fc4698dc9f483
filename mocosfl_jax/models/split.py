"""A backbone split at a cut layer into a client slice and a server slice, as pure functions.

    net = build(SplitConfig(arch="resnet18", cut=2, bottleneck="C4S2"))
    client_vars = net.init_client(key)                       # stack these over clients
    smashed, client_vars = net.apply_client(client_vars, x, train=True)
    proj, server_vars = net.apply_server(server_vars, smashed, train=True)

Variables are plain dicts {'params': ..., 'batch_stats': ...} ('batch_stats' always present, empty
unless the network has BatchNorm: MobileNetV2's shortcut BN and the largeV2 head), so client
variables can be stacked on a leading client axis and vmapped. Parameter names are global
(`layer{i}` = the i-th layer of the unsplit backbone), so the client and server trees of any cut
are two disjoint pieces of the same network (see `full_network`).
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mocosfl_jax import precision
from mocosfl_jax.models import bottleneck as bnl
from mocosfl_jax.models import conv as C
from mocosfl_jax.models import heads
from mocosfl_jax.models import layers as L
from mocosfl_jax.models import mobilenetv2, resnet, vgg

Variables = dict[str, Any]
RESNETS = tuple(resnet.RESNET_STAGES)
VGGS = tuple(vgg.CFGS)
ARCHS = RESNETS + ("mobilenetv2",) + VGGS


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  """What a user chooses: backbone, cut and options. Hashable, so it can be a static jit argument.

  Attributes:
    arch: one of ARCHS ('resnet_tiny' is a small test network).
    cut: number of backbone layers on the client (ResNet: stem + cut-1 blocks); cuts past the end
      put the whole backbone on the client.
    input_size: image side in pixels. ResNets: 64 selects the stride-2 stem, 224 the 7x7 stem;
      MobileNetV2 and VGG take 32 only (as the reference).
    bottleneck: 'None' or the reference's `[K<k>]C<c>S<s>[noRELU]` string.
    head: projection head 'V1', 'smallV2', 'V2' or 'largeV2'.
    ws: Weight Standardisation in the backbone convs (ws=False is the reference's --disable_WS).
      ResNets keep the stem conv and the Bottleneck shortcut conv WS regardless, MobileNetV2's
      projection shortcut conv is never WS, as the reference.
    c_residual: keep the skip connections of client-side blocks.
    width: base width of ResNets (64 in the papers; smaller only for tests).
    conv_impl: how convolutions compute, one of conv.CONV_IMPLS ('auto' = Winograd + shifted-view
      matmuls on CPU, XLA's conv elsewhere; see models/conv.py). Changes speed and float
      rounding only, never parameters.
  """
  arch: str = "resnet18"
  cut: int = 1
  input_size: int = 32
  bottleneck: str = "None"
  head: str = "V2"
  ws: bool = True
  c_residual: bool = True
  width: int = 64
  conv_impl: str = "auto"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "SplitConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown SplitConfig fields {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class _Arch:
  layers: tuple[Callable[..., nn.Module], ...]
  cut: int                      # effective cut, clamped to len(layers)
  feature_dim: int
  expansion: int
  pool: Callable[[jax.Array], jax.Array]
  bottleneck: bnl.BottleneckSpec | None
  stride1_head_kernel: int | None


def num_layers(arch: str) -> int:
  """Number of cuttable layers of a backbone (ResNet: stem + blocks; VGG: cfg entries)."""
  if arch in RESNETS:
    return 1 + sum(resnet.RESNET_STAGES[arch][1])
  if arch == "mobilenetv2":
    return 2 + len(mobilenetv2.CFG)
  if arch in VGGS:
    return len(vgg.CFGS[arch])
  raise ValueError(f"arch={arch!r} is unknown; valid: {list(ARCHS)}")


def validate(cfg: SplitConfig) -> None:
  """Raises ValueError naming the field and the valid values for any choice we cannot build."""
  n = num_layers(cfg.arch)
  if not isinstance(cfg.cut, int) or cfg.cut < 1:
    raise ValueError(f"cut={cfg.cut!r} is invalid for {cfg.arch}: valid cuts are 1..{n} "
                     f"(larger values put the whole backbone on the client)")
  if cfg.conv_impl not in C.CONV_IMPLS:
    raise ValueError(f"conv_impl={cfg.conv_impl!r} is unknown; valid: {list(C.CONV_IMPLS)}")
  if cfg.head not in heads.KEY_DIM:
    raise ValueError(f"head={cfg.head!r} is unknown; valid: {list(heads.KEY_DIM)}")
  if cfg.arch in RESNETS:
    if cfg.input_size < 8:
      raise ValueError(f"input_size={cfg.input_size} is too small for {cfg.arch}: valid sizes are "
                       ">= 8 (32 CIFAR, 64 Tiny-ImageNet stride-2 stem, 224 ImageNet 7x7 stem)")
    if cfg.width < 1:
      raise ValueError(f"width={cfg.width} must be a positive integer (64 in the papers)")
  else:
    if cfg.input_size != 32:
      raise ValueError(f"input_size={cfg.input_size} is invalid for {cfg.arch}: valid: 32 (the "
                       "reference's pooling/flatten assume a 32x32 input); ResNets take any size")
    if cfg.width != 64:
      raise ValueError(f"width={cfg.width} is only adjustable for ResNets; {cfg.arch} needs 64")
  spec = bnl.parse_bottleneck(cfg.bottleneck)
  if spec is not None:
    h, w, _ = _raw_smashed_shape(cfg)
    if h % spec.stride or w % spec.stride:
      raise ValueError(f"bottleneck={cfg.bottleneck!r}: stride {spec.stride} does not divide the "
                       f"{h}x{w} activation at cut {cfg.cut} of {cfg.arch}; use a smaller S")


@functools.lru_cache(maxsize=None)
def _arch(cfg: SplitConfig) -> _Arch:
  n = num_layers(cfg.arch)
  cut = min(cfg.cut, n)
  spec = bnl.parse_bottleneck(cfg.bottleneck)
  if cfg.arch in RESNETS:
    layers, feature_dim, expansion = resnet.resnet_layers(
        cfg.arch, cut, width=cfg.width, input_size=cfg.input_size, ws=cfg.ws,
        c_residual=cfg.c_residual)
    return _Arch(tuple(layers), cut, feature_dim, expansion, L.global_avg_pool, spec, None)
  if cfg.arch == "mobilenetv2":
    if spec is not None and not spec.relu:
      spec = dataclasses.replace(spec, relu=True)  # the reference ignores noRELU for MobileNetV2
    return _Arch(tuple(mobilenetv2.mobilenetv2_layers(cfg.c_residual, cfg.ws)), cut,
                 mobilenetv2.FEATURE_DIM, 1, mobilenetv2.avg_pool_4, spec, 1)
  return _Arch(tuple(vgg.vgg_layers(cfg.arch, cfg.ws)), cut, vgg.FEATURE_DIM, 1,
               lambda x: x.reshape(x.shape[0], -1), spec, None)


class ClientNet(nn.Module):
  """layers[0:cut] (+ bottleneck tail).

  `remat_ws` (default on) makes its weight-standardised convs recompute the standardised kernels
  in the backward pass (see layers.Conv): the client slice runs vmapped over every client, so
  keeping them would hold a copy of every client's kernels.
  """
  cfg: SplitConfig
  with_bottleneck: bool = True
  remat_ws: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    arch = _arch(self.cfg)
    opts = dict(conv_impl=C.resolve_conv_impl(self.cfg.conv_impl), remat_ws=self.remat_ws)
    for i in range(arch.cut):
      x = arch.layers[i](name=f"layer{i}", **opts)(x, train)
    if arch.bottleneck is not None and self.with_bottleneck:
      x = bnl.BottleneckTail(arch.bottleneck, name="bottleneck", **opts)(x)
    return x


class ServerNet(nn.Module):
  """(bottleneck head +) layers[start:] + pooling + projection head.

  Its kernels exist once (not per client), so it keeps the standardised kernels for the
  backward pass (`remat_ws=False`): recomputing them would only cost time.
  """
  cfg: SplitConfig
  start: int
  cut_channels: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False, features_only: bool = False):
    arch = _arch(self.cfg)
    conv_impl = C.resolve_conv_impl(self.cfg.conv_impl)
    if arch.bottleneck is not None and self.start > 0:
      x = bnl.BottleneckHead(arch.bottleneck, self.cut_channels, arch.stride1_head_kernel,
                             conv_impl=conv_impl, name="bottleneck")(x)
    for i in range(self.start, len(arch.layers)):
      x = arch.layers[i](name=f"layer{i}", conv_impl=conv_impl, remat_ws=False)(x, train)
    features = arch.pool(x)
    if features_only:
      return features
    return heads.ProjectionHead(self.cfg.head, arch.expansion, name="head")(features, train)


@functools.lru_cache(maxsize=None)
def _raw_smashed_shape(cfg: SplitConfig) -> tuple[int, int, int]:
  x = jax.ShapeDtypeStruct((1, cfg.input_size, cfg.input_size, 3), precision.float_dtype())
  module = ClientNet(cfg, with_bottleneck=False)
  out = jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x)[0], x)
  return tuple(out.shape[1:])


def _as_variables(v) -> Variables:
  v = dict(v)
  return {"params": dict(v.get("params", {})), "batch_stats": dict(v.get("batch_stats", {}))}


def _apply(module, variables, x, train, **kwargs):
  if train:
    y, updates = module.apply(variables, x, train=True, mutable=["batch_stats"], **kwargs)
    return y, {**variables, "batch_stats": dict(updates.get("batch_stats", {}))}
  return module.apply(variables, x, train=False, **kwargs), variables


class SplitNet:
  """The functional API of one split network; equal and hashable by its config."""

  def __init__(self, cfg: SplitConfig):
    validate(cfg)
    self.config = cfg
    arch = _arch(cfg)
    self.cut = arch.cut
    self.num_layers = len(arch.layers)
    self.feature_dim = arch.feature_dim
    self.key_dim = heads.KEY_DIM[cfg.head]
    self.input_shape = (cfg.input_size, cfg.input_size, 3)
    self.cut_channels = _raw_smashed_shape(cfg)[-1]
    self.client_module = ClientNet(cfg)
    self.server_module = ServerNet(cfg, start=arch.cut, cut_channels=self.cut_channels)
    if arch.bottleneck is None:
      self.smashed_shape = _raw_smashed_shape(cfg)
    else:
      x = jax.ShapeDtypeStruct((1, *self.input_shape), precision.float_dtype())
      out = jax.eval_shape(
          lambda x: self.client_module.init_with_output(jax.random.key(0), x)[0], x)
      self.smashed_shape = tuple(out.shape[1:])

  def __eq__(self, other):
    return isinstance(other, SplitNet) and other.config == self.config

  def __hash__(self):
    return hash(self.config)

  def __repr__(self):
    return f"SplitNet({self.config})"

  def init_client(self, key: jax.Array) -> Variables:
    x = jnp.zeros((1, *self.input_shape), precision.float_dtype())
    return _as_variables(self.client_module.init(key, x))

  def init_server(self, key: jax.Array) -> Variables:
    # batch 2: BatchNorm needs >1 row
    x = jnp.zeros((2, *self.smashed_shape), precision.float_dtype())
    return _as_variables(self.server_module.init(key, x))

  def apply_client(self, variables: Variables, x: jax.Array, train: bool = False):
    """Client slice: images [B,H,W,3] (normalised, NHWC) -> (smashed [B,h,w,c], variables)."""
    return _apply(self.client_module, variables, x, train)

  def apply_server(self, variables: Variables, smashed: jax.Array, train: bool = False):
    """Server slice: smashed [B,h,w,c] -> (projection [B,key_dim] (not normalised), variables)."""
    return _apply(self.server_module, variables, smashed, train)

  def server_features(self, variables: Variables, smashed: jax.Array) -> jax.Array:
    """Pooled backbone features without the head (for linear probes), eval mode."""
    return self.server_module.apply(variables, smashed, train=False, features_only=True)


def build(cfg: SplitConfig) -> SplitNet:
  return SplitNet(cfg)


def full_network(cfg: SplitConfig) -> ServerNet:
  """The unsplit backbone + head (no bottleneck); its variables hold every `layer{i}` and `head`."""
  return ServerNet(dataclasses.replace(cfg, bottleneck="None"), start=0)


def split_variables(cfg: SplitConfig, full_vars: Variables) -> tuple[Variables, Variables]:
  """Splits variables of `full_network(cfg)` into (client, server) variables at cfg.cut."""
  cut = _arch(cfg).cut

  def side(tree, client):
    return {k: v for k, v in tree.items()
            if (k.startswith("layer") and (int(k[5:]) < cut) == client)
            or (k == "head" and not client)}

  full = _as_variables(full_vars)
  return tuple({c: side(full[c], client) for c in ("params", "batch_stats")}
               for client in (True, False))
