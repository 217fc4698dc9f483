"""FL-MoCo baseline (algorithm/flmoco.py): the vmapped step against a per-client Python loop
written from the reference's flmoco_functions.py, the run from the CLI (resume included), the
config refusals, its linear-probe recipe and its cost row."""
import dataclasses
import functools
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_testlib import CONFIG_DIR, StandInNet, load_config, optimisations_off
from mocosfl_jax import config, costs, experiment
from mocosfl_jax.algorithm import flmoco, state as state_lib, step
from mocosfl_jax.algorithm.plan import StepConfig
from mocosfl_jax.evaluation import probes, protocols
from mocosfl_jax.run import train

# S = 4 steps per round, FedAvg after steps 1 and 3 of each round (avg_freq 2).
_CFG = dict(num_clients=3, batch_size=2, queue_size=10, lr=0.06, tau=0.99, num_epochs=3,
            steps_per_epoch=4, avg_freq=2, method='flmoco')
SCHEDULE = ((0, 0, (2, 0)), (0, 1, (2, 0)), (1, 0, (1, 2)))   # (round, step, pool)


def _unit(z):
  return z / jnp.sqrt(jnp.sum(z * z, axis=1, keepdims=True))


def _ce0(q, k, queue, t):
  """Mean cross-entropy of label 0 over [q.k, q.queue] / t (the reference's criterion)."""
  logits = jnp.concatenate([jnp.sum(q * k, axis=1, keepdims=True), q @ queue.T], axis=1) / t
  return -jnp.mean(jax.nn.log_softmax(logits, axis=1)[:, 0])


def _forward(net, pair, x):
  smashed, c_new = net.apply_client(pair[0], x, train=True)
  z, s_new = net.apply_server(pair[1], smashed, train=True)
  keep = lambda old, new: {**old, 'batch_stats': new.get('batch_stats', old['batch_stats'])}
  return _unit(z), [keep(pair[0], c_new), keep(pair[1], s_new)]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _client_step(net, cfg, on, mom, buf, queue, x_q, x_k, lr):
  """One client of the reference's loop: EMA, the two-term loss, backward, torch SGD."""
  mom = [{**m, 'params': jax.tree.map(lambda t, o: t * cfg.tau + o * (1 - cfg.tau),
                                      m['params'], o['params'])} for m, o in zip(mom, on)]

  def loss_fn(params):
    o = [{**v, 'params': p} for v, p in zip(on, params)]
    q1, o = _forward(net, o, x_q)            # contrastive_loss(query, pkey)
    k2, m = _forward(net, mom, x_k)
    q2, o = _forward(net, o, x_k)            # contrastive_loss(pkey, query)
    k1, m = _forward(net, m, x_q)
    k1, k2 = jax.lax.stop_gradient(k1), jax.lax.stop_gradient(k2)
    return (_ce0(q1, k2, queue, cfg.temperature) + _ce0(q2, k1, queue, cfg.temperature),
            (o, m, jnp.concatenate([k1, k2])))

  params = [v['params'] for v in on]
  (loss, (on, mom, keys)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  # torch SGD: buf = momentum * buf + (g + wd * p); p -= lr * buf (buf starts at zero).
  new_on, new_buf = [], []
  for v, p, g, b in zip(on, params, grads, buf):
    trace = jax.tree.map(lambda t, g, p: cfg.momentum * t + g + cfg.weight_decay * p,
                         b[1].trace, g, p)
    new_buf.append((b[0], b[1]._replace(trace=trace)))
    new_on.append({**v, 'params': jax.tree.map(lambda p, t: p - lr * t, p, trace)})
  return new_on, mom, new_buf, keys, loss


def loop_step(net, cfg, st, pool, vq, vk, epoch, b):
  """One step as the reference runs it: a Python loop over the pool, each client on its own."""
  n = cfg.num_clients
  get = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
  c, s = st.clients, st.server
  nets = [dict(on=[get(c.online, i), get(s.online, i)], mom=[get(c.momentum, i), get(s.momentum, i)],
               buf=[get(c.opt_state, i), get(s.opt_state, i)]) for i in range(n)]
  queues, ptrs = np.array(s.queue), np.array(s.ptr)
  lr = cfg.c_lr * (1 + math.cos(math.pi * epoch / cfg.num_epochs)) / 2   # cosine per round
  losses = []
  for j, i in enumerate(pool):
    me = nets[i]
    me['on'], me['mom'], me['buf'], keys, loss = _client_step(
        net, cfg, me['on'], me['mom'], me['buf'], jnp.asarray(queues[i]), vq[j], vk[j], lr)
    losses.append(float(loss))
    for r, key in enumerate(np.asarray(keys)):                          # enqueue, wrapping
      queues[i][(ptrs[i] + r) % cfg.queue_size] = key
    ptrs[i] = (ptrs[i] + len(keys)) % cfg.queue_size
  period = cfg.steps_per_epoch // cfg.avg_freq
  if b == cfg.steps_per_epoch - 1 or b % period == period - 1:       # FedAvg of online nets
    avg = jax.tree.map(lambda *xs: sum(xs) / len(xs), *[nets[i]['on'] for i in pool])
    for me in nets:
      me['on'] = avg
  stack = lambda k, side: jax.tree.map(lambda *xs: jnp.stack(xs), *[m[k][side] for m in nets])
  counts = np.array(c.count) + np.isin(np.arange(n), pool)
  clients = c.replace(online=stack('on', 0), momentum=stack('mom', 0), opt_state=stack('buf', 0),
                      count=jnp.asarray(counts, jnp.int32), draws=jnp.asarray(counts, jnp.int32))
  server = s.replace(online=stack('on', 1), momentum=stack('mom', 1), opt_state=stack('buf', 1),
                     queue=jnp.asarray(queues), ptr=jnp.asarray(ptrs, jnp.int32))
  return st.replace(clients=clients, server=server), float(np.mean(losses))


@pytest.mark.parametrize('bn', [False, True], ids=['groupnorm_fused', 'batchnorm_four_calls'])
def test_step_equals_per_client_loop(bn):
  # float64: BatchNorm over two rows turns float32 re-association noise into 1e-4 differences.
  with jax.enable_x64(), optimisations_off():
    # GroupNorm nets run both views in one pass per network (flmoco.local_step), which
    # re-associates sums inside the normalisations: equal up to float64 rounding grown over the
    # steps; the BatchNorm path makes the reference's four calls in its order.
    _check_against_loop(StandInNet(client_bn=bn, server_bn=bn), StepConfig(**_CFG),
                        rtol=1e-10 if bn else 1e-8)


def _check_against_loop(net, cfg, rtol):
  st = flmoco.create_state(net, cfg, jax.random.key(0))
  # The stand-in's flax BatchNorm keeps float32 running statistics; make the state all float64.
  st = jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating)
                    else x, st)
  # Clients start identical; each has its own random queue.
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], st.server.online),
                              jax.tree.map(lambda x: x[2], st.server.online))
  assert not np.allclose(st.server.queue[0], st.server.queue[1])
  ref = st
  step = jax.jit(flmoco.train_step, static_argnums=(0, 1))
  for seed, (epoch, b, pool) in enumerate(SCHEDULE):
    kq, kk = jax.random.split(jax.random.key(seed))
    shape = (len(pool), cfg.batch_size, 8, 8, 3)
    vq, vk = jax.random.normal(kq, shape), jax.random.normal(kk, shape)
    st, m = step(net, cfg, st, vq, vk, jnp.int32(epoch), jnp.int32(b),
                 jnp.asarray(pool, jnp.int32))
    ref, loss = loop_step(net, cfg, ref, pool, vq, vk, epoch, b)
    np.testing.assert_allclose(float(m["loss"]), loss, rtol=rtol)
    assert float(m['synced']) == float(b == 1)
  chex.assert_trees_all_close(st.clients, ref.clients, rtol=10 * rtol, atol=rtol / 10)
  chex.assert_trees_all_close(st.server.replace(step=0, epoch=0),
                              ref.server.replace(step=0, epoch=0), rtol=10 * rtol, atol=rtol / 10)
  assert st.server.step.tolist() == [2, 1, 3]


def _config(**overrides):
  c = load_config('tiny').get_config()
  c.method = 'flmoco'
  c.num_clients, c.local_epochs, c.avg_freq = 3, 1, 2
  c.update(overrides)
  return c


def test_run_from_config_resumes_exactly(tmp_path):
  s = experiment.resolve(_config()).step.steps_per_epoch
  c = _config(num_steps=6, checkpoint_every_steps=3, eval_every_steps=3, avg_freq=s // 2)
  exp = experiment.resolve(c)
  assert exp.step.steps_per_epoch // exp.step.avg_freq == 2     # a FedAvg every second step
  assert exp.step.method == 'flmoco'
  with optimisations_off():
    train.train_and_evaluate(c, str(tmp_path / 'whole'))
    half = _config(num_steps=3, checkpoint_every_steps=3, eval_every_steps=3, avg_freq=s // 2)
    train.train_and_evaluate(half, str(tmp_path / 'resumed'))
    results = train.train_and_evaluate(c, str(tmp_path / 'resumed'))
  rows = lambda d: [json.loads(x) for x in
                    (tmp_path / d / 'metrics.jsonl').read_text().splitlines()]
  whole, resumed = rows('whole'), rows('resumed')
  last = lambda rs, key: [r[key] for r in rs if r['step'] == 6 and key in r]
  assert last(whole, 'loss') == last(resumed, 'loss')
  assert last(whole, 'test_knn_accuracy') == last(resumed, 'test_knn_accuracy')
  # The resumed run ends in the same state, bit for bit.
  states = [protocols.restore_for_eval(tmp_path / d, 'latest')[2:4] for d in ('whole', 'resumed')]
  chex.assert_trees_all_equal(*states)
  assert any(r.get('synced', 0) > 0 for r in whole)
  assert 'test_knn_accuracy' in results['last']
  saved = json.loads((tmp_path / 'whole' / 'config.json').read_text())
  assert saved['step']['method'] == 'flmoco'
  assert saved['step']['steps_per_epoch'] == exp.step.steps_per_epoch


@pytest.mark.parametrize('overrides, message', [
    (dict(bottleneck='C4S2'), 'no smashed data to compress'),
    (dict(loss_form='two_view'), "valid: ('original', 'single')"),
    (dict(momentum_sync=True), 'averages the online models only'),
    (dict(final_protocols='knn,attack'), 'nothing for the model-inversion'),
    (dict(client_parallel='shard_map'), "use client_parallel='vmap'"),
    (dict(client_schedule='per_epoch'), 'once per round'),
    (dict(method='fl'), "valid: mocosfl, flmoco"),
    (dict(local_epochs=0), 'local_epochs=0'),
    (dict(auto_adjust=True), 'drop auto_adjust'),
    (dict(client_queues='reference'), 'drop client_queues'),
    (dict(distributed=True), 'use distributed=False'),
    (dict(lr=0.5, c_lr=0.05), 'FL-MoCo clients train at c_lr=0.05'),
])
def test_config_refusals_name_the_fix(overrides, message):
  with pytest.raises(ValueError, match=None) as e:
    experiment.resolve(_config(**overrides))
  assert message in str(e.value), str(e.value)


def test_local_epochs_without_flmoco_is_refused():
  c = _config(local_epochs=3)
  c.method = 'mocosfl'
  with pytest.raises(ValueError, match="set method='flmoco'"):
    experiment.resolve(c)


def test_avg_freq_left_at_its_default_is_one_fedavg_per_round():
  c = load_config('tiny').get_config()
  c.method, c.avg_freq = 'flmoco', config.get_config().avg_freq
  assert experiment.resolve(c).step.avg_freq == 1


def test_round_is_local_epochs_passes_over_client_0():
  one = experiment.resolve(_config(local_epochs=1)).step.steps_per_epoch
  assert experiment.resolve(_config(local_epochs=5)).step.steps_per_epoch == 5 * one


def test_linear_probe_recipe_is_the_references_sgd():
  lr = probes.linear_lr('flmoco')
  schedule = probes.probe_lr_schedule('linear', 'flmoco', lr=lr, epochs=10, steps_per_epoch=7)
  for t in (0, 3, 10, 15, 20):    # cosine T_max = epochs, stepped per iteration: period 20
    np.testing.assert_allclose(float(schedule(t)), 3.0 * (1 + math.cos(math.pi * t / 10)) / 2,
                               atol=1e-6)
  x = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  r = probes.linear_probe(x, y, x, y, 2, key=jax.random.key(0), recipe='flmoco', epochs=3,
                          lr=lr, batch_size=8)
  assert r.lrs[0, 0] == pytest.approx(3.0) and r.final_accuracy > 80


def test_cost_row_is_the_whole_network_without_activations():
  traffic = costs.Traffic(local_epochs=5, epochs=10)
  with optimisations_off():
    row = costs.fl_row('resnet_tiny', width=4, input_size=8, head='V1', traffic=traffic)
    (split,) = costs.cost_table('resnet_tiny', width=4, input_size=8, head='V1', cuts=[1],
                                traffic=traffic)
  assert row['client_params'] == split['client_params'] + split['server_params']
  assert row['upload_bytes_per_step'] == row['download_bytes_per_step'] == 0
  assert row['sync_bytes_per_sync'] == 2 * 4 * row['client_params']
  assert row['total_mib'] == pytest.approx(10 * row['sync_bytes_per_sync'] / 5 / 2**20)
  assert row['client_forward_flops'] > split['client_forward_flops']
  assert row['client_memory_bytes'] > split['client_memory_bytes']
  with pytest.raises(ValueError, match='local_epochs=0'):
    costs.fl_row('resnet_tiny', traffic=dataclasses.replace(traffic, local_epochs=0))


def test_serve_and_attack_refuse_an_flmoco_run(tmp_path, capsys):
  from mocosfl_jax import serve  # pylint: disable=g-import-not-at-top
  rc = serve.main(['--config', str(CONFIG_DIR / 'tiny.py'), '--config.method=flmoco',
                   '--workdir', str(tmp_path / 'served'), '--remote', '1',
                   '--listen', '127.0.0.1:0'])
  assert rc == 2 and 'has no server step and runs with' in capsys.readouterr().err
  assert not (tmp_path / 'served').exists()


def test_split_only_sync_switches_are_refused():
  for overrides in (dict(divergence_aware='fedema'), dict(fedavg_set='reference', sample_ratio=0.5)):
    with pytest.raises(ValueError, match="FL-MoCo's FedAvg is the pool's mean"):
      experiment.resolve(_config(**overrides))


def test_one_client_equals_the_two_view_split_step_at_twice_the_lr():
  """With one client, FL-MoCo's symmetric sum over the whole network is MonAcoSFL's two-view
  loss (one mean over [q; k]) doubled: without weight decay, FL-MoCo at lr equals the split
  step at 2 lr, and the queues hold the same keys (in another order, which the loss ignores,
  with K a multiple of the 2B keys per step)."""
  common = dict(num_clients=1, batch_size=2, queue_size=8, weight_decay=0.0, steps_per_epoch=4,
                avg_freq=2, num_epochs=3)
  with jax.enable_x64(), optimisations_off():
    net = StandInNet()
    c_fl = StepConfig(lr=0.03, method='flmoco', **common)
    c_split = StepConfig(lr=0.06, loss_form='two_view', client_schedule='per_epoch', **common)
    fl = flmoco.create_state(net, c_fl, jax.random.key(0))
    split = state_lib.create_train_state(net, c_split, jax.random.key(0))
    split = split.replace(server=split.server.replace(queue=fl.server.queue[0]))
    pool = jnp.array([0], jnp.int32)
    for i, (epoch, b) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0)]):
      kq, kk = jax.random.split(jax.random.key(i))
      vq, vk = jax.random.normal(kq, (1, 2, 8, 8, 3)), jax.random.normal(kk, (1, 2, 8, 8, 3))
      fl, m_fl = flmoco.train_step(net, c_fl, fl, vq, vk, jnp.int32(epoch), jnp.int32(b), pool)
      split, m = step.train_step(net, c_split, split, vq, vk, jnp.int32(epoch), jnp.int32(b),
                                 pool=pool)
      np.testing.assert_allclose(float(m_fl['loss']), 2 * float(m['loss']), rtol=1e-14)
    chex.assert_trees_all_close(fl.clients.online, split.clients.online, rtol=1e-13)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], fl.server.online),
                                split.server.online, rtol=1e-13)
