"""Server-side MoCo InfoNCE and the three loss forms with the reference's stop-gradients.

All forms are written so that one `jax.grad` of the returned loss w.r.t. (client params, server
params) gives exactly the gradients of the split protocol: client-target features are
`stop_gradient`, keys are `stop_gradient`, and in the original form the A_q fed to the server
target is `stop_gradient` (clients get gradient from term 1 only).

The reference's batch-shuffle of keys (shuffle rows, run W', unshuffle) is dropped: on one device
with GroupNorm, or BN over the whole batch, it is a mathematical no-op. The forms and their
reference are described in docs/reference.md, 'Server loss'.
"""
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from mocosfl_jax import precision
from mocosfl_jax.algorithm.queue import l2_normalize

PyTree = Any


def nll_of_positive(pos: jax.Array, others: jax.Array, where=None) -> jax.Array:
  """-log softmax([pos, others...])[0] per row, accurate to float rounding of the inputs.

  Equal to logsumexp([pos, others]) - pos (and PyTorch's cross-entropy), but computed as
  softplus(logsumexp(others) - pos): when the positive dominates, the loss is tiny and both
  logsumexp - pos (a difference of two numbers near pos) and -log_softmax (log of 1 + a tiny
  sum) round it to a few float32 ulps of the logits, i.e. up to 1e-3 relative for a loss of
  1e-4; softplus keeps the relative error at that of the logits themselves.

  Args:
    pos: [R] logit of the correct entry.
    others: [R, M] the other logits (M >= 1).
    where: optional bool [R, M] selecting which of `others` count.
  """
  return jax.nn.softplus(jax.nn.logsumexp(others, axis=-1, where=where) - pos)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-row cross-entropy of integer labels, [R, C] logits -> [R] (see `nll_of_positive`)."""
  pos = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  others = jnp.arange(logits.shape[-1]) != labels[:, None]
  return nll_of_positive(pos, logits, where=others)


def info_nce(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float):
  """MoCo InfoNCE with label 0.

  Args:
    q: [R, D] L2-normalised queries.
    k: [R, D] L2-normalised positive keys (treated as constants).
    queue: [K, D] shared negatives, or [G, K', D] per-client negatives where the R rows are G
      consecutive blocks of R // G rows (pool position order).
    temperature: T.

  Returns:
    (loss, accuracy in percent, mean positive cosine), loss = mean_n -log softmax(logits_n)[0]
    with logits_n = [q_n.k_n, q_n.Q_1, ..., q_n.Q_K] / T, computed as `nll_of_positive`.
  """
  k = jax.lax.stop_gradient(k)
  queue = jax.lax.stop_gradient(queue)
  l_pos = jnp.sum(q * k, axis=-1)                                  # [R]
  if queue.ndim == 2:
    l_neg = q @ queue.T                                            # [R, K]
  else:
    g = queue.shape[0]
    r = q.shape[0]
    if r % g:
      raise ValueError(f'{r} rows cannot be split over {g} per-client queues.')
    l_neg = jnp.einsum('grd,gkd->grk', q.reshape(g, r // g, -1), queue).reshape(r, -1)
  pos, neg = l_pos / temperature, l_neg / temperature
  loss = jnp.mean(nll_of_positive(pos, neg))
  acc = 100.0 * jnp.mean((pos >= jnp.max(neg, axis=1)).astype(precision.float_dtype()))
  return loss, acc, jnp.mean(l_pos)


def client_inputs(loss_form: str, x_q: jax.Array, x_k: jax.Array):
  """Per-client (online input, momentum input): [q;k] / [k;q] for 'two_view', else (q, k)."""
  if loss_form == 'two_view':
    return jnp.concatenate([x_q, x_k], axis=0), jnp.concatenate([x_k, x_q], axis=0)
  return x_q, x_k


def embed(net, variables: dict, x: jax.Array):
  """Normalised projection and the variables with updated running stats (params unchanged)."""
  proj, new_vars = net.apply_server(variables, x, train=True)
  new = dict(variables)
  if 'batch_stats' in new_vars:
    new['batch_stats'] = new_vars['batch_stats']
  return l2_normalize(proj), new


def has_batch_stats(variables: dict) -> bool:
  """True if the variables carry BatchNorm running stats (rows of a batch then interact)."""
  return bool(jax.tree.leaves(variables.get('batch_stats', {})))


def server_loss(net, loss_form: str, temperature: float, online_vars: dict, momentum_vars: dict,
                a_q: jax.Array, a_k: jax.Array, queue: jax.Array, num_groups: int,
                fuse_passes: Optional[bool] = None) -> Tuple[jax.Array, dict]:
  """Server contrastive loss on concatenated smashed data.

  Args:
    net: split network (apply_server).
    loss_form: 'original' | 'two_view' | 'single'.
    temperature: T.
    online_vars / momentum_vars: server W and (already EMA-updated) target W' variables.
    a_q: [R, ...] smashed queries from client online nets, pool order.
    a_k: [R, ...] smashed keys from client momentum nets (stop-gradient here).
    queue: pre-step queue, [K, D] shared or [P, K', D] gathered per-client queues.
    num_groups: P (pool positions), used to group keys per client.
    fuse_passes: 'original' form only: run W once on [A_q; A_k] and W' once on [A_k; A_q]
      instead of four passes of R rows (one pass per net: bigger matmuls, half the per-op
      overhead). Exact only when every server op is per-row (GroupNorm nets); with BatchNorm the
      batch statistics would mix the two halves, so None (default) fuses iff neither W nor W'
      has batch_stats. True with BatchNorm raises ValueError.

  Returns:
    (loss, aux) with aux: online_vars / momentum_vars (running stats updated in the reference's
    call order), keys ([n, D] shared layout, k1 block first for 'original'), client_keys
    ([P, keys_per_client, D] per-client layout), acc (of the last term, as the reference),
    pos (mean positive cosine over the computed terms).
  """
  a_k = jax.lax.stop_gradient(a_k)
  if loss_form in ('two_view', 'single'):
    q, online_vars = embed(net, online_vars, a_q)
    k, momentum_vars = embed(net, momentum_vars, a_k)
    k = jax.lax.stop_gradient(k)
    loss, acc, pos = info_nce(q, k, queue, temperature)
    aux = dict(online_vars=online_vars, momentum_vars=momentum_vars, keys=k,
               client_keys=k.reshape(num_groups, -1, k.shape[-1]), acc=acc, pos=pos)
    return loss, aux
  if loss_form != 'original':
    raise ValueError(f"loss_form={loss_form!r}; valid: ('original', 'two_view', 'single').")

  bn = has_batch_stats(online_vars) or has_batch_stats(momentum_vars)
  if fuse_passes and bn:
    raise ValueError('fuse_passes=True needs a server without BatchNorm (batch_stats found): '
                     'a fused pass would mix the two halves in the batch statistics.')
  if (not bn) if fuse_passes is None else fuse_passes:
    # Same maths as the four calls below when rows are independent: online W on [A_q; A_k]
    # (clients get gradient only through the A_q rows), target W' on [A_k; A_q].
    r = a_q.shape[0]
    q, online_vars = embed(net, online_vars, jnp.concatenate([a_q, a_k], axis=0))
    k, momentum_vars = embed(net, momentum_vars,
                              jnp.concatenate([a_k, jax.lax.stop_gradient(a_q)], axis=0))
    q1, q2 = q[:r], q[r:]
    k2, k1 = jax.lax.stop_gradient(k[:r]), jax.lax.stop_gradient(k[r:])
  else:
    # Call order W(Aq), W'(Ak), W(Ak), W'(Aq) as the reference (BN running stats).
    q1, online_vars = embed(net, online_vars, a_q)
    k2, momentum_vars = embed(net, momentum_vars, a_k)
    q2, online_vars = embed(net, online_vars, a_k)
    k1, momentum_vars = embed(net, momentum_vars, jax.lax.stop_gradient(a_q))
    k1, k2 = jax.lax.stop_gradient(k1), jax.lax.stop_gradient(k2)
  # Term 1: l(Aq, Ak). Term 2: l(Ak, Aq): server online on client-*target* features; Aq enters
  # W' without grad.
  loss1, _, pos1 = info_nce(q1, k2, queue, temperature)
  loss2, acc, pos2 = info_nce(q2, k1, queue, temperature)
  loss = loss1 + loss2                        # a sum, not a mean, as the reference
  d = k1.shape[-1]
  aux = dict(online_vars=online_vars, momentum_vars=momentum_vars,
             keys=jnp.concatenate([k1, k2], axis=0),            # k1 block first
             client_keys=jnp.concatenate([k1.reshape(num_groups, -1, d),
                                          k2.reshape(num_groups, -1, d)], axis=1),
             acc=acc, pos=0.5 * (pos1 + pos2))
  return loss, aux
