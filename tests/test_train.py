"""The run a user trusts: exact resume after a kill, interrupted checkpoint writes, NaN stop, config errors."""
import hashlib
import json
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from mocosfl_jax import experiment
from mocosfl_jax.run import checkpoints, metrics, train, workdir_lock
from mocosfl_jax.algorithm import state as state_lib
from mocosfl_jax.models import build

from core_testlib import load_config, stop_at

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
  assert records[0]["step"] == 0 and "test_knn_accuracy" in records[0]
  assert "val_knn_accuracy" not in records[0]       # val_fraction=0: nothing to select on
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == [2, 4, 6]
  assert all(np.isfinite(r["loss"]) and "server_lr" in r and "steps_per_sec" in r
             for r in train_records)
  assert results["last"]["step"] == 6
  assert 0.0 <= results["last"]["test_knn_accuracy"] <= 100.0
  assert "best" not in results and results["selection"].startswith("none")
  assert results["reported_step"] == 6
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["arch"] == "resnet_tiny"
  assert (workdir / "partition.json").exists() and (workdir / "partition.png").exists()
  assert checkpoints.read_meta(workdir / "checkpoints", 6)["model"]["cut"] == 2


def test_logged_values_are_window_means_fetched_at_log_steps(tmp_path, monkeypatch):
  """The loop never reads a step's metrics on the host; log records hold window means."""
  real_step = train.simulated_step
  losses = []

  def recording(*args):
    state, m = real_step(*args)
    losses.append(m["loss"])
    return state, m

  fetches = {"flush": 0, "snapshot": 0}
  for name in fetches:
    real = getattr(train.MetricWindow, name)
    monkeypatch.setattr(train.MetricWindow, name,
                        lambda self, _n=name, _f=real: fetches.update({_n: fetches[_n] + 1})
                        or _f(self))
  monkeypatch.setattr(train, "simulated_step", recording)
  config = tiny.get_config()
  config.avg_freq = 16           # a sync every 2 steps, so divergences are logged too
  train.train_and_evaluate(config, str(tmp_path))
  records = [r for r in metrics.read_metrics(tmp_path) if "loss" in r]
  values = np.array(jax.device_get(losses), np.float64)
  assert [r["step"] for r in records] == [2, 4, 6]
  for r, window in zip(records, (values[0:2], values[2:4], values[4:6])):
    assert r["loss"] == pytest.approx(float(np.mean(window)), rel=1e-6)
  # The metrics are read from the device at log steps and before checkpoints only.
  assert fetches == {"flush": 3, "snapshot": 3 + 1}   # +1: the checkpoint at step 3

  # Every logged metric family lands in a plot.
  names = {k for r in metrics.read_metrics(tmp_path) for k in r} - {"step"}
  assert {"loss", "div_online_global", "test_knn_accuracy", "server_lr"} <= names
  unplotted = sorted(k for k in names if metrics.plot_group(k) is None
                     and k not in metrics.NOT_PLOTTED)
  assert unplotted == []
  for stem in {metrics.plot_group(k) for k in names} - {None}:
    assert (tmp_path / metrics.PLOTS_DIR / f"{stem}.png").exists(), stem


def test_resume_after_kill_equals_uninterrupted_run(uninterrupted, tmp_path, monkeypatch):
  full_dir, _ = uninterrupted
  config = tiny.get_config()
  real_step = train.simulated_step
  stop_at(monkeypatch, train, "simulated_step", 4,
          KeyboardInterrupt("simulated kill between steps 4 and 5"))
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
  # The checkpoint at step 3 lies inside the log window 3-4: it carried the window, so the means
  # logged after the resume are the uninterrupted run's.
  logged = lambda d: [{k: v for k, v in r.items() if k not in ("steps_per_sec", "eval_seconds")}
                      for r in metrics.read_metrics(d)]
  assert logged(tmp_path) == logged(full_dir)


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


def _file_hashes(directory):
  return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_with_a_changed_config_is_refused(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  before = _file_hashes(workdir)
  config = tiny.get_config()
  config.lr = 0.5
  config.noniid_ratio = 0.5       # changes the partition files too, were they rewritten
  with pytest.raises(ValueError, match=r"different config \(lr: 0.06 -> 0.5, noniid_ratio"):
    train.train_and_evaluate(config, str(workdir))
  assert _file_hashes(workdir) == before       # config.json, partition.* untouched


def test_a_second_process_is_refused_while_a_run_holds_the_workdir(tmp_path):
  tmp_path.joinpath("notes.txt").write_text("kept")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from mocosfl_jax.run import workdir_lock\n"
       "with workdir_lock.hold(sys.argv[1]):\n  print('held', flush=True); time.sleep(60)",
       str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before = _file_hashes(tmp_path)
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"in use by a training run \(pid {holder.pid} on host"):
      train.train_and_evaluate(tiny.get_config(), str(tmp_path))
    assert _file_hashes(tmp_path) == before
  finally:
    holder.kill()
    holder.wait()
  # The lock dies with its holder (even killed): the directory is usable again.
  with workdir_lock.hold(tmp_path):
    pass


def test_a_step_with_an_unreadable_metrics_file_is_set_aside_and_the_run_resumes(tmp_path):
  """orbax cannot even list such a step; the resume check reads config.json instead, and the
  run's own Checkpointer moves the step to checkpoints/damaged/ and resumes before it."""
  config = tiny.get_config()
  config.val_fraction = 0.25            # selection: steps carry orbax metrics files
  first = train.train_and_evaluate(config, str(tmp_path))
  metrics_file = tmp_path / "checkpoints" / "6" / "metrics" / "metrics"
  metrics_file.write_bytes(metrics_file.read_bytes()[:3])
  again = train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "checkpoints" / "damaged" / "6").is_dir()
  assert again["last"] == first["last"]           # steps 4-6 rerun from step 3, exactly


def test_on_several_hosts_every_process_learns_that_the_workdir_is_held(tmp_path, monkeypatch):
  """Process 0 checks the lock and broadcasts the outcome: a process that does not check it
  (here: the simulated process 1 of 2) is refused too, instead of waiting in a collective."""
  monkeypatch.setattr(train.jax, "process_count", lambda: 2)
  sent = []

  def broadcast(x):                       # what process 0 sends, here: "held"
    sent.append(int(x))
    return np.int32(1)

  monkeypatch.setattr(train.multihost_utils, "broadcast_one_to_all", broadcast)
  with pytest.raises(workdir_lock.WorkdirLockedError, match="process 0 found its lock held"):
    train._refuse_if_workdir_held(tmp_path, primary=False)
  assert sent == [0]                      # process 1 itself found nothing
  monkeypatch.setattr(train.multihost_utils, "broadcast_one_to_all", lambda x: np.int32(0))
  train._refuse_if_workdir_held(tmp_path, primary=False)          # free: no refusal
