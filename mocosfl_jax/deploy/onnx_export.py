"""Hand-written ONNX exporter of the client slice: walks our own parameter tree, emits plain ops.

    model = export_client(cfg, client_vars, mean=..., std=..., layout="NCHW", dynamic_batch=True)
    onnx.save(model, "client.onnx")          # input 'images' [B,3,H,W] normalised, output 'smashed'

Why hand-written rather than jax2onnx (shared/toolchain.md §3):
* Dependency health: jax2onnx 0.17.1 pins orbax-checkpoint<0.11.37 (we pin 0.12.8, which training
  and checkpoints.py use) and pulls equinox, huggingface-hub, netron, orbax-export and more; this
  module needs only `onnx` + numpy, already dependencies. Its first call also costs 12-15 s.
* Correctness: jax2onnx exports tuple-padded max-pool silently wrong, and a tracer exports whatever
  the trace contains; here every op is chosen on purpose and checked against JAX in tests.
* Graph size and speed on ARM: jax2onnx keeps the graph NHWC and puts Transposes around every
  Conv, and traces Weight Standardisation of the constant kernels as graph ops. Here the graph
  is NCHW end to end (onnxruntime's native conv layout, the one its aarch64 MLAS kernels take),
  WS is folded into constant OIHW weights in numpy, and an NHWC model adds exactly one Transpose
  at the input and one at the output. ResNet-18 cut 2 + C4S2 is 25 nodes / 317 kB. Fewer,
  layout-stable nodes is what matters on a small ARM CPU; no ARM device was available to measure,
  so the figures in bench/results/onnx_client.json are from the x86 development machine.

Ops emitted: Conv (WS folded, bias when the layer has one, group for depthwise), GroupNorm, then
BatchNormalization (inference mode, running stats; MobileNetV2's shortcut BN), Relu, Add, MaxPool,
Transpose (NHWC only). GroupNorm is the native GroupNormalization at opset >= 21 (per-channel
scale/bias) and at opset 18-20 the decomposition Reshape [N,G,-1] -> InstanceNormalization ->
Reshape -> Mul -> Add (the same biased-variance maths). The default is opset 18 on purpose:
onnxruntime 1.31's CPU provider has no GroupNormalization kernel and inlines its function body
(the ResNet-18 cut-2 graph grows from 13 to 102 nodes after optimisation, 30 with the
decomposition), the decomposition ran ~7% faster per image on the x86 machine (1.96 vs 2.10 ms,
1 thread), and it loads in older onnxruntime builds (device wheels lag). The client slice never
contains a transposed conv (only the server's bottleneck head does), so no ConvTranspose is
emitted. The export is the inference-mode slice, i.e. `apply_client(vars, x, train=False)`.

Structure comes from the model modules' own layer factories (resnet.resnet_layers,
mobilenetv2.mobilenetv2_layers, vgg.vgg_layers) dispatched on the module class, so a new block
type fails loudly; parameters are read by path from the tree and every leaf must be consumed
(anything left over means the tree and the config disagree). The model itself stays NHWC/HWIO.
"""
from __future__ import annotations

import functools
import json
import math
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mocosfl_jax.models import SplitConfig, build
from mocosfl_jax.models import bottleneck as bnl
from mocosfl_jax.models import layers as L
from mocosfl_jax.models import mobilenetv2, resnet, split, vgg

LAYOUTS = ("NCHW", "NHWC")
MIN_OPSET = 18          # ReduceMean/axes-as-input era; below it the decomposition is invalid.
NATIVE_GN_OPSET = 21    # GroupNormalization-21 has per-channel scale/bias (18's is per group).
DEFAULT_OPSET = 18   # see the module docstring: faster on onnxruntime CPU, wider support.
INPUT_NAME = "images"
OUTPUT_NAME = "smashed"
GN_EPS = 1e-5
BN_EPS = 1e-5
FORMAT_VERSION = "1"


@functools.lru_cache(maxsize=16)
def _build(cfg: SplitConfig):
  """build() traces the client twice (shapes); SplitNet is immutable, so reuse it per config."""
  return build(cfg)


def max_opset() -> int:
  return onnx.defs.onnx_opset_version()


def validate_options(layout: str, opset: int, batch_size: int) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} is invalid; valid: {list(LAYOUTS)}")
  if not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
    raise ValueError(f"opset={opset!r} is invalid; valid: {MIN_OPSET}..{max_opset()} "
                     f"(>= {NATIVE_GN_OPSET} uses the native GroupNormalization)")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be a positive integer")


def standardize_kernel_np(kernel: np.ndarray) -> np.ndarray:
  """numpy twin of layers.standardize_kernel (HWIO, per output channel, unbiased std + eps)."""
  k = kernel.astype(np.float64)
  centred = k - k.mean(axis=(0, 1, 2), keepdims=True)
  std = centred.std(axis=(0, 1, 2), keepdims=True, ddof=1)
  return (centred / (std + L.WS_EPS)).astype(np.float32)


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], np.ndarray]:
  out = {}
  for k, v in dict(tree or {}).items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = np.asarray(v, np.float32)
  return out


class _Vars:
  """Read-by-path access to {'params', 'batch_stats'} that remembers what was consumed."""

  def __init__(self, variables):
    self.leaves = {("params",) + p: v for p, v in _flatten(variables.get("params")).items()}
    self.leaves.update({("batch_stats",) + p: v
                        for p, v in _flatten(variables.get("batch_stats")).items()})
    self.used = set()

  def get(self, *path, shape=None) -> np.ndarray:
    if path not in self.leaves:
      near = sorted("/".join(p) for p in self.leaves if p[:-1] == path[:-1])
      raise ValueError(f"client variables have no '{'/'.join(path)}' that the model config needs "
                       f"(incompatible parameter tree); siblings present: {near}")
    value = self.leaves[path]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ValueError(f"client variable '{'/'.join(path)}' has shape {tuple(value.shape)}, the "
                       f"model config needs {tuple(shape)} (incompatible parameter tree)")
    self.used.add(path)
    return value

  def has(self, *prefix) -> bool:
    return any(p[:len(prefix)] == prefix for p in self.leaves)

  def unused(self) -> list[str]:
    return sorted("/".join(p) for p in self.leaves if p not in self.used)


class _Graph:
  """Node/initializer accumulator; tensors are (name, C, H, W) with static C, H, W."""

  def __init__(self, opset: int, variables):
    self.opset = opset
    self.vars = _Vars(variables)
    self.nodes, self.inits = [], []
    self._count = 0

  def _name(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def const(self, hint: str, array) -> str:
    name = self._name(hint)
    self.inits.append(numpy_helper.from_array(np.asarray(array), name))
    return name

  def op(self, op_type: str, inputs, hint: str, **attrs) -> str:
    out = self._name(hint)
    self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
    return out

  # -- layers ------------------------------------------------------------------------------------
  def conv(self, x, path, features, k, stride, pad, *, groups=1, ws=True, bias=False):
    name, c, h, w = x
    kernel = self.vars.get("params", *path, "kernel", shape=(k, k, c // groups, features))
    if ws:
      kernel = standardize_kernel_np(kernel)
    inputs = [name, self.const("/".join(path) + "/W", kernel.transpose(3, 2, 0, 1))]
    if bias:
      inputs.append(self.const("/".join(path) + "/B",
                               self.vars.get("params", *path, "bias", shape=(features,))))
    y = self.op("Conv", inputs, "/".join(path), kernel_shape=[k, k], strides=[stride, stride],
                pads=[pad] * 4, group=groups)
    return (y, features, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)

  def group_norm(self, x, path):
    name, c, h, w = x
    groups = max(c // 4, 1)  # layers.group_norm: 4 channels per group.
    scale = self.vars.get("params", *path, "gn", "scale", shape=(c,))
    bias = self.vars.get("params", *path, "gn", "bias", shape=(c,))
    hint = "/".join(path)
    if self.opset >= NATIVE_GN_OPSET:
      y = self.op("GroupNormalization", [name, self.const(hint + "/scale", scale),
                                         self.const(hint + "/bias", bias)], hint,
                  epsilon=GN_EPS, num_groups=groups)
      return (y, c, h, w)
    grouped = self.op("Reshape", [name, self.const(hint + "/gshape", np.array([0, groups, -1],
                                                                              np.int64))],
                      hint + "/grouped")
    normed = self.op("InstanceNormalization",
                     [grouped, self.const(hint + "/ones", np.ones(groups, np.float32)),
                      self.const(hint + "/zeros", np.zeros(groups, np.float32))],
                     hint + "/normed", epsilon=GN_EPS)
    back = self.op("Reshape", [normed, self.const(hint + "/shape", np.array([0, c, h, w],
                                                                            np.int64))],
                   hint + "/ungrouped")
    scaled = self.op("Mul", [back, self.const(hint + "/scale", scale.reshape(c, 1, 1))],
                     hint + "/scaled")
    y = self.op("Add", [scaled, self.const(hint + "/bias", bias.reshape(c, 1, 1))], hint)
    return (y, c, h, w)

  def batch_norm(self, x, path):
    name, c, h, w = x
    hint = "/".join(path)
    get = self.vars.get
    inputs = [name] + [self.const(f"{hint}/{n}", get(col, *path, "bn", n, shape=(c,)))
                       for col, n in (("params", "scale"), ("params", "bias"),
                                      ("batch_stats", "mean"), ("batch_stats", "var"))]
    return (self.op("BatchNormalization", inputs, hint, epsilon=BN_EPS), c, h, w)

  def relu(self, x):
    return (self.op("Relu", [x[0]], "relu"),) + tuple(x[1:])

  def add(self, x, y):
    if tuple(x[1:]) != tuple(y[1:]):
      raise AssertionError(f"residual shapes differ: {x[1:]} vs {y[1:]}")
    return (self.op("Add", [x[0], y[0]], "add"),) + tuple(x[1:])

  def max_pool_2x2(self, x, path):
    name, c, h, w = x
    return (self.op("MaxPool", [name], "/".join(path), kernel_shape=[2, 2], strides=[2, 2]),
            c, h // 2, w // 2)


# -- per-module emitters (one per layer class of the model zoo) ------------------------------------


def _resnet_stem(g, x, p, width, input_size):
  if input_size == 224:
    x = g.conv(x, p + ("conv",), width, 7, 2, 3)
  else:
    x = g.conv(x, p + ("conv",), width, 3, 2 if input_size == 64 else 1, 1)
  return g.relu(g.group_norm(x, p + ("norm",)))


def _basic_block(g, x, p, planes, stride=1, residual=True, ws=True):
  out = g.relu(g.group_norm(g.conv(x, p + ("conv1",), planes, 3, stride, 1, ws=ws), p + ("norm1",)))
  out = g.group_norm(g.conv(out, p + ("conv2",), planes, 3, 1, 1, ws=ws), p + ("norm2",))
  if residual:
    if stride != 1 or x[1] != planes:
      x = g.group_norm(g.conv(x, p + ("shortcut_conv",), planes, 1, stride, 0, ws=ws),
                       p + ("shortcut_norm",))
    out = g.add(out, x)
  return g.relu(out)


def _bottleneck_block(g, x, p, planes, stride=1, residual=True, ws=True):
  out_planes = 4 * planes
  out = g.relu(g.group_norm(g.conv(x, p + ("conv1",), planes, 1, 1, 0, ws=ws), p + ("norm1",)))
  out = g.relu(g.group_norm(g.conv(out, p + ("conv2",), planes, 3, stride, 1, ws=ws),
                            p + ("norm2",)))
  out = g.group_norm(g.conv(out, p + ("conv3",), out_planes, 1, 1, 0, ws=ws), p + ("norm3",))
  if residual:
    if stride != 1 or x[1] != out_planes:  # the reference's shortcut conv is always WS.
      x = g.group_norm(g.conv(x, p + ("shortcut_conv",), out_planes, 1, stride, 0, ws=True),
                       p + ("shortcut_norm",))
    out = g.add(out, x)
  return g.relu(out)


def _mnv2_stem(g, x, p):
  return g.group_norm(g.conv(x, p + ("conv",), mobilenetv2.STEM_WIDTH, 3, 1, 1), p + ("norm",))


def _mnv2_block(g, x, p, expansion, out_planes, stride, residual):
  planes = expansion * x[1]
  out = g.relu(g.group_norm(g.conv(x, p + ("conv1",), planes, 1, 1, 0), p + ("norm1",)))
  out = g.relu(g.group_norm(g.conv(out, p + ("conv2",), planes, 3, stride, 1, groups=planes),
                            p + ("norm2",)))
  out = g.group_norm(g.conv(out, p + ("conv3",), out_planes, 1, 1, 0), p + ("norm3",))
  if residual and stride == 1:
    if x[1] != out_planes:  # plain conv + BatchNorm shortcut (reference quirk).
      x = g.batch_norm(g.conv(x, p + ("shortcut_conv",), out_planes, 1, 1, 0, ws=False),
                       p + ("shortcut_bn",))
    out = g.add(out, x)
  return out


def _mnv2_stage(g, x, p, expansion, out_planes, num_blocks, stride, residual=True):
  for i in range(num_blocks):
    x = _mnv2_block(g, x, p + (f"block{i}",), expansion, out_planes, stride if i == 0 else 1,
                    residual)
  return x


def _mnv2_final(g, x, p):
  return g.group_norm(g.conv(x, p + ("conv",), mobilenetv2.FEATURE_DIM, 1, 1, 0), p + ("norm",))


def _vgg_conv(g, x, p, features):
  return g.relu(g.group_norm(g.conv(x, p + ("conv",), features, 3, 1, 1, bias=True),
                             p + ("norm",)))


def _vgg_pool(g, x, p):
  return g.max_pool_2x2(x, p)


_EMITTERS = {
    resnet.Stem: _resnet_stem, resnet.BasicBlock: _basic_block,
    resnet.Bottleneck: _bottleneck_block, mobilenetv2.Stem: _mnv2_stem,
    mobilenetv2.Stage: _mnv2_stage, mobilenetv2.FinalConv: _mnv2_final,
    vgg.ConvGNReLU: _vgg_conv, vgg.MaxPool: _vgg_pool,
}


def _layer_factories(cfg: SplitConfig, cut: int):
  """The same factory list that split.ClientNet instantiates (public builders, same arguments)."""
  if cfg.arch in split.RESNETS:
    return resnet.resnet_layers(cfg.arch, cut, width=cfg.width, input_size=cfg.input_size,
                                ws=cfg.ws, c_residual=cfg.c_residual)[0]
  if cfg.arch == "mobilenetv2":
    return mobilenetv2.mobilenetv2_layers(cfg.c_residual)
  return vgg.vgg_layers(cfg.arch)


def _bottleneck_tail(g, x, cfg: SplitConfig):
  spec = bnl.parse_bottleneck(cfg.bottleneck)
  if spec is None:
    return x
  relu = spec.relu or cfg.arch == "mobilenetv2"  # the reference ignores noRELU for MobileNetV2.
  p = ("bottleneck",)
  if spec.stride == 1:
    x = g.conv(x, p + ("conv0",), spec.channels, spec.kernel, 1, spec.kernel // 2, ws=False,
               bias=True)
  else:
    x = g.conv(x, p + ("conv0",), spec.channels, 3, 2, 1, ws=False, bias=True)
    for i in range(int(math.log2(spec.stride // 2))):
      x = g.relu(x) if relu else x
      x = g.conv(x, p + (f"conv{i + 1}",), spec.channels, 3, 2, 1, ws=False, bias=True)
  return g.relu(x) if relu else x


def _floats(values, name: str) -> list[float]:
  out = [float(v) for v in np.asarray(values, np.float64).reshape(-1)]
  if len(out) != 3 or not all(math.isfinite(v) for v in out) or (name == "std" and
                                                                  min(out) <= 0):
    raise ValueError(f"{name}={values!r} must be 3 finite RGB values on the [0, 1] scale"
                     + (" (> 0)" if name == "std" else ""))
  return out


def export_client(cfg: SplitConfig, variables, *, mean, std, layout: str = "NCHW",
                  dynamic_batch: bool = False, batch_size: int = 1,
                  opset: int = DEFAULT_OPSET, source: Mapping[str, Any] | None = None
                  ) -> onnx.ModelProto:
  """Builds the ONNX model of `build(cfg)`'s client slice with `variables` as constants.

  Args:
    cfg: the split configuration (arch, cut, bottleneck, ...).
    variables: client variables {'params', 'batch_stats'} of ONE client (no client axis).
    mean, std: RGB normalisation of the run's dataset; stored in metadata for run_client.py
      (the graph itself takes already-normalised float32 input, exactly like apply_client).
    layout: 'NCHW' (native; input [B,3,H,W], output [B,c,h,w]) or 'NHWC' (input [B,H,W,3],
      output [B,h,w,c] as the JAX server expects; one Transpose at each end).
    dynamic_batch: symbolic batch dimension 'batch' instead of the fixed `batch_size`.
    opset: ONNX opset, 18..max (default 18); >= 21 emits native GroupNormalization.
    source: extra metadata (checkpoint step, copy, client, dataset, ...), stringified.

  Returns:
    A checked onnx.ModelProto. Raises ValueError for bad options or an incompatible tree.
  """
  validate_options(layout, opset, batch_size)
  mean, std = _floats(mean, "mean"), _floats(std, "std")
  net = _build(cfg)
  g = _Graph(opset, variables)
  batch = "batch" if dynamic_batch else batch_size
  s = cfg.input_size
  x = (INPUT_NAME, 3, s, s)
  if layout == "NHWC":
    x = (g.op("Transpose", [INPUT_NAME], "to_nchw", perm=[0, 3, 1, 2]), 3, s, s)
  for i, factory in enumerate(_layer_factories(cfg, net.cut)[:net.cut]):
    cls = getattr(factory, "func", factory)
    if cls not in _EMITTERS:
      raise ValueError(f"no ONNX emitter for layer{i} ({cls.__module__}.{cls.__name__}); "
                       f"supported: {sorted(c.__name__ for c in _EMITTERS)}")
    x = _EMITTERS[cls](g, x, (f"layer{i}",), **getattr(factory, "keywords", {}))
  x = _bottleneck_tail(g, x, cfg)
  unused = g.vars.unused()
  if unused:
    raise ValueError(f"client variables hold {len(unused)} entries the model config does not use "
                     f"(incompatible parameter tree), e.g. {unused[:5]}")
  h, w, c = net.smashed_shape
  if tuple(x[1:]) != (c, h, w):
    raise AssertionError(f"exporter shape {x[1:]} != model smashed shape {(c, h, w)}")
  if layout == "NHWC":
    g.nodes.append(helper.make_node("Transpose", [x[0]], [OUTPUT_NAME], name="to_nhwc",
                                    perm=[0, 2, 3, 1]))
    in_shape, out_shape = [batch, s, s, 3], [batch, h, w, c]
  else:
    g.nodes.append(helper.make_node("Identity", [x[0]], [OUTPUT_NAME], name="output"))
    in_shape, out_shape = [batch, 3, s, s], [batch, c, h, w]
  graph = helper.make_graph(
      g.nodes, f"mocosfl_client_{cfg.arch}_cut{net.cut}",
      [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, in_shape)],
      [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, out_shape)], g.inits)
  opsets = [helper.make_opsetid("", opset)]
  model = helper.make_model(graph, opset_imports=opsets, producer_name="mocosfl_jax.export",
                            producer_version=FORMAT_VERSION,
                            ir_version=helper.find_min_ir_version_for(opsets))
  model.doc_string = (f"MocoSFL client slice {cfg.arch} cut {net.cut} bottleneck "
                      f"{cfg.bottleneck}: normalised float32 {layout} images -> smashed "
                      "activations. Normalise uint8 RGB with metadata mean/std: (x/255-mean)/std.")
  props = {
      "format_version": FORMAT_VERSION, "arch": cfg.arch, "cut": net.cut,
      "bottleneck": cfg.bottleneck, "input_size": s, "width": cfg.width, "ws": cfg.ws,
      "c_residual": cfg.c_residual, "split_config": cfg.to_dict(), "mean": mean, "std": std,
      "layout": layout, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
      "input_shape": in_shape[1:], "smashed_shape": out_shape[1:],
      "smashed_shape_nhwc": [h, w, c], "dynamic_batch": dynamic_batch, "opset": opset,
      **dict(source or {}),
  }
  helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v)
                                 for k, v in props.items()})
  onnx.checker.check_model(model, full_check=True)
  return model


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
  """metadata_props back as Python values (JSON-decoded where possible)."""
  out = {}
  for prop in model.metadata_props:
    try:
      out[prop.key] = json.loads(prop.value)
    except ValueError:
      out[prop.key] = prop.value
  return out
