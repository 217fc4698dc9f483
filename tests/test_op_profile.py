"""The profile benchmark's grouping of XLA thunks by what they compute (bench/profile_server.py)."""
import collections

import jax
import jax.numpy as jnp

from mocosfl_jax.benchmarks import op_profile


def test_source_label_drops_function_and_layer_names():
  assert op_profile.source_label(
      "jit(server_step)/transpose(jvp(ServerNet))/layer3/conv1/kto,kco->ktc/dot_general"
  ) == "backward conv1/kto,kco->ktc/dot_general"
  assert op_profile.source_label(
      "jit(train_step)/jvp(vmap(ClientNet))/block2/norm1/gn/reduce_sum"
  ) == "forward norm1/gn/reduce_sum"
  assert op_profile.source_label("jit(f)/add") == "forward add"
  assert op_profile.source_label("jit(f)") == "other"


def test_thunks_are_grouped_by_the_operation_they_were_fused_from():
  def f(x, w):
    return jnp.sum(jnp.tanh(x @ w) ** 2)
  x, w = jnp.ones((8, 4)), jnp.ones((4, 3))
  hlo = jax.jit(jax.grad(f, argnums=1)).lower(x, w).compile().as_text()
  sources = op_profile.op_sources(hlo)
  labels = {op_profile.source_label(v) for v in sources.values()}
  assert any("dot_general" in label for label in labels), labels
  assert any(label.startswith("backward ") for label in labels), labels
  # The same operation in two layers adds up; a thunk the HLO does not name is 'unknown'.
  names = {"fusion.1": "jit(s)/jvp(Net)/layer1/conv1/add",
           "fusion.2": "jit(s)/jvp(Net)/layer4/conv1/add"}
  got = op_profile.by_source(
      collections.Counter({"fusion.1": 1.5, "fusion.2": 0.5, "not_in_hlo.3": 2.0}), names)
  assert got == {"forward conv1/add": 2.0, "unknown": 2.0}


def test_op_kind_removes_the_numeric_suffix():
  assert op_profile.op_kind("ynn_fusion.412") == "ynn_fusion"
  assert op_profile.op_kind("copy") == "copy"
