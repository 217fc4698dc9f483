"""Training with remote JAX clients over loopback gRPC gives the simulated run's losses, and a
client that disappears is left out while the run goes on, then rejoins.

The server (`python -m mocosfl_jax.serve`) and the clients (`python -m mocosfl_jax.edge_client`)
run in this process, the clients in threads: the same code as separate processes, without
their start-up. tests/test_remote_processes.py runs them as processes, with an ONNX client.
"""
import json
import logging
import threading
import time

import numpy as np
import pytest

from mocosfl_jax import edge_client, serve
from mocosfl_jax.remote import client_loop, steps as remote_steps
from mocosfl_jax.run import train

import core_testlib
from core_testlib import CONFIG_DIR

fast_compile = core_testlib.fast_compile
pytestmark = pytest.mark.usefixtures("fast_compile")

TINY = str(CONFIG_DIR / "tiny.py")


def losses(workdir):
  return [(r["step"], r["loss"]) for r in map(json.loads, (workdir / "metrics.jsonl").open())
          if "loss" in r]


class Vanished(Exception):
  pass


def start_client(workdir, client, overrides, *, stop_after=None):
  """A JAX edge client in a thread, once the server listens; `stop_after` steps, it vanishes
  (stops calling the server, as a killed process)."""
  status = {}

  def body():
    while not (workdir / "server.json").exists():
      time.sleep(0.1)
    address = json.loads((workdir / "server.json").read_text())["address"]
    if stop_after is not None:
      real_one = client_loop.ClientLoop._one

      def one(loop):
        if loop.steps_done >= stop_after:
          raise Vanished()          # gone without a word
        return real_one(loop)

      client_loop.ClientLoop._one = one
    try:
      status["rc"] = edge_client.main(["--config", TINY, *overrides, "--server", address,
                                       "--client_id", str(client),
                                       "--token_file", str(workdir / "remote_tokens.json")])
    except Vanished:
      status["rc"] = "vanished"

  t = threading.Thread(target=body, daemon=True)
  t.start()
  return t, status


def serve_run(workdir, remote, overrides, deadline="60"):
  return serve.main(["--config", TINY, *overrides, "--workdir", str(workdir), "--remote", remote,
                     "--listen", "127.0.0.1:0", "--deadline", deadline, "--poll", "0.5"])


def test_remote_trainable_clients_give_the_simulated_losses(tmp_path, monkeypatch, caplog):
  """Clients 1 and 2 remote (c_lr > 0: gradients back, model uploads and averages at syncs
  every 2 steps), a sampled pool of 3 of 4 clients (0, 3, 1): client 1 takes part in every
  step beside two simulated clients, client 2 waits for a step that never comes. The
  first two backward passes take longer than the clients' polling interval (a slow device):
  the server waits for them, within its deadline."""
  caplog.set_level(logging.INFO, logger="mocosfl_jax.remote.client")
  overrides = ["--config.avg_freq=16", "--config.sample_ratio=0.75"]
  backward, slow = edge_client.JaxClient.backward, [2]

  def slow_backward(self, grad, lr):
    if slow[0] > 0:
      slow[0] -= 1
      time.sleep(2.0)              # longer than 3 x --poll 0.5
    return backward(self, grad, lr)

  monkeypatch.setattr(edge_client.JaxClient, "backward", slow_backward)
  threads = [start_client(tmp_path / "served", c, overrides) for c in (1, 2)]
  assert serve_run(tmp_path / "served", "1,2", overrides) == 0
  for t, status in threads:
    t.join(60)
    assert status.get("rc") == 0
  config = core_testlib.load_config("tiny").get_config()
  config.avg_freq, config.sample_ratio = 16, 0.75
  train.train_and_evaluate(config, str(tmp_path / "simulated"))
  got, want = losses(tmp_path / "served"), losses(tmp_path / "simulated")
  assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)
  assert slow == [0]
  done = sorted(r.getMessage() for r in caplog.records if "the run is done" in r.getMessage())
  assert done == ["client 1: the run is done (6 steps taken part in)",
                  "client 2: the run is done (0 steps taken part in)"]
  records = [json.loads(l) for l in (tmp_path / "served" / "metrics.jsonl").open()]
  assert any(r.get("div_online_global", 0) > 0 for r in records)     # syncs happened


def test_a_client_that_vanishes_is_left_out_and_rejoins(tmp_path, caplog, monkeypatch):
  """Client 1 stops answering after 2 steps: the next step runs without it (logged). A new
  client 1 then joins (the server holds step 6 until it is connected, so the test does not race
  the run) and takes part in every step from then on."""
  caplog.set_level(logging.INFO, logger="mocosfl_jax.remote.client")
  workdir = tmp_path / "run"
  overrides = ["--config.num_steps=10", "--config.eval_every_steps=10",
               "--config.checkpoint_every_steps=10"]
  step = remote_steps.RemoteStepper.__call__

  def paced(self, state, s, *args):
    if s == 5:
      assert self.coord.wait_connected([1], 120)
    return step(self, state, s, *args)

  monkeypatch.setattr(remote_steps.RemoteStepper, "__call__", paced)
  first = start_client(workdir, 1, overrides, stop_after=2)
  done = {}

  def restart_when_left_out():
    while not any("absent" in r.getMessage() for r in caplog.records):
      time.sleep(0.1)
    first[0].join()
    client_loop.ClientLoop._one = REAL_ONE
    done["second"] = start_client(workdir, 1, overrides)

  watcher = threading.Thread(target=restart_when_left_out, daemon=True)
  watcher.start()
  assert serve_run(workdir, "1", overrides, deadline="3") == 0
  watcher.join(10)
  assert first[1]["rc"] == "vanished"
  second_thread, second = done["second"]
  second_thread.join(60)
  assert second.get("rc") == 0
  absent = [r.getMessage() for r in caplog.records if "absent" in r.getMessage()]
  assert absent and "step 3: remote client(s) [1] absent" in absent[0]
  assert [s for s, _ in losses(workdir)] == [2, 4, 6, 8, 10]    # the run went on and finished
  joined = [r.getMessage() for r in caplog.records if "client 1 joined" in r.getMessage()]
  assert len(joined) == 2
  took_part = [r.getMessage() for r in caplog.records if "client 1: the run is done" in
               r.getMessage()]
  # The new client takes part from the step after it connects: step 6 at the latest.
  assert len(took_part) == 1
  assert 5 <= int(took_part[0].split("(")[1].split()[0]) <= 7


REAL_ONE = client_loop.ClientLoop._one


@pytest.fixture(autouse=True)
def _restore_client_loop():
  yield
  client_loop.ClientLoop._one = REAL_ONE
