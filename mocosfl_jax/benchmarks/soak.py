"""Soak: SIGKILL a training run at random moments, rerun it after each, compare with a whole run.

A user who kills a run (or loses the machine) reruns the same command and must get the run they
would have had: `metrics.jsonl` (less its timing fields) and `results.json` equal to those of a
run that was never interrupted. Each kill is one of three kinds, in turn:

* `commit`: the training process kills itself inside a checkpoint write, after orbax has written
  the step's files and its commit marker, just before the rename that publishes the step (the
  process's `os.rename` is wrapped; its n-th checkpoint, n drawn at random);
* `write`: this process kills it at a random moment (0-200 ms) after a checkpoint's temporary
  directory appears, while the arrays are being written;
* `step`: this process kills it at a random moment (0-500 ms) after a new metrics record appears,
  i.e. anywhere in the training loop.

Every kill is SIGKILL: no handler runs, the workdir lock dies with the process. After the kills
the command runs to the end, and its files are compared with those of an uninterrupted run in a
fresh directory. The config is configs/tiny.py with more steps (enough for every kill to land
before the run ends; the command fails otherwise) and a checkpoint at every log step.

  python -m mocosfl_jax.benchmarks.soak --kills 10 --seed 0     # writes bench/results/soak.json
"""
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

from absl import flags

from mocosfl_jax import cli

RESULTS = pathlib.Path('bench') / 'results'
KINDS = ('commit', 'write', 'step')
TIMING_FIELDS = ('steps_per_sec', 'eval_seconds')
KILL_ENV = 'MOCOSFL_SOAK_KILL_AT_COMMIT'   # the child kills itself at this checkpoint commit
TMP_MARK = '.orbax-checkpoint-tmp'


def _tiny_config() -> pathlib.Path:
  """configs/tiny.py of the checkout this runs in (the benchmarks run from its root), else the one
  beside the imported package (an editable install)."""
  here = pathlib.Path('configs') / 'tiny.py'
  return (here if here.exists()
          else pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'tiny.py').resolve()


CONFIG = _tiny_config()
NUM_STEPS = 60
OVERRIDES = ('--config.log_every_steps=2', '--config.checkpoint_every_steps=2',
             '--config.eval_every_steps=10')


def child() -> None:
  """The training command, killing itself at the commit of its n-th checkpoint if asked.

  Run as `python -c 'from mocosfl_jax.benchmarks import soak; soak.child()' MAIN-FLAGS...`.
  """
  n = int(os.environ.get(KILL_ENV, '0'))
  if n:
    real_rename, commits = os.rename, []

    def rename(src, dst, *args, **kwargs):
      if TMP_MARK in os.fspath(src) and os.path.basename(os.fspath(dst)).isdigit():  # a step
        commits.append(src)
        if len(commits) == n:
          os.kill(os.getpid(), signal.SIGKILL)
      return real_rename(src, dst, *args, **kwargs)

    os.rename = rename
  from mocosfl_jax import main  # pylint: disable=g-import-not-at-top
  sys.exit(main.main(sys.argv[1:]))


def _command(workdir, num_steps: int) -> list:
  return [sys.executable, '-c', 'from mocosfl_jax.benchmarks import soak; soak.child()',
          '--config', str(CONFIG), *OVERRIDES, f'--config.num_steps={num_steps}',
          '--workdir', str(workdir)]


def _env(kill_at_commit: int = 0) -> dict:
  env = dict(os.environ)
  package_parent = str(pathlib.Path(__file__).resolve().parents[2])
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [package_parent, env.get('PYTHONPATH')]))
  env.setdefault('JAX_PLATFORMS', 'cpu')
  env.setdefault('JAX_COMPILATION_CACHE_DIR',
                 os.path.expanduser('~/.cache/mocosfl_jax/jax_cache'))
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  env[KILL_ENV] = str(kill_at_commit)
  return env


def _records(workdir) -> int:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return path.read_text().count('\n') if path.exists() else 0


def _tmp_dirs(workdir) -> set:
  """Names of checkpoint directories being written (or left by a killed write)."""
  ckpts = pathlib.Path(workdir) / 'checkpoints'
  try:
    return {p.name for p in ckpts.iterdir() if TMP_MARK in p.name}
  except OSError:   # not there yet, or a name vanished while listing
    return set()


def _wait_for(proc, condition, timeout: float = 600.0) -> bool:
  """Polls `condition` every 5 ms until it holds (True) or the process ends (False)."""
  end = time.time() + timeout
  while proc.poll() is None and time.time() < end:
    if condition():
      return True
    time.sleep(0.005)
  return False


def kill_once(workdir, kind: str, rng: random.Random, num_steps: int = NUM_STEPS) -> dict:
  """Starts the command in `workdir` and SIGKILLs it in the way `kind` says; returns a record."""
  from mocosfl_jax.run import checkpoints  # pylint: disable=g-import-not-at-top
  ckpt_dir = pathlib.Path(workdir) / 'checkpoints'
  before = checkpoints.latest_step(ckpt_dir)
  record = {'kind': kind, 'resumed_from': before}
  t0 = time.time()
  if kind == 'commit':
    record['at_commit'] = rng.randint(1, 3)
    proc = subprocess.Popen(_command(workdir, num_steps), env=_env(record['at_commit']),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  else:
    proc = subprocess.Popen(_command(workdir, num_steps), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if kind == 'write':
      old = _tmp_dirs(workdir)   # left by an earlier kill: the new run removes them
      seen = _wait_for(proc, lambda: bool(_tmp_dirs(workdir) - old))
      delay = rng.uniform(0.0, 0.2)
    else:
      start = _records(workdir)
      seen = _wait_for(proc, lambda: _records(workdir) > start + (1 if start else 0))
      delay = rng.uniform(0.0, 0.5)
    if seen:
      time.sleep(delay)
      record['delay_s'] = round(delay, 3)
      proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  record['returncode'] = proc.returncode
  record['killed'] = proc.returncode == -signal.SIGKILL
  if not record['killed']:
    record['stderr_tail'] = err.decode(errors='replace')[-2000:]
  record['wall_s'] = round(time.time() - t0, 1)
  record['checkpoint_after'] = checkpoints.latest_step(ckpt_dir)
  record['left_tmp_dir'] = bool(_tmp_dirs(workdir))
  return record


def finish(workdir, num_steps: int = NUM_STEPS) -> subprocess.CompletedProcess:
  """Runs the command to its end (resuming whatever is in `workdir`)."""
  return subprocess.run(_command(workdir, num_steps), env=_env(), capture_output=True,
                        text=True, check=False)


def comparable(workdir) -> tuple:
  """(metrics records without timing fields, results.json) of a finished run."""
  from mocosfl_jax.run import metrics  # pylint: disable=g-import-not-at-top
  records = [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
             for r in metrics.read_metrics(workdir)]
  results = json.loads((pathlib.Path(workdir) / 'results.json').read_text())
  return records, results


def soak(kills: int, seed: int, root, num_steps: int = NUM_STEPS) -> dict:
  """The uninterrupted run, then `kills` kills and a final run in another directory; compared."""
  rng = random.Random(seed)
  root = pathlib.Path(root)
  t0 = time.time()
  reference = finish(root / 'uninterrupted', num_steps)
  if reference.returncode:
    raise RuntimeError(f'the uninterrupted run failed: {reference.stderr[-2000:]}')
  reference_s = time.time() - t0
  workdir = root / 'killed'
  log = [kill_once(workdir, KINDS[i % len(KINDS)], rng, num_steps) for i in range(kills)]
  last = finish(workdir, num_steps)
  if last.returncode:
    raise RuntimeError(f'the final rerun failed: {last.stderr[-2000:]}')
  want, got = comparable(root / 'uninterrupted'), comparable(workdir)
  return {
      'kills': log,
      'killed': sum(r['killed'] for r in log),
      'metrics_equal': got[0] == want[0],
      'results_equal': got[1] == want[1],
      'metrics_records': len(want[0]),
      'uninterrupted_s': round(reference_s, 1),
      'total_s': round(time.time() - t0, 1),
  }


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer('kills', 10, 'SIGKILLs before the final rerun.', **fv)
  flags.DEFINE_integer('seed', 0, 'Seed of the kill moments.', **fv)
  flags.DEFINE_integer('steps', NUM_STEPS, 'Training steps of the run (enough for every kill '
                       'to land before it ends).', **fv)
  flags.DEFINE_string('out', None, 'Output JSON (default bench/results/soak.json).', **fv)


def benchmark(args) -> int:
  if args.kills < 1:
    raise ValueError(f'--kills {args.kills}: must be >= 1')
  with tempfile.TemporaryDirectory(prefix='soak-') as root:
    report = soak(args.kills, args.seed, root, args.steps)
  report.update(config=str(CONFIG.name),
                overrides=[*OVERRIDES, f'--config.num_steps={args.steps}'], seed=args.seed,
                machine={'cpu_count': os.cpu_count(), 'load_at_end': list(os.getloadavg())})
  out = pathlib.Path(args.out) if args.out else RESULTS / 'soak.json'
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  print(json.dumps({k: v for k, v in report.items() if k != 'kills'}, indent=1))
  print(f'written to {out}')
  if report['killed'] < args.kills:
    print(f"only {report['killed']} of {args.kills} kills landed before the run ended; raise "
          "--steps", file=sys.stderr)
  ok = report['metrics_equal'] and report['results_equal'] and report['killed'] == args.kills
  return 0 if ok else 1


def main(argv=None) -> int:
  return cli.run(define_flags, benchmark, argv)


if __name__ == '__main__':
  main()
