"""Issue-3 figure: one simulated step at 100 clients x batch 1, ResNet-18 cut 2, V2 head, K 6000.

    JAX_PLATFORMS=cpu python bench/step_100clients.py [--loss_form original] [--repeats 3]

Times, in one process: compile of the jitted step, then the median of repeated steps (data
already augmented on device), and checks that no step recompiles. Writes
bench/results/step_100clients.json with a description of the machine.
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mocosfl_jax import plan, state as state_lib, step as step_lib
from mocosfl_jax.models import SplitConfig, build


def machine() -> dict:
  cpu = ""
  if Path("/proc/cpuinfo").exists():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "")
  return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
          "load_average": os.getloadavg(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main():
  a = argparse.ArgumentParser()
  a.add_argument("--clients", type=int, default=100)
  a.add_argument("--cut", type=int, default=2)
  a.add_argument("--loss_form", default="original")
  a.add_argument("--repeats", type=int, default=3)
  args = a.parse_args()
  net = build(SplitConfig(arch="resnet18", cut=args.cut, head="V2"))
  cfg = plan.StepConfig(num_clients=args.clients, batch_size=1, queue_size=6000,
                        loss_form=args.loss_form, steps_per_epoch=500, avg_freq=10)
  clients, server = state_lib.init_state(net, cfg, jax.random.key(0))
  pool = jnp.arange(args.clients, dtype=jnp.int32)
  views = jax.random.normal(jax.random.key(1), (args.clients, 1, 32, 32, 3))
  t0 = time.time()
  compiled = step_lib.train_step.lower(net, cfg, clients, server, pool, views, views,
                                       jnp.int32(0), jnp.int32(0)).compile()
  compile_s = time.time() - t0
  times = []
  for i in range(args.repeats + 1):
    t = time.time()
    clients, server, m = compiled(clients, server, pool, views, views, jnp.int32(0),
                                  jnp.int32(i))  # step 9 of the epoch would be a sync step
    jax.block_until_ready(m["loss"])
    times.append(time.time() - t)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  median = float(np.median(times[1:]))
  result = {"clients": args.clients, "batch_size": 1, "cut": args.cut, "head": "V2",
            "queue_size": 6000, "loss_form": args.loss_form, "compile_seconds": compile_s,
            "step_seconds_median": median, "step_seconds_all": times,
            "images_per_second": args.clients / median, "xla_gflop_per_step":
            float(cost.get("flops", 0)) / 1e9, "loss": float(m["loss"]), "machine": machine()}
  out = Path(__file__).parent / "results" / "step_100clients.json"
  out.write_text(json.dumps(result, indent=1))
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
