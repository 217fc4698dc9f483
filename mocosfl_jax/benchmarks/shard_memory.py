"""Per-device memory of the shard_map step, from XLA's memory analysis (nothing is run).

Compiles `parallel.train_step` with `client_parallel='shard_map'` over D forced CPU devices for
abstract, sharded state (clients split on their leading axis, server replicated) and records
what each device needs: arguments (its clients' state + the server), outputs and scratch (temp),
for the pool given as client ids (a sampled pool) and as None (full participation, in place).
This is how to size a multi-device or multi-host run before renting it.

  python -m mocosfl_jax.benchmarks.shard_memory                # 4 devices, default grid
  python -m mocosfl_jax.benchmarks.shard_memory --devices 8 --grid 100:9,1000:2
  (`python bench/shard_memory.py ...` is the same command)

Grid entries are CLIENTS:CUT (full participation, batch 1, ResNet-18 with the reference's
Weight Standardisation, V2, K 6000, original loss, 32x32). Writes bench/results/shard_memory.json
under the current directory. The forced device count is set before JAX starts, so run it as its
own process.
"""
import json
import os
import pathlib

from absl import flags

from mocosfl_jax import cli


def measure(clients: int, cut: int, conv_impl: str = 'auto') -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mocosfl_jax import parallel  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.algorithm import plan, state  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.models import SplitConfig, build  # pylint: disable=g-import-not-at-top

  net = build(SplitConfig(arch='resnet18', cut=cut, input_size=32, head='V2', conv_impl=conv_impl))
  cfg = plan.StepConfig(num_clients=clients, batch_size=1, queue_size=6000, steps_per_epoch=10,
                        avg_freq=5)
  mesh = parallel.client_mesh()
  shapes = state.abstract_train_state(net, cfg)
  shardings = parallel.state_shardings(shapes, mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  par = parallel.ClientParallel('shard_map', mesh=mesh)
  views = jax.ShapeDtypeStruct((clients, 1, 32, 32, 3), jnp.float32)
  nbytes = lambda t: int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(t)))
  gib = 2.0 ** 30
  out = dict(clients=clients, cut=cut, devices=jax.device_count(), conv_impl=conv_impl,
             client_state_gib=nbytes(shapes.clients) / gib,
             server_state_gib=nbytes(shapes.server) / gib)
  # 'ids': the pool given as client ids (any order; rows move in ppermute rounds), what a
  # sampled pool compiles to; 'in_place': pool=None, what full participation compiles to.
  for name, pool in (('ids', jnp.arange(clients, dtype=jnp.int32)), ('in_place', None)):
    mem = parallel.train_step.lower(net, cfg, abstract, pool, views, views, jnp.int32(0),
                                    jnp.int32(0), par=par).compile().memory_analysis()
    out[name] = dict(
        per_device_argument_gib=mem.argument_size_in_bytes / gib,
        per_device_output_gib=mem.output_size_in_bytes / gib,
        per_device_alias_gib=mem.alias_size_in_bytes / gib,
        per_device_temp_gib=mem.temp_size_in_bytes / gib,
        per_device_total_gib=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                              - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / gib)
  return out


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer('devices', 4, 'Forced CPU devices.', **fv)
  flags.DEFINE_string('grid', '64:4,32:9,100:9', 'Comma list of CLIENTS:CUT.', **fv)
  flags.DEFINE_enum('conv-impl', 'auto', ['auto', 'matmul', 'winograd', 'lax'],
                    'Convolution implementation.', **fv)
  flags.DEFINE_string('out', str(pathlib.Path('bench') / 'results' / 'shard_memory.json'),
                      'Result JSON.', **fv)


def benchmark(args) -> None:
  """Compiles every grid setting and writes the per-device memory report."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices}').strip()
  from mocosfl_jax.benchmarks import step  # pylint: disable=g-import-not-at-top
  report = dict(machine=step.machine(), settings=[])
  for entry in args.grid.split(','):
    n, cut = map(int, entry.split(':'))
    r = measure(n, cut, args.conv_impl)
    print(json.dumps(r), flush=True)
    report['settings'].append(r)
  pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
  print('wrote', args.out)


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, benchmark, argv, errors=())


if __name__ == '__main__':
  main()
