"""FedAvg of client models and the MonAcoSFL divergence metrics.

The per-client body `fedavg_client` uses `lax.pmean(x, 'clients')`, so the same function runs
under `jax.vmap(..., axis_name='clients')` over the pool (`fedavg_pool`) and under
`jax.shard_map` over a client mesh axis: it is the definition. The training step uses
`fedavg_masked` (through `fedavg_if`), equal to it up to summation order (tests): each device
takes the mask-weighted sum of its local clients as a dot product and psums it over the
'clients' axis, so padding clients count for nothing. Why not the pmean under vmap: it lowers to
a reduction over the leading (client) axis, in which each output element reads N values one
client model apart, and XLA:CPU runs that far slower than a dot product over the same bytes
(bench/README.md has the figures).

Deliberate deviation: the reference's `average_weights` starts from client 0's state dict and
adds pool[1:], so under client sampling client 0's stale weights replace pool[0]'s; we average
exactly the pool (docs/reference.md, 'FedAvg'), and `StepConfig.fedavg_set='reference'`
reproduces the reference (`reference_weights`). The whole variables dict is averaged (params and
BatchNorm running stats, as the reference averages buffers); divergences are measured on
'params' only, as the reference code skips BatchNorm buffers too.

`aggregate_if` is what the step runs: `fedavg_if` plus the switches of `StepConfig`, the
reference's own divergence measure (`l2_divergences`: per client, the sum over tensors of the
L2 norm of local - global) and divergence-aware aggregation (FedEMA's rule, or the reference's
no-op); docs/reference.md, 'Divergence and divergence-aware aggregation'.
"""
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax import precision
from mocosfl_jax.algorithm.mapping import AXIS, ClientParallel, map_clients, reduce_clients

PyTree = Any
DIVERGENCE_KEYS = ('div_online_global', 'div_online_momentum', 'div_momentum_global')


def tree_pmean(tree: PyTree, axis_name: str = AXIS) -> PyTree:
  """Mean over the mapped client axis of every floating leaf (integer leaves are kept)."""
  def f(x):
    return lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(f, tree)


def mean_sq_diff(a: PyTree, b: PyTree) -> jax.Array:
  """Mean squared difference per element over a whole tree (MonAcoSFL's divergence measure)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if not la:
    return jnp.zeros((), precision.float_dtype())
  total = sum(jnp.sum(jnp.square(x - y)) for x, y in zip(la, lb))
  return total / sum(x.size for x in la)


def fedavg_client(online: PyTree, momentum: PyTree, sync_momentum: bool,
                  axis_name: str = AXIS) -> Tuple[PyTree, PyTree, dict]:
  """Per-client FedAvg body; must run with `axis_name` bound (vmap or shard_map over the pool).

  Args:
    online / momentum: this client's variables {'params', 'batch_stats'} (after its local step).
    sync_momentum: MonAcoSFL: also replace momentum by the pool mean of momentum nets.
    axis_name: mapped axis carrying the pool clients.

  Returns:
    (pool-mean online vars, momentum vars (averaged iff sync_momentum), metrics), metrics =
    pool means of ||online - mean(online)||^2, ||online - momentum||^2 and
    ||momentum - mean(momentum)||^2 per element, all measured before the replacement.
  """
  avg_on = tree_pmean(online, axis_name)
  avg_mom = tree_pmean(momentum, axis_name)
  p_on, p_mom = online.get('params', online), momentum.get('params', momentum)
  divs = (mean_sq_diff(p_on, avg_on.get('params', avg_on)), mean_sq_diff(p_on, p_mom),
          mean_sq_diff(p_mom, avg_mom.get('params', avg_mom)))
  metrics = {k: lax.pmean(v, axis_name) for k, v in zip(DIVERGENCE_KEYS, divs)}
  return avg_on, (avg_mom if sync_momentum else momentum), metrics


def fedavg_pool(online_pool: PyTree, momentum_pool: PyTree, sync_momentum: bool):
  """FedAvg over stacked pool trees (leading axis P) via vmap + pmean: the definition, kept as
  the reference that `fedavg_masked` (what the step runs) is tested against.

  Returns:
    (mean online vars, mean momentum vars or None, metrics) without the pool axis.
  """
  avg_on, avg_mom, metrics = jax.vmap(
      lambda o, m: fedavg_client(o, m, sync_momentum), axis_name=AXIS)(online_pool, momentum_pool)
  first = lambda t: jax.tree.map(lambda x: x[0], t)
  return first(avg_on), (first(avg_mom) if sync_momentum else None), first(metrics)


def broadcast_clients(tree: PyTree, num_clients: int) -> PyTree:
  """Copies one client's tree to all N clients (leading axis N)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (num_clients,) + x.shape), tree)


def give_all(clients, rows, momentum_sync: bool):
  """After a sync of the pool: every client's online (and with momentum sync, momentum)
  variables := pool row 0's, which holds the average. `clients` [N], `rows` the pool's [P]."""
  n = clients.count.shape[0]
  first = lambda t: broadcast_clients(jax.tree.map(lambda x: x[0], t), n)
  clients = clients.replace(online=first(rows.online))
  if momentum_sync:
    clients = clients.replace(momentum=first(rows.momentum))
  return clients


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def _wsum(tree: PyTree, mask: jax.Array) -> PyTree:
  """Mask-weighted sum over the leading (local client) axis of every floating leaf."""
  def f(x):
    if not _is_float(x):
      return jnp.zeros((), precision.float_dtype())
    return jnp.tensordot(mask.astype(x.dtype), x, axes=1)
  return jax.tree.map(f, tree)


def fedavg_masked(par, online_pool: PyTree, momentum_pool: PyTree, mask: Optional[jax.Array],
                  sync_momentum: bool, weights: Optional[jax.Array] = None,
                  extra: Optional[tuple] = None):
  """FedAvg over the real (mask 1; None = all) clients of a possibly padded, sharded pool.

  `par` is a ClientParallel (None: vmap): under 'shard_map' every device sums its local
  clients as a dot product with the mask and
  the sums are psum'ed over the 'clients' axis (the pmean of `fedavg_client`, weighted by the
  mask so padding clients count for nothing). Same results as `fedavg_pool` up to float
  summation order. Integer leaves are taken from pool position 0.

  weights, extra: the reference's set (`reference_weights`): the rows are summed with
  `weights` instead of the mask, `extra` = (online vars, momentum vars, weight) of one more
  client (no pool axis) is added, and the sum is still divided by the number of real rows.

  Returns:
    (mean online vars, mean momentum vars or None, metrics) without the pool axis.
  """
  if mask is None:
    mask = jnp.ones((jax.tree.leaves(online_pool)[0].shape[0],), precision.float_dtype())

  def sums(on, mom, m):
    return dict(n=jnp.sum(m), on=_wsum(on, m), mom=_wsum(mom, m))

  if weights is None:
    s = reduce_clients(par, sums, online_pool, momentum_pool, mask)
    n = s['n']
  else:
    s = reduce_clients(par, sums, online_pool, momentum_pool, weights)
    n = jnp.sum(mask)
    if extra is not None:
      on0, mom0, w0 = extra
      add = lambda tot, x: tot + w0.astype(tot.dtype) * x if _is_float(x) else tot
      s = dict(s, on=jax.tree.map(add, s['on'], on0), mom=jax.tree.map(add, s['mom'], mom0))

  def mean(tot, full):
    return jax.tree.map(lambda t, x: (t / n).astype(x.dtype) if _is_float(x) else x[0],
                        tot, full)

  avg_on, avg_mom = mean(s['on'], online_pool), mean(s['mom'], momentum_pool)
  p_avg_on, p_avg_mom = avg_on.get('params', avg_on), avg_mom.get('params', avg_mom)

  def divs(on, mom, m):
    p_on, p_mom = on.get('params', on), mom.get('params', mom)
    size = sum(x[0].size for x in jax.tree.leaves(p_on))

    def sq(a, b):  # b: stacked like a, or one tree that broadcasts over the client axis
      per = sum(jnp.sum(jnp.square(x - y).reshape(x.shape[0], -1), axis=1)
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
      return jnp.sum(m * per) / size

    return dict(zip(DIVERGENCE_KEYS, (sq(p_on, p_avg_on), sq(p_on, p_mom),
                                      sq(p_mom, p_avg_mom))))

  if jax.tree.leaves(p_avg_on):
    metrics = {k: v / n for k, v in
               reduce_clients(par, divs, online_pool, momentum_pool, mask).items()}
  else:
    metrics = {k: jnp.zeros((), precision.float_dtype()) for k in DIVERGENCE_KEYS}
  return avg_on, (avg_mom if sync_momentum else None), metrics


def fedavg_if(sync, clients, sync_momentum: bool, mask: Optional[jax.Array] = None,
              par: Optional[ClientParallel] = None, keep_params: bool = False):
  """FedAvg of the pool's clients (stacked ClientState rows) when `sync` is true.

  Every row's online variables (MonAcoSFL: and momentum variables) become the average of the
  real rows (`mask`, None = all). `lax.cond`, so one compiled step serves sync and non-sync
  steps. Returns (clients, metrics): the divergences, measured before averaging, and 0 when
  there is no sync.

  keep_params (static; frozen clients, c_lr = 0): the online 'params' are left as they are and
  only the rest (BatchNorm running statistics; MonAcoSFL: the momentum nets) is averaged.
  Frozen clients all hold the same params (they start equal and never step), so their average
  is the same params, but a float sum of equal values can move the last bit.
  """
  rows = jax.tree.leaves(clients.online)[0].shape[0]

  def do_sync(cl):
    avg_on, avg_mom, m = fedavg_masked(par, cl.online, cl.momentum, mask, sync_momentum)
    online = broadcast_clients(avg_on, rows)
    if keep_params and 'params' in online:
      online = dict(online, params=cl.online['params'])
    cl = cl.replace(online=online)
    if sync_momentum:
      cl = cl.replace(momentum=broadcast_clients(avg_mom, rows))
    return cl, {k: v.astype(precision.float_dtype()) for k, v in m.items()}

  def no_sync(cl):
    return cl, {k: jnp.zeros((), precision.float_dtype()) for k in DIVERGENCE_KEYS}

  return lax.cond(jnp.asarray(sync, bool), do_sync, no_sync, clients)


# ---- the reference's FedAvg set, its divergence measure, divergence-aware aggregation ---------

L2_KEYS = ('div_l2_mean', 'div_l2_std')
MU_KEY = 'div_mu_mean'


def reference_weights(pool: jax.Array, rows: int, mask: Optional[jax.Array]):
  """Row weights of the reference's `average_weights`: client 0 + pool[1:], divided by P.

  Pool position 0 gets weight 0 and client 0 weight 1: through its row when client 0 is in the
  pool (so a client 0 at position j >= 1 counts twice), else as an extra client whose weight is
  returned. Padding rows (mask 0) get 0.

  Returns:
    (weights [rows], weight of client 0 when it is outside the pool: 1.0 or 0.0).
  """
  dtype = precision.float_dtype()
  m = jnp.ones((rows,), dtype) if mask is None else mask.astype(dtype)
  p = pool.shape[0]
  at0 = jnp.zeros((rows,), dtype).at[:p].set((pool == 0).astype(dtype))
  first = jnp.zeros((rows,), dtype).at[0].set(1.0)
  return m - first + at0, 1.0 - jnp.sum(at0)


def l2_divergences(par, rows: PyTree, avg: PyTree, n: int) -> jax.Array:
  """The reference's divergence of every row: the sum over tensors of ||local - global||_2.

  Args:
    rows: stacked 'params' of the pool's n rows (leading axis); avg: the global 'params'.

  Returns:
    float [n] (per client, not per element: unlike MonAcoSFL's mean squared difference it
    grows with the model's size); zeros for a client without params.
  """
  dtype = precision.float_dtype()
  if not jax.tree.leaves(rows):
    return jnp.zeros((n,), dtype)

  def one(a, b):
    return sum(jnp.sqrt(jnp.sum(jnp.square(x - y))).astype(dtype) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  return map_clients(par, one, rows, broadcast_clients(avg, n))


def _masked_mean_std(d: jax.Array, mask: Optional[jax.Array]):
  m = jnp.ones_like(d) if mask is None else mask.astype(d.dtype)
  n = jnp.sum(m)
  mean = jnp.sum(m * d) / n
  return mean, jnp.sqrt(jnp.sum(m * jnp.square(d - mean)) / n)


def fedema_mix(local: PyTree, global_: PyTree, mu: jax.Array) -> PyTree:
  """Per row j: mu_j * local_j + (1 - mu_j) * global on every floating leaf (FedEMA's update);
  integer leaves take the global's."""
  def f(x, g):
    if not _is_float(x):
      return jnp.broadcast_to(g, x.shape)
    w = mu.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return w * x + (1 - w) * g
  return jax.tree.map(f, local, global_)


def aggregate_if(sync, clients, cfg, mask: Optional[jax.Array] = None,
                 par: Optional[ClientParallel] = None, *, pool: jax.Array,
                 client0: Optional[tuple] = None, div_lambda: Optional[jax.Array] = None,
                 keep_params: bool = False):
  """`fedavg_if` with the step's switches (cfg: StepConfig), and the reference's measure.

  At a sync step: the global model is the pool's mean (cfg.fedavg_set='pool') or the
  reference's client 0 + pool[1:] (needs `client0` = (online vars, momentum vars) of client 0
  before this step's sync); every pool row's divergence ||local - global|| (`l2_divergences`)
  is logged as its pool mean and std (div_l2_mean, div_l2_std) beside the `fedavg_if` metrics.
  Then with cfg.divergence_aware:
    'off': every row gets the global model (`fedavg_if`).
    'fedema': row j keeps mu_j * local + (1 - mu_j) * global, mu_j = min(1, lambda_j * div_j)
      (Zhuang et al., ICLR 2022); lambda_j (`div_lambda` [N], 0 = unset) is set to
      cfg.div_mu / div_j at client j's first sync, for every client. Logs div_mu_mean.
    'reference': the reference's no-op: the rows keep their local models.
  Clients outside the pool get the global model (parallel.py), which is returned for that.
  keep_params (static): the rows keep their online 'params' (frozen clients, c_lr = 0, or the
  loss-threshold saving's status B: they did not train, and all hold the last sync's model).

  Returns:
    (clients, metrics, global online vars or None (divergence_aware 'off'), div_lambda).
  """
  rows = jax.tree.leaves(clients.online)[0].shape[0]
  pool = jnp.asarray(pool, jnp.int32)
  aware = cfg.divergence_aware
  dtype = precision.float_dtype()
  keys = DIVERGENCE_KEYS + L2_KEYS + ((MU_KEY,) if aware == 'fedema' else ())
  if cfg.fedavg_set == 'reference' and client0 is None:
    raise ValueError("fedavg_set='reference' needs client0 (client 0's online and momentum "
                     'variables): parallel.train_step passes them.')

  def do_sync(operand):
    cl, lam = operand
    weights = extra = None
    if cfg.fedavg_set == 'reference':
      weights, w0 = reference_weights(pool, rows, mask)
      extra = (client0[0], client0[1], w0)
    avg_on, avg_mom, m = fedavg_masked(par, cl.online, cl.momentum, mask, cfg.momentum_sync,
                                       weights, extra)
    m = {k: v.astype(dtype) for k, v in m.items()}
    d = l2_divergences(par, cl.online.get('params', cl.online), avg_on.get('params', avg_on),
                       rows)
    m['div_l2_mean'], m['div_l2_std'] = _masked_mean_std(d, mask)
    online = broadcast_clients(avg_on, rows)
    if (cfg.frozen_clients or keep_params) and 'params' in online:
      online = dict(online, params=cl.online['params'])
    if aware == 'fedema':
      ids = jnp.concatenate([pool, jnp.zeros((rows - pool.shape[0],), jnp.int32)])
      lam_rows = lam[ids]
      lam_rows = jnp.where((lam_rows <= 0) & (d > 0), cfg.div_mu / jnp.where(d > 0, d, 1.0),
                           lam_rows)
      mu = jnp.minimum(1.0, lam_rows * d)
      online = fedema_mix(cl.online, avg_on, mu)
      lam = lam.at[pool].set(lam_rows[:pool.shape[0]])
      m[MU_KEY] = _masked_mean_std(mu, mask)[0]
    elif aware == 'reference':
      online = cl.online
    cl = cl.replace(online=online)
    if cfg.momentum_sync:
      cl = cl.replace(momentum=broadcast_clients(avg_mom, rows))
    return (cl, lam), m, (avg_on if aware != 'off' else None)

  def no_sync(operand):
    cl, _ = operand
    zero = {k: jnp.zeros((), dtype) for k in keys}
    first = jax.tree.map(lambda x: x[0], cl.online) if aware != 'off' else None
    return operand, zero, first

  (clients, div_lambda), metrics, avg = lax.cond(jnp.asarray(sync, bool), do_sync, no_sync,
                                                 (clients, div_lambda))
  return clients, metrics, avg, div_lambda
