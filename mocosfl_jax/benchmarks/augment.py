"""Times `two_views` (both MoCo views) for a [clients, batch] block of uint8 images.

Default: 100 clients x batch 1 at 32x32, mocov2 (the reference's cross-client CIFAR-10 setting).
Reports compile time and the median of repeated jitted calls; writes bench/results/augment.json
under the current directory.

  python -m mocosfl_jax.benchmarks.augment [--clients 100 --batch 1 --size 32 --pipeline mocov2
      --repeats 50]                      # or: python bench/augment_bench.py ...
"""
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np
from absl import flags

from mocosfl_jax import cli
from mocosfl_jax.data.augment import two_views


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer("clients", 100, "Clients (leading axis of the image block).", **fv)
  flags.DEFINE_integer("batch", 1, "Images per client.", **fv)
  flags.DEFINE_integer("size", 32, "Image size.", **fv)
  flags.DEFINE_enum("pipeline", "mocov2", ["mocov2", "mocov1", "none"], "Augmentation.", **fv)
  flags.DEFINE_integer("repeats", 50, "Timed calls.", **fv)
  flags.DEFINE_integer("warmup", 3, "Untimed calls first.", **fv)
  flags.DEFINE_string("out", str(pathlib.Path("bench") / "results" / "augment.json"),
                      "Result JSON.", **fv)


def benchmark(args) -> None:
  """Times the two views and writes the result JSON."""
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
          "load_avg_1min": os.getloadavg()[0],  # other load on the machine skews timings
      },
      "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"two_views {args.pipeline} {result['shape']}: median {median * 1e3:.2f} ms "
        f"({result['views_per_s']:.0f} views/s), first call {first_call_s:.1f} s "
        f"on {result['machine']['device']} -> {args.out}")


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, benchmark, argv, errors=())


if __name__ == "__main__":
  main()
