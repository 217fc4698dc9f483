"""What frozen clients (c_lr = 0, TAResSFL's deployment) save per step: the jitted training step
with c_lr = 0 against the same step with a tiny positive c_lr, side by side.

    python -m mocosfl_jax.benchmarks.frozen [--reps 21] [--settings quickstart,resnet18_cut1]
    (`python bench/frozen_step.py ...` is the same command)

One process, the same inputs for both variants, called alternately (the order swapped every
repetition, so machine load falls on both alike); after one untimed call each, medians of the
wall time and of the process CPU time per call, for non-sync and sync steps separately, plus
XLA's FLOP count and the compile time of each variant. Full participation (pool None, in place),
as the training loop. Settings:

  quickstart      the offline quickstart's step (mocosfl_jax/quickstart.py: digits at 16 px,
                  width-16 ResNet-18 cut 2, smallV2, 20 clients x B 8, K 1024)
  resnet18_cut1   ResNet-18 cut 1, V2, 16 clients x B 1 at 32 px, K 6000

Writes bench/results/frozen_step.json under the current directory (or --out).
"""
import dataclasses
import json
import pathlib

from absl import flags

from mocosfl_jax import cli

SETTINGS = ("quickstart", "resnet18_cut1")


def _setting(name):
  """(model, step config, image size) of a named setting."""
  # pylint: disable=g-import-not-at-top
  from mocosfl_jax import experiment, quickstart
  from mocosfl_jax.algorithm.plan import StepConfig
  from mocosfl_jax.models import SplitConfig
  if name == "quickstart":
    exp = experiment.resolve(quickstart.get_config())
    return exp.model, exp.step, exp.train.input_size
  model = SplitConfig(arch="resnet18", cut=1, input_size=32, head="V2")
  cfg = StepConfig(num_clients=16, batch_size=1, queue_size=6000, steps_per_epoch=50, avg_freq=5)
  return model, cfg, 32


def compare(name: str, reps: int) -> dict:
  """The two variants of one setting, timed alternately."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from mocosfl_jax import parallel
  from mocosfl_jax.algorithm import state as state_lib
  from mocosfl_jax.benchmarks.interleaved import time_variants
  from mocosfl_jax.benchmarks.step import machine
  from mocosfl_jax.models import build
  model, cfg, size = _setting(name)
  net = build(model)
  variants = {"frozen": dataclasses.replace(cfg, c_lr=0.0),
              "training": dataclasses.replace(cfg, c_lr=1e-6)}
  kq, kk = jax.random.split(jax.random.key(1))
  shape = (cfg.pool_size, cfg.batch_size, size, size, 3)
  vq, vk = jax.random.normal(kq, shape), jax.random.normal(kk, shape)
  states = {v: state_lib.create_train_state(net, c, jax.random.key(0))
            for v, c in variants.items()}

  def call(v, st, sync):
    return parallel.train_step, (net, variants[v], st, None, vq, vk, jnp.int32(0),
                                 jnp.int32(int(sync)), jnp.bool_(sync))

  out = time_variants(states, call, reps)
  for v, c in variants.items():
    out[v] = dict(c_lr=c.c_lr, **out[v])
  saving = {f"{k}": 1.0 - out["frozen"][k] / out["training"][k]
            for k in ("median_nosync_s", "median_sync_s", "median_nosync_cpu_s",
                      "median_sync_cpu_s", "gflop")}
  return dict(setting=name, model=model.to_dict(), clients=cfg.num_clients,
              batch=cfg.batch_size, image_size=size, reps=reps, variants=out, saving=saving,
              load_avg_end=machine()["load_avg"])


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("settings", list(SETTINGS), f"Comma list of {', '.join(SETTINGS)}.", **fv)
  flags.DEFINE_integer("reps", 21, "Timed calls per variant and kind of step.", lower_bound=1,
                       **fv)
  flags.DEFINE_string("out", str(pathlib.Path("bench") / "results" / "frozen_step.json"),
                      "Result JSON.", **fv)


def benchmark(args) -> None:
  from mocosfl_jax.benchmarks.interleaved import start_report  # pylint: disable=g-import-not-at-top
  report, out = start_report(args.settings, SETTINGS, args.out)
  for name in args.settings:
    r = compare(name, args.reps)
    report["results"].append(r)
    print(name, flush=True)
    for v, x in r["variants"].items():
      print(f"  {v:8s} c_lr={x['c_lr']:g}: wall {x['median_nosync_s'] * 1e3:.0f} ms "
            f"(sync {x['median_sync_s'] * 1e3:.0f} ms), cpu {x['median_nosync_cpu_s'] * 1e3:.0f} ms "
            f"(sync {x['median_sync_cpu_s'] * 1e3:.0f} ms), {x['gflop']:.2f} GFLOP, compile "
            f"{x['compile_s']:.0f} s", flush=True)
    s = r["saving"]
    print(f"  frozen saves: wall {s['median_nosync_s']:.1%} (sync {s['median_sync_s']:.1%}), "
          f"cpu {s['median_nosync_cpu_s']:.1%} (sync {s['median_sync_cpu_s']:.1%}), "
          f"FLOPs {s['gflop']:.1%}", flush=True)
    out.write_text(json.dumps(report, indent=1))
  print("wrote", out)


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, benchmark, argv, errors=(ValueError,))


if __name__ == "__main__":
  main()
