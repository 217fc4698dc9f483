"""The run a user trusts: exact resume after a kill, interrupted checkpoint writes, NaN stop, config errors."""
import json

import chex
import jax
import numpy as np
import pytest

from mocosfl_jax import experiment
from mocosfl_jax.run import checkpoints, metrics, train
from mocosfl_jax.algorithm import state as state_lib
from mocosfl_jax.models import build

from core_testlib import load_config

tiny = load_config("tiny")


def _final_state(workdir, config):
  p = experiment.resolve(config)
  net = build(p.model)
  st = state_lib.create_train_state(net, p.step, jax.random.key(0))
  target = {"clients": st.clients, "server": st.server}
  with checkpoints.Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
    return ckpt.restore(p.num_steps, target).state


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  results = train.train_and_evaluate(tiny.get_config(), str(workdir))
  return workdir, results


def test_run_writes_metrics_checkpoints_and_results(uninterrupted):
  workdir, results = uninterrupted
  records = metrics.read_metrics(workdir)
  assert records[0]["step"] == 0 and "knn_accuracy" in records[0]
  assert "test_knn_accuracy" in records[0]
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == [2, 4, 6]
  assert all(np.isfinite(r["loss"]) and "server_lr" in r and "steps_per_sec" in r
             for r in train_records)
  assert results["last"]["step"] == 6
  assert 0.0 <= results["best"]["test_knn_accuracy"] <= 100.0
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["arch"] == "resnet_tiny"
  assert (workdir / "partition.json").exists() and (workdir / "partition.png").exists()
  assert checkpoints.read_meta(workdir / "checkpoints", 6)["model"]["cut"] == 2


def test_resume_after_kill_equals_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
  full_dir, _ = uninterrupted
  config = tiny.get_config()
  real_step = train.simulated_step
  calls = {"n": 0}

  def killed_after_four_steps(*args):
    if calls["n"] == 4:
      raise KeyboardInterrupt("simulated kill between steps 4 and 5")
    calls["n"] += 1
    return real_step(*args)

  monkeypatch.setattr(train, "simulated_step", killed_after_four_steps)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.setattr(train, "simulated_step", real_step)
  # A later step left half-written by a kill during the write must be ignored.
  (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-123").mkdir()
  assert checkpoints.latest_step(tmp_path / "checkpoints") == 3
  train.train_and_evaluate(config, str(tmp_path))
  chex.assert_trees_all_equal(_final_state(tmp_path, config), _final_state(full_dir, config))
  steps = [r["step"] for r in metrics.read_metrics(tmp_path) if "loss" in r]
  assert steps == [2, 4, 6]  # records after the restored step were dropped, none duplicated


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  real_step = train.simulated_step
  calls = {"n": 0}

  def nan_at_step_five(*args):
    state, m = real_step(*args)
    calls["n"] += 1
    if calls["n"] == 5:
      m = {**m, "loss": m["loss"] * np.nan}
    return state, m

  monkeypatch.setattr(train, "simulated_step", nan_at_step_five)
  with pytest.raises(train.NonFiniteLossError, match=r"at step 5 .*last good checkpoint is step 3"):
    train.train_and_evaluate(tiny.get_config(), str(tmp_path))
  assert checkpoints.complete_steps(tmp_path / "checkpoints") == [0, 3]


@pytest.mark.parametrize("field,value,match", [
    ("cut", 9, r"config.cut=9: resnet_tiny has cuts 1..4"),
    ("queue_size", 8, r"queue_size=8 is smaller than the 16 keys enqueued per step"),
    ("sample_ratio", 1.5, r"config.sample_ratio=1.5 must be in \(0, 1\]"),
    ("sample_ratio", 0.0, r"config.sample_ratio=0.0 must be in \(0, 1\]"),
    ("dataset", "mnist", r"config.dataset='mnist': unknown; valid"),
    ("conv_impl", "fft", r"config.conv_impl='fft' is unknown; valid"),
    ("client_parallel", "pmap", r"config.client_parallel='pmap'; valid"),
    ("client_chunk", -2, r"config.client_chunk=-2 must be an int >= 0"),
])
def test_invalid_config_fails_before_compilation_naming_the_field(field, value, match):
  config = tiny.get_config()
  config[field] = value
  with pytest.raises(ValueError, match=match):
    experiment.resolve(config)


def test_resume_with_a_changed_config_is_refused(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  config = tiny.get_config()
  config.lr = 0.5
  with pytest.raises(ValueError, match=r"different config \(lr: 0.06 -> 0.5\)"):
    train.train_and_evaluate(config, str(workdir))
