"""The deployment as processes over loopback: `python -m mocosfl_jax.serve`, an ONNX client
(`python export/edge_client.py`, numpy + onnxruntime) and a JAX client
(`python -m mocosfl_jax.edge_client`), in a frozen federation (c_lr = 0, TAResSFL's deployment)
on the digits.
The server is SIGKILLed after its step-3 checkpoint and started again: it resumes, the clients
reconnect, and the run ends with the losses of the simulated run.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mocosfl_jax import experiment
from mocosfl_jax.deploy import to_onnx
from mocosfl_jax.run import train

import core_testlib
from core_testlib import CONFIG_DIR, PACKAGE_PARENT

fast_compile = core_testlib.fast_compile
pytestmark = pytest.mark.usefixtures("fast_compile")

ROOT = CONFIG_DIR.parent
# configs/tiny.py on scikit-learn's digits (8x8, shipped in the package: offline).
OVERRIDES = ["--config.dataset=digits", "--config.c_lr=0", "--config.avg_freq=16"]


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "MOCOSFL_"))}
  # Compiled as this process compiles the simulated reference (fast_compile).
  env.update(PYTHONPATH=PACKAGE_PARENT, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(path, proc, timeout=240):
  end = time.monotonic() + timeout
  while not path.exists():
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.monotonic() < end, f"{path} did not appear"
    time.sleep(0.2)


def losses(workdir):
  return [(r["step"], r["loss"]) for r in map(json.loads, (workdir / "metrics.jsonl").open())
          if "loss" in r]


def test_onnx_and_jax_clients_train_through_a_server_restart(tmp_path):
  run = tmp_path / "run"
  address = f"127.0.0.1:{_free_port()}"
  server_cmd = [sys.executable, "-m", "mocosfl_jax.serve", "--config", str(CONFIG_DIR / "tiny.py"),
                *OVERRIDES, "--workdir", str(run), "--remote", "1,2", "--listen", address,
                "--deadline", "60", "--poll", "1"]
  spawn = lambda cmd, log: subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=open(log, "w"),
                                            stderr=subprocess.STDOUT, text=True)
  server = spawn(server_cmd, tmp_path / "server1.log")
  tokens = run / "remote_tokens.json"
  _wait_for(run / "server.json", server)    # listening, waiting for its clients
  jax_client = spawn([sys.executable, "-m", "mocosfl_jax.edge_client", "--config",
                      str(CONFIG_DIR / "tiny.py"), *OVERRIDES, "--server", address,
                      "--client_id", "2", "--token_file", str(tokens)], tmp_path / "client2.log")
  # Client 1's device: the ONNX slice of its model and its own images, nothing else.
  _wait_for(run / "checkpoints" / "0", server)    # the first checkpoint is written asynchronously
  to_onnx.export_onnx(str(tmp_path / "client1.onnx"), workdir=str(run), checkpoint="0",
                      client="1", layout="NHWC", dynamic_batch=True)
  config = core_testlib.load_config("tiny").get_config()
  config.dataset, config.c_lr, config.avg_freq = "digits", 0.0, 16
  exp = experiment.resolve(config)
  np.save(tmp_path / "client1.npy", exp.train.images[np.asarray(exp.parts[1])])
  onnx_client = spawn([sys.executable, str(ROOT / "export" / "edge_client.py"), "--server",
                       address, "--model", str(tmp_path / "client1.onnx"), "--data",
                       str(tmp_path / "client1.npy"), "--client-id", "1", "--token-file",
                       str(tokens)], tmp_path / "client1.log")

  _wait_for(run / "checkpoints" / "3", server)
  server.send_signal(signal.SIGKILL)
  server.wait()
  server = spawn(server_cmd, tmp_path / "server2.log")
  assert server.wait(timeout=400) == 0, (tmp_path / "server2.log").read_text()[-3000:]
  for proc, log in ((jax_client, "client2.log"), (onnx_client, "client1.log")):
    assert proc.wait(timeout=120) == 0, (tmp_path / log).read_text()[-3000:]
  second = (tmp_path / "server2.log").read_text()
  assert "resumed from step 3" in second
  assert "absent" not in (tmp_path / "server1.log").read_text() + second
  assert "the run is done" in (tmp_path / "client1.log").read_text()

  train.train_and_evaluate(config, str(tmp_path / "simulated"))
  got, want = losses(run), losses(tmp_path / "simulated")
  assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6]
  np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-5)
