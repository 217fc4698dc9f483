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
exactly the pool (docs/reference.md, 'FedAvg'). The whole variables dict is averaged (params and
BatchNorm running stats, as the reference averages buffers); divergences are measured on
'params' only, as MonAcoSFL's reference code skips BatchNorm buffers too.
"""
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from mocosfl_jax import precision
from mocosfl_jax.algorithm.mapping import AXIS, ClientParallel, reduce_clients

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
                  sync_momentum: bool):
  """FedAvg over the real (mask 1; None = all) clients of a possibly padded, sharded pool.

  `par` is a ClientParallel (None: vmap): under 'shard_map' every device sums its local
  clients as a dot product with the mask and
  the sums are psum'ed over the 'clients' axis (the pmean of `fedavg_client`, weighted by the
  mask so padding clients count for nothing). Same results as `fedavg_pool` up to float
  summation order. Integer leaves are taken from pool position 0.

  Returns:
    (mean online vars, mean momentum vars or None, metrics) without the pool axis.
  """
  if mask is None:
    mask = jnp.ones((jax.tree.leaves(online_pool)[0].shape[0],), precision.float_dtype())

  def sums(on, mom, m):
    return dict(n=jnp.sum(m), on=_wsum(on, m), mom=_wsum(mom, m))

  s = reduce_clients(par, sums, online_pool, momentum_pool, mask)
  n = s['n']

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
