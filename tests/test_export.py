"""ONNX export of the client slice: JAX parity for every backbone/cut/bottleneck, both layouts,
dynamic and fixed batch, a block type the exporter has never seen, checkpoint round trip through
the CLI, clear errors, run_client.py without JAX, and int8 quantisation.

Parity params are random (shape from `jax.eval_shape(net.init_client)`, values from numpy: no init
compile, non-trivial GroupNorm/BatchNorm statistics); the reference is
`net.apply_client(vars, x)[0]`
run eagerly, so cuts of one backbone share XLA's per-op compile cache.
"""
import functools
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import core_testlib
from mocosfl_jax.deploy import client_checkpoint, onnx_export, quantize, run_client, to_onnx
from mocosfl_jax.run import checkpoints
from mocosfl_jax.models import SplitConfig, build
from mocosfl_jax.models import layers as L
from mocosfl_jax.algorithm.plan import StepConfig
from mocosfl_jax.algorithm.state import abstract_train_state

TOL = 1e-4
# The eager JAX references run one XLA op per jnp call; XLA's own conv is one op, the CPU default
# ('auto': Winograd and shifted-view matmul convs) is many. The conv implementation changes speed
# and float rounding only, so the matrix uses 'lax' and a few cases check the default.
FAST = {"conv_impl": "lax"}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CPU = ["CPUExecutionProvider"]


@functools.lru_cache(maxsize=None)
def _client_shapes(net):
  return jax.eval_shape(net.init_client, jax.random.key(0))


def _random_vars(net, seed=0):
  """Client variables with the model's exact tree, filled with well-scaled random numbers."""
  return _random_like(_client_shapes(net), seed)


def _random_like(shapes, seed=0):
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    if name == "scale":
      return (1 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _digits_uint8(size, n=3):
  """Real images: sklearn digits (8x8, 0..16) upsampled bilinearly to size x size RGB uint8."""
  from PIL import Image
  from sklearn.datasets import load_digits
  out = []
  for img in load_digits().images[:n]:
    im = Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    out.append(np.repeat(np.asarray(im)[..., None], 3, axis=-1))
  return np.stack(out)


def _normalise(u8, mean=MEAN, std=STD):
  return ((u8.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)).astype(np.float32)


def _inputs(size):
  """Batch of 3: one real (digit) image first, then two random normal images."""
  rand = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
  return np.concatenate([_normalise(_digits_uint8(size)[:1]), rand])


def _run(sess, x_nhwc, layout):
  """Runs an exported model on NHWC input; returns NHWC output whatever the layout."""
  feed = x_nhwc if layout == "NHWC" else x_nhwc.transpose(0, 3, 1, 2)
  out = sess.run(None, {onnx_export.INPUT_NAME: np.ascontiguousarray(feed)})[0]
  return out if layout == "NHWC" else out.transpose(0, 2, 3, 1)


def _reference(net, variables, x):
  return np.asarray(net.apply_client(variables, jnp.asarray(x))[0])


def _session(model):
  return ort.InferenceSession(model.SerializeToString(), providers=CPU)


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  """XLA with most optimisations off: the eager per-op compiles of the references get cheaper."""
  with core_testlib.optimisations_off():
    yield


# ---------------------------------------------------------------------------------------------
# Parity matrix: every requested backbone and cut, with and without C4S2, + other options.

MATRIX = ([("resnet18", c, b, {}) for c in range(1, 10) for b in ("None", "C4S2")]
          + [("resnet50", c, b, {}) for c in range(1, 4) for b in ("None", "C4S2")]
          + [("mobilenetv2", c, b, {}) for c in range(1, 6) for b in ("None", "C4S2")]
          + [("vgg13", c, b, {}) for c in range(1, 4) for b in ("None", "C4S2")])
EXTRA = [
    ("resnet18", 4, "None", dict(ws=False)),              # plain convs incl. projection shortcut
    ("resnet18", 3, "None", dict(c_residual=False)),      # client blocks without skips
    ("resnet50", 2, "None", dict(ws=False)),              # Bottleneck shortcut stays WS (quirk)
    ("mobilenetv2", 4, "None", dict(ws=False)),           # plain convs, stem included
    ("vgg13", 3, "None", dict(ws=False)),                 # plain convs with bias
    ("mobilenetv2", 4, "None", dict(c_residual=False)),   # MobileNetV2 drops every skip + BN
    ("mobilenetv2", 3, "C4S4noRELU", {}),                 # noRELU ignored for MobileNetV2
    ("resnet18", 2, "C4S8noRELU", {}),                    # two extra stride-2 convs, no ReLU
    ("resnet18", 3, "C8S1", {}),
    ("vgg13", 3, "K5C16S1", {}),
    ("resnet_tiny", 1, "C4S2", dict(width=4, input_size=64)),   # stride-2 stem
    ("resnet_tiny", 1, "None", dict(width=4, input_size=224)),  # 7x7 stride-2 stem
    ("resnet_tiny", 9, "None", dict(width=8, input_size=16)),   # cut past the end: whole backbone
    ("resnet18", 2, "C4S2", dict(conv_impl="auto")),
    ("mobilenetv2", 4, "None", dict(conv_impl="auto")),
]


def _case_id(case):
  arch, cut, bn, extra = case
  return "-".join([arch, f"cut{cut}", bn] + [f"{k}={v}" for k, v in extra.items()])


@pytest.mark.parametrize("case", MATRIX + EXTRA, ids=_case_id)
def test_parity_both_layouts_dynamic_batch(case):
  arch, cut, bn, extra = case
  cfg = SplitConfig(arch=arch, cut=cut, bottleneck=bn, **{**FAST, **extra})
  net = onnx_export._build(cfg)  # pylint: disable=protected-access  (shared with the exporter)
  variables = _random_vars(net)
  x = _inputs(cfg.input_size)
  ref = _reference(net, variables, x)
  chex.assert_shape(ref, (3, *net.smashed_shape))
  for layout in onnx_export.LAYOUTS:
    sess = _session(onnx_export.export_client(cfg, variables, mean=MEAN, std=STD, layout=layout,
                                              dynamic_batch=True))
    for batch in (1, 3):
      out = _run(sess, x[:batch], layout)
      chex.assert_shape(out, (batch, *net.smashed_shape))
      np.testing.assert_allclose(out, ref[:batch], rtol=0, atol=TOL,
                                 err_msg=f"{layout} batch {batch}")


@pytest.mark.parametrize("arch,cut,opset", [("resnet18", 3, 21), ("mobilenetv2", 4, 21),
                                            ("vgg13", 3, 20), ("resnet18", 2, 23)])
def test_parity_other_opsets(arch, cut, opset):
  cfg = SplitConfig(arch=arch, cut=cut, bottleneck="C4S2", **FAST)
  net = onnx_export._build(cfg)  # pylint: disable=protected-access
  variables = _random_vars(net, seed=3)
  x = _inputs(32)
  model = onnx_export.export_client(cfg, variables, mean=MEAN, std=STD, opset=opset,
                                    dynamic_batch=True)
  ops = {n.op_type for n in model.graph.node}
  assert ("GroupNormalization" in ops) == (opset >= onnx_export.NATIVE_GN_OPSET)
  assert model.opset_import[0].version == opset
  np.testing.assert_allclose(_run(_session(model), x, "NCHW"), _reference(net, variables, x),
                             rtol=0, atol=TOL)


def test_fixed_batch_metadata_and_graph():
  cfg = SplitConfig(arch="resnet18", cut=2, bottleneck="C4S2", **FAST)
  net = onnx_export._build(cfg)  # pylint: disable=protected-access
  variables = _random_vars(net)
  model = onnx_export.export_client(cfg, variables, mean=MEAN, std=STD, layout="NHWC",
                                    batch_size=2, source={"checkpoint_step": 7, "copy": "online",
                                                          "client": "average"})
  onnx.checker.check_model(model, full_check=True)
  meta = onnx_export.read_metadata(model)
  assert meta["arch"] == "resnet18" and meta["cut"] == 2 and meta["bottleneck"] == "C4S2"
  assert meta["input_size"] == 32 and meta["layout"] == "NHWC"
  assert meta["mean"] == list(MEAN) and meta["std"] == list(STD)
  assert meta["smashed_shape"] == [16, 16, 4] == list(net.smashed_shape)
  assert (meta["checkpoint_step"], meta["copy"], meta["client"]) == (7, "online", "average")
  assert SplitConfig.from_dict(meta["split_config"]) == cfg
  ops = [n.op_type for n in model.graph.node]
  assert ops.count("Transpose") == 2  # one at each end, none around the convs
  assert set(ops) == {"Transpose", "Conv", "Reshape", "InstanceNormalization", "Mul", "Add",
                      "Relu"}  # default opset 18: GroupNorm decomposed
  dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
  assert dims == [2, 32, 32, 3]
  sess = _session(model)
  x = _inputs(32)[:2]
  np.testing.assert_allclose(_run(sess, x, "NHWC"), _reference(net, variables, x), atol=TOL,
                             rtol=0)
  with pytest.raises(Exception, match="Got invalid dimensions"):
    _run(sess, _inputs(32), "NHWC")  # batch 3 into a fixed batch of 2


def test_export_rejects_bad_options_and_trees():
  cfg = SplitConfig(arch="resnet_tiny", cut=2, width=4, input_size=8)
  variables = _random_vars(build(cfg))
  kw = dict(mean=MEAN, std=STD)
  with pytest.raises(ValueError, match=r"layout='NWHC' is invalid; valid: \['NCHW', 'NHWC'\]"):
    onnx_export.export_client(cfg, variables, layout="NWHC", **kw)
  with pytest.raises(ValueError, match="opset=17 is invalid; valid: 18.."):
    onnx_export.export_client(cfg, variables, opset=17, **kw)
  with pytest.raises(ValueError, match="std="):
    onnx_export.export_client(cfg, variables, mean=MEAN, std=(0.2, 0.0, 0.2))
  extra = jax.tree.map(lambda a: a, variables)
  extra["params"]["layer1"]["surprise"] = {"kernel": np.zeros((1, 1, 4, 4), np.float32)}
  with pytest.raises(ValueError, match="does not use.*layer1/surprise/kernel"):
    onnx_export.export_client(cfg, extra, **kw)
  missing = jax.tree.map(lambda a: a, variables)
  del missing["params"]["layer1"]["conv2"]
  with pytest.raises(ValueError, match="no 'params/layer1/conv2/kernel'"):
    onnx_export.export_client(cfg, missing, **kw)
  wider = _random_vars(build(SplitConfig(arch="resnet_tiny", cut=2, width=8, input_size=8)))
  with pytest.raises(ValueError, match=r"layer0/conv/kernel' has shape \(3, 3, 3, 8\)"):
    onnx_export.export_client(cfg, wider, **kw)


class _UnseenBlock(nn.Module):
  """A block type no exporter code knows: WS conv, GN, ReLU, a plain strided 1x1 skip with bias,
  residual add, ReLU, 2x2 max-pool."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(L.group_norm("norm")(L.Conv(8, 3, 2, 1, ws=True, name="conv")(x)))
    skip = L.Conv(8, 1, 2, 0, use_bias=True, ws=False, name="skip")(x)
    return L.max_pool_2x2(nn.relu(y + skip))


def _export_module(monkeypatch, module, input_size, smashed_shape):
  """Exports `module` as if it were a config's client slice (the exporter reads only these)."""
  cfg = SplitConfig(arch="resnet_tiny", cut=1, width=3, input_size=input_size)
  fake = types.SimpleNamespace(client_module=module, cut=1, smashed_shape=smashed_shape,
                               input_shape=(input_size, input_size, 3))
  monkeypatch.setattr(onnx_export, "_build", lambda c: fake)
  onnx_export._trace.cache_clear()  # pylint: disable=protected-access
  try:
    x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
    variables = _random_like(jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x))
    return variables, onnx_export.export_client(cfg, variables, mean=MEAN, std=STD,
                                                dynamic_batch=True)
  finally:
    onnx_export._trace.cache_clear()  # pylint: disable=protected-access


def test_a_new_block_exports_without_exporter_changes(monkeypatch):
  """The graph comes from what the model runs: a block written once, in Flax, exports as is."""
  module = _UnseenBlock()
  variables, model = _export_module(monkeypatch, module, 8, (2, 2, 8))
  assert [n.op_type for n in model.graph.node if n.op_type in ("Conv", "MaxPool", "Add")] == [
      "Conv", "Add", "Conv", "Add", "MaxPool"]  # GN's Add, the residual Add
  x = _inputs(8)
  want = np.asarray(module.apply(variables, jnp.asarray(x), train=False))
  np.testing.assert_allclose(_run(_session(model), x, "NCHW"), want, rtol=0, atol=TOL)


class _SigmoidBlock(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.sigmoid(L.Conv(4, 3, 1, 1, name="conv")(x))


class _SigmoidClient(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    return _SigmoidBlock(name="layer0")(x, train)


def test_an_op_without_translation_names_the_primitive_and_the_layer(monkeypatch):
  with pytest.raises(ValueError, match="jax primitive 'logistic' in layer 'layer0' of the client"):
    _export_module(monkeypatch, _SigmoidClient(), 8, (8, 8, 4))


# ---------------------------------------------------------------------------------------------
# Checkpoint round trip through to_onnx.py (resnet_tiny, written by mocosfl_jax.run.checkpoints).

CK_CFG = SplitConfig(arch="resnet_tiny", cut=2, width=8, input_size=16, bottleneck="C4S2",
                     head="V1")
DATASET = {"name": "cifar10", "mean": list(MEAN), "std": list(STD), "input_size": 16}


def _training_state(net, seed):
  """A checkpoint's exact pytree ({'clients', 'server'}), every client and leaf different."""
  st = abstract_train_state(net, StepConfig(num_clients=3, batch_size=2, queue_size=16))
  abstract = (st.clients, st.server)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype)
                      if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype),
                      abstract)


def _save(workdir, step, state, meta, knn):
  with checkpoints.Checkpointer(Path(workdir) / "checkpoints") as ckpt:
    ckpt.save(step, {"clients": state[0], "server": state[1], "rng": jax.random.key(step)},
              meta=meta, metrics={"knn_accuracy": knn})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run with step 5 (best kNN) and step 9 (latest), plus two broken runs."""
  root = tmp_path_factory.mktemp("runs")
  net = build(CK_CFG)
  states = {5: _training_state(net, 5), 9: _training_state(net, 9)}
  meta = {"model": CK_CFG.to_dict(), "dataset": DATASET}
  _save(root / "good", 5, states[5], meta, 50.0)
  _save(root / "good", 9, states[9], meta, 40.0)
  wrong_model = {"model": {**CK_CFG.to_dict(), "width": 4}, "dataset": DATASET}
  _save(root / "incompatible", 1, states[5], wrong_model, 1.0)
  _save(root / "nomean", 1, states[5], {"model": CK_CFG.to_dict()}, 1.0)
  return root, states


def _cli(argv, capsys):
  rc = to_onnx.main([str(a) for a in argv])
  out = capsys.readouterr()
  return rc, out.out, out.err


def _client_vars(state, copy, client):
  stacked = getattr(state[0], copy)
  if client == "average":
    return jax.tree.map(lambda a: np.mean(a.astype(np.float64), 0).astype(np.float32), stacked)
  return jax.tree.map(lambda a: a[client], stacked)


@pytest.mark.parametrize("argv,step,copy,client,layout", [
    ([], 9, "online", "average", "NCHW"),
    (["--checkpoint", "best", "--copy", "momentum", "--client", "1", "--layout", "NHWC"],
     5, "momentum", 1, "NHWC"),
    (["--checkpoint", "5", "--client", "2", "--cut", "2", "--opset", "21"], 5, "online", 2,
     "NCHW"),
])
def test_checkpoint_round_trip(run_dir, tmp_path, capsys, argv, step, copy, client, layout):
  root, states = run_dir
  out = tmp_path / "client.onnx"
  rc, stdout, stderr = _cli(["--workdir", root / "good", "--out", out, "--dynamic-batch", *argv],
                            capsys)
  assert rc == 0, stderr
  assert "verify_max_abs_diff" in stdout
  model = onnx.load(out)
  onnx.checker.check_model(model, full_check=True)
  meta = onnx_export.read_metadata(model)
  assert (meta["checkpoint_step"], meta["copy"], meta["client"]) == (step, copy, client)
  assert meta["mean"] == list(MEAN) and meta["std"] == list(STD) and meta["dataset"] == "cifar10"
  assert meta["num_clients"] == 3 and meta["layout"] == layout
  net = build(CK_CFG)
  variables = _client_vars(states[step], copy, client)
  x = _inputs(16)
  np.testing.assert_allclose(_run(_session(model), x, layout), _reference(net, variables, x),
                             rtol=0, atol=TOL)


def test_load_client_matches_saved_arrays(run_dir):
  root, states = run_dir
  ck = client_checkpoint.load_client(root / "good", "latest", "momentum", 0)
  assert (ck.step, ck.num_clients, ck.cfg) == (9, 3, CK_CFG)
  chex.assert_trees_all_equal(ck.variables, _client_vars(states[9], "momentum", 0))


def _garble_arrays(step_dir):
  """Overwrites every data file of the step's arrays with random bytes (orbax spreads the arrays
  over several files under state/**/d/, in no fixed way)."""
  rng = np.random.default_rng(0)
  for f in (step_dir / "state").rglob("d/*"):
    f.write_bytes(rng.integers(0, 256, f.stat().st_size, np.uint8).tobytes())


def test_export_skips_a_damaged_latest_step_and_says_which_it_used(run_dir, tmp_path, capsys,
                                                                   caplog):
  root, states = run_dir
  work = tmp_path / "run"
  shutil.copytree(root / "good", work)
  _garble_arrays(work / "checkpoints" / "9")
  rc, stdout, err = _cli(["--workdir", work, "--out", tmp_path / "c.onnx", "--no-verify"], capsys)
  assert rc == 0, err
  assert "checkpoint_step: 5" in stdout.splitlines()
  assert any("step 9" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
  assert (work / "checkpoints" / "9").is_dir()  # export only reads: nothing moved
  rc, _, err = _cli(["--workdir", work, "--checkpoint", "9", "--out", tmp_path / "d.onnx"],
                    capsys)
  assert rc == 2 and err.startswith("error: checkpoint step 9 in ") and "is damaged" in err
  assert len(err.strip().splitlines()) == 1 and not (tmp_path / "d.onnx").exists()
  proc = subprocess.run([sys.executable, "-m", "mocosfl_jax.deploy.to_onnx", "--workdir",
                         str(work), "--checkpoint", "9", "--out", str(tmp_path / "d.onnx")],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert [l for l in proc.stderr.splitlines() if l.startswith("error: ")] == [err.strip()]


def test_load_client_verifies_the_client_arrays_it_reads(run_dir):
  root, states = run_dir
  stacked = jax.tree.map(np.array, dict(states[9][0].momentum))  # copies: edited below
  with checkpoints.Checkpointer(root / "good" / "checkpoints", read_only=True) as c:
    c.verify(9, stacked, prefix=("clients", "momentum"))  # the names load_client reads match
    kernel = stacked["params"]["layer0"]["conv"]["kernel"]
    kernel.reshape(-1)[0] += 1.0
    with pytest.raises(checkpoints.DamagedCheckpointError,
                       match=r"step 9 .* e.g. \['clients/momentum/params/layer0/conv/kernel'\]"):
      c.verify(9, stacked, prefix=("clients", "momentum"))


@pytest.mark.parametrize("argv,message", [
    (["--workdir", "{root}/absent"], "workdir .*absent does not exist"),
    (["--workdir", "{root}"], "has no checkpoints/ directory"),
    (["--workdir", "{root}/good", "--checkpoint", "7"],
     r"no checkpoint for step 7 .*available steps: \[5, 9\]"),
    (["--workdir", "{root}/good", "--checkpoint", "newest"], "valid: a step number or one of"),
    (["--workdir", "{root}/good", "--cut", "3"], "--cut 3 differs from the checkpoint's cut 2"),
    (["--workdir", "{root}/good", "--client", "3"],
     r"client='3' is invalid; valid: 'average' or 0..2"),
    (["--workdir", "{root}/good", "--copy", "target"], "copy='target' is invalid"),
    (["--workdir", "{root}/good", "--layout", "HWC"], "layout='HWC' is invalid"),
    (["--workdir", "{root}/good", "--opset", "17"], "opset=17 is invalid"),
    (["--workdir", "{root}/incompatible"],
     r"incompatible with the model in its meta.*layer0/conv/kernel'.*\(3, 3, 3, 3, 8\)"),
    (["--workdir", "{root}/nomean"], "no normalisation mean/std .* pass --mean R,G,B"),
])
def test_cli_errors(run_dir, tmp_path, capsys, argv, message):
  root, _ = run_dir
  rc, _, err = _cli([a.format(root=root) for a in argv] + ["--out", tmp_path / "x.onnx"], capsys)
  assert rc == 2
  assert err.startswith("error: ")
  assert any(__import__("re").search(message, line) for line in err.splitlines()), err
  assert not (tmp_path / "x.onnx").exists()


def test_cli_mean_std_flags_and_random_init(run_dir, tmp_path, capsys):
  root, _ = run_dir
  out = tmp_path / "m.onnx"
  rc, _, err = _cli(["--workdir", root / "nomean", "--out", out, "--mean", "0.5,0.5,0.5",
                     "--std", "0.25,0.25,0.25", "--no-verify"], capsys)
  assert rc == 0, err
  assert onnx_export.read_metadata(onnx.load(out))["std"] == [0.25] * 3
  cfg = '{"arch": "resnet_tiny", "cut": 1, "width": 4, "input_size": 8}'
  rc, stdout, err = _cli(["--random-init", cfg, "--out", out, "--mean", "0.5,0.5,0.5",
                          "--std", "0.25,0.25,0.25"], capsys)
  assert rc == 0, err
  assert "verify_max_abs_diff" in stdout
  assert onnx_export.read_metadata(onnx.load(out))["arch"] == "resnet_tiny"


# ---------------------------------------------------------------------------------------------
# run_client.py (numpy + onnxruntime only) and quantisation.


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
  """(dir, model path, fixed-batch-2 model path, reference client vars) from the good run."""
  root, states = run_dir
  d = tmp_path_factory.mktemp("exported")
  assert to_onnx.main(["--workdir", str(root / "good"), "--out", str(d / "c.onnx"),
                       "--dynamic-batch", "--no-verify"]) == 0
  assert to_onnx.main(["--workdir", str(root / "good"), "--out", str(d / "c2.onnx"),
                       "--batch-size", "2", "--layout", "NHWC", "--no-verify"]) == 0
  np.save(d / "u8.npy", _digits_uint8(16, 4))
  return d, _client_vars(states[9], "online", "average")


def test_run_client_without_jax_bench_and_normalisation(exported):
  d, variables = exported
  code = ("import sys, runpy\n"
          "for m in ('jax', 'jaxlib', 'flax', 'mocosfl_jax', 'onnx'): sys.modules[m] = None\n"
          "sys.argv = sys.argv[1:]\n"
          "runpy.run_path(sys.argv[0], run_name='__main__')\n")
  argv = [sys.executable, "-c", code, run_client.__file__, "--model",
          str(d / "c.onnx"), "--npy", str(d / "u8.npy"), "--out", str(d / "s.npy"), "--bench", "5"]
  proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": ""})
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout)
  assert report["bench"]["median_ms_per_image"] > 0 and report["bench"]["peak_rss_mib"] > 10
  assert report["bench"]["model_bytes"] == os.path.getsize(d / "c.onnx")
  smashed = np.load(d / "s.npy")  # NCHW
  ref = _reference(build(CK_CFG), variables, _normalise(_digits_uint8(16, 4)))
  np.testing.assert_allclose(smashed.transpose(0, 2, 3, 1), ref, rtol=0, atol=TOL)


def test_run_client_image_folder_fixed_batch_and_shape_errors(exported, tmp_path, capsys):
  from PIL import Image
  d, variables = exported
  images = tmp_path / "imgs"
  images.mkdir()
  for i, img in enumerate(_digits_uint8(16, 4)):
    Image.fromarray(img).save(images / f"{i}.png")
  assert run_client.main(["--model", str(d / "c2.onnx"), "--images", str(images),
                          "--out", str(tmp_path / "s.npy")]) == 0
  ref = _reference(build(CK_CFG), variables, _normalise(_digits_uint8(16, 4)))
  np.testing.assert_allclose(np.load(tmp_path / "s.npy"), ref, rtol=0, atol=TOL)  # NHWC model
  capsys.readouterr()

  def fails(argv, *needles):
    assert run_client.main(argv) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err

  np.save(tmp_path / "big.npy", np.zeros((2, 32, 32, 3), np.uint8))
  fails(["--model", str(d / "c.onnx"), "--npy", str(tmp_path / "big.npy")],
        "(2, 32, 32, 3)", "expected (N, 16, 16, 3)")
  np.save(tmp_path / "f.npy", np.zeros((2, 16, 16, 3), np.float32))  # NHWC float into NCHW model
  fails(["--model", str(d / "c.onnx"), "--npy", str(tmp_path / "f.npy")],
        "(2, 16, 16, 3)", "expected (N, 3, 16, 16) normalised NCHW")
  np.save(tmp_path / "three.npy", _digits_uint8(16, 3))
  fails(["--model", str(d / "c2.onnx"), "--npy", str(tmp_path / "three.npy")],
        "got 3 images", "fixed batch of 2")
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(images / "z_odd.png")
  fails(["--model", str(d / "c.onnx"), "--images", str(images)], "z_odd.png is 20x20",
        "expected 16x16")
  assert run_client.main(["--model", str(d / "c.onnx"), "--images", str(images), "--resize"]) == 0
  fails(["--model", str(d / "absent.onnx"), "--npy", str(tmp_path / "f.npy")], "does not exist")


@pytest.mark.parametrize("mode", quantize.MODES)
def test_quantize_reports_activation_error(exported, tmp_path, mode):
  d, _ = exported
  out = tmp_path / f"{mode}.onnx"
  report = quantize.quantize(str(d / "c.onnx"), str(out), str(d / "u8.npy"), mode=mode)
  assert 0 < report["relative_rms"] < 0.2 and report["cosine"] > 0.98
  meta = onnx_export.read_metadata(onnx.load(out))
  assert meta["quantization"]["mode"] == mode and meta["mean"] == list(MEAN)
  x = run_client.ClientModel(str(out)).prepare(_digits_uint8(16, 4))
  chex.assert_shape(run_client.ClientModel(str(out)).run(x), (4, 4, 8, 8))


def test_quantize_refuses_to_overwrite_an_input(exported, tmp_path, capsys):
  d, _ = exported
  model = tmp_path / "c.onnx"
  shutil.copy(d / "c.onnx", model)
  before = model.read_bytes()
  os.link(model, tmp_path / "hard.onnx")
  (tmp_path / "sub").mkdir()
  calib = tmp_path / "u8.npy"
  shutil.copy(d / "u8.npy", calib)
  for out, flag in [(model, "model"), (tmp_path / "sub" / ".." / "c.onnx", "model"),
                    (tmp_path / "hard.onnx", "model"), (calib, "calib")]:
    assert quantize.main(["--model", str(model), "--out", str(out), "--calib", str(calib)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} is the same file as --{flag} ") and \
        "choose another --out" in err and len(err.strip().splitlines()) == 1, err
  assert model.read_bytes() == before and calib.read_bytes() == (d / "u8.npy").read_bytes()


def test_run_client_rejects_nan_and_inf_inputs(exported, tmp_path, capsys):
  d, _ = exported
  x = run_client.ClientModel(str(d / "c.onnx")).prepare(_digits_uint8(16, 2))
  for value, index in [(np.nan, (1, 2, 3, 4)), (np.inf, (0, 0, 0, 0)), (-np.inf, (1, 0, 5, 5))]:
    bad = x.copy()
    bad[index] = value
    np.save(tmp_path / "bad.npy", bad)
    assert run_client.main(["--model", str(d / "c.onnx"), "--npy", str(tmp_path / "bad.npy"),
                            "--out", str(tmp_path / "s.npy")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: float32 input holds 1 NaN/Inf values (first at index {index}: "
                   f"{value}); expected finite normalised tensors\n")
  assert not (tmp_path / "s.npy").exists()


def test_deploy_refusals_print_no_traceback(exported, tmp_path):
  d, _ = exported
  bad = run_client.ClientModel(str(d / "c.onnx")).prepare(_digits_uint8(16, 1))
  bad[0, 0, 0, 0] = np.nan
  np.save(tmp_path / "nan.npy", bad)
  shutil.copy(d / "c.onnx", tmp_path / "c.onnx")  # the refusal is the new code's; keep d intact
  root = Path(__file__).resolve().parent.parent
  for argv in ([str(root / "export" / "quantize.py"), "--model", str(tmp_path / "c.onnx"),
                "--out", str(tmp_path / "c.onnx")],
               ["-m", "mocosfl_jax.deploy.run_client", "--model", str(d / "c.onnx"), "--npy",
                str(tmp_path / "nan.npy")]):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error: ")]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr


def test_cli_does_not_write_a_model_onnxruntime_cannot_load(tmp_path, capsys):
  out = tmp_path / "new.onnx"
  rc, _, err = _cli(["--random-init", '{"arch": "resnet_tiny", "cut": 1, "width": 4, '
                     '"input_size": 8}', "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2",
                     "--opset", onnx_export.max_opset(), "--out", out], capsys)
  if rc == 0:  # onnx 1.23 (opset 28, IR 14) is ahead of onnxruntime 1.31 (IR 13); not always.
    pytest.skip(f"this onnxruntime loads opset {onnx_export.max_opset()}")
  assert rc == 2 and "cannot load the exported model" in err and not out.exists()
