"""What share of a paper run the per-epoch kNN monitor takes, measured on this machine.

The reference evaluates kNN after every epoch, and so do the paper configs. One evaluation
embeds the whole training set (the bank) and the test set through client 0's slice and the
server, then scores every test image against the bank. For each setting this benchmark resolves
the paper config against a stand-in CIFAR split of the real size (`sources.cifar_stand_in`:
timing does not depend on pixel values), and times in one process, after warm-up, medians of:

* the training step (`run.train.simulated_step`: sampling, augmentation, step) of that config;
* the evaluation embedding of `eval_batch_size` images (the monitor's jitted function);
* the kNN scoring of the 10 000 test features against the 50 000 bank features.

It reports the time of one evaluation (embedding of 60 000 images extrapolated from the batch
time, plus the scoring), of one epoch of steps (S x step), and the evaluation's share of the
run, eval / (epoch + eval). Writes bench/results/eval_share.json.

  python -m mocosfl_jax.benchmarks.eval_share                  # the default settings
  python -m mocosfl_jax.benchmarks.eval_share --setting mocosfl_table3:clients=1000 --reps 2

(`python bench/eval_share.py` is the same command.)
"""
import json
import pathlib
import time

from absl import flags
import numpy as np

from mocosfl_jax import cli

RESULTS = pathlib.Path('bench') / 'results'
DEFAULT_SETTINGS = ('mocosfl_table2:clients=5', 'mocosfl_table3:clients=100',
                    'mocosfl_table3:clients=200', 'mocosfl_table3:clients=1000',
                    'monacosfl:clients=5,cut=1')


def _config(setting: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  name, _, arg = setting.partition(':')
  path = pathlib.Path('configs') / f'{name}.py'      # the checkout it runs in, as bench/ does
  if not path.exists():
    path = pathlib.Path(__file__).resolve().parents[2] / 'configs' / f'{name}.py'
  if not path.exists():
    raise ValueError(f'--setting: no config {path}; use names of files in configs/')
  spec = importlib.util.spec_from_file_location(f'cfg_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def run_setting(setting: str, reps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mocosfl_jax import experiment, parallel  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.benchmarks.step import _median_time  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.data import sampler, sources  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.evaluation import features, knn  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.models import build  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.run import train  # pylint: disable=g-import-not-at-top

  real_load, sources.load = sources.load, sources.cifar_stand_in
  try:
    exp = experiment.resolve(_config(setting))
  finally:
    sources.load = real_load
  net, cfg, c = build(exp.model), exp.step, exp.config
  keys = jax.random.split(jax.random.key(0), 4)
  state = parallel.create_train_state(net, cfg, keys[0])
  images = sampler.TrainImages.flat(exp.train.images)
  table = sampler.ClientTable.from_partition(exp.parts, cfg.batch_size)
  pool = None if cfg.pool_size == cfg.num_clients else jnp.arange(cfg.pool_size, dtype=jnp.int32)
  holder = {'state': state}

  def step():
    holder['state'], m = train.simulated_step(net, cfg, exp.aug, holder['state'], images, table,
                                              keys[1], keys[2], pool, jnp.int32(0),
                                              jnp.int32(1), exp.par)
    return m['loss']

  t0 = time.perf_counter()
  jax.block_until_ready(step())
  step_compile = time.perf_counter() - t0
  step_s, step_ts = _median_time(step, reps)

  embed = features.embed_fn(net, jnp.asarray(exp.aug.mean), jnp.asarray(exp.aug.std))
  args = (features.client0(holder['state'].clients), holder['state'].server.online)
  batch = jnp.asarray(exp.train.images[:c.eval_batch_size])
  embed_s, embed_ts = _median_time(lambda: embed(*args, batch), reps)
  dim = int(embed(*args, batch).shape[-1])
  rng = np.random.default_rng(0)
  bank = rng.standard_normal((len(exp.train), dim)).astype(np.float32)
  query = rng.standard_normal((len(exp.test), dim)).astype(np.float32)
  labels = exp.train.labels
  score_s, score_ts = _median_time(
      lambda: knn.knn_accuracy(bank, labels, query, exp.test.labels, 10, k=c.knn_k, t=c.knn_t),
      max(1, reps // 2))

  n_embed = len(exp.train) + len(exp.test)
  eval_s = n_embed / c.eval_batch_size * embed_s + score_s
  epoch_s = cfg.steps_per_epoch * step_s
  return dict(setting=setting, steps_per_epoch=cfg.steps_per_epoch, num_steps=exp.num_steps,
              eval_every=exp.eval_every, rows_per_step=cfg.pool_size * cfg.batch_size,
              step_s=step_s, step_times_s=step_ts, step_compile_s=step_compile,
              embed_batch=c.eval_batch_size, embed_batch_s=embed_s, embed_times_s=embed_ts,
              images_embedded=n_embed, knn_scoring_s=score_s, knn_scoring_times_s=score_ts,
              eval_s=eval_s, epoch_s=epoch_s, eval_share=eval_s / (epoch_s + eval_s),
              run_hours_with_eval=(exp.num_steps * step_s
                                   + exp.num_steps / exp.eval_every * eval_s) / 3600)


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_multi_string('setting', list(DEFAULT_SETTINGS), 'CONFIG[:ARGS] of a file in '
                            'configs/; repeat the flag for several.', flag_values=flag_values)
  flags.DEFINE_integer('reps', 3, 'Timed repetitions per measurement (median).',
                       flag_values=flag_values)
  flags.DEFINE_string('out', None, 'Output JSON (default bench/results/eval_share.json).',
                      flag_values=flag_values)


def benchmark(args) -> None:
  from mocosfl_jax.benchmarks.step import machine  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(args.out or RESULTS / 'eval_share.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  report = dict(machine=machine(), settings=[])
  for setting in args.setting:
    r = run_setting(setting, args.reps)
    report['settings'].append(r)
    print(f"{setting:32s} S {r['steps_per_epoch']:5d} | step {r['step_s']:.3f} s | epoch "
          f"{r['epoch_s']:.0f} s | kNN eval {r['eval_s']:.0f} s | eval share "
          f"{100 * r['eval_share']:.1f}%", flush=True)
    out.write_text(json.dumps(report, indent=1))
  report['machine']['load_avg_end'] = __import__('os').getloadavg()
  out.write_text(json.dumps(report, indent=1))
  print('wrote', out)


def main(argv=None) -> int:
  return cli.run(define_flags, benchmark, argv)


if __name__ == '__main__':
  main()
