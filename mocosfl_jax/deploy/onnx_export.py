"""ONNX export of the client slice, translated from the computation the model itself runs.

    model = export_client(cfg, client_vars, mean=..., std=..., layout="NCHW", dynamic_batch=True)
    onnx.save(model, "client.onnx")          # input 'images' [B,3,H,W] normalised, output 'smashed'

How: the inference-mode client slice, `net.client_module.apply(vars, x, train=False)`, is traced
once per config with `jax.make_jaxpr` while `flax.linen.intercept_methods` replaces every
primitive layer of models/layers.py that has a rule here (`Conv`, `GroupNorm`, `BatchNorm`) by
one opaque `client_layer` op carrying the layer module. Composite blocks (ResNet blocks,
MobileNetV2 stages, VGG layers, the bottleneck tail) run their own code, so the jaxpr is the
network exactly as the model computes it: those layers, ReLU (`max(x, 0)`), residual `add` and
`reduce_window_max`. This module translates that jaxpr op by op, so a new block built from these
needs no change here; any other op raises a ValueError naming the primitive and the layer.
Which variables a layer needs, and their shapes, come from the layer's own `init`: every one must
be in the given tree with that shape, and every leaf of the tree must be used (anything else means
the tree and the config disagree).

Why translate our own jaxpr rather than use jax2onnx:
* Dependency health: jax2onnx pins an older orbax-checkpoint than training and checkpoints.py
  use, and pulls equinox, huggingface-hub, netron, orbax-export and more; this module needs only
  `onnx` and numpy, already dependencies.
* Correctness: jax2onnx exports tuple-padded max-pool silently wrong; here each op has a
  translation written on purpose and checked against JAX in tests/test_export.py.
* Graph size and speed on ARM: a generic converter keeps the graph NHWC with Transposes around
  every Conv, exports whichever convolution implementation (shifted-view matmuls, Winograd) the
  config selected, and traces Weight Standardisation of the constant kernels as graph ops. Here
  each layer becomes its ONNX op directly, the graph is NCHW end to end (onnxruntime's native
  conv layout, the one its aarch64 MLAS kernels take), WS is folded into constant OIHW weights in
  numpy, and an NHWC model adds exactly one Transpose at the input and one at the output. Fewer,
  layout-stable nodes is what matters on a small ARM CPU; bench/results/onnx_client.json has the
  size and latency measured on the development machine.

Ops emitted: Conv (WS folded, bias when the layer has one, group for depthwise), GroupNorm,
BatchNormalization (inference mode, running stats; MobileNetV2's shortcut BN), Relu, Add, MaxPool,
Transpose (NHWC only). GroupNorm is the native GroupNormalization at opset >= 21 (per-channel
scale/bias) and at opset 18-20 the decomposition Reshape [N,G,-1] -> InstanceNormalization ->
Reshape -> Mul -> Add (the same biased-variance maths). The default is opset 18 on purpose:
onnxruntime's CPU provider has no GroupNormalization kernel and inlines its function body into
many more nodes than the decomposition, which also ran faster per image, and it loads in older
onnxruntime builds (device wheels lag). The client slice never contains a transposed conv (only
the server's bottleneck head does), so there is no ConvTranspose rule. The model itself stays
NHWC/HWIO.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax.extend import core as jex_core
from onnx import TensorProto, helper, numpy_helper

from mocosfl_jax.models import SplitConfig, build
from mocosfl_jax.models import layers as L

LAYOUTS = ("NCHW", "NHWC")
MIN_OPSET = 18          # ReduceMean/axes-as-input era; below it the decomposition is invalid.
NATIVE_GN_OPSET = 21    # GroupNormalization-21 has per-channel scale/bias (18's is per group).
DEFAULT_OPSET = 18   # see the module docstring: faster on onnxruntime CPU, wider support.
INPUT_NAME = "images"
OUTPUT_NAME = "smashed"
FORMAT_VERSION = "1"
TRACE_BATCH = 2      # any batch works; not 1, so that no batch axis can pass for a broadcast one.


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

  def unused(self) -> list[str]:
    return sorted("/".join(p) for p in self.leaves if p not in self.used)


# -- tracing the client slice -------------------------------------------------------------------

_client_layer_p = jex_core.Primitive("client_layer")
_client_layer_p.def_abstract_eval(
    lambda x, *, index, out_shape: jax.core.ShapedArray(out_shape, x.dtype))


@dataclasses.dataclass(frozen=True)
class _Layer:
  """One primitive layer of the trace.

  Attributes:
    path: the layer's module path in the client slice, e.g. ('layer1', 'conv2').
    module: an unbound copy of the layer (its fields: kernel size, stride, ws, ...).
    needs: ((collection, *leaf path under `path`), shape) of every variable it reads.
  """
  path: tuple[str, ...]
  module: nn.Module
  needs: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]


@dataclasses.dataclass(frozen=True)
class _Trace:
  jaxpr: jex_core.ClosedJaxpr
  layers: tuple[_Layer, ...]


class _Interceptor:
  """Replaces the primitive layers that have a rule by `client_layer` ops while the slice traces.

  A layer's output shape and variables come from tracing its own `init` abstractly; nested
  module calls during that (and inside composite blocks' own code) are left alone.
  """

  def __init__(self):
    self.layers: list[_Layer] = []
    self._busy = False

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if self._busy or context.method_name != "__call__" or type(module) not in _RULES:
      return next_fun(*args, **kwargs)
    x, rest = args[0], args[1:]
    unbound = module.clone(parent=None)
    self._busy = True
    try:
      out, shapes = jax.eval_shape(
          lambda x: unbound.init_with_output(jax.random.key(0), x, *rest, **kwargs),
          jax.ShapeDtypeStruct(x.shape, x.dtype))
    finally:
      self._busy = False
    needs = tuple((tuple(str(k.key) for k in path), tuple(leaf.shape))
                  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0])
    self.layers.append(_Layer(tuple(module.path), unbound, needs))
    return _client_layer_p.bind(x, index=len(self.layers) - 1, out_shape=tuple(out.shape))


@functools.lru_cache(maxsize=16)
def _trace(cfg: SplitConfig) -> _Trace:
  """The inference-mode client slice of `cfg` as a jaxpr of `client_layer` ops and glue ops."""
  net = _build(cfg)
  interceptor = _Interceptor()

  def client(x):
    with nn.intercept_methods(interceptor):
      return net.client_module.apply({"params": {}, "batch_stats": {}}, x, train=False)

  x = jax.ShapeDtypeStruct((TRACE_BATCH, *net.input_shape), jnp.float32)
  return _Trace(jax.make_jaxpr(client)(x), tuple(interceptor.layers))


# -- ONNX graph -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Const:
  """A constant operand of a jaxpr op (a literal such as ReLU's 0)."""
  value: np.ndarray


class _Graph:
  """Node/initializer accumulator. Tensors are ONNX names, laid out NCHW."""

  def __init__(self, opset: int):
    self.opset = opset
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


# -- rules for the primitive layers: (graph, input, layer, its variables, NHWC input shape) -------


def _conv(g: _Graph, x: str, layer: _Layer, arrays, shape) -> str:
  m, hint = layer.module, "/".join(layer.path)
  kernel = arrays["params", "kernel"]
  if m.ws:
    kernel = standardize_kernel_np(kernel)
  inputs = [x, g.const(hint + "/W", kernel.transpose(3, 2, 0, 1))]
  if m.use_bias:
    inputs.append(g.const(hint + "/B", arrays["params", "bias"]))
  k, s, p = m.kernel_size, m.stride, m.padding
  return g.op("Conv", inputs, hint, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4,
              group=m.groups)


def _group_norm(g: _Graph, x: str, layer: _Layer, arrays, shape) -> str:
  _, h, w, c = shape
  groups = L.gn_groups(c)
  scale, bias = arrays["params", "gn", "scale"], arrays["params", "gn", "bias"]
  hint = "/".join(layer.path)
  if g.opset >= NATIVE_GN_OPSET:
    return g.op("GroupNormalization", [x, g.const(hint + "/scale", scale),
                                       g.const(hint + "/bias", bias)], hint,
                epsilon=L.GN_EPS, num_groups=groups)
  grouped = g.op("Reshape", [x, g.const(hint + "/gshape", np.array([0, groups, -1], np.int64))],
                 hint + "/grouped")
  normed = g.op("InstanceNormalization",
                [grouped, g.const(hint + "/ones", np.ones(groups, np.float32)),
                 g.const(hint + "/zeros", np.zeros(groups, np.float32))],
                hint + "/normed", epsilon=L.GN_EPS)
  back = g.op("Reshape", [normed, g.const(hint + "/shape", np.array([0, c, h, w], np.int64))],
              hint + "/ungrouped")
  scaled = g.op("Mul", [back, g.const(hint + "/scale", scale.reshape(c, 1, 1))], hint + "/scaled")
  return g.op("Add", [scaled, g.const(hint + "/bias", bias.reshape(c, 1, 1))], hint)


def _batch_norm(g: _Graph, x: str, layer: _Layer, arrays, shape) -> str:
  hint = "/".join(layer.path)
  inputs = [x] + [g.const(f"{hint}/{n}", arrays[col, "bn", n])
                  for col, n in (("params", "scale"), ("params", "bias"),
                                 ("batch_stats", "mean"), ("batch_stats", "var"))]
  return g.op("BatchNormalization", inputs, hint, epsilon=L.BN_EPS)


_RULES: dict[type, Callable[..., str]] = {
    L.Conv: _conv, L.GroupNorm: _group_norm, L.BatchNorm: _batch_norm,
}

# Primitives that only wrap a sub-jaxpr (jnp/nn helpers under jit, custom derivatives,
# rematerialisation): their sub-jaxpr is translated in place.
_CALL_PARAMS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
                "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
                "checkpoint": "jaxpr"}


def _layer_name(name_stack: str) -> str:
  """'ClientNet/layer1/conv1' (flax's name stack of an op) -> 'layer1/conv1'."""
  return name_stack.split("/", 1)[1] if "/" in name_stack else name_stack


class _Translator:
  """Walks the traced jaxpr and emits one ONNX op per layer and glue op."""

  def __init__(self, g: _Graph, trace: _Trace, arrays: list[dict]):
    self.g, self.trace, self.arrays = g, trace, arrays

  def run(self, jaxpr, inputs, where: str = ""):
    """Translates `jaxpr` (closed or open) applied to `inputs`; returns its outputs."""
    consts = getattr(jaxpr, "consts", ())
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    env = {v: _Const(np.asarray(c)) for v, c in zip(jaxpr.constvars, consts)}
    env.update(zip(jaxpr.invars, inputs))
    read = lambda v: _Const(np.asarray(v.val)) if isinstance(v, jex_core.Literal) else env[v]
    for eqn in jaxpr.eqns:
      here = where or str(eqn.source_info.name_stack)
      outs = self.eqn(eqn, [read(v) for v in eqn.invars], here)
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, args, where: str) -> list:
    """The ONNX tensors of one jaxpr op's outputs; ValueError for an op with no translation."""
    name, params = eqn.primitive.name, eqn.params
    tensors = [a for a in args if not isinstance(a, _Const)]
    consts = [a for a in args if isinstance(a, _Const)]
    if name == _client_layer_p.name:
      index = params["index"]
      layer = self.trace.layers[index]
      return [_RULES[type(layer.module)](self.g, args[0], layer, self.arrays[index],
                                         eqn.invars[0].aval.shape)]
    if name in _CALL_PARAMS:
      return self.run(params[_CALL_PARAMS[name]], args, where)
    if (name == "max" and len(tensors) == 1 and len(consts) == 1
        and consts[0].value.size == 1 and float(consts[0].value) == 0.0):
      return [self.g.op("Relu", tensors, "relu")]
    if (name == "add" and len(tensors) == 2
        and eqn.invars[0].aval.shape == eqn.invars[1].aval.shape):
      return [self.g.op("Add", tensors, "add")]
    if name == "reduce_window_max" and len(tensors) == 1 and _is_2d_pool(params):
      (top, bottom), (left, right) = params["padding"][1:3]
      pads = {"pads": [top, left, bottom, right]} if any((top, left, bottom, right)) else {}
      return [self.g.op("MaxPool", tensors, _layer_name(where),
                        kernel_shape=list(params["window_dimensions"][1:3]),
                        strides=list(params["window_strides"][1:3]), **pads)]
    raise ValueError(f"no ONNX translation for the jax primitive '{name}' in layer "
                     f"'{_layer_name(where)}' of the client slice; translated are the layers "
                     f"{sorted(c.__name__ for c in _RULES)}, ReLU (max with 0), add of equal "
                     "shapes and 2-D max-pooling")


def _is_2d_pool(params) -> bool:
  """A reduce_window over H and W of an NHWC tensor only, without dilations."""
  window, strides, padding = (params["window_dimensions"], params["window_strides"],
                              params["padding"])
  return (len(window) == 4 and window[0] == window[3] == strides[0] == strides[3] == 1
          and tuple(padding[0]) == tuple(padding[3]) == (0, 0)
          and all(d == 1 for d in (*params["base_dilation"], *params["window_dilation"])))


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
  trace = _trace(cfg)
  tree = _Vars(variables)
  arrays = [{need: tree.get(need[0], *layer.path, *need[1:], shape=shape)
             for need, shape in layer.needs} for layer in trace.layers]
  unused = tree.unused()
  if unused:
    raise ValueError(f"client variables hold {len(unused)} entries the model config does not use "
                     f"(incompatible parameter tree), e.g. {unused[:5]}")
  g = _Graph(opset)
  batch = "batch" if dynamic_batch else batch_size
  s = cfg.input_size
  x = INPUT_NAME
  if layout == "NHWC":
    x = g.op("Transpose", [INPUT_NAME], "to_nchw", perm=[0, 3, 1, 2])
  (y,) = _Translator(g, trace, arrays).run(trace.jaxpr, [x])
  if not isinstance(y, str) or y == INPUT_NAME:
    raise ValueError(f"the client slice of {cfg.arch} cut {net.cut} does not compute on its input")
  h, w, c = net.smashed_shape
  if layout == "NHWC":
    g.nodes.append(helper.make_node("Transpose", [y], [OUTPUT_NAME], name="to_nhwc",
                                    perm=[0, 2, 3, 1]))
    in_shape, out_shape = [batch, s, s, 3], [batch, h, w, c]
  else:
    g.nodes.append(helper.make_node("Identity", [y], [OUTPUT_NAME], name="output"))
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
