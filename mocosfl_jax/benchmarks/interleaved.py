"""Variants of one jitted step timed side by side in one process (benchmarks/frozen.py,
benchmarks/hetero.py).

Each variant is compiled once for XLA's FLOP count and its compile time; then, after one untimed
call each, every repetition calls all variants in turn, for non-sync and sync steps, starting
from a variant that rotates with the repetition (so machine load falls on all alike). Medians
of the wall time and of the process CPU time per call are reported.
"""
import pathlib
import statistics
import time

import jax


def start_report(settings, valid, out: str):
  """Refuses --settings names outside `valid`; returns (the report, with this machine and no
  results yet, and the output path, its folder made)."""
  from mocosfl_jax.benchmarks.step import machine  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(settings) - set(valid))
  if unknown:
    raise ValueError(f"--settings {unknown} unknown; valid: {', '.join(valid)}")
  path = pathlib.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  return dict(machine=machine(), results=[]), path


def time_variants(states: dict, call, reps: int) -> dict:
  """Times the variants of `states` ({name: initial state}, updated in place).

  Args:
    states: the state each variant's step starts from; each call's new state replaces it.
    call: call(name, state, sync) -> (jitted step, its arguments); the step returns
      (state, metrics).
    reps: timed calls per variant and kind of step.

  Returns:
    {name: dict(compile_s, gflop, median_nosync_s, median_sync_s, median_nosync_cpu_s,
    median_sync_cpu_s, nosync_s, sync_s)}, the last two the timed wall times.
  """
  out = {}
  for v in states:
    fn, args = call(v, states[v], False)
    t0 = time.perf_counter()
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[v] = dict(compile_s=time.perf_counter() - t0,
                  gflop=float((cost or {}).get("flops", 0.0)) / 1e9)
  wall = {(v, s): [] for v in states for s in (False, True)}
  cpu = {(v, s): [] for v in states for s in (False, True)}
  names = list(states)
  for r in range(reps + 1):                       # r = 0: untimed (the jit wrapper's first call)
    order = names[r % len(names):] + names[:r % len(names)]
    for sync in (False, True):
      for v in order:
        fn, args = call(v, states[v], sync)
        t0, c0 = time.perf_counter(), time.process_time()
        states[v], m = fn(*args)
        jax.block_until_ready((states[v], m))
        if r:
          wall[(v, sync)].append(time.perf_counter() - t0)
          cpu[(v, sync)].append(time.process_time() - c0)
  for v in states:
    for sync, key in ((False, "nosync"), (True, "sync")):
      out[v][f"median_{key}_s"] = statistics.median(wall[(v, sync)])
      out[v][f"median_{key}_cpu_s"] = statistics.median(cpu[(v, sync)])
      out[v][f"{key}_s"] = wall[(v, sync)]
  return out
