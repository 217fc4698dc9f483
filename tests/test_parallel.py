"""Tests for mocosfl_jax.parallel: shard_map over 4 forced CPU devices (conftest) and lax.map
chunks give the same state as the vmapped step, padding clients stay invisible, masked FedAvg."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_testlib import fast_compile  # noqa: F401  pylint: disable=unused-import
from core_testlib import (PACKAGE_PARENT, assert_states_close, case, copy_tree, pool_for,
                          tiny_net, views)
from mocosfl_jax import parallel
from mocosfl_jax.algorithm import plan, state, sync
from mocosfl_jax.data import sampler

pytestmark = pytest.mark.usefixtures('fast_compile')
SCHEDULE = ((0, 0), (0, 1), (1, 0))      # b=1 is a sync step (S=4, avg 2)


def _run(net, cfg, st, par):
  ms = []
  for i, (e, b) in enumerate(SCHEDULE):
    vq, vk = views(cfg, net, i)
    st, m = parallel.train_step(net, cfg, st, pool_for(cfg, e), vq, vk, jnp.int32(e),
                                jnp.int32(b), par=par)
    ms.append(m)
  return st.clients, st.server, ms


def _shard(st, mesh):
  return st.replace(clients=parallel.shard_clients(st.clients, mesh),
                    server=parallel.replicate(st.server, mesh))


# moco_original_full: P=3 on 4 devices (one masked padding client, server BatchNorm);
# monaco_two_view_sampled: P=2 of N=4 (two padding clients on 4 devices, momentum sync,
# sampling; on 2 devices no padding at all).
@pytest.mark.parametrize('name,chunk,devices', [('moco_original_full', 0, 4),
                                                ('monaco_two_view_sampled', 0, 4),
                                                ('monaco_two_view_sampled', 1, 4),
                                                ('monaco_two_view_sampled', 0, 2)])
def test_shard_map_equals_vmap(name, chunk, devices):
  assert jax.device_count() >= 4, 'conftest forces 4 CPU devices'
  mesh = parallel.client_mesh(jax.devices()[:devices])
  net, cfg = case(name)
  st = state.create_train_state(net, cfg, jax.random.key(0))
  ref = _run(net, cfg, copy_tree(st), None)
  par = parallel.ClientParallel('shard_map', chunk=chunk, mesh=mesh)
  assert par.padded(cfg.pool_size) == max(devices, cfg.pool_size)
  got = _run(net, cfg, _shard(copy_tree(st), mesh), par)
  assert_states_close(got[:2], ref[:2])
  np.testing.assert_array_equal(got[0].count, ref[0].count)   # padding clients never counted
  for g, r in zip(got[2], ref[2]):
    for k in ('loss', 'div_online_global', 'div_online_momentum', 'div_momentum_global'):
      np.testing.assert_allclose(g[k], r[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert [float(m['synced']) for m in got[2]] == [0.0, 1.0, 0.0]


@pytest.mark.parametrize('devices', [0, 4, 2])         # 0: plain vmap on one device
def test_natural_order_pool_in_place_equals_gathered_pool(devices):
  """pool=None (all clients, natural order) skips the gather/scatter and changes nothing."""
  net, cfg = case('monaco_two_view_sampled')
  cfg = dataclasses.replace(cfg, sample_ratio=1.0, pool_size=4, queue_size=16)
  st = state.create_train_state(net, cfg, jax.random.key(5))
  par = None
  if devices:
    mesh = parallel.client_mesh(jax.devices()[:devices])
    par = parallel.ClientParallel('shard_map', mesh=mesh)
    st = _shard(st, mesh)

  def run(pool):
    s, losses = copy_tree(st), []
    for i, (e, b) in enumerate(SCHEDULE):
      vq, vk = views(cfg, net, i)
      s, m = parallel.train_step(net, cfg, s, pool, vq, vk, jnp.int32(e), jnp.int32(b),
                                 par=par)
      losses.append(float(m['loss']))
    return s.clients, s.server, losses

  got, ref = run(None), run(jnp.arange(4, dtype=jnp.int32))
  assert_states_close(got[:2], ref[:2])
  np.testing.assert_allclose(got[2], ref[2], rtol=1e-6)
  np.testing.assert_array_equal(got[0].count, [3, 3, 3, 3])


def test_natural_order_pool_needs_full_participation():
  net, cfg = case('monaco_two_view_sampled')             # P = 2 of N = 4
  st = state.create_train_state(net, cfg, jax.random.key(5))
  vq, vk = views(cfg, net, 0)
  with pytest.raises(ValueError, match='natural order'):
    parallel.train_step(net, cfg, st, None, vq, vk, jnp.int32(0), jnp.int32(0))


def test_client_chunks_equal_vmap():
  net, cfg = case('moco_original_full')       # P=3, chunk 2: one full chunk and a remainder
  st = state.create_train_state(net, cfg, jax.random.key(1))
  ref = _run(net, cfg, copy_tree(st), None)
  got = _run(net, cfg, copy_tree(st), parallel.ClientParallel('vmap', chunk=2))
  assert_states_close(got[:2], ref[:2])


def test_fedavg_masked_ignores_padding_and_matches_pool_mean():
  k1, k2 = jax.random.split(jax.random.key(2))
  on = {'params': {'w': jax.random.normal(k1, (5, 3, 2))}, 'batch_stats': {}}
  mom = {'params': {'w': jax.random.normal(k2, (5, 3, 2))}, 'batch_stats': {}}
  mask = jnp.array([1., 1., 1., 0., 0.])
  garbage = jax.tree.map(lambda x: x.at[3:].set(1e6), on)
  got_on, got_mom, got_m = sync.fedavg_masked(parallel.ClientParallel(), garbage, mom, mask, True)
  head = lambda t: jax.tree.map(lambda x: x[:3], t)
  ref_on, ref_mom, ref_m = sync.fedavg_pool(head(on), head(mom), True)
  chex.assert_trees_all_close(got_on, ref_on, rtol=1e-6)
  chex.assert_trees_all_close(got_mom, ref_mom, rtol=1e-6)
  for k in sync.DIVERGENCE_KEYS:
    np.testing.assert_allclose(got_m[k], ref_m[k], rtol=1e-5)


def test_pad_pool_ids_are_dropped_on_scatter():
  ids, mask = parallel.pad_pool(jnp.array([2, 0], jnp.int32), num_clients=3, padded=4)
  np.testing.assert_array_equal(ids, [2, 0, 3, 3])
  np.testing.assert_array_equal(mask, [1, 1, 0, 0])
  full = jnp.zeros((3, 2))
  out = parallel.scatter_pool(None, full, jnp.ones((4, 2)), ids)
  np.testing.assert_array_equal(out, [[1, 1], [0, 0], [1, 1]])


@pytest.mark.parametrize('num_clients,devices', [(8, 4), (6, 4), (8, 2)])
def test_pool_gather_and_scatter_under_shard_map_equal_plain_indexing(num_clients, devices):
  """Ring gather/scatter (clients split over devices; N=6 on 4 devices is replicated)."""
  mesh = parallel.client_mesh(jax.devices()[:devices])
  par = parallel.ClientParallel('shard_map', mesh=mesh)
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  full = {'w': jax.random.normal(k1, (num_clients, 3, 2)), 'n': jnp.arange(num_clients) * 10}
  pool = jax.random.permutation(k2, num_clients)[:5].astype(jnp.int32)
  ids, _ = parallel.pad_pool(pool, num_clients, par.padded(5))
  got = parallel.gather_pool(par, parallel.shard_clients(full, mesh), ids)
  ref = jax.tree.map(lambda x: x[pool], full)
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[:5], got), ref)
  new = {'w': jax.random.normal(k3, (ids.shape[0], 3, 2)), 'n': -jnp.arange(ids.shape[0]) - 1}
  out = parallel.scatter_pool(par, parallel.shard_clients(full, mesh),
                              parallel.shard_clients(new, mesh), ids)
  expect = jax.tree.map(lambda f, p: f.at[pool].set(p[:5]), full, new)
  chex.assert_trees_all_equal(out, expect)      # padding rows dropped, other clients untouched


def test_sharded_init_and_images_hold_only_each_devices_clients():
  """create_train_state(mesh=...) equals the plain init, and neither it nor the by-client image
  table ever puts more than a device's own clients on a device."""
  mesh = parallel.client_mesh()
  net = tiny_net(head='V1')
  cfg = plan.StepConfig(num_clients=64, batch_size=1, queue_size=256)   # 16 clients a device
  key = jax.random.key(4)
  ref = parallel.create_train_state(net, cfg, key)
  got = parallel.create_train_state(net, cfg, key, mesh=mesh)
  chex.assert_trees_all_equal(got, ref)
  for leaf in jax.tree.leaves(got.clients):
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {16}
  # Per device, the compiled init writes a quarter of the client state (and the server), and
  # needs no more scratch than the unsharded init: no device ever builds all 64 clients.
  client_bytes, server_bytes = (parallel.addressable_bytes(t) for t in (ref.clients, ref.server))
  shardings = parallel.state_shardings(state.abstract_train_state(net, cfg), mesh)
  sharded = jax.jit(state.init_fn, static_argnums=(0, 1), out_shardings=shardings).lower(
      net, cfg, key).compile().memory_analysis()
  plain = state.create_train_state.lower(net, cfg, key).compile().memory_analysis()
  assert sharded.output_size_in_bytes < server_bytes + 0.3 * client_bytes
  assert plain.output_size_in_bytes > server_bytes + 0.95 * client_bytes
  assert sharded.temp_size_in_bytes <= plain.temp_size_in_bytes

  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8)
  parts = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 30), np.arange(30, 40)]
  rows = parallel.place_images_by_client(images, parts, mesh)
  for s in rows.images.addressable_shards:
    c = s.index[0].start
    np.testing.assert_array_equal(s.data[0, :len(parts[c])], images[parts[c]])
  table = sampler.ClientTable.from_partition(parts, batch_size=2)
  flat = sampler.TrainImages.flat(images)
  read = jax.jit(lambda im, ids, draws: im.batch(table, ids, draws, 2, jax.random.key(1)))
  ids, draws = jnp.array([3, 1, 0], jnp.int32), jnp.array([0, 4, 7], jnp.int32)
  np.testing.assert_array_equal(read(rows, ids, draws), read(flat, ids, draws))


def test_bad_settings_raise():
  with pytest.raises(ValueError, match='client_parallel'):
    parallel.ClientParallel('pmap')
  with pytest.raises(ValueError, match='client_chunk'):
    parallel.ClientParallel('vmap', chunk=-1)
  with pytest.raises(ValueError, match='client_parallel'):
    parallel.ClientParallel('threads', 0)


def test_distributed_init_only_when_asked(monkeypatch):
  monkeypatch.delenv(parallel.DISTRIBUTED_ENV, raising=False)
  assert parallel.maybe_initialize_distributed() is False
  assert parallel.maybe_initialize_distributed(False) is False


_WORKER = r'''
import os, sys
pid = int(sys.argv[1])
os.environ.update(XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
                  MOCOSFL_DISTRIBUTED='1', JAX_COORDINATOR_ADDRESS=sys.argv[2],
                  JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(pid))
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
from mocosfl_jax import parallel
from mocosfl_jax.algorithm.mapping import reduce_clients
assert parallel.maybe_initialize_distributed()
import jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = parallel.client_mesh()
assert jax.device_count() == 4 and jax.local_device_count() == 2
par = parallel.ClientParallel('shard_map', mesh=mesh)
sh = NamedSharding(mesh, P('clients'))
# each process holds only its own 2 clients' rows; the last client of process 1 is padding
x = jax.make_array_from_process_local_data(sh, np.full((2, 3), 1.0 + pid, np.float32))
m = jax.make_array_from_process_local_data(sh, np.array([1, 1 - pid], np.float32))
f = lambda a, w: (jnp.sum(a * w[:, None], 0), jnp.sum(w))
tot, n = jax.jit(lambda a, w: reduce_clients(par, f, a, w))(x, m)
print('RESULT', float(np.asarray(tot)[0]), float(n), flush=True)
jax.distributed.shutdown()
'''


def test_two_processes_on_loopback(tmp_path):
  """Two JAX processes x 2 CPU devices: a masked psum over the global 'clients' axis."""
  import socket, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  script = tmp_path / 'worker.py'
  script.write_text(_WORKER)
  env = {k: v for k, v in __import__('os').environ.items() if not k.startswith(('XLA_', 'JAX_'))}
  env['PYTHONPATH'] = PACKAGE_PARENT
  procs = [subprocess.Popen([sys.executable, str(script), str(i), f'127.0.0.1:{port}'], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  if any('gloo' in o and ('not' in o.lower() and 'support' in o.lower()) for o in outs):
    pytest.skip('this jaxlib has no CPU collectives: ' + outs[0][-300:])
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-2000:]
    line = [l for l in o.splitlines() if l.startswith('RESULT')][-1].split()
    # process 0: 2 clients x 1.0 ; process 1: 1 real client x 2.0  -> 4.0 over 3 clients
    assert float(line[1]) == 4.0 and float(line[2]) == 3.0


def test_two_process_training_run_equals_one_process(tmp_path):
  """`python -m mocosfl_jax.main` as two JAX processes (2 CPU devices each, shard_map over the
  4-device 'clients' axis, one shared run directory) gives the losses and kNN results of one
  process running the same shard_map over 4 devices; only process 0 writes the run files.

  The reference uses the same mapping because the tiny config is chaotic at the 1e-4 level by
  step 6: mathematically equal computations (conv_impl lax vs matmul, or vmap vs shard_map)
  end 1.2e-4 apart there; shard_map == vmap is pinned on short runs by the tests above.
  The one-process reference runs as a subprocess too: in this process the module's
  fast_compile fixture would compile it differently (and its executables would leak into
  later tests' jit caches)."""
  import json, os, socket, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  root = Path(__file__).resolve().parent.parent
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_', 'JAX_', 'MOCOSFL_'))}
  # All three runs compile with most optimisations off (they are compared with each other only).
  env.update(PYTHONPATH=PACKAGE_PARENT, JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  dist = dict(MOCOSFL_DISTRIBUTED='1', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
              JAX_NUM_PROCESSES='2', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
              XLA_FLAGS='--xla_force_host_platform_device_count=2')
  main = [sys.executable, '-m', 'mocosfl_jax.main', '--config', str(root / 'configs' / 'tiny.py'),
          '--verbosity=0']
  two, one = tmp_path / 'two', tmp_path / 'one'
  shard = ['--config.client_parallel=shard_map']
  runs = [(main + ['--workdir', str(two)] + shard, {**env, **dist, 'JAX_PROCESS_ID': str(i)})
          for i in range(2)]
  runs.append((main + ['--workdir', str(one)] + shard,
               {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}))
  procs = [subprocess.Popen(cmd, env=e, cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for cmd, e in runs]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  losses = lambda d: [r['loss'] for r in map(json.loads, (d / 'metrics.jsonl').open())
                      if 'loss' in r]
  assert len(losses(two)) == len(losses(one)) == 3        # one writer, no duplicated records
  np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
  got, ref = (json.loads((d / 'results.json').read_text()) for d in (two, one))
  assert got['last']['step'] == ref['last']['step'] and got['reported_step'] == ref['reported_step']
  np.testing.assert_allclose(got['last']['test_knn_accuracy'], ref['last']['test_knn_accuracy'])
  # Each process holds only its own 2 of the 4 clients (state and image rows) and the server on
  # its own 2 devices: exactly half of what the one process with all 4 devices holds.
  held = [json.loads(o.split('holds on its devices (bytes): ')[1].splitlines()[0]) for o in outs]
  for h in held[:2]:
    assert {k: 2 * v for k, v in h.items()} == held[2]
