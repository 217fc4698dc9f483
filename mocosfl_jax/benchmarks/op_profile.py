"""Where the CPU step spends its time: XLA ops grouped by kind, from a profiler trace.

  python -m mocosfl_jax.benchmarks.op_profile [--clients 100] [--cut 2] [--conv-impl auto]
  python -m mocosfl_jax.benchmarks.op_profile --part clients    # the vmapped client slices
  (`python bench/profile_server.py ...` is the same command)

Runs `parties.server_step` (ResNet-18, V2 head, K 6000, original loss, batch 1 per client), or
with `--part clients` the pool's vmapped client forward + backward/SGD (`parties.client_send`,
`client_backward`, as the step benchmark times them), after warm-up, times medians, then records one
call with `jax.profiler` and sums the durations of XLA's thunks by name with the numeric suffix
removed (`ynn_fusion.412` -> `ynn_fusion`). Thread time adds up over XLA's worker threads, so it
exceeds the wall time when ops run side by side. Writes bench/results/<part>_profile.json under
the current directory.
"""
import collections
import functools
import glob
import gzip
import json
import os
import pathlib
import re
import statistics
import tempfile
import time

from absl import flags

from mocosfl_jax import cli

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


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer('clients', 100, 'Clients in the pool (batch 1 each).', **fv)
  flags.DEFINE_integer('cut', 2, 'ResNet-18 cut layer.', **fv)
  flags.DEFINE_enum('conv-impl', 'auto', ['auto', 'winograd', 'matmul', 'lax'],
                    'Convolution implementation.', **fv)
  flags.DEFINE_integer('reps', 3, 'Timed calls before the profiled one.', **fv)
  flags.DEFINE_enum('part', 'server', ['server', 'clients'], 'Which side of the step.', **fv)
  flags.DEFINE_string('out', '', 'Default: bench/results/<part>_profile.json.', **fv)


def profile(args) -> None:
  """Times and profiles one part of the step; writes and prints the op-kind breakdown."""
  args.out = args.out or str(pathlib.Path('bench') / 'results' / f'{args.part}_profile.json')
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from mocosfl_jax import parallel
  from mocosfl_jax.algorithm import parties, state
  from mocosfl_jax.algorithm.plan import StepConfig
  from mocosfl_jax.benchmarks.step import client_pass, machine
  from mocosfl_jax.models import SplitConfig, build

  n = args.clients
  net = build(SplitConfig(arch='resnet18', cut=args.cut, input_size=32, head='V2',
                          conv_impl=args.conv_impl))
  cfg = StepConfig(num_clients=n, batch_size=1, queue_size=6000, loss_form='original',
                   pool_size=n, steps_per_epoch=50, avg_freq=5)
  train_state = state.create_train_state(net, cfg, jax.random.key(0))
  clients, server = train_state.clients, train_state.server
  shape = (n, 1) + net.smashed_shape
  if args.part == 'server':
    f = jax.jit(parties.server_step, static_argnums=(0, 1, 2))
    call_args = (net, cfg, train_state.tx, server, jax.random.normal(jax.random.key(1), shape),
                 jax.random.normal(jax.random.key(2), shape), jnp.arange(n, dtype=jnp.int32),
                 jnp.int32(0))
  else:
    f = jax.jit(functools.partial(client_pass, net, cfg, parallel.ClientParallel()))
    views = [jax.random.normal(jax.random.key(i), (n, 1, 32, 32, 3)) for i in (1, 2)]
    call_args = (clients.online, clients.momentum, clients.opt_state, *views,
                 jax.random.normal(jax.random.key(3), shape) * 1e-3,
                 jnp.full((n,), 0.06, jnp.float32))
  run = lambda: jax.block_until_ready(f(*call_args))
  run()
  cost = f.lower(*call_args).compile().cost_analysis()
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
  print(f"{args.part} median {res['median_s']:.3f} s, {flops / 1e9:.0f} GFLOP (XLA's count); "
        f"{total:.0f} ms of op time over threads")
  for k in kinds[:12]:
    print(f"  {k['thread_ms']:8.1f} ms  {100 * k['share']:5.1f}%  {k['op']}")


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, profile, argv, errors=())


if __name__ == '__main__':
  main()
