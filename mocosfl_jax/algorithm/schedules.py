"""Learning-rate schedules as pure functions of counters, usable inside jit.

The reference uses PyTorch schedulers stepped at different rates: the server's once per epoch,
each client's once per *participation* (a quirk we keep by default; docs/reference.md,
'Learning-rate schedules'). We evaluate the closed forms at the counter instead of stepping
objects:

* cosine: base * (1 + cos(pi * t / E)) / 2. PyTorch's chained CosineAnnealingLR continues
  periodically past t = E (0 at E, 3E, ...; back to base at 2E, 4E, ...), which this closed form
  reproduces; that is what clients see in the reference when t counts participations.
* multistep: base * gamma ** #{m in [int(0.6E), int(0.8E)] : m <= t} (bisect_right semantics,
  duplicate milestones decay twice as PyTorch's Counter does).

Both are computed in `precision.float_dtype()` (float64 under JAX's x64 mode, as PyTorch's
learning rates are Python doubles), in forms whose relative error stays at a few ulps of that
type everywhere, the cosine minimum included.
"""
import math

import jax.numpy as jnp

from mocosfl_jax import precision
from mocosfl_jax.algorithm.plan import StepConfig

SERVER_GAMMA = 0.1
CLIENT_GAMMA = 0.2


def cosine(base: float, t, period: int):
  """Chained-cosine LR after t scheduler steps with T_max = period (eta_min = 0).

  Computed as base * sin(pi * (period - t) / (2 period))^2, which equals
  base * (1 + cos(pi * t / period)) / 2 but has no cancellation near the minimum (1 + cos(x) with
  cos(x) ~ -1 loses all but a few bits there). Integer counters are first reduced modulo
  2 * period (exact, the schedule's period) and period - t is formed in integers, so the angle
  stays accurate for the ~1e5 participations of long runs.
  """
  dtype = precision.float_dtype()
  t = jnp.asarray(t)
  if jnp.issubdtype(t.dtype, jnp.integer):
    t = t % (2 * period)
    s = (period - t).astype(dtype)
  else:
    s = period - t.astype(dtype)
  half_angle = jnp.asarray(math.pi / (2 * period), dtype) * s
  return jnp.asarray(base, dtype) * jnp.square(jnp.sin(half_angle))


def milestones(num_epochs: int) -> tuple:
  """Reference MultiStep milestones [int(0.6E), int(0.8E)]."""
  return (int(0.6 * num_epochs), int(0.8 * num_epochs))


def multistep(base: float, t, marks, gamma: float):
  """MultiStepLR after t scheduler steps: base * gamma ** (number of milestones <= t).

  The len(marks) + 1 possible values are formed in Python doubles (as PyTorch does) and rounded
  once to the float type.
  """
  t = jnp.asarray(t)
  n = sum((t >= m).astype(jnp.int32) for m in marks)
  values = [base]
  for _ in marks:
    values.append(values[-1] * gamma)
  return jnp.asarray(values, precision.float_dtype())[n]


def server_lr(cfg: StepConfig, epoch):
  """Server LR during 0-based `epoch` (its scheduler has been stepped `epoch` times)."""
  if cfg.lr_schedule == 'cosine':
    return cosine(cfg.lr, epoch, cfg.num_epochs)
  return multistep(cfg.lr, epoch, milestones(cfg.num_epochs), SERVER_GAMMA)


def client_lr(cfg: StepConfig, count, epoch):
  """Client LR for its current update.

  Args:
    cfg: step config (c_lr, lr_schedule, client_schedule, num_epochs).
    count: participations completed before this one (int array, any shape, e.g. [P]); the
      counter the reference's per-participation scheduler has reached.
    epoch: 0-based epoch, used when cfg.client_schedule == 'per_epoch'.

  Returns:
    float array (precision.float_dtype()) shaped like `count`.
  """
  count = jnp.asarray(count)
  t = count if cfg.client_schedule == 'per_participation' else jnp.broadcast_to(
      jnp.asarray(epoch), count.shape)
  if cfg.lr_schedule == 'cosine':
    return cosine(cfg.c_lr, t, cfg.num_epochs)
  return multistep(cfg.c_lr, t, milestones(cfg.num_epochs), CLIENT_GAMMA)


FLMOCO_MILESTONES = (60, 120, 160)


def flmoco_lr(cfg: StepConfig, epoch):
  """An FL-MoCo client's LR during 0-based round `epoch`: the reference steps every client's
  scheduler once per round, cosine with T_max = E, or MultiStep at the fixed rounds
  (60, 120, 160) with gamma 0.2 (its run_flmoco.py; not scaled with E), from c_lr."""
  if cfg.lr_schedule == 'cosine':
    return cosine(cfg.c_lr, epoch, cfg.num_epochs)
  return multistep(cfg.c_lr, epoch, FLMOCO_MILESTONES, CLIENT_GAMMA)
