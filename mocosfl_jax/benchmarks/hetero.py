"""What heterogeneous clients cost per step: the two-group hetero step against the homogeneous
step of the same total images, and against the homogeneous step at the rich batch.

    python -m mocosfl_jax.benchmarks.hetero [--reps 21] [--settings quickstart,resnet18_cut1]
    (`python bench/hetero_step.py ...` is the same command)

10 clients, 20% rich with a 4x batch (hetero string '0.2_0.8|4|0.8_0.2'): clients 0-1 draw 4B
images, clients 2-9 draw B, so a step carries 16B images. Variants, same model and queue:

  hetero        algorithm/hetero_step.py: the rich and the poor group, each vmapped, one server
                batch of the 16B real rows
  homogeneous   parallel.train_step with 10 clients of 1.6B images each (the same 16B images)
  padded        parallel.train_step with 10 clients of 4B images each: the work a masked-padding
                hetero step (every client slot carrying the rich batch, padding rows masked out)
                would do at least, so its time is a lower bound of that design's

One process, the same weights and views for every variant, called in turn (order rotated every
repetition, so machine load falls on all alike); after one untimed call each, medians of wall
and process CPU time per call for non-sync and sync steps, plus XLA's FLOP count and compile
time. Settings (B = 5, so 80 images per step):

  quickstart      the offline quickstart's model (digits at 16 px, width-16 ResNet-18 cut 2,
                  smallV2 head), K 1024
  resnet18_cut1   ResNet-18 cut 1, V2 head, 32 px, K 6000

Writes bench/results/hetero_step.json under the current directory (or --out).
"""
import json
import pathlib

from absl import flags

from mocosfl_jax import cli

SETTINGS = ("quickstart", "resnet18_cut1")
NUM_CLIENTS, RICH, MULTIPLIER, BATCH = 10, 2, 4, 5
VARIANTS = ("hetero", "homogeneous", "padded")


def _setting(name):
  """(model, base StepConfig, image size) of a named setting."""
  # pylint: disable=g-import-not-at-top
  from mocosfl_jax import experiment, quickstart
  from mocosfl_jax.models import SplitConfig
  if name == "quickstart":
    exp = experiment.resolve(quickstart.get_config())
    return exp.model, 1024, exp.train.input_size
  if name != "resnet18_cut1":
    raise ValueError(f"setting {name!r} unknown; valid: {', '.join(SETTINGS)}")
  return SplitConfig(arch="resnet18", cut=1, input_size=32, head="V2"), 6000, 32


def configs(queue_size: int) -> dict:
  """The three variants' StepConfigs (16B images per step for hetero and homogeneous)."""
  from mocosfl_jax.algorithm.plan import StepConfig  # pylint: disable=g-import-not-at-top
  base = dict(num_clients=NUM_CLIENTS, queue_size=queue_size, steps_per_epoch=50, avg_freq=5)
  total = RICH * MULTIPLIER * BATCH + (NUM_CLIENTS - RICH) * BATCH
  if total % NUM_CLIENTS:
    raise ValueError(f"{total} images do not split evenly over {NUM_CLIENTS} clients")
  return {"hetero": StepConfig(batch_size=BATCH, rich_clients=RICH,
                               rich_batch_size=MULTIPLIER * BATCH, **base),
          "homogeneous": StepConfig(batch_size=total // NUM_CLIENTS, **base),
          "padded": StepConfig(batch_size=MULTIPLIER * BATCH, **base)}


def compare(name: str, reps: int) -> dict:
  """The variants of one setting, timed in turn."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from mocosfl_jax import parallel
  from mocosfl_jax.algorithm import hetero_step, state as state_lib
  from mocosfl_jax.benchmarks.interleaved import time_variants
  from mocosfl_jax.benchmarks.step import machine
  from mocosfl_jax.models import build
  model, queue_size, size = _setting(name)
  net = build(model)
  variants = configs(queue_size)
  images = jax.random.normal(jax.random.key(1), (2, 16 * NUM_CLIENTS * BATCH, size, size, 3))

  def views(c):
    if c.rich_clients:
      r, n = c.rich_clients, c.num_clients
      rich, poor = r * c.rich_batch_size, (n - r) * c.batch_size
      split = lambda x: (x[:rich].reshape((r, c.rich_batch_size) + x.shape[1:]),
                         x[rich:rich + poor].reshape((n - r, c.batch_size) + x.shape[1:]))
      return split(images[0]), split(images[1])
    rows = c.num_clients * c.batch_size
    shape = (c.num_clients, c.batch_size, size, size, 3)
    return images[0, :rows].reshape(shape), images[1, :rows].reshape(shape)

  def step(c, st, sync):
    vq, vk = views(c)
    args = (jnp.int32(0), jnp.int32(int(sync)), jnp.bool_(sync))
    if c.rich_clients:
      return hetero_step.train_step, (net, c, st, vq, vk) + args
    return parallel.train_step, (net, c, st, None, vq, vk) + args

  states = {v: state_lib.create_train_state(net, c, jax.random.key(0))
            for v, c in variants.items()}
  out = time_variants(states, lambda v, st, sync: step(variants[v], st, sync), reps)
  for v, c in variants.items():
    out[v] = dict(images_per_step=c.images_per_step, clients=c.num_clients,
                  batch=c.batch_size, rich_clients=c.rich_clients,
                  rich_batch=c.rich_batch_size, **out[v])
  ratio = {f"{v}_over_homogeneous": {k: out[v][k] / out["homogeneous"][k]
                                     for k in ("median_nosync_s", "median_sync_s", "gflop")}
           for v in ("hetero", "padded")}
  return dict(setting=name, model=model.to_dict(), image_size=size, queue_size=queue_size,
              hetero_string=f"0.2_0.8|{MULTIPLIER}|0.8_0.2", reps=reps, variants=out,
              ratios=ratio, load_avg_end=machine()["load_avg"])


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("settings", ["quickstart"], f"Comma list of {', '.join(SETTINGS)}.", **fv)
  flags.DEFINE_integer("reps", 21, "Timed calls per variant and kind of step.", lower_bound=1,
                       **fv)
  flags.DEFINE_string("out", str(pathlib.Path("bench") / "results" / "hetero_step.json"),
                      "Result JSON.", **fv)


def benchmark(args) -> None:
  from mocosfl_jax.benchmarks.step import machine  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(args.settings) - set(SETTINGS))
  if unknown:
    raise ValueError(f"--settings {unknown} unknown; valid: {', '.join(SETTINGS)}")
  report = dict(machine=machine(), results=[])
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  for name in args.settings:
    r = compare(name, args.reps)
    report["results"].append(r)
    print(name, flush=True)
    for v, x in r["variants"].items():
      print(f"  {v:12s} {x['images_per_step']:4d} images: wall {x['median_nosync_s'] * 1e3:.1f} ms "
            f"(sync {x['median_sync_s'] * 1e3:.1f} ms), cpu {x['median_nosync_cpu_s'] * 1e3:.1f} "
            f"ms, {x['gflop']:.2f} GFLOP, compile {x['compile_s']:.0f} s", flush=True)
    out.write_text(json.dumps(report, indent=1))
  print("wrote", out)


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, benchmark, argv, errors=(ValueError,))


if __name__ == "__main__":
  main()
