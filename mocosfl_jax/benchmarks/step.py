"""Times the pieces of one MocoSFL step on this machine (flax's benchmark style).

For each (clients, cut) setting, in one process and one run, after warm-up, medians of repeated
calls of: the client side vmapped and the same per-client functions called in a Python loop
(the reference's structure), the two-view augmentation, the server step, the sync and the full
step. Each result records XLA's FLOP count, achieved GFLOP/s, the fraction of this machine's
conv-training peak (measured by this script), peak memory (RSS high-water mark of the setting's
own subprocess), compile time, recompilations across steps/syncs/epochs, and the machine.

  python -m mocosfl_jax.benchmarks.step                            # default grid, 2 threads
  python -m mocosfl_jax.benchmarks.step --threads 1 --grid 100:2     # one setting, one core
  python -m mocosfl_jax.benchmarks.step --grid 10000@100:1 --only full   # 10000 registered clients
  python -m mocosfl_jax.benchmarks.step --torch-python /tmp/tv/bin/python  # + the PyTorch step

(`python bench/step_bench.py` is the same command.)

Grid entries are CLIENTS[@POOL]:CUT; images per step are 100 (B = 100 // POOL, at least 1),
ResNet-18, V2 head, K 6000, original symmetric loss, synthetic CIFAR-shaped data. Each setting
runs in its own subprocess (clean memory high-water mark) with GLIBC_TUNABLES=
glibc.malloc.hugetlb=1 (2 MiB pages for XLA's large temporaries, whose page faults otherwise
dominate some large concatenations) unless --no-hugetlb. --threads 1 pins to one core (taskset)
and turns off XLA's multi-threaded Eigen. Writes bench/results/step_<threads>t.json under the
current directory (see bench/README.md). `client_pass`, `conv_peak` and `machine` are reused by
the other benchmarks.
"""
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

from absl import flags

import mocosfl_jax
from mocosfl_jax import cli

RESULTS = pathlib.Path('bench') / 'results'
TORCH_SCRIPT = 'bench/torch_reference.py'
DEFAULT_GRID = '5:1,20:1,100:1,1000@100:1,5:2,20:2,100:2,1000@100:2,100:5,100:9'


def machine() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  cpu = ''
  try:
    cpu = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
               if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return dict(platform=platform.platform(), cpu=cpu or platform.processor(),
              cores=os.cpu_count(), affinity=sorted(os.sched_getaffinity(0)),
              load_avg=os.getloadavg(), python=platform.python_version(),
              jax=jax.__version__, backend=jax.default_backend(), devices=jax.device_count(),
              xla_flags=os.environ.get('XLA_FLAGS', ''),
              glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),
              time_utc=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))


def _median_time(fn, reps, warmup=1):
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    jax.block_until_ready(fn())
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts


def _compiled(jitted, *args, **kw):
  t0 = time.perf_counter()
  comp = jitted.lower(*args, **kw).compile()
  ct = time.perf_counter() - t0
  cost = comp.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return comp, ct, float((cost or {}).get('flops', 0.0))


def _record(name, med, ts, flops, compile_s, peak, extra=None):
  r = dict(name=name, median_s=med, times_s=ts, gflop=flops / 1e9, compile_s=compile_s,
           gflops_per_s=flops / med / 1e9 if med else 0.0,
           peak_fraction=(flops / med / 1e9) / peak if med and peak else 0.0)
  r.update(extra or {})
  return r


def conv_peak(reps=3) -> dict:
  """This machine's conv-training peak: best GFLOP/s of a 3x3 64->64 conv fwd+bwd at 32x32,
  batch 128, over XLA's direct conv and the shifted-view matmul, and a 2048^3 matmul."""
  import jax, jax.numpy as jnp  # pylint: disable=g-import-not-at-top,multiple-imports
  from jax import lax  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.models.conv import conv_matmul  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (128, 32, 32, 64))
  w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64)) * 0.05
  direct = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), [(1, 1)] * 2,
                                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  flops = 3 * 2 * 128 * 32 * 32 * 9 * 64 * 64        # fwd + dgrad + wgrad, direct-conv count
  out = {}
  for name, f in (('lax', direct), ('matmul', lambda x, w: conv_matmul(x, w, 1, 1))):
    g = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
    med, _ = _median_time(lambda: g(x, w), reps)
    out[f'conv_{name}_gflops'] = flops / med / 1e9
  a = jax.random.normal(jax.random.key(2), (2048, 2048))
  mm = jax.jit(lambda a: a @ a)
  med, _ = _median_time(lambda: mm(a), reps)
  out['gemm_gflops'] = 2 * 2048 ** 3 / med / 1e9
  out['conv_training_peak_gflops'] = max(out['conv_lax_gflops'], out['conv_matmul_gflops'])
  return out


def client_pass(net, cfg, par, on, mom, opt, vq, vk, grads, lrs):
  """The pool's client side of a step: forward (mapped as `par` says), then backward + SGD."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.algorithm import parties, state  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.algorithm.mapping import map_clients  # pylint: disable=g-import-not-at-top
  fwd = functools.partial(parties.client_send, net, cfg)
  a_q, a_k, on, mom, resid = map_clients(par, fwd, on, mom, vq, vk)
  bwd = functools.partial(parties.client_receive, net, cfg, state.optimizer(cfg))
  on, opt = jax.vmap(bwd)(on, opt, vq, vk, grads, lrs, resid)
  return a_q, a_k, on, mom, opt


def run_setting(args) -> dict:
  """One (clients, pool, cut) setting; runs inside its own subprocess."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax, jax.numpy as jnp  # pylint: disable=g-import-not-at-top,multiple-imports
  # pylint: disable=g-import-not-at-top
  from mocosfl_jax import parallel
  from mocosfl_jax.algorithm import parties, state, sync
  from mocosfl_jax.benchmarks.compiles import count_compiles
  from mocosfl_jax.data import augment  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.models import SplitConfig, build  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.models.conv import resolve_conv_impl  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.algorithm.plan import StepConfig  # pylint: disable=g-import-not-at-top

  n, pool, cut = args.clients, args.pool or args.clients, args.cut
  b = max(args.images // pool, 1)
  conv_impl = resolve_conv_impl(args.conv_impl)         # recorded resolved
  net = build(SplitConfig(arch='resnet18', cut=cut, input_size=32, head='V2', conv_impl=conv_impl))
  cfg = StepConfig(num_clients=n, batch_size=b, queue_size=6000, loss_form='original',
                   pool_size=pool, steps_per_epoch=50, avg_freq=5)
  par = parallel.ClientParallel(args.client_parallel, args.client_chunk)
  only = set(args.only.split(',')) if args.only else None
  want = lambda k: only is None or k in only
  peak = args.peak
  res = dict(setting=dict(clients=n, pool=pool, batch=b, cut=cut, images=pool * b,
                          conv_impl=conv_impl, client_parallel=par.mode,
                          client_chunk=par.chunk, threads=args.threads), results=[])
  out = res['results']
  key = jax.random.key(0)
  t0 = time.perf_counter()
  train_state = state.create_train_state(net, cfg, key)
  clients, server, tx = train_state.clients, train_state.server, train_state.tx
  jax.block_until_ready(clients)
  res['init_s'] = time.perf_counter() - t0
  pool_ids = jnp.arange(pool, dtype=jnp.int32)
  images = jax.random.randint(jax.random.key(1), (pool, b, 32, 32, 3), 0, 256).astype(jnp.uint8)
  mean, std = jnp.array([0.4914, 0.4822, 0.4465]), jnp.array([0.2470, 0.2435, 0.2616])
  aug = jax.jit(functools.partial(augment.two_views, pipeline='mocov2'))
  vq, vk = aug(jax.random.key(2), images, mean, std)
  reps = args.reps

  if want('augment'):
    comp, ct, fl = _compiled(aug, jax.random.key(3), images, mean, std)
    med, ts = _median_time(lambda: comp(jax.random.key(3), images, mean, std), reps * 3)
    out.append(_record('augment', med, ts, fl, ct, peak))

  lrs = jnp.full((pool,), 0.06, jnp.float32)
  rows = on = mom = opt = None
  if want('clients') or want('sync'):      # a copy of the pool's state: only when timed
    rows = parallel.gather_pool(None, clients, pool_ids)
    on, mom, opt = rows.online, rows.momentum, rows.opt_state

  clients_fb = functools.partial(client_pass, net, cfg, par)
  smashed = (pool, cfg.rows_per_client // 1) + net.smashed_shape
  grads = jax.random.normal(jax.random.key(4), smashed) * 1e-3
  if want('clients'):
    f = jax.jit(clients_fb)
    comp, ct, fl = _compiled(f, on, mom, opt, vq, vk, grads, lrs)
    med, ts = _median_time(lambda: comp(on, mom, opt, vq, vk, grads, lrs), reps)
    out.append(_record('clients_vmap', med, ts, fl, ct, peak))
    if not args.no_loop:           # the reference's structure: one client at a time
      fwd1 = jax.jit(parties.client_send, static_argnums=(0, 1))
      bwd1 = jax.jit(parties.client_receive, static_argnums=(0, 1, 2))
      row = lambda t, i: jax.tree.map(lambda x: x[i], t)
      per = [(row(on, i), row(mom, i), row(opt, i), vq[i], vk[i], grads[i]) for i in range(pool)]

      def loop():
        last = None
        for o, m, s, q, k, g in per:
          a_q, a_k, o2, m2, _ = fwd1(net, cfg, o, m, q, k)
          last = bwd1(net, cfg, tx, o2, s, q, k, g, jnp.float32(0.06))
        return last

      t1 = time.perf_counter()
      jax.block_until_ready(loop())
      ct_loop = time.perf_counter() - t1
      med_l, ts_l = _median_time(loop, max(1, reps // 2), warmup=0)
      out.append(_record('clients_loop', med_l, ts_l, fl, ct_loop, peak,
                         dict(speedup_vmap=med_l / med)))

  a_q = jax.random.normal(jax.random.key(5), smashed)
  a_k = jax.random.normal(jax.random.key(6), smashed)
  if want('server'):
    f = jax.jit(parties.server_step, static_argnums=(0, 1, 2))
    comp, ct, fl = _compiled(f, net, cfg, tx, server, a_q, a_k, pool_ids, jnp.int32(0))
    med, ts = _median_time(lambda: comp(server, a_q, a_k, pool_ids, jnp.int32(0)), reps)
    out.append(_record('server', med, ts, fl, ct, peak))

  if want('sync'):
    # FedAvg of the pool's rows, written back to every row (what a sync adds to a step).
    f = jax.jit(lambda rows: sync.fedavg_if(True, rows, cfg.momentum_sync, None, par),
                donate_argnums=(0,))
    comp, ct, fl = _compiled(f, rows)
    box = [rows]

    def run_sync():
      box[0], m = comp(box[0])
      return m
    med, ts = _median_time(run_sync, reps * 3)
    out.append(_record('sync', med, ts, fl, ct, peak))
    del box

  if want('full'):
    kw = dict(par=par)
    # As the training loop: with full participation the pool is None (in place, natural order).
    step_pool = None if pool == n else pool_ids
    res['setting']['pool_in_place'] = step_pool is None
    comp, ct, fl = _compiled(parallel.train_step, net, cfg, train_state, step_pool, vq, vk,
                             jnp.int32(0), jnp.int32(0), jnp.bool_(False), **kw)
    res['full_step_compile_s'] = ct
    sched = [(e, bi, bool(s)) for e, bi, s in ((0, 0, 0), (0, 1, 1), (1, 0, 0), (1, 4, 1))]
    box = [train_state]
    times = {False: [], True: []}
    recompiles = 0
    for i in range(reps + len(sched)):
      e, bi, s = sched[i % len(sched)]
      with count_compiles(parallel.train_step) as compiles:
        t1 = time.perf_counter()
        box[0], m = parallel.train_step(net, cfg, box[0], step_pool, vq, vk, jnp.int32(e),
                                        jnp.int32(bi), jnp.bool_(s), **kw)
        jax.block_until_ready(m)
        elapsed = time.perf_counter() - t1
      if i >= 1:          # the first call pays the compile (cache miss of the jit wrapper)
        times[s].append(elapsed)
        recompiles += compiles.count
    allt = times[False] + times[True]
    med = statistics.median(allt)
    out.append(_record('full_step', med, allt, fl, ct, peak, dict(
        images_per_s=pool * b / med, steps_per_s=1 / med, recompilations=recompiles,
        median_nosync_s=statistics.median(times[False]),
        median_sync_s=statistics.median(times[True]) if times[True] else None,
        loss=float(m['loss']))))
  res['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  res['load_avg_end'] = os.getloadavg()
  return res


def parse_grid(text):
  out = []
  for item in text.split(','):
    left, cut = item.split(':')
    n, _, p = left.partition('@')
    out.append((int(n), int(p) if p else 0, int(cut)))
  return out


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('grid', DEFAULT_GRID, 'Comma list of CLIENTS[@POOL]:CUT settings.', **fv)
  flags.DEFINE_integer('threads', 2, '1 (one core, pinned) or 2.', lower_bound=1, upper_bound=2,
                       **fv)
  flags.DEFINE_integer('images', 100, 'Images per step (B = images // pool, at least 1).', **fv)
  flags.DEFINE_integer('reps', 3, 'Timed repetitions per piece.', **fv)
  flags.DEFINE_enum('conv-impl', 'auto', ['auto', 'winograd', 'matmul', 'lax'],
                    "'auto': winograd on CPU, XLA's convolution on GPU/TPU (recorded resolved).",
                    **fv)
  flags.DEFINE_enum('client-parallel', 'vmap', ['vmap', 'shard_map'], 'Client mapping.', **fv)
  flags.DEFINE_integer('client-chunk', 0, '0: all clients at once; k: chunks of k.', **fv)
  flags.DEFINE_string('only', '', 'Comma list of augment,clients,server,sync,full.', **fv)
  flags.DEFINE_bool('no-loop', False, 'Skip the per-client Python loop.', **fv)
  flags.DEFINE_bool('no-hugetlb', False, 'Do not ask glibc for 2 MiB pages.', **fv)
  flags.DEFINE_string('torch-python', '', 'Interpreter with torch: also time --torch-script on '
                      'each setting, alternating with ours.', **fv)
  flags.DEFINE_string('torch-script', TORCH_SCRIPT, 'The PyTorch reference-shaped step (a file '
                      'of the repository; run by path with --torch-python).', **fv)
  flags.DEFINE_string('out', '', 'Default: bench/results/step_<threads>t.json.', **fv)
  flags.DEFINE_string('setting', '', 'Internal: the one CLIENTS@POOL:CUT setting a child process '
                      'runs.', **fv)
  flags.DEFINE_float('peak', 0.0, "Internal: the parent's conv-training peak, GFLOP/s.", **fv)


def benchmark(args) -> None:
  """The grid, one subprocess per setting (or, with --setting, one setting in this process)."""
  if args.setting:                                   # child: one setting, JSON on stdout
    (args.clients, args.pool, args.cut), = parse_grid(args.setting)
    print('RESULT ' + json.dumps(run_setting(args)), flush=True)
    return

  env = dict(os.environ)
  if not args.no_hugetlb:
    env['GLIBC_TUNABLES'] = 'glibc.malloc.hugetlb=1'
  prefix = []
  if args.threads == 1:
    prefix = ['taskset', '-c', '0']
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false').strip()
  # The children import the same mocosfl_jax as this process (a checkout or an install).
  package_parent = str(pathlib.Path(mocosfl_jax.__file__).resolve().parent.parent)
  env['PYTHONPATH'] = package_parent + os.pathsep + env.get('PYTHONPATH', '')
  me = [sys.executable, '-m', 'mocosfl_jax.benchmarks.step']
  common = ['--threads', str(args.threads), '--images', str(args.images), '--reps',
            str(args.reps), '--conv-impl', args.conv_impl, '--client-parallel',
            args.client_parallel, '--client-chunk', str(args.client_chunk)]
  if args.only:
    common += ['--only', args.only]
  if args.no_loop:
    common += ['--no-loop']

  def child_code(fn):
    return ('import json; from mocosfl_jax.benchmarks import step; '
            f'print("RESULT " + json.dumps(step.{fn}()))')

  peak = _child(prefix + [sys.executable, '-c', child_code('conv_peak')], env)
  report = dict(machine=None, conv_peak=peak, threads=args.threads, settings=[])
  report['machine'] = _child(prefix + [sys.executable, '-c', child_code('machine')], env)
  out = pathlib.Path(args.out or RESULTS / f'step_{args.threads}t.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  for n, p, cut in parse_grid(args.grid):
    setting = f'{n}@{p}:{cut}' if p else f'{n}:{cut}'
    r = _child(prefix + me + common + ['--setting', setting, '--peak',
                                       str(peak['conv_training_peak_gflops'])], env)
    if args.torch_python:
      tcmd = [args.torch_python, args.torch_script, '--clients', str(n),
              '--pool', str(p or n), '--cut', str(cut), '--threads', str(args.threads),
              '--steps', str(args.reps), '--images', str(args.images)]
      r['torch_reference'] = _child(prefix + tcmd, env, marker='{')
    report['settings'].append(r)
    _print_setting(r)
    out.write_text(json.dumps(report, indent=1))      # after every setting: a partial run counts
  print('wrote', out)


def _child(cmd, env, marker='RESULT '):
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines()[::-1]:
    if line.startswith(marker):
      return json.loads(line[len('RESULT '):] if marker == 'RESULT ' else line)
  return dict(error=(proc.stderr or proc.stdout)[-3000:], returncode=proc.returncode)


def _print_setting(r):
  if 'error' in r:
    print('ERROR', r['error'][-800:], flush=True)
    return
  s = r['setting']
  parts = [f"{s['clients']}@{s['pool']} B{s['batch']} cut{s['cut']}:"]
  for x in r['results']:
    parts.append(f"{x['name']} {x['median_s']:.3f}s ({x['gflops_per_s']:.0f} GF/s)")
  parts.append(f"peak {r['peak_rss_mib']:.0f} MiB")
  if 'torch_reference' in r and 'median_s' in r['torch_reference']:
    parts.append(f"torch {r['torch_reference']['median_s']:.2f}s")
  print(' | '.join(parts), flush=True)


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, benchmark, argv, errors=())


if __name__ == '__main__':
  main()
