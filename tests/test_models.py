"""Split networks: reference parameter counts, cut semantics, composition, vmap, errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.models import (ARCHS, SplitConfig, build, full_network, num_layers,
                                split_variables)
from mocosfl_jax.models import layers as L
from mocosfl_jax.models.bottleneck import parse_bottleneck

import core_testlib

# Every test here compares two computations compiled in this module (or a loop of its own):
# XLA's optimisations only cost compile time, on some of the largest networks of the suite.
fast_compile = core_testlib.fast_compile
pytestmark = pytest.mark.usefixtures("fast_compile")

RESNET18_CLIENT_PARAMS = [1856, 75840, 149824, 379968, 675392, 1594432, 2775104, 6448192,
                          11168832]
RESNET18_SMASHED = [(32, 32, 64)] * 3 + [(16, 16, 128)] * 2 + [(8, 8, 256)] * 2 + [(4, 4, 512)] * 2


def _param_count(init_fn):
  return L.count_params(jax.eval_shape(init_fn, jax.random.key(0))["params"])


@pytest.mark.parametrize("cut", range(1, 10))
def test_resnet18_client_params_and_smashed_shape(cut):
  net = build(SplitConfig(arch="resnet18", cut=cut))
  assert _param_count(net.init_client) == RESNET18_CLIENT_PARAMS[cut - 1]
  assert net.smashed_shape == RESNET18_SMASHED[cut - 1]


def test_resnet18_server_with_v2_head_at_cut1():
  net = build(SplitConfig(arch="resnet18", cut=1, head="V2"))
  assert _param_count(net.init_server) == 12741888
  assert net.key_dim == 1024 and net.feature_dim == 512


@pytest.mark.parametrize("cut", [1, 2])
def test_c4s2_bottleneck_adds_reference_params(cut):
  plain = build(SplitConfig(arch="resnet18", cut=cut))
  net = build(SplitConfig(arch="resnet18", cut=cut, bottleneck="C4S2"))
  assert _param_count(net.init_client) - _param_count(plain.init_client) == 2308
  assert _param_count(net.init_server) - _param_count(plain.init_server) == 2368
  assert net.smashed_shape == (16, 16, 4)


@pytest.mark.parametrize("head,key_dim", [("V1", 128), ("smallV2", 512), ("V2", 1024),
                                          ("largeV2", 2048)])
def test_heads_key_dims(head, key_dim):
  net = build(SplitConfig(arch="resnet_tiny", cut=1, width=4, input_size=8, head=head))
  server = net.init_server(jax.random.key(0))
  proj, new = net.apply_server(server, jnp.ones((3, *net.smashed_shape)), train=True)
  assert proj.shape == (3, key_dim)
  assert bool(new["batch_stats"]) == (head == "largeV2")


# Numerics on every cut of these; first, middle, last and past-the-end cuts of the others (the
# same code path; each cut costs an eager forward on the 2-core CI machine). Every cut of every
# arch is still checked structurally in test_every_cut_splits_the_parameters_of_one_network.
EVERY_CUT = ("resnet_tiny", "resnet18", "vgg13")


def _cuts(arch):
  n = num_layers(arch)
  if arch in EVERY_CUT:
    return range(1, n + 2)  # one past the end too
  return sorted({1, n // 2, n, n + 1})


@pytest.mark.parametrize("arch", ARCHS)
def test_every_cut_splits_the_parameters_of_one_network(arch):
  """For every cut, client and server trees are exactly layer0..cut-1 and the rest + head."""
  input_size = 8 if arch == "resnet_tiny" else 32
  base = SplitConfig(arch=arch, cut=1, input_size=input_size, head="V1")
  x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
  full = jax.eval_shape(lambda x: full_network(base).init(jax.random.key(0), x), x)
  n = num_layers(arch)
  for cut in range(1, n + 2):
    net = build(SplitConfig(arch=arch, cut=cut, input_size=input_size, head="V1"))
    want_client, want_server = split_variables(net.config, full)
    got_client = jax.eval_shape(net.init_client, jax.random.key(0))
    got_server = jax.eval_shape(net.init_server, jax.random.key(0))
    assert all(int(k[5:]) < cut for k in got_client["params"])
    assert all(k == "head" or int(k[5:]) >= cut for k in got_server["params"])
    chex.assert_trees_all_equal_shapes(got_client, want_client)
    chex.assert_trees_all_equal_shapes(got_server, want_server)


@pytest.mark.parametrize("arch", ARCHS)
def test_client_then_server_equals_unsplit_network(arch):
  """For every cut, client(x) then server(.) reproduces the unsplit network exactly."""
  input_size = 8 if arch == "resnet_tiny" else 32
  width = 4 if arch == "resnet_tiny" else 64
  base = SplitConfig(arch=arch, cut=1, input_size=input_size, width=width, head="V1")
  full = full_network(base)
  x = jax.random.normal(jax.random.key(1), (1, input_size, input_size, 3))
  full_vars = full.init(jax.random.key(2), x)
  want = full.apply(full_vars, x)
  for cut in _cuts(arch):
    cfg = SplitConfig(arch=arch, cut=cut, input_size=input_size, width=width, head="V1")
    net = build(cfg)
    client_vars, server_vars = split_variables(cfg, full_vars)
    chex.assert_trees_all_equal_shapes(client_vars["params"],
                                       jax.eval_shape(net.init_client, jax.random.key(0))["params"])
    smashed, _ = net.apply_client(client_vars, x)
    got, _ = net.apply_server(server_vars, smashed)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{arch} cut {cut}")


@pytest.mark.parametrize("cfg", [
    SplitConfig(arch="resnet_tiny", cut=2, width=4, input_size=8),
    SplitConfig(arch="resnet_tiny", cut=2, width=4, input_size=16, bottleneck="C2S2"),
    SplitConfig(arch="mobilenetv2", cut=4),  # client-side BatchNorm in the shortcuts
])
def test_vmap_over_stacked_clients_with_batch_one(cfg):
  net = build(cfg)
  num_clients = 3
  stacked = jax.vmap(net.init_client)(jax.random.split(jax.random.key(0), num_clients))
  x = jax.random.normal(jax.random.key(1), (num_clients, 1, *net.input_shape))
  apply = jax.jit(lambda v, xb: net.apply_client(v, xb, train=True))
  y, new_vars = jax.jit(jax.vmap(apply))(stacked, x)
  assert y.shape == (num_clients, 1, *net.smashed_shape)
  for c in range(num_clients):
    one = jax.tree.map(lambda a: a[c], stacked)
    yc, vc = apply(one, x[c])
    np.testing.assert_allclose(y[c], yc, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[c], new_vars), vc, rtol=1e-5, atol=1e-6)


def test_mobilenet_client_batchnorm_stats_update_in_train_mode_only():
  net = build(SplitConfig(arch="mobilenetv2", cut=4))
  v = net.init_client(jax.random.key(0))
  assert v["batch_stats"], "cut 4 holds stage-3 shortcut BatchNorms"
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  _, same = net.apply_client(v, x, train=False)
  chex.assert_trees_all_equal(same["batch_stats"], v["batch_stats"])
  _, moved = net.apply_client(v, x, train=True)
  assert not np.allclose(jax.tree.leaves(moved["batch_stats"])[0],
                         jax.tree.leaves(v["batch_stats"])[0])


def test_c_residual_off_removes_client_skips_only():
  on = build(SplitConfig(arch="resnet18", cut=5))
  off = build(SplitConfig(arch="resnet18", cut=5, c_residual=False))
  p_on = jax.eval_shape(on.init_client, jax.random.key(0))["params"]
  p_off = jax.eval_shape(off.init_client, jax.random.key(0))["params"]
  assert "shortcut_conv" in p_on["layer3"] and "shortcut_conv" not in p_off["layer3"]
  s_off = jax.eval_shape(off.init_server, jax.random.key(0))["params"]
  assert "shortcut_conv" in s_off["layer5"]  # server blocks keep their skips


def test_weight_standardisation_matches_reference_formula():
  w = jax.random.normal(jax.random.key(0), (3, 3, 5, 7)) * 3 + 1
  got = L.standardize_kernel(w)
  flat = np.asarray(w).reshape(-1, 7)
  centred = flat - flat.mean(0)
  want = centred / (centred.std(0, ddof=1) + 1e-5)
  np.testing.assert_allclose(np.asarray(got).reshape(-1, 7), want, rtol=1e-5, atol=1e-5)


def _always_ws(arch, path):
  """Convs that stay weight-standardised with ws=False (reference): the ResNet stem and the
  Bottleneck shortcut."""
  return arch.startswith("resnet") and (path[:2] == ("layer0", "conv")
                                        or (arch == "resnet50" and "shortcut_conv" in path))


def _never_ws(arch, path):
  """Convs that are plain even with ws=True: MobileNetV2's projection shortcuts."""
  return arch == "mobilenetv2" and "shortcut_conv" in path


@pytest.mark.parametrize("arch,cut", [("resnet_tiny", 4), ("resnet50", 2), ("mobilenetv2", 9),
                                      ("vgg11", 3)])
def test_ws_off_makes_exactly_the_reference_convs_plain(arch, cut):
  """ws=False changes the client output; it equals the ws=True network whose switchable kernels
  are standardised beforehand, so exactly the reference's set of convs follows `ws`."""
  small = dict(width=4, input_size=8) if arch == "resnet_tiny" else {}
  on, off = (build(SplitConfig(arch=arch, cut=cut, ws=ws, conv_impl="lax", **small))
             for ws in (True, False))
  v = on.init_client(jax.random.key(0))
  chex.assert_trees_all_equal_shapes(v, jax.eval_shape(off.init_client, jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (2, *on.input_shape))
  y_on, y_off = (jax.jit(lambda v, x, net=net: net.apply_client(v, x)[0])(v, x)
                 for net in (on, off))
  assert float(jnp.abs(y_on - y_off).max()) > 1e-2 * float(jnp.abs(y_on).max())

  def standardise(path, leaf):
    path = tuple(getattr(p, "key", None) for p in path)
    if (path[-1] == "kernel" and leaf.ndim == 4 and not _always_ws(arch, path)
        and not _never_ws(arch, path)):
      return L.standardize_kernel(leaf)
    return leaf

  pre = {**v, "params": jax.tree_util.tree_map_with_path(standardise, v["params"])}
  np.testing.assert_allclose(off.apply_client(pre, x)[0], y_on, rtol=1e-4, atol=1e-4)


def test_rematerialised_weight_standardisation_has_the_same_gradient():
  w = jax.random.normal(jax.random.key(3), (3, 3, 5, 7)) * 3 + 1
  g = jax.random.normal(jax.random.key(4), (3, 3, 5, 7))
  loss = lambda f: lambda w: jnp.sum(jnp.sin(f(w)) * g)
  np.testing.assert_allclose(L._standardize_kernel_remat(w), L.standardize_kernel(w))  # pylint: disable=protected-access
  np.testing.assert_allclose(jax.grad(loss(L._standardize_kernel_remat))(w),  # pylint: disable=protected-access
                             jax.grad(loss(L.standardize_kernel))(w), rtol=1e-4, atol=1e-6)


def test_client_side_weight_standardisation_is_rematerialised(monkeypatch):
  """The client slice recomputes its standardised kernels in the backward pass: XLA's scratch
  for a step with 8 ResNet-18 clients at cut 9 is below the same step keeping them, by more
  than the clients' parameters (compiled only, nothing runs)."""
  from mocosfl_jax import parallel  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.algorithm import plan, state  # pylint: disable=g-import-not-at-top
  net = build(SplitConfig(arch="resnet18", cut=9, head="V1"))
  cfg = plan.StepConfig(num_clients=8, batch_size=1, queue_size=32, steps_per_epoch=4,
                        avg_freq=2)
  shapes = state.abstract_train_state(net, cfg)
  views = jax.ShapeDtypeStruct((8, 1, 32, 32, 3), jnp.float32)

  def scratch():   # a fresh jit each time: no trace is shared between the two settings
    fn = jax.jit(lambda *a: parallel.train_step_fn(*a), static_argnums=(0, 1), donate_argnums=(2,))
    return fn.lower(net, cfg, shapes, None, views, views, jnp.int32(0),
                    jnp.int32(0)).compile().memory_analysis().temp_size_in_bytes

  assert net.client_module.remat_ws
  remat = scratch()
  monkeypatch.setattr(net, "client_module", net.client_module.clone(remat_ws=False))
  kept = scratch()
  params = sum(x.size * 4 for x in jax.tree.leaves(shapes.clients.online["params"]))
  assert remat < kept - params, (remat, kept, params)


def test_conv_transpose_matches_pytorch_definition():
  """y[o, s*i - p + k] += x[c, i] * w[c, o, k], cropped to (H-1)*s - 2p + K + output_padding."""
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 3, 3, 2)))
  module = L.ConvTranspose(features=4, kernel_size=3, stride=2, padding=1, output_padding=1)
  variables = module.init(jax.random.key(1), jnp.asarray(x))
  w = np.asarray(variables["params"]["kernel"])  # (kh, kw, in, out)
  b = np.asarray(variables["params"]["bias"])
  full = np.zeros((1, 8, 8, 4))
  for i in range(3):
    for j in range(3):
      for ki in range(3):
        for kj in range(3):
          full[0, 2 * i + ki, 2 * j + kj] += x[0, i, j] @ w[ki, kj]
  want = full[:, 1:7, 1:7] + b  # crop padding 1; output_padding adds one row/col at the end
  got = module.apply(variables, jnp.asarray(x))
  assert got.shape == (1, 6, 6, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reference_initialisation_scales():
  net = build(SplitConfig(arch="resnet18", cut=1, bottleneck="C4S2"))
  p = net.init_client(jax.random.key(0))["params"]
  stem = np.asarray(p["layer0"]["conv"]["kernel"])  # WS conv: PyTorch default U(+-1/sqrt(27))
  assert np.abs(stem).max() <= 1 / np.sqrt(27) + 1e-7
  assert np.abs(stem).max() > 0.8 / np.sqrt(27)
  tail = p["bottleneck"]["conv0"]  # plain conv: xavier-uniform, zero bias
  bound = np.sqrt(6 / (9 * 64 + 9 * 4))
  assert np.abs(np.asarray(tail["kernel"])).max() <= bound + 1e-7
  assert not np.asarray(tail["bias"]).any()


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="resnet19"), "arch='resnet19' is unknown; valid"),
    (dict(cut=0), "cut=0 is invalid .* valid cuts are 1..9"),
    (dict(bottleneck="C4X2"), "malformed; expected"),
    (dict(bottleneck="C4S3"), "power of two"),
    (dict(arch="vgg13", input_size=64), "input_size=64 is invalid for vgg13: valid: 32"),
    (dict(arch="mobilenetv2", input_size=224), "valid: 32"),
    (dict(input_size=4), "valid sizes are >= 8"),
    (dict(head="V3"), "head='V3' is unknown; valid"),
    (dict(cut=9, bottleneck="C4S8"), "does not divide the 4x4 activation"),
])
def test_invalid_choices_raise_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    build(SplitConfig(**kwargs))


def test_bottleneck_parser():
  spec = parse_bottleneck("K5C16S1noRELU")
  assert (spec.kernel, spec.channels, spec.stride, spec.relu) == (5, 16, 1, False)
  assert parse_bottleneck("None") is None
  with pytest.raises(ValueError, match="only used with stride S1"):
    parse_bottleneck("K5C4S2")


def test_stems_for_64_and_224_inputs():
  assert build(SplitConfig(arch="resnet18", cut=1, input_size=64)).smashed_shape == (32, 32, 64)
  assert build(SplitConfig(arch="resnet18", cut=1, input_size=224)).smashed_shape == (112, 112, 64)
  p = jax.eval_shape(build(SplitConfig(arch="resnet18", cut=1, input_size=224)).init_client,
                     jax.random.key(0))["params"]
  assert p["layer0"]["conv"]["kernel"].shape == (7, 7, 3, 64)


@pytest.mark.parametrize("arch,cut", [("resnet18", 9), ("mobilenetv2", 6), ("vgg11", 5),
                                      ("resnet50", 3)])
def test_matmul_convolutions_equal_xla_convolutions(arch, cut):
  """conv_impl changes speed only: same parameters, same outputs, same gradients."""
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  outs = []
  for impl in ("lax", "matmul", "winograd"):
    net = build(SplitConfig(arch=arch, cut=cut, conv_impl=impl))
    v = net.init_client(jax.random.key(0))
    outs.append(jax.jit(lambda v, x, net=net: net.apply_client(v, x)[0])(v, x))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(outs[0], outs[2], rtol=1e-3, atol=1e-3)
  # Gradients at a shallow cut (3x3 convs, strided, depthwise, 1x1 projections) under a random
  # linear loss; deep stacks of weight-standardised layers amplify float32 rounding.
  shallow = {"resnet18": 4, "mobilenetv2": 4, "vgg11": 3, "resnet50": 2}[arch]
  grads = []
  for impl in ("lax", "matmul"):
    net = build(SplitConfig(arch=arch, cut=shallow, conv_impl=impl))
    v = net.init_client(jax.random.key(0))
    r = jax.random.normal(jax.random.key(2), (2, *net.smashed_shape))
    f = lambda p, net=net, v=v, r=r: jnp.sum(net.apply_client({**v, "params": p}, x)[0] * r)
    grads.append(jax.jit(jax.grad(f))(v["params"]))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[0]), jax.tree.leaves(grads[1])):
    assert float(jnp.abs(a - b).max()) <= 1e-3 * float(jnp.abs(a).max()), jax.tree_util.keystr(path)


@pytest.mark.parametrize("arch,cut", [("resnet18", 4), ("resnet50", 2)])
def test_winograd_network_gradients_equal_xla_in_float64(arch, cut):
  """conv_impl='winograd' computes the same maths as XLA's conv through a whole client slice.

  Compared in float64: in float32 Winograd F(4x4, 3x3) rounds ~10x more per conv than a direct
  conv, and Weight Standardisation's backward (a difference of nearly equal terms) amplifies
  that to ~1e-3 relative in the kernel gradients, which would hide a wrong transform.
  """
  nets = [build(SplitConfig(arch=arch, cut=cut, conv_impl=impl)) for impl in ("lax", "winograd")]
  v32 = nets[0].init_client(jax.random.key(0))
  with jax.enable_x64():
    v = jax.tree.map(lambda a: a.astype(jnp.float64), v32)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3), jnp.float64)   # 128 tiles: Winograd
    r = jax.random.normal(jax.random.key(2), (2, *nets[0].smashed_shape), jnp.float64)
    grads = [jax.jit(jax.grad(lambda p, net=net: jnp.sum(
        net.apply_client({**v, "params": p}, x)[0] * r)))(v["params"]) for net in nets]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[0]),
                            jax.tree.leaves(grads[1])):
      assert a.dtype == jnp.float64
      assert float(jnp.abs(a - b).max()) <= 1e-10 * float(jnp.abs(a).max()), jax.tree_util.keystr(path)
