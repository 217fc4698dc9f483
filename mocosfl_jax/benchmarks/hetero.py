"""What heterogeneous clients cost per step: the two-group hetero step against the homogeneous
step of the same total images, and against the homogeneous step at the rich batch.

    python -m mocosfl_jax.benchmarks.hetero [--reps 21] [--settings quickstart,resnet18_cut1]
                                            [--sampled]
    (`python bench/hetero_step.py ...` is the same command)

10 clients, 20% rich with a 4x batch (hetero string '0.2_0.8|4|0.8_0.2'): clients 0-1 draw 4B
images, clients 2-9 draw B, so a step carries 16B images. Variants, same model and queue:

  hetero        algorithm/hetero_step.py: the rich and the poor group, each vmapped, one server
                batch of the 16B real rows
  homogeneous   parallel.train_step with 10 clients of 1.6B images each (the same 16B images)
  padded        parallel.train_step with 10 clients of 4B images each: the work a masked-padding
                hetero step (every client slot carrying the rich batch, padding rows masked out)
                would do at least, so its time is a lower bound of that design's

With client sampling (`--sampled`): 20 clients, 4 rich (clients 0-3) at 4B, a pool of 10 holding
2 rich clients (the expected count), so the pool also carries 16B images:

  hetero_sampled        the pool's rich and poor group (a HeteroPool), gathered, stepped and
                        written back: one compilation per rich count the sampler draws
  homogeneous_sampled   parallel.train_step, pool of 10 clients of 1.6B images each
  masked_sampled        two groups at their largest, min(R, P) = 4 rich slots at 4B and
                        min(N - R, P) = 10 poor slots at B (26B images): the work a masked step
                        that compiles once would do at least
  padded_sampled        parallel.train_step, pool of 10 clients of 4B images each (40B)

and the number of compilations the sampled step needs over whole runs of the reference's
sampled hetero settings (N = 500 and 200 under auto_adjust), counted from the run's own pools.

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
# Sampling: 20 clients (0-3 rich), a pool of 10 with 2 rich clients (0 and 2).
SAMPLED_CLIENTS, SAMPLED_RICH = 20, 4
SAMPLED_POOL = (5, 0, 12, 7, 13, 15, 9, 18, 11, 2)
# The reference's sampled hetero settings: (N, epochs before auto_adjust); the hetero string is
# the one the reference forces for that N (hetero.REFERENCE_BY_N).
REFERENCE_SAMPLED = ((500, 200), (200, 200))


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


def sampled_configs(queue_size: int) -> dict:
  """The sampled variants' StepConfigs (see the module docstring)."""
  from mocosfl_jax.algorithm.plan import StepConfig  # pylint: disable=g-import-not-at-top
  n, r, p = SAMPLED_CLIENTS, SAMPLED_RICH, len(SAMPLED_POOL)
  base = dict(queue_size=queue_size, steps_per_epoch=50, avg_freq=5)
  total = 2 * MULTIPLIER * BATCH + (p - 2) * BATCH
  return {"hetero_sampled": StepConfig(num_clients=n, sample_ratio=p / n, batch_size=BATCH,
                                       rich_clients=r, rich_batch_size=MULTIPLIER * BATCH,
                                       **base),
          "homogeneous_sampled": StepConfig(num_clients=n, sample_ratio=p / n,
                                            batch_size=total // p, **base),
          "masked_sampled": StepConfig(num_clients=r + p, batch_size=BATCH,
                                       rich_clients=min(r, p), rich_batch_size=MULTIPLIER * BATCH,
                                       **base),
          "padded_sampled": StepConfig(num_clients=n, sample_ratio=p / n,
                                       batch_size=MULTIPLIER * BATCH, **base)}


def compiles_over_runs(seed: int = 0) -> list:
  """Distinct rich counts (= compilations of the sampled step) over whole runs of the
  reference's sampled hetero settings, from the pools a run with `seed` draws (its pool key as
  run/train.py derives it)."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from mocosfl_jax.algorithm import hetero as hetero_lib, plan
  from mocosfl_jax.run import train
  key = train.run_keys(seed)[3]
  out = []
  for n, epochs in REFERENCE_SAMPLED:
    text = hetero_lib.REFERENCE_BY_N[n]
    adj = plan.auto_adjust(n, num_epochs=epochs)
    p = int(adj["sample_ratio"] * n)
    r = hetero_lib.parse(text).rich_clients(n)
    counts = [int((np.asarray(plan.sample_pool(key, e, n, p)) < r).sum())
              for e in range(adj["num_epochs"])]
    out.append(dict(num_clients=n, hetero=text, pool_size=p, rich_clients=r,
                    epochs=adj["num_epochs"], compilations=len(set(counts)),
                    rich_in_pool_min=min(counts), rich_in_pool_max=max(counts),
                    rich_in_pool_mean=float(np.mean(counts)), masked_rich_slots=min(r, p)))
  return out


def compare(name: str, reps: int, sampled: bool = False) -> dict:
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
  variants = sampled_configs(queue_size) if sampled else configs(queue_size)
  images = jax.random.normal(jax.random.key(1), (2, 16 * NUM_CLIENTS * BATCH, size, size, 3))

  def pool_of(c):
    return None if c.pool_size == c.num_clients else jnp.array(SAMPLED_POOL, jnp.int32)

  def views(c):
    if c.rich_clients:
      hp = None if pool_of(c) is None else hetero_step.split_pool(SAMPLED_POOL, c)
      r = c.rich_clients if hp is None else hp.rich.shape[0]
      p = c.pool_size
      rich, poor = r * c.rich_batch_size, (p - r) * c.batch_size
      split = lambda x: (x[:rich].reshape((r, c.rich_batch_size) + x.shape[1:]),
                         x[rich:rich + poor].reshape((p - r, c.batch_size) + x.shape[1:]))
      return split(images[0]), split(images[1]), hp
    rows = c.pool_size * c.batch_size
    shape = (c.pool_size, c.batch_size, size, size, 3)
    return images[0, :rows].reshape(shape), images[1, :rows].reshape(shape), None

  def step(c, st, sync):
    vq, vk, hp = views(c)
    args = (jnp.int32(0), jnp.int32(int(sync)), jnp.bool_(sync))
    if c.rich_clients:
      return hetero_step.train_step, (net, c, st, vq, vk) + args + (hp,)
    return parallel.train_step, (net, c, st, pool_of(c), vq, vk) + args

  states = {v: state_lib.create_train_state(net, c, jax.random.key(0))
            for v, c in variants.items()}
  out = time_variants(states, lambda v, st, sync: step(variants[v], st, sync), reps)
  for v, c in variants.items():
    images_per_step = c.images_per_step
    if v == "hetero_sampled":     # this pool's own count (images_per_step: the most a pool holds)
      images_per_step = sum((c.rich_batch_size if i < c.rich_clients else c.batch_size)
                            for i in SAMPLED_POOL)
    out[v] = dict(images_per_step=images_per_step, clients=c.num_clients, pool=c.pool_size,
                  batch=c.batch_size, rich_clients=c.rich_clients,
                  rich_batch=c.rich_batch_size, **out[v])
  suffix = "_sampled" if sampled else ""
  base = out["homogeneous" + suffix]
  ratio = {f"{v}_over_homogeneous": {k: out[v][k] / base[k]
                                     for k in ("median_nosync_s", "median_sync_s", "gflop")}
           for v in out if not v.startswith("homogeneous")}
  extra = dict(sampled_pool=list(SAMPLED_POOL), reference_runs=compiles_over_runs()) if sampled \
      else {}
  return dict(setting=name + suffix, model=model.to_dict(), image_size=size,
              queue_size=queue_size, hetero_string=f"0.2_0.8|{MULTIPLIER}|0.8_0.2", reps=reps,
              variants=out, ratios=ratio, load_avg_end=machine()["load_avg"], **extra)


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list("settings", ["quickstart"], f"Comma list of {', '.join(SETTINGS)}.", **fv)
  flags.DEFINE_integer("reps", 21, "Timed calls per variant and kind of step.", lower_bound=1,
                       **fv)
  flags.DEFINE_bool("sampled", False, "Also the client-sampling variants (20 clients, a pool of "
                    "10) and the reference runs' compilation counts.", **fv)
  flags.DEFINE_string("out", str(pathlib.Path("bench") / "results" / "hetero_step.json"),
                      "Result JSON.", **fv)


def benchmark(args) -> None:
  from mocosfl_jax.benchmarks.interleaved import start_report  # pylint: disable=g-import-not-at-top
  report, out = start_report(args.settings, SETTINGS, args.out)
  runs = [(name, False) for name in args.settings]
  runs += [(name, True) for name in args.settings if args.sampled]
  for name, sampled in runs:
    r = compare(name, args.reps, sampled)
    report["results"].append(r)
    print(r["setting"], flush=True)
    for v, x in r["variants"].items():
      print(f"  {v:12s} {x['images_per_step']:4d} images: wall {x['median_nosync_s'] * 1e3:.1f} ms "
            f"(sync {x['median_sync_s'] * 1e3:.1f} ms), cpu {x['median_nosync_cpu_s'] * 1e3:.1f} "
            f"ms, {x['gflop']:.2f} GFLOP, compile {x['compile_s']:.0f} s", flush=True)
    for x in r.get("reference_runs", ()):
      print(f"  N {x['num_clients']} ({x['hetero']}), pools of {x['pool_size']}, "
            f"{x['epochs']} epochs: {x['rich_in_pool_min']}-{x['rich_in_pool_max']} rich per "
            f"pool, {x['compilations']} compilations (masked: {x['masked_rich_slots']} rich "
            "slots every step)", flush=True)
    out.write_text(json.dumps(report, indent=1))
  print("wrote", out)


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, benchmark, argv, errors=(ValueError,))


if __name__ == "__main__":
  main()
