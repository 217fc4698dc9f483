"""MocoSFL's loss-threshold communication saving: the A/B/C status machine and the replay step.

With `loss_threshold > 0` every epoch runs in one of three statuses, chosen from the mean
training loss of the epochs before it (the reference's `loss_based_status`):

  A  the full protocol: clients upload, the server trains, clients download the gradient and
     train; the server keeps every step's smashed stacks (A_q, A_k).
  B  clients upload (their forward, the momentum EMA and the BatchNorm statistics still run),
     the server trains and keeps the stacks; no gradient download, no client backward, no client
     SGD and no client scheduler step (`step.train_step(..., train_clients=False)`).
  C  no client computation and no communication: the server trains on the stacks of the last
     A/B epoch in a random order (`replay_step`, `shuffle_map`).

After every epoch (1-based `epoch`) with mean loss L: during the warm-up (epoch <= warmup,
10 in the reference) delta = threshold, afterwards delta = max(previous L - L, 0); if
delta < threshold the status moves A -> B, B -> C, C -> C, else it returns to A. The
reference counts the status reached after each epoch (so E records, the first epoch's A
uncounted, a status for the epoch after the last one counted) and reports the saving as
#C + #B / 2 epochs out of E (`reference_saving`). The host side (storage of the stacks, resume,
bytes) is run/replay.py; docs/reference.md, 'Loss-threshold communication saving', lists where
we differ from the reference.
"""
import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from mocosfl_jax import precision
from mocosfl_jax.algorithm import parties, schedules
from mocosfl_jax.algorithm import sync as sync_lib
from mocosfl_jax.algorithm.plan import StepConfig
from mocosfl_jax.algorithm.state import TrainState

STATUSES = ('A', 'B', 'C')
WARMUP_EPOCHS = 10      # the reference's warm-up (loss_based_status's default)


@dataclasses.dataclass(frozen=True)
class StatusMachine:
  """The reference's `loss_based_status` as a value (JSON round trip with `asdict`/`from_dict`).

  Attributes:
    status: the status of the next epoch to run.
    prev_loss: the mean loss of the last finished epoch (None before the first: the
      reference's np.inf).
    recorded: {'A', 'B', 'C'} -> statuses counted as the reference counts them (one per
      finished epoch: the status it moved to).
    history: the status each finished epoch ran in, one letter per epoch.
  """
  status: str = 'A'
  prev_loss: Optional[float] = None
  recorded: tuple = (('A', 0), ('B', 0), ('C', 0))
  history: str = ''

  def counts(self) -> dict:
    return dict(self.recorded)

  def asdict(self) -> dict:
    return dict(status=self.status, prev_loss=self.prev_loss, recorded=self.counts(),
                history=self.history)

  @classmethod
  def from_dict(cls, d: dict) -> 'StatusMachine':
    return cls(d['status'], d['prev_loss'], tuple((k, int(d['recorded'][k])) for k in STATUSES),
               d['history'])


def next_status(status: str, prev_loss: Optional[float], loss: float, epoch: int,
                threshold: float, warmup: int = WARMUP_EPOCHS) -> str:
  """The status after 1-based `epoch` with mean loss `loss` (the reference's rules)."""
  if status not in STATUSES:
    raise ValueError(f'status={status!r}; valid: {STATUSES}.')
  if epoch <= warmup:
    delta = threshold
  else:
    delta = max((math.inf if prev_loss is None else prev_loss) - loss, 0.0)
  if delta < threshold:
    return {'A': 'B', 'B': 'C', 'C': 'C'}[status]
  return 'A'


def record_loss(m: StatusMachine, epoch: int, loss: float, threshold: float,
                warmup: int = WARMUP_EPOCHS) -> StatusMachine:
  """The machine after 1-based `epoch`, which ran in `m.status`, ended with mean loss `loss`."""
  new = next_status(m.status, m.prev_loss, loss, epoch, threshold, warmup)
  counts = m.counts()
  counts[new] += 1
  return StatusMachine(new, float(loss), tuple((k, counts[k]) for k in STATUSES),
                       m.history + m.status)


def reference_saving(counts: dict) -> float:
  """Epochs of communication saved as the reference logs it: #C + #B / 2."""
  return counts['C'] + counts['B'] / 2


def shuffle_map(key: jax.Array, epoch: int, steps_per_epoch: int) -> jax.Array:
  """The order a C epoch replays the stored steps in: a permutation of range(S), a
  deterministic function of (key, epoch) (the reference draws it from numpy's global RNG)."""
  return jax.random.permutation(jax.random.fold_in(key, epoch), steps_per_epoch)


def replay_step_fn(net, cfg: StepConfig, state: TrainState, smashed_q: jax.Array,
                   smashed_k: jax.Array, pool: jax.Array, epoch):
  """One C step: the server's step alone on stored smashed stacks; the clients do nothing.

  Args:
    smashed_q, smashed_k: [P, B', ...] stacks of one step of the last A/B epoch.
    pool: int32 [P] the clients the stacks came from (per-client queues are indexed by them).
    epoch: 0-based epoch (server learning rate).

  Returns:
    (state, metrics) with the keys of `step.train_step`'s scalar metrics: the server's loss,
    accuracy and learning rate, client_lr the pool's schedule value (no client steps), synced 0
    and the divergences 0 (a sync would change nothing: the clients have not moved).
  """
  pool = jnp.asarray(pool, jnp.int32)
  server, _, m = parties.server_step(net, cfg, state.tx, state.server, smashed_q, smashed_k,
                                     pool, epoch, client_grad=False)
  clients = state.clients
  client_lrs = schedules.client_lr(cfg, clients.count[pool], epoch) * clients.lr_scale[pool]
  zero = jnp.zeros((), precision.float_dtype())
  metrics = dict(m, client_lr=jnp.mean(client_lrs), synced=zero,
                 **{k: zero for k in sync_lib.DIVERGENCE_KEYS + sync_lib.L2_KEYS})
  return state.replace(server=server), metrics


# Jitted `replay_step_fn`: net and cfg static, the state donated.
replay_step = jax.jit(replay_step_fn, static_argnums=(0, 1), donate_argnums=(2,))
