"""Times `two_views` (both MoCo views) for a [clients, batch] block of uint8 images.

Default: 100 clients x batch 1 at 32x32, mocov2 (the reference's 100-client CIFAR-10 setting).
Reports compile time and the median of repeated jitted calls; writes bench/results/augment.json.

  python bench/augment_bench.py [--clients 100 --batch 1 --size 32 --pipeline mocov2 --repeats 50]
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

from mocosfl_jax.data.augment import two_views


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", type=int, default=100)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--pipeline", default="mocov2", choices=("mocov2", "mocov1", "none"))
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" /
                                            "augment.json"))
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (args.clients, args.batch, args.size, args.size, 3),
                                       dtype=np.uint8))
  mean = jax.device_put(np.array([0.4914, 0.4822, 0.4465], np.float32))
  std = jax.device_put(np.array([0.2023, 0.1994, 0.2010], np.float32))
  keys = jax.random.split(jax.random.key(0), args.warmup + args.repeats)

  t0 = time.perf_counter()
  jax.block_until_ready(two_views(keys[0], images, mean, std, pipeline=args.pipeline))
  first_call_s = time.perf_counter() - t0  # trace + compile (+ persistent cache lookup) + run
  for i in range(1, args.warmup):
    jax.block_until_ready(two_views(keys[i], images, mean, std, pipeline=args.pipeline))
  times = []
  for i in range(args.warmup, args.warmup + args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(two_views(keys[i], images, mean, std, pipeline=args.pipeline))
    times.append(time.perf_counter() - t0)

  n_images = args.clients * args.batch
  median = statistics.median(times)
  device = jax.devices()[0]
  result = {
      "benchmark": "two_views",
      "pipeline": args.pipeline,
      "shape": [args.clients, args.batch, args.size, args.size, 3],
      "median_s": median,
      "min_s": min(times),
      "max_s": max(times),
      "repeats": args.repeats,
      "first_call_s": first_call_s,
      "views_per_s": 2 * n_images / median,
      "machine": {
          "platform": platform.platform(),
          "processor": platform.processor() or platform.machine(),
          "python": platform.python_version(),
          "cpu_count": os.cpu_count(),
          "jax_version": jax.__version__,
          "backend": jax.default_backend(),
          "device": getattr(device, "device_kind", str(device)),
          "num_devices": jax.device_count(),
          "load_avg_1min": os.getloadavg()[0],  # this 2-core machine is often shared
      },
      "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"two_views {args.pipeline} {result['shape']}: median {median * 1e3:.2f} ms "
        f"({result['views_per_s']:.0f} views/s), first call {first_call_s:.1f} s "
        f"on {result['machine']['device']} -> {args.out}")


if __name__ == "__main__":
  main()
