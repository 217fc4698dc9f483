"""Where the CPU step spends its time: XLA ops grouped by kind and by what they compute.

  python -m mocosfl_jax.benchmarks.op_profile [--clients 100] [--cut 2] [--conv-impl auto]
  python -m mocosfl_jax.benchmarks.op_profile --part clients     # the vmapped client slices
  python -m mocosfl_jax.benchmarks.op_profile --part quickstart  # the quickstart's whole step
  (`python bench/profile_server.py ...` is the same command)

Runs `parties.server_step` (ResNet-18, V2 head, K 6000, original loss, batch 1 per client), or
with `--part clients` the pool's vmapped client forward + backward/SGD (`parties.client_send`,
`client_backward`, as the step benchmark times them), or with `--part quickstart` the full
training step of the offline quickstart (`parallel.train_step`, its config, random views), after
warm-up, times medians, then records `--profiled` calls with `jax.profiler` and sums the
durations of XLA's thunks per call two ways: by op kind, the thunk name with its numeric suffix
removed (`ynn_fusion.412` -> `ynn_fusion`), and by source, the jax operation the thunk was
fused from (the compiled HLO's `op_name` metadata with layer numbers removed, so the same
operation of every block adds up: 'backward conv1/kto,kco->ktc/dot_general'; the backward of a
custom VJP, as the Winograd convolution's, keeps its forward's name). Thread time adds
up over XLA's worker threads, so it exceeds the wall time when ops run side by side. Writes
bench/results/<part>_profile.json under the current directory.
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


def thunk_times(trace_dir: str) -> collections.Counter:
  """Sum of thunk durations (ms) by thunk name in the newest trace under `trace_dir`."""
  path = sorted(glob.glob(os.path.join(trace_dir, 'plugins/profile/*/*.trace.json.gz')))[-1]
  events = json.load(gzip.open(path))['traceEvents']
  out = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and not e['name'].startswith(SKIP):
      out[e['name']] += e['dur'] / 1e3
  return out


def op_kind(thunk: str) -> str:
  """'ynn_fusion.412' -> 'ynn_fusion'."""
  return re.sub(r'\.\d+$', '', thunk)


def op_sources(hlo_text: str) -> dict:
  """Instruction name -> the `op_name` metadata jax attached to it, from compiled HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]*)"', line)
    if m:
      out.setdefault(m.group(1), m.group(2))
  return out


def source_label(op_name: str) -> str:
  """An `op_name` without its function and layer names, its direction spelled out.

  'jit(server_step)/transpose(jvp(ServerNet))/layer3/conv1/kto,kco->ktc/dot_general'
  -> 'backward conv1/kto,kco->ktc/dot_general'.
  """
  parts = [p for p in op_name.split('/') if not re.fullmatch(r'(jit\([^)]*\)|layer\d+|block\d+)', p)]
  direction = 'forward'
  if parts and parts[0].startswith('transpose('):
    direction, parts = 'backward', parts[1:]
  elif parts and parts[0].startswith(('jvp(', 'vmap(')):
    parts = parts[1:]
  return f"{direction} {'/'.join(parts)}" if parts else 'other'


def summed_by(thunks: collections.Counter, key) -> collections.Counter:
  """Thunk times summed by `key(thunk name)`."""
  out = collections.Counter()
  for name, ms in thunks.items():
    out[key(name)] += ms
  return out


def by_source(thunks: collections.Counter, sources: dict) -> collections.Counter:
  """Thunk times summed by `source_label` of each thunk's op_name ('unknown' without one)."""
  return summed_by(thunks, lambda name: source_label(sources[name]) if name in sources
                   else 'unknown')


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer('clients', 100, 'Clients in the pool (batch 1 each).', **fv)
  flags.DEFINE_integer('cut', 2, 'ResNet-18 cut layer.', **fv)
  flags.DEFINE_enum('conv-impl', 'auto', ['auto', 'winograd', 'matmul', 'lax'],
                    'Convolution implementation.', **fv)
  flags.DEFINE_integer('reps', 3, 'Timed calls before the profiled one.', **fv)
  flags.DEFINE_enum('part', 'server', ['server', 'clients', 'quickstart'],
                    'The server step, the vmapped clients, or the quickstart training step.', **fv)
  flags.DEFINE_integer('profiled', 3, 'Calls recorded by the profiler (times are per call).',
                       lower_bound=1, **fv)
  flags.DEFINE_string('out', '', 'Default: bench/results/<part>_profile.json.', **fv)


def _server_or_clients(args):
  """(compiled function, call) of `--part server` or `--part clients`; `call()` runs it once."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from mocosfl_jax import parallel
  from mocosfl_jax.algorithm import parties, state
  from mocosfl_jax.algorithm.plan import StepConfig
  from mocosfl_jax.benchmarks.step import client_pass
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
    static = (net, cfg, train_state.tx)
    call_args = (server, jax.random.normal(jax.random.key(1), shape),
                 jax.random.normal(jax.random.key(2), shape), jnp.arange(n, dtype=jnp.int32),
                 jnp.int32(0))
  else:
    f = jax.jit(functools.partial(client_pass, net, cfg, parallel.ClientParallel()))
    static = ()
    views = [jax.random.normal(jax.random.key(i), (n, 1, 32, 32, 3)) for i in (1, 2)]
    call_args = (clients.online, clients.momentum, clients.opt_state, *views,
                 jax.random.normal(jax.random.key(3), shape) * 1e-3,
                 jnp.full((n,), 0.06, jnp.float32))
  compiled = f.lower(*static, *call_args).compile()
  return compiled, functools.partial(compiled, *call_args)


def _quickstart_step():
  """(compiled step, call) of the quickstart's training step; `call()` runs one step, threading
  the donated state through a box, on fixed random views."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from mocosfl_jax import experiment, parallel, quickstart
  from mocosfl_jax.models import build

  exp = experiment.resolve(quickstart.get_config())
  cfg = exp.step
  net = build(exp.model)
  size = exp.model.input_size
  views = [jax.random.normal(jax.random.key(i), (cfg.num_clients, cfg.batch_size, size, size, 3))
           for i in (1, 2)]
  box = [parallel.create_train_state(net, cfg, jax.random.key(0))]
  step_args = (None, *views, jnp.int32(0), jnp.int32(1))
  compiled = parallel.train_step.lower(net, cfg, box[0], *step_args).compile()

  def call():
    box[0], m = compiled(box[0], *step_args)
    return box[0], m
  return compiled, call


def profile(args) -> None:
  """Times and profiles one part of the step; writes and prints both breakdowns."""
  args.out = args.out or str(pathlib.Path('bench') / 'results' / f'{args.part}_profile.json')
  import jax  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.benchmarks.step import machine  # pylint: disable=g-import-not-at-top

  compiled, call = _quickstart_step() if args.part == 'quickstart' else _server_or_clients(args)
  run = lambda: jax.block_until_ready(call())
  run()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', 0.0))
  times = []
  for _ in range(args.reps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(args.profiled):
      run()
    jax.profiler.stop_trace()
    thunks = collections.Counter({k: v / args.profiled for k, v in thunk_times(tmp).items()})
  total = sum(thunks.values())
  kinds = summed_by(thunks, op_kind)
  sources = by_source(thunks, op_sources(compiled.as_text()))
  table = lambda c: [dict(op=k, thread_ms=v, share=v / total) for k, v in c.most_common()]
  res = dict(setting=vars(args), median_s=statistics.median(times), times_s=times,
             gflop=flops / 1e9, thread_ms_total=total, distinct_thunks=len(thunks),
             ops=table(kinds), sources=table(sources), machine=machine())
  pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
  print(f"{args.part} median {res['median_s']:.3f} s, {flops / 1e9:.0f} GFLOP (XLA's count); "
        f"{total:.0f} ms of op time over threads per call, {len(thunks)} distinct thunks")
  for title, rows in (('by op kind', res['ops']), ('by source', res['sources'])):
    print(title)
    for k in rows[:15]:
      print(f"  {k['thread_ms']:8.1f} ms  {100 * k['share']:5.1f}%  {k['op']}")


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, profile, argv, errors=())


if __name__ == '__main__':
  main()
