"""Warm start (config.init_from): a new run starts from another run's client 0 and server, bit for
bit; the momentum nets follow init_momentum; resuming ignores init_from but refuses a change of
it; every bad source is refused in one line before anything is written."""
import shutil

import chex
import jax
import ml_collections
import numpy as np
import pytest

from mocosfl_jax import experiment, parallel
from mocosfl_jax.algorithm import state as state_lib
from mocosfl_jax.deploy import client_checkpoint
from mocosfl_jax.models import build
from mocosfl_jax.run import checkpoints, init_from, train

from core_testlib import copy_tree, load_config

tiny = load_config("tiny")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A finished tiny run: 4 clients, checkpoints at steps 0, 3 and 6 (the latest)."""
  workdir = tmp_path_factory.mktemp("source")
  config = tiny.get_config()
  config.keep_checkpoints = 3
  train.train_and_evaluate(config, str(workdir))
  assert checkpoints.complete_steps(workdir / "checkpoints") == [0, 3, 6]
  return workdir


def _saved(workdir, step):
  """(clients, server) a run's checkpoint holds, read with the run's own config.json."""
  meta = checkpoints.read_meta(workdir / "checkpoints", step)
  exp = experiment.resolve(ml_collections.ConfigDict(meta["config"]), strict=False)
  abstract = state_lib.abstract_train_state(build(exp.model), exp.step)
  with checkpoints.Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
    state = ckpt.restore(step, {"clients": abstract.clients, "server": abstract.server}).state
  return state["clients"], state["server"]


def _client0(workdir, step):
  """Client 0's online variables, read by the export path (orbax partial restore)."""
  return client_checkpoint.load_client(workdir, step, "online", 0).variables


def _every_row_is(stacked, one):
  chex.assert_trees_all_equal(stacked, jax.tree.map(
      lambda x, o: np.broadcast_to(o, x.shape), stacked, one))


def _deploy_config(source_dir):
  """TAResSFL's deployment in miniature: 2 frozen clients warm-started from the 4-client run."""
  config = tiny.get_config()
  config.num_clients = 2
  config.init_from = str(source_dir)
  config.c_lr = 0.0
  config.lr = 0.01
  config.num_steps = 4
  config.keep_checkpoints = 3       # steps 0 (the warm start), 3 and 4
  return config


@pytest.fixture(scope="module")
def deployed(source, tmp_path_factory):
  """(run directory, config, source copy it started from): the copy can be moved away."""
  copy = tmp_path_factory.mktemp("src") / "expert"
  shutil.copytree(source, copy)
  workdir = tmp_path_factory.mktemp("deployed")
  config = _deploy_config(copy)
  train.train_and_evaluate(config, str(workdir))
  return workdir, config, copy


def test_a_new_run_starts_from_the_source_client0_and_server_bit_for_bit(source, deployed):
  workdir, _, _ = deployed
  src_clients, src_server = _saved(source, 6)              # 'DIR' means the latest step
  clients, server = _saved(workdir, 0)                     # the warm run before any step
  client0 = _client0(source, 6)
  assert clients.count.shape == (2,)
  _every_row_is(clients.online, client0)
  _every_row_is(clients.online, jax.tree.map(lambda x: x[0], src_clients.online))
  _every_row_is(clients.momentum, client0)                 # init_momentum='copy' (default)
  chex.assert_trees_all_equal(server.online, src_server.online)
  chex.assert_trees_all_equal(server.momentum, src_server.online)
  # Optimizer states and counters start fresh.
  for leaf in jax.tree.leaves((clients.opt_state, server.opt_state, clients.count,
                               clients.draws, server.step, server.ptr)):
    assert not np.any(leaf)
  # Frozen clients (c_lr=0) keep the loaded params through 4 steps and 2 syncs; the server trains.
  end_clients, end_server = _saved(workdir, 4)
  _every_row_is(end_clients.online["params"], client0["params"])
  assert not np.array_equal(jax.tree.leaves(end_server.online["params"])[0],
                            jax.tree.leaves(src_server.online["params"])[0])


def test_init_momentum_random_keeps_this_runs_momentum_nets_and_a_step_can_be_named(source):
  exp = experiment.resolve(tiny.get_config())
  net = build(exp.model)
  fresh = state_lib.create_train_state(net, exp.step, jax.random.key(0))
  warm = init_from.load(f"{source}:3", exp.model)
  assert warm.step == 3 and warm.num_clients == 4
  got = init_from.apply(copy_tree(fresh), warm, "random")
  client0, (_, src_server) = _client0(source, 3), _saved(source, 3)
  _every_row_is(got.clients.online, client0)
  chex.assert_trees_all_equal(got.server.online, src_server.online)
  chex.assert_trees_all_equal(got.clients.momentum, fresh.clients.momentum)   # random init
  chex.assert_trees_all_equal(got.server.momentum, fresh.server.momentum)
  chex.assert_trees_all_equal((got.clients.opt_state, got.server.queue),
                              (fresh.clients.opt_state, fresh.server.queue))
  assert init_from.load(f"{source}:best", exp.model).step == 6   # nothing selected: latest


def test_a_warm_start_keeps_the_placement_of_a_sharded_state(source):
  exp = experiment.resolve(tiny.get_config())
  net = build(exp.model)
  mesh = parallel.client_mesh()
  fresh = parallel.create_train_state(net, exp.step, jax.random.key(0), mesh=mesh)
  got = init_from.apply(fresh, init_from.load(str(source), exp.model))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(fresh)):
    assert a.sharding == b.sharding and a.dtype == b.dtype
  _every_row_is(got.clients.online, _client0(source, 6))


def test_resuming_ignores_init_from_but_refuses_a_change_of_it(deployed, tmp_path):
  workdir, config, copy = deployed
  before = {p: p.read_bytes() for p in workdir.rglob("*.json") if p.is_file()}
  changed = ml_collections.ConfigDict(config.to_dict())
  changed.init_from = f"{copy}:3"
  with pytest.raises(ValueError, match=r"different config \(init_from: '.*expert' -> "
                     r"'.*expert:3'\)"):
    train.train_and_evaluate(changed, str(workdir))
  assert {p: p.read_bytes() for p in before} == before
  moved = tmp_path / "moved"
  shutil.move(copy, moved)                  # the source is gone: the run resumes from its own
  try:
    results = train.train_and_evaluate(config, str(workdir))
  finally:
    shutil.move(moved, copy)
  assert results["last"]["step"] == 4


def test_a_damaged_latest_source_step_falls_back_to_the_previous_one(source, tmp_path, caplog):
  copy = tmp_path / "expert"
  shutil.copytree(source, copy)
  array = max((p for p in (copy / "checkpoints" / "6" / "state").rglob("*") if p.is_file()),
              key=lambda p: p.stat().st_size)
  data = bytearray(array.read_bytes())
  data[len(data) // 2] ^= 0x5A
  array.write_bytes(bytes(data))
  model = experiment.resolve(tiny.get_config()).model
  assert init_from.load(str(copy), model).step == 3
  assert (copy / "checkpoints" / "6").is_dir()              # read-only: left in place
  assert any("step 6" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
  with pytest.raises(checkpoints.DamagedCheckpointError, match="step 6 .* is damaged"):
    init_from.load(f"{copy}:6", model)


REFUSALS = [
    (dict(init_from="{tmp}/nope"), r"config.init_from='.*/nope': .*/nope does not exist; train "
     r"one there first \(python -m mocosfl_jax.main --config \.\.\. --workdir .*/nope\)"),
    (dict(init_from="{tmp}"), r"config.init_from='.*': .* holds no checkpoint \(no complete "
     r"step under .*checkpoints\); train one there first \(python -m mocosfl_jax.main"),
    (dict(init_from="{source}:5"), r"config.init_from='.*:5': .* has no checkpoint step 5; "
     r"steps there: \[0, 3, 6\]"),
    (dict(init_from="{source}", cut=1), r"config.init_from='.*': the init_from run has cut=2, "
     r"this config cut=1; a warm start needs the same model"),
    (dict(init_from="{source}", width=8, head="V2"), r"the init_from run has width=4 and "
     r"head='V1', this config width=8 and head='V2'"),
    (dict(init_from="{source}", image_size=16), r"the init_from run has input_size=8, this "
     r"config input_size=16"),
    (dict(init_from="{source}", bottleneck="C2S1"), r"the init_from run has bottleneck='None', "
     r"this config bottleneck='C2S1'"),
    (dict(init_from="{source}:abc"), r"config.init_from='.*:abc': 'abc' after the last ':' is "
     r"not a step number, 'best' or 'latest'"),
    (dict(init_from="{source}:-1"), r"'-1' after the last ':' is not a step number"),
    (dict(init_from="{source}:"), r"'' after the last ':' is not a step number"),
    (dict(init_from=":3"), r"config.init_from=':3': no run directory"),
    (dict(init_momentum="random"), r"config.init_momentum='random': only a warm start uses it "
     r"\(what the momentum nets start from\); set init_from=DIR or drop init_momentum"),
    (dict(init_from="{source}", init_momentum="zeros"), r"config.init_momentum='zeros': valid: "
     r"copy, random"),
]


@pytest.mark.parametrize("fields,match", REFUSALS, ids=[m[:40] for _, m in REFUSALS])
def test_a_bad_warm_start_is_refused_before_anything_is_written(source, tmp_path, fields, match):
  config = tiny.get_config()
  for k, v in fields.items():
    config[k] = v.format(tmp=tmp_path, source=source) if isinstance(v, str) else v
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match) as e:
    train.train_and_evaluate(config, str(workdir))
  assert "\n" not in str(e.value)
  assert not workdir.exists()
