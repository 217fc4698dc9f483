"""FedAvg of client models and the MonAcoSFL divergence metrics (spec §1.8, §2.1, §2.3).

The per-client body uses `lax.pmean(x, 'clients')`, so the same function runs under
`jax.vmap(..., axis_name='clients')` over the pool (one device, tests) and under `jax.shard_map`
over a client mesh axis later.

Deliberate deviation: the reference's `average_weights` starts from client 0's state dict and
adds pool[1:], so under client sampling client 0's stale weights replace pool[0]'s (§1.8, §10.2).
We average exactly the pool. The whole variables dict is averaged (params and BN running stats,
as the reference averages buffers); divergences are measured on 'params' only (S skips BN
buffers too).
"""
from typing import Any, Tuple

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any
AXIS = 'clients'
DIVERGENCE_KEYS = ('div_online_global', 'div_online_momentum', 'div_momentum_global')


def tree_pmean(tree: PyTree, axis_name: str = AXIS) -> PyTree:
  """Mean over the mapped client axis of every floating leaf (integer leaves are kept)."""
  def f(x):
    return lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(f, tree)


def mean_sq_diff(a: PyTree, b: PyTree) -> jax.Array:
  """Mean squared difference per element over a whole tree (M's divergence measure)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if not la:
    return jnp.zeros((), jnp.float32)
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
  """FedAvg over stacked pool trees (leading axis P) via vmap + pmean.

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
