"""Where the CPU server step spends its time: XLA ops grouped by kind, from a profiler trace.

  python bench/profile_server.py [--clients 100] [--cut 2] [--conv-impl auto]

Runs `protocol.server_step` (ResNet-18, V2 head, K 6000, original loss, batch 1 per client) after
warm-up, times medians, then records one call with `jax.profiler` and sums the durations of XLA's
thunks by name with the numeric suffix removed (`ynn_fusion.412` -> `ynn_fusion`). Thread time
adds up over XLA's worker threads, so it exceeds the wall time when ops run side by side.
Writes bench/results/server_profile.json.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP = ('ThunkExecutor', '$', 'SlinkyThreadPool', 'PjitFunction')


def op_times(trace_dir: str) -> collections.Counter:
  """Sum of thunk durations (ms) by op kind in the newest trace under `trace_dir`."""
  path = sorted(glob.glob(os.path.join(trace_dir, 'plugins/profile/*/*.trace.json.gz')))[-1]
  events = json.load(gzip.open(path))['traceEvents']
  out = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and not e['name'].startswith(SKIP):
      out[re.sub(r'\.\d+$', '', e['name'])] += e['dur'] / 1e3
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--clients', type=int, default=100)
  ap.add_argument('--cut', type=int, default=2)
  ap.add_argument('--conv-impl', default='auto', choices=('auto', 'winograd', 'matmul', 'lax'))
  ap.add_argument('--reps', type=int, default=3)
  ap.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'server_profile.json'))
  args = ap.parse_args()
  sys.path.insert(0, str(ROOT))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mocosfl_jax import protocol, state  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.models import SplitConfig, build  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.plan import StepConfig  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT / 'bench'))
  from step_bench import machine  # pylint: disable=g-import-not-at-top

  n = args.clients
  net = build(SplitConfig(arch='resnet18', cut=args.cut, input_size=32, head='V2',
                          conv_impl=args.conv_impl))
  cfg = StepConfig(num_clients=n, batch_size=1, queue_size=6000, loss_form='original',
                   pool_size=n, steps_per_epoch=50, avg_freq=5)
  _, server = state.init_state(net, cfg, jax.random.key(0))
  shape = (n, 1) + net.smashed_shape
  a_q = jax.random.normal(jax.random.key(1), shape)
  a_k = jax.random.normal(jax.random.key(2), shape)
  pool = jnp.arange(n, dtype=jnp.int32)
  f = jax.jit(protocol.server_step, static_argnums=(0, 1))
  run = lambda: jax.block_until_ready(f(net, cfg, server, a_q, a_k, pool, jnp.int32(0)))
  run()
  cost = f.lower(net, cfg, server, a_q, a_k, pool, jnp.int32(0)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', 0.0))
  times = []
  for _ in range(args.reps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    run()
    jax.profiler.stop_trace()
    ops = op_times(tmp)
  total = sum(ops.values())
  kinds = [dict(op=k, thread_ms=v, share=v / total) for k, v in ops.most_common()]
  res = dict(setting=vars(args), median_s=statistics.median(times), times_s=times,
             gflop=flops / 1e9, thread_ms_total=total, ops=kinds, machine=machine())
  pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
  print(f"server step median {res['median_s']:.3f} s, {flops / 1e9:.0f} GFLOP (XLA's count); "
        f"{total:.0f} ms of op time over threads")
  for k in kinds[:12]:
    print(f"  {k['thread_ms']:8.1f} ms  {100 * k['share']:5.1f}%  {k['op']}")


if __name__ == '__main__':
  main()
