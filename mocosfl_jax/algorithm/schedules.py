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
"""
import math

import jax.numpy as jnp

from mocosfl_jax.algorithm.plan import StepConfig

SERVER_GAMMA = 0.1
CLIENT_GAMMA = 0.2


def cosine(base: float, t, period: int):
  """Chained-cosine LR after t scheduler steps with T_max = period (eta_min = 0).

  Integer counters are first reduced modulo 2 * period (exact, the schedule's period), so the
  float32 angle stays accurate for the ~1e5 participations of long runs.
  """
  t = jnp.asarray(t)
  if jnp.issubdtype(t.dtype, jnp.integer):
    t = t % (2 * period)
  t = t.astype(jnp.float32)
  return base * 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * t / period))


def milestones(num_epochs: int) -> tuple:
  """Reference MultiStep milestones [int(0.6E), int(0.8E)]."""
  return (int(0.6 * num_epochs), int(0.8 * num_epochs))


def multistep(base: float, t, marks, gamma: float):
  """MultiStepLR after t scheduler steps: base * gamma ** (number of milestones <= t)."""
  t = jnp.asarray(t)
  n = sum((t >= m).astype(jnp.int32) for m in marks)
  return base * jnp.power(jnp.float32(gamma), n.astype(jnp.float32))


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
    float32 array shaped like `count`.
  """
  count = jnp.asarray(count)
  t = count if cfg.client_schedule == 'per_participation' else jnp.broadcast_to(
      jnp.asarray(epoch), count.shape)
  if cfg.lr_schedule == 'cosine':
    return cosine(cfg.c_lr, t, cfg.num_epochs)
  return multistep(cfg.c_lr, t, milestones(cfg.num_epochs), CLIENT_GAMMA)
