"""What remote clients cost: a served run's step time against the simulated run's, the bytes each
remote client moves per step, and the frozen ONNX client's time and memory per step.

    python -m mocosfl_jax.benchmarks.remote [--steps 40] [--remote 1,10] [--out FILE]
    (`python bench/remote_step.py ...` is the same command)

Setting: the reference's Raspberry Pi demo (TAResSFL deployment): ResNet-18 cut 2 with the C4S2
bottleneck, V2 head, frozen clients (c_lr = 0), batch 1, 10 clients all in every step, queue
1024, synthetic 32 px images (configs/tiny.py with overrides). Three runs of `--steps` steps,
one after the other on this machine:

  simulated   python -m mocosfl_jax.main (every client in the server's vmapped step)
  remote R    python -m mocosfl_jax.serve --remote 0..R-1 with R ONNX clients
              (export/edge_client.py processes on the same machine, over loopback)

Per run: the median seconds per step over the logging windows after the first (which holds
the compilation). The time the remote clients add per step is the served run's minus the
simulated run's; it holds the clients' own work (augmenting and encoding on the same cores as
the server), the messages and the waiting, and the served step's own costs (it fetches each
step's batch positions to the host, so steps no longer overlap their dispatch, and it runs the
per-party functions rather than one fused step). The part spent waiting for the uploads, from
opening the step to the last upload, is logged as `remote_wait_s`. Per client: the median time of its steps as the
client logs them (from taking its task to the server's acknowledgement of its upload) and its
peak resident memory. Bytes per step per client are the encoded messages of one step (task
request and reply, upload and acknowledgement), beside `python -m mocosfl_jax.costs`'s upload
count for the same setting.

Writes bench/results/remote.json (or --out).
"""
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from mocosfl_jax import cli

NUM_CLIENTS = 10
LOG_EVERY = 10


def _fields(steps: int) -> dict:
  """The setting: configs/tiny.py's fields overridden (typed, so the bench's own config and
  the commands' --config.FIELD=VALUE flags are the same values)."""
  return dict(image_size=32, arch="resnet18", width=64, cut=2, bottleneck="C4S2", head="V2",
              num_clients=NUM_CLIENTS, batch_size=1, queue_size=1024, num_steps=steps,
              log_every_steps=LOG_EVERY, eval_every_steps=steps, checkpoint_every_steps=steps,
              c_lr=0.0)


def _overrides(steps: int) -> list:
  return [f"--config.{k}={v}" for k, v in _fields(steps).items()]


def _config_path() -> str:
  here = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny.py"
  if not here.exists():
    raise FileNotFoundError(f"{here} not found: run the benchmark from a checkout")
  return str(here)


def _seconds_per_step(workdir: pathlib.Path) -> float:
  rates = [r["steps_per_sec"] for r in map(json.loads, (workdir / "metrics.jsonl").open())
           if "steps_per_sec" in r]
  return statistics.median(1.0 / r for r in rates[1:])


def _env() -> dict:
  package_parent = str(pathlib.Path(__file__).resolve().parents[2])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
  return env


def message_bytes(net, cfg, aug_uniforms: int) -> dict:
  """Encoded sizes of one step's messages for one frozen remote client."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from mocosfl_jax.remote import wire
  b = cfg.batch_size
  smashed = np.zeros((b,) + tuple(net.smashed_shape), np.float32)
  sizes = {
      "task_request": len(wire.encode("task_request", {"client": 0})),
      "task": len(wire.encode("task", {"client": 0, "step": 10 ** 6, "epoch": 10 ** 3,
                                       "batch_idx": 10 ** 3, "sync": 0, "train": 0},
                              {"positions": np.zeros(b, np.int32),
                               "uniforms": np.zeros((2, b, aug_uniforms), np.float32)})),
      "smashed": len(wire.encode("smashed", {"client": 0, "step": 10 ** 6},
                                 {"q": smashed, "k": smashed})),
      "ack": len(wire.encode("ack", {"client": 0, "step": 10 ** 6})),
      "smashed_payload": 2 * smashed.nbytes,
  }
  sizes["upload_per_step"] = sizes["task_request"] + sizes["smashed"]
  sizes["download_per_step"] = sizes["task"] + sizes["ack"]
  return sizes


def run(steps: int, remote_counts, out: str, keep: str | None = None) -> dict:
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from mocosfl_jax import costs, experiment
  from mocosfl_jax.benchmarks.step import machine
  from mocosfl_jax.data import augment
  from mocosfl_jax.deploy import to_onnx
  from mocosfl_jax.models import build
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_config", _config_path())
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update(_fields(steps))
  exp = experiment.resolve(config)
  net = build(exp.model)
  result = {"machine": machine(), "load_average_before": os.getloadavg(),
            "setting": {"arch": "resnet18", "cut": 2, "bottleneck": "C4S2", "head": "V2",
                        "num_clients": NUM_CLIENTS, "batch_size": 1, "frozen": True,
                        "steps": steps, "image_size": 32},
            "bytes_per_step_per_client": message_bytes(net, exp.step, augment.NUM_UNIFORMS),
            "costs_upload_bytes_per_step": costs.cost_table(
                "resnet18", bottleneck="C4S2", cuts=[2],
                traffic=costs.Traffic(frozen_client=True))[0]["upload_bytes_per_step"],
            "runs": {}}
  base = [sys.executable, "-m"]
  with tempfile.TemporaryDirectory() as scratch:
    tmp = pathlib.Path(keep or scratch)
    tmp.mkdir(parents=True, exist_ok=True)
    sim = tmp / "simulated"
    subprocess.run(base + ["mocosfl_jax.main", "--config", _config_path(), *_overrides(steps),
                           "--workdir", str(sim)], env=_env(), check=True,
                   capture_output=True, text=True)
    result["runs"]["simulated"] = {"seconds_per_step": _seconds_per_step(sim)}
    print(f"simulated: {result['runs']['simulated']}", flush=True)
    for r in remote_counts:
      result["runs"][f"remote_{r}"] = _served(tmp / f"remote_{r}", r, steps, exp, to_onnx, np)
      print(f"remote {r}: {result['runs'][f'remote_{r}']}", flush=True)
  sim_s = result["runs"]["simulated"]["seconds_per_step"]
  for r in remote_counts:
    run_ = result["runs"][f"remote_{r}"]
    run_["added_seconds_per_step"] = run_["seconds_per_step"] - sim_s
  result["load_average_after"] = os.getloadavg()
  path = pathlib.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1))
  print(json.dumps(result, indent=1))
  return result


def _served(workdir: pathlib.Path, r: int, steps: int, exp, to_onnx, np) -> dict:
  remote = list(range(r))
  server = subprocess.Popen(
      [sys.executable, "-m", "mocosfl_jax.serve", "--config", _config_path(), *_overrides(steps),
       "--workdir", str(workdir), "--remote", ",".join(map(str, remote)), "--listen",
       "127.0.0.1:0", "--deadline", "120", "--poll", "2"], env=_env(),
      stdout=subprocess.DEVNULL, stderr=open(workdir.parent / f"server_{r}.log", "w"))
  while not (workdir / "server.json").exists():
    if server.poll() is not None:
      raise RuntimeError((workdir.parent / f"server_{r}.log").read_text()[-3000:])
    time.sleep(0.5)
  address = json.loads((workdir / "server.json").read_text())["address"]
  while not (workdir / "checkpoints" / "0").exists():   # written asynchronously
    time.sleep(0.2)
  model = workdir.parent / f"client_{r}.onnx"
  to_onnx.export_onnx(str(model), workdir=str(workdir), checkpoint="0", client="0",
                      layout="NHWC", dynamic_batch=True)
  clients = []
  for c in remote:
    data = workdir.parent / f"client_{r}_{c}.npy"
    np.save(data, exp.train.images[np.asarray(exp.parts[c])])
    log = workdir.parent / f"client_{r}_{c}.log"
    clients.append((log, subprocess.Popen(
        [sys.executable, str(pathlib.Path(_config_path()).parents[1] / "export" /
                             "edge_client.py"),
         "--server", address, "--model", str(model), "--data", str(data), "--client-id",
         str(c), "--token-file", str(workdir / "remote_tokens.json"), "--threads", "1"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=open(log, "w"))))
  if server.wait() != 0:
    raise RuntimeError((workdir.parent / f"server_{r}.log").read_text()[-3000:])
  step_times, peaks = [], []
  for log, proc in clients:
    proc.wait(timeout=120)
    text = log.read_text()
    times = [float(t) for t in re.findall(r"step \d+ in ([0-9.]+) s", text)]
    step_times.append(statistics.median(times[1:]))
    peaks.append(float(re.findall(r"peak memory ([0-9.]+) MiB", text)[-1]))
  waits = [r["remote_wait_s"] for r in map(json.loads, (workdir / "metrics.jsonl").open())
           if "remote_wait_s" in r][1:]
  return {"seconds_per_step": _seconds_per_step(workdir),
          "upload_wait_seconds_per_step": statistics.median(waits),
          "client_seconds_per_step_median": statistics.median(step_times),
          "client_peak_rss_mib_max": max(peaks)}


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_integer("steps", 40, "Steps per run.", flag_values=flag_values)
  flags.DEFINE_string("remote", "1,10", "Numbers of remote clients to measure.",
                      flag_values=flag_values)
  flags.DEFINE_string("out", "bench/results/remote.json", "Output JSON.",
                      flag_values=flag_values)
  flags.DEFINE_string("keep", None, "Keep the runs and logs in this directory (default: a "
                      "temporary one, removed).", flag_values=flag_values)


def _main(args) -> int:
  counts = [int(x) for x in args.remote.split(",")]
  if any(not 1 <= c <= NUM_CLIENTS for c in counts):
    raise ValueError(f"--remote: each count must be in 1..{NUM_CLIENTS}")
  if args.steps < 3 * LOG_EVERY:
    raise ValueError(f"--steps must be at least {3 * LOG_EVERY} (windows of {LOG_EVERY})")
  run(args.steps, counts, args.out, args.keep)
  return 0


def main(argv=None) -> int:
  return cli.run(define_flags, _main, argv)


if __name__ == "__main__":
  main()
