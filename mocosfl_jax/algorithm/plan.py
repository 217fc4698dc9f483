"""Static plan of a simulated MocoSFL / MonAcoSFL run: config, sync rule, auto_adjust, pools.

`StepConfig` is a frozen, hashable dataclass so it can be a static argument of the jitted step.
Everything that changes from step to step (epoch, batch index, pool, counters) is a traced array
instead, so one compiled step serves the whole run. The reference rules implemented here are
described in docs/reference.md ('Sync rule', 'Client sampling', 'auto_adjust').
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from mocosfl_jax.privacy import decoder as decoder_lib

LOSS_FORMS = ('original', 'two_view', 'single')
LR_SCHEDULES = ('cosine', 'multistep')
CLIENT_SCHEDULES = ('per_participation', 'per_epoch')
FLAVOURS = ('mocosfl', 'monacosfl')
METHODS = ('mocosfl', 'flmoco')
FLMOCO_LOSS_FORMS = ('original', 'single')
FEDAVG_SETS = ('pool', 'reference')
CLIENT_QUEUES = ('clean', 'reference')
DIVERGENCE_AWARE = ('off', 'fedema', 'reference')


@dataclasses.dataclass(frozen=True)
class RessflConfig:
  """TAResSFL's simulated attacker and regulariser in the step (algorithm/ressfl.py); static.

  Attributes:
    alpha: weight of the regulariser alpha * (s - target_ssim), s the attacker's SSIM.
    target_ssim: the regulariser acts only while s > target_ssim (always when <= 0).
    decoder: the attacker's decoder, 'res_normN<blocks>C<channels>' (privacy/decoder.py).
    norm: 'bn' or 'gn' (GroupNorm + weight-standardised convs) in the decoder.
    mean, std: RGB constants that turn the client's (normalised) input back into the [0, 1]
      image the attacker reconstructs.
    milestones: epochs at which the attacker's learning rate is multiplied by `gamma`.
    lr, gamma: the attacker's Adam learning rate and its MultiStep decay.
  """
  alpha: float
  target_ssim: float
  decoder: str
  norm: str
  mean: tuple
  std: tuple
  milestones: tuple = (60, 120, 160)
  lr: float = 1e-3
  gamma: float = 0.2

  def __post_init__(self):
    for name in ('mean', 'std', 'milestones'):   # lists after a JSON round trip
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.alpha < 0:
      raise ValueError(f'ressfl alpha={self.alpha!r} must be >= 0.')
    if not 0.0 <= self.target_ssim < 1.0:
      raise ValueError(f'ressfl target_ssim={self.target_ssim!r} must be in [0, 1).')
    decoder_lib.parse_name(self.decoder)
    if self.norm not in decoder_lib.NORMS:
      raise ValueError(f'ressfl norm={self.norm!r}; valid: {decoder_lib.NORMS}.')
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f'ressfl mean={self.mean!r}, std={self.std!r}: need 3 values each, '
                       'std > 0.')


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Hyper-parameters of one simulated training step (hashable, static under jit).

  Attributes:
    num_clients: N, number of clients holding state.
    pool_size: P, clients per step; None derives int(sample_ratio * N).
    batch_size: B, images per client per step (before the two-view doubling); with an auxiliary
      data set (TAResSFL) the target and auxiliary images together.
    queue_size: K, shared queue length (per-client queues get K // N rows each).
    temperature: InfoNCE temperature T.
    loss_form: 'original' (MocoSFL two-term sum), 'two_view' (MonAcoSFL [q;k] concat, single
      mean) or 'single' (V1 non-symmetric ℓ(Aq, Ak)); docs/reference.md, 'Server loss'.
    momentum_sync: MonAcoSFL: FedAvg also averages the client momentum (target) nets.
    tau: EMA coefficient of client and server targets (0.99, hard-coded in the reference).
    lr: server base learning rate.
    c_lr: client base learning rate; None means `lr` (reference default c_lr = -1).
    momentum: SGD momentum (both sides).
    weight_decay: SGD weight decay, applied to every parameter as the reference does.
    lr_schedule: 'cosine' (V2) or 'multistep' (V1), for server and clients.
    client_schedule: 'per_participation' (reference quirk: the client scheduler steps once per
      participation, so chained cosine becomes periodic) or 'per_epoch' (clean);
      docs/reference.md, 'Learning-rate schedules'.
    num_epochs: E after any sampling multiplication (cosine T_max).
    steps_per_epoch: S.
    avg_freq: FedAvg frequency parameter of the sync rule (`is_sync_step`).
    feature_sharing: one shared queue (True, default) or per-client queues.
    sample_ratio: r in (0, 1]; used to derive pool_size.
    ressfl: None, or TAResSFL's simulated attacker and regulariser (`RessflConfig`).
    method: 'mocosfl' (split learning, this module's step) or 'flmoco' (the FL-MoCo baseline,
      algorithm/flmoco.py: every client trains the whole network with its own queue of
      `queue_size` keys, at learning rate c_lr on the per-round schedule; `client_schedule`
      does not apply and the symmetric loss is 'original', the non-symmetric 'single').
    rich_clients: heterogeneous clients (algorithm/hetero.py): clients 0..rich_clients-1 are
      rich and draw `rich_batch_size` images per step, the others `batch_size`; 0 is off (every
      client draws batch_size). Needs the shared queue and the pool's plain FedAvg
      (algorithm/hetero_step.py).
    rich_batch_size: the rich clients' batch (int(c) * B); 0 when rich_clients is 0.
    fedavg_set: 'pool' (the pool's mean) or 'reference' (client 0 + pool[1:], the reference's
      `average_weights`, also for MonAcoSFL's momentum nets); algorithm/sync.py.
    client_queues: per-client queues 'clean' (indexed by pool position, normalised, every key
      enqueued) or 'reference' (MocoSFL's: unnormalised at init, only the k1 block enqueued
      under 'original'; needs pool_size == num_clients); algorithm/queue.py.
    divergence_aware: 'off' (plain FedAvg), 'fedema' (each pool client keeps
      mu * local + (1 - mu) * global, mu = min(1, lambda * divergence)) or 'reference' (the
      reference's no-op: pool clients keep their local weights, the others get the global).
    div_mu: 'fedema': the mu each client's auto-scaler gives it at its first sync.
  """
  num_clients: int
  batch_size: int
  queue_size: int = 6000
  pool_size: Optional[int] = None
  temperature: float = 0.1
  loss_form: str = 'original'
  momentum_sync: bool = False
  tau: float = 0.99
  lr: float = 0.06
  c_lr: Optional[float] = None
  momentum: float = 0.9
  weight_decay: float = 5e-4
  lr_schedule: str = 'cosine'
  client_schedule: str = 'per_participation'
  num_epochs: int = 200
  steps_per_epoch: int = 500
  avg_freq: int = 10
  feature_sharing: bool = True
  sample_ratio: float = 1.0
  ressfl: Optional[RessflConfig] = None
  method: str = 'mocosfl'
  rich_clients: int = 0
  rich_batch_size: int = 0
  fedavg_set: str = 'pool'
  client_queues: str = 'clean'
  divergence_aware: str = 'off'
  div_mu: float = 0.7

  def __post_init__(self):
    check_sample_ratio(self.sample_ratio)
    if isinstance(self.ressfl, dict):       # dataclasses.asdict, e.g. a checkpoint's meta
      object.__setattr__(self, 'ressfl', RessflConfig(**self.ressfl))
    if self.pool_size is None:
      object.__setattr__(self, 'pool_size', int(self.sample_ratio * self.num_clients))
    if self.c_lr is None:
      object.__setattr__(self, 'c_lr', self.lr)
    self.validate()

  @property
  def frozen_clients(self) -> bool:
    """c_lr == 0: the clients never train (TAResSFL's deployment). The step skips their
    backward and optimizer (algorithm/step.py), and FedAvg keeps their params."""
    return self.c_lr == 0

  @property
  def rows_per_client(self) -> int:
    """Rows each client sends per step: 2B for the two-view form ([q;k]), else B."""
    return 2 * self.batch_size if self.loss_form == 'two_view' else self.batch_size

  @property
  def keys_per_client(self) -> int:
    """Keys each client contributes to the queue per step (k1 and k2 blocks for 'original';
    the k1 block only with the reference's per-client queues, which drop k2)."""
    if self.loss_form == 'single' or self.drops_k2:
      return self.batch_size
    return 2 * self.batch_size

  @property
  def drops_k2(self) -> bool:
    """MocoSFL's per-client queues under 'original' enqueue only the k1 block of the keys."""
    return (not self.feature_sharing and self.client_queues == 'reference'
            and self.loss_form == 'original')

  @property
  def keys_per_step(self) -> int:
    """Keys enqueued per step: 2PB for 'original' and 'two_view', PB for 'single' (with rich
    clients: B is each client's own batch, and the most a pool can send)."""
    if self.rich_clients:
      return (self.keys_per_client // self.batch_size) * self.images_per_step
    return self.pool_size * self.keys_per_client

  @property
  def images_per_step(self) -> int:
    """Query images the pool sends per step: P * B; with rich clients at most
    R' * rich B + (P - R') * B, R' = min(R, P) the most rich clients a pool can hold (a sampled
    pool's own count varies by epoch)."""
    return (self.pool_size * self.batch_size
            + min(self.rich_clients, self.pool_size) * (self.rich_batch_size - self.batch_size))

  @property
  def client_queue_size(self) -> int:
    """Rows of each per-client queue when feature_sharing is False (K // N, as the reference)."""
    return self.queue_size // self.num_clients

  def validate(self) -> None:
    """Raises ValueError naming the first offending field, its value and what is allowed."""
    def need(cond, msg):
      if not cond:
        raise ValueError(msg)

    for name in ('num_clients', 'batch_size', 'queue_size', 'num_epochs', 'steps_per_epoch',
                 'avg_freq'):
      v = getattr(self, name)
      need(isinstance(v, int) and v >= 1, f'{name}={v!r} must be an int >= 1.')
    need(isinstance(self.pool_size, int) and 1 <= self.pool_size <= self.num_clients,
         f'pool_size={self.pool_size!r} must be an int in [1, num_clients={self.num_clients}] '
         f'(derived as int(sample_ratio * num_clients) when not given).')
    need(self.loss_form in LOSS_FORMS, f'loss_form={self.loss_form!r}; valid: {LOSS_FORMS}.')
    need(self.lr_schedule in LR_SCHEDULES,
         f'lr_schedule={self.lr_schedule!r}; valid: {LR_SCHEDULES}.')
    need(self.client_schedule in CLIENT_SCHEDULES,
         f'client_schedule={self.client_schedule!r}; valid: {CLIENT_SCHEDULES}.')
    need(self.temperature > 0, f'temperature={self.temperature!r} must be > 0.')
    need(0.0 <= self.tau <= 1.0, f'tau={self.tau!r} must be in [0, 1].')
    need(self.lr >= 0, f'lr={self.lr!r} must be >= 0.')
    need(self.c_lr >= 0, f'c_lr={self.c_lr!r} must be >= 0 (None means lr).')
    need(self.ressfl is None or self.c_lr > 0,
         'ressfl with c_lr=0: the regulariser trains the client slice, and frozen clients never '
         'train; use c_lr > 0 (the expert), or drop ressfl (the frozen deployment).')
    need(0.0 <= self.momentum < 1.0, f'momentum={self.momentum!r} must be in [0, 1).')
    need(self.weight_decay >= 0, f'weight_decay={self.weight_decay!r} must be >= 0.')
    need(self.fedavg_set in FEDAVG_SETS,
         f'fedavg_set={self.fedavg_set!r}; valid: {FEDAVG_SETS}.')
    need(self.client_queues in CLIENT_QUEUES,
         f'client_queues={self.client_queues!r}; valid: {CLIENT_QUEUES}.')
    if self.client_queues == 'reference':
      need(not self.feature_sharing,
           "client_queues='reference' describes per-client queues and has no effect with the "
           "shared queue; set feature_sharing=False or client_queues='clean'.")
      need(self.pool_size == self.num_clients,
           f"client_queues='reference' slices rows by client id, which is only well defined "
           f"when every client takes part (pool_size={self.pool_size} of num_clients="
           f"{self.num_clients}); set sample_ratio=1 or client_queues='clean'.")
    need(self.divergence_aware in DIVERGENCE_AWARE,
         f'divergence_aware={self.divergence_aware!r}; valid: {DIVERGENCE_AWARE}.')
    if self.divergence_aware != 'off':
      need(not self.momentum_sync,
           f'divergence_aware={self.divergence_aware!r} with momentum_sync=True: MonAcoSFL '
           'asserts they are not combined; drop one.')
      need(not self.frozen_clients,
           f'divergence_aware={self.divergence_aware!r} with c_lr=0: frozen clients never '
           'diverge; drop divergence_aware or train the clients.')
    need(0.0 < self.div_mu <= 1.0, f'div_mu={self.div_mu!r} must be in (0, 1].')
    need(self.steps_per_epoch // self.avg_freq >= 1,
         f'avg_freq={self.avg_freq} > steps_per_epoch={self.steps_per_epoch}: '
         f'steps_per_epoch // avg_freq == 0 (the reference divides by zero); need avg_freq <= '
         f'steps_per_epoch.')
    need(self.method in METHODS, f'method={self.method!r}; valid: {METHODS}.')
    if self.rich_clients or self.rich_batch_size:
      need(isinstance(self.rich_clients, int) and 1 <= self.rich_clients < self.num_clients,
           f'rich_clients={self.rich_clients!r} must be an int in [1, num_clients='
           f'{self.num_clients}) (0 with rich_batch_size=0 is off).')
      need(isinstance(self.rich_batch_size, int) and self.rich_batch_size >= self.batch_size,
           f'rich_batch_size={self.rich_batch_size!r} must be an int >= batch_size='
           f'{self.batch_size}.')
      need(self.feature_sharing, 'rich_clients with feature_sharing=False: per-client queues '
           'are not implemented for heterogeneous clients (nor hetero-aware in the reference); '
           'use the shared queue.')
      need(self.method == 'mocosfl', f'rich_clients with method={self.method!r}: '
           'heterogeneous clients are implemented for the split step only.')
      need(self.ressfl is None, 'rich_clients with ressfl: the simulated attacker is not '
           'implemented for heterogeneous clients.')
      need(self.fedavg_set == 'pool' and self.divergence_aware == 'off',
           f'rich_clients with fedavg_set={self.fedavg_set!r}, divergence_aware='
           f'{self.divergence_aware!r}: the heterogeneous step averages the pool '
           "(algorithm/hetero_step.py); use fedavg_set='pool', divergence_aware='off'.")
    if self.method == 'flmoco':
      self._validate_flmoco(need)
    elif self.feature_sharing:
      need(self.queue_size >= self.keys_per_step,
           f'queue_size={self.queue_size} is smaller than the {self.keys_per_step} keys enqueued '
           f'per step (pool_size * {self.keys_per_client} for loss_form={self.loss_form!r}); need '
           f'queue_size >= {self.keys_per_step}.')
    else:
      need(self.client_queue_size >= self.keys_per_client,
           f'queue_size={self.queue_size}: per-client queues of queue_size // num_clients = '
           f'{self.client_queue_size} rows are smaller than the {self.keys_per_client} keys each '
           f'client enqueues per step; need queue_size >= '
           f'{self.keys_per_client * self.num_clients}.')


  def _validate_flmoco(self, need) -> None:
    """FL-MoCo: each client's own queue of K keys; the settings only split learning has."""
    need(self.loss_form in FLMOCO_LOSS_FORMS,
         f'loss_form={self.loss_form!r} with method=flmoco; valid: {FLMOCO_LOSS_FORMS} (the '
         "reference's FL-MoCo has the symmetric two-term loss, 'original', or the "
         "non-symmetric one, 'single').")
    need(self.feature_sharing,
         'feature_sharing=False with method=flmoco: every FL-MoCo client already has its own '
         'queue of queue_size keys; drop feature_sharing.')
    need(not self.momentum_sync,
         'momentum_sync=True with method=flmoco: FL-MoCo averages the online models only (the '
         'reference); momentum sync is MonAcoSFL\'s, drop it.')
    need(self.ressfl is None, 'ressfl with method=flmoco: FL-MoCo sends no smashed data, so '
         "there is nothing for TAResSFL's attacker to invert; drop ressfl.")
    need(self.fedavg_set == 'pool' and self.divergence_aware == 'off',
         f'fedavg_set={self.fedavg_set!r}, divergence_aware={self.divergence_aware!r} with '
         "method=flmoco: FL-MoCo's FedAvg is the pool's mean (algorithm/flmoco.py); use "
         "fedavg_set='pool', divergence_aware='off'.")
    need(self.c_lr > 0, f'c_lr={self.c_lr!r} with method=flmoco: FL-MoCo clients train the '
         'whole network at c_lr (default: lr); it must be > 0.')
    need(self.queue_size >= self.keys_per_client,
         f'queue_size={self.queue_size} is smaller than the {self.keys_per_client} keys each '
         f'FL-MoCo client enqueues per step ({self.keys_per_client // self.batch_size} x '
         f'batch_size); need queue_size >= {self.keys_per_client}.')


def check_sample_ratio(sample_ratio) -> None:
  """Raises ValueError unless the client sampling ratio r is a number in (0, 1]."""
  if not isinstance(sample_ratio, (int, float)) or not 0.0 < sample_ratio <= 1.0:
    raise ValueError(f'sample_ratio={sample_ratio!r} must be in (0, 1].')


def sync_now(cfg: StepConfig, batch_idx, sync=None) -> jax.Array:
  """Bool array: the explicit `sync` flag if given, else the reference rule on the 0-based
  step within the epoch (`is_sync_step`)."""
  if sync is None:
    return is_sync_step(jnp.asarray(batch_idx, jnp.int32), cfg.steps_per_epoch, cfg.avg_freq)
  return jnp.asarray(sync, bool)


def is_sync_step(b, steps_per_epoch: int, avg_freq: int):
  """Reference FedAvg rule after step b (0-based) of an epoch (docs/reference.md, 'Sync rule').

  `b == S-1 or b % (S // avg_freq) == S // avg_freq - 1`. Works on Python ints and on traced
  int arrays (returns a bool array then). S // avg_freq == 0 raises instead of dividing by zero.
  """
  period = steps_per_epoch // avg_freq
  if period == 0:
    raise ValueError(f'avg_freq={avg_freq} > steps_per_epoch={steps_per_epoch}: '
                     'steps_per_epoch // avg_freq == 0.')
  if isinstance(b, int):
    return b == steps_per_epoch - 1 or b % period == period - 1
  b = jnp.asarray(b)
  return (b == steps_per_epoch - 1) | (b % period == period - 1)


def sampling_epochs(num_epochs: int, sample_ratio: float) -> int:
  """E * int(1 / r), as the reference multiplies epochs under sampling (int, not 1 / r: a quirk)."""
  return num_epochs * int(1.0 / sample_ratio)


def auto_adjust(num_clients: int, flavour: str = 'mocosfl', *, batch_size: Optional[int] = None,
                num_epochs: int = 200, queue_size: int = 6000, avg_freq: int = 1,
                sample_ratio: float = 1.0, feature_sharing: bool = True,
                adjust_batch_for_large: bool = True) -> dict:
  """The reference's `--auto_adjust`: MocoSFL's (S) or MonAcoSFL's (M) rules (docs/reference.md,
  'auto_adjust').

  Args:
    num_clients: N.
    flavour: 'mocosfl' (S: B = 100 // N for N <= 50, else 1) or 'monacosfl' (M: B = batch_size // N
      for N <= 50, else 1; default batch_size 12, so 5 clients give B = 2 as in M's scripts).
    batch_size: M's input batch size (default 12); ignored by S.
    num_epochs, queue_size, avg_freq, sample_ratio: values before adjustment.
    feature_sharing: M only: without it K is multiplied by N and B is left unchanged.
    adjust_batch_for_large: M only; False is `--dont_adjust_batch_size_for_large_clients` (B // N).

  Returns:
    dict with batch_size, avg_freq, sample_ratio, num_epochs (E * int(1/r)), queue_size.
  """
  if flavour not in FLAVOURS:
    raise ValueError(f'flavour={flavour!r}; valid: {FLAVOURS}.')
  n = num_clients
  if not isinstance(n, int) or n < 1:
    raise ValueError(f'num_clients={n!r} must be an int >= 1.')
  k = queue_size
  if flavour == 'mocosfl':
    b = 100 // n if n <= 50 else 1
    if n <= 1000:
      avg_freq = 1000 // (b * n)
  else:
    b0 = 12 if batch_size is None else batch_size
    if not feature_sharing:
      b, k = b0, queue_size * n
    elif n <= 50 or not adjust_batch_for_large:
      b = b0 // n
    else:
      b = 1
    if b < 1:
      raise ValueError(f'batch_size={b0} // num_clients={n} == 0 after auto_adjust; use '
                       f'batch_size >= {n}.')
    avg_freq = max(1, 1000 // (b * n))
  if b < 1 or avg_freq < 1:
    raise ValueError(f'auto_adjust gave batch_size={b}, avg_freq={avg_freq} for num_clients={n}.')
  if n >= 200:
    sample_ratio = 1.0 / (n // 100)
  return dict(batch_size=b, avg_freq=avg_freq, sample_ratio=sample_ratio,
              num_epochs=sampling_epochs(num_epochs, sample_ratio), queue_size=k)


def sample_pool(key: jax.Array, epoch, num_clients: int, pool_size: int) -> jax.Array:
  """Clients participating during `epoch` (fixed for all S steps of the epoch, as the reference).

  P == N gives range(N) in natural order (as the reference); otherwise P distinct clients in
  random order, a deterministic function of (key, epoch). Returns int32 [P].
  """
  if not 1 <= pool_size <= num_clients:
    raise ValueError(f'pool_size={pool_size} must be in [1, num_clients={num_clients}].')
  if pool_size == num_clients:
    return jnp.arange(num_clients, dtype=jnp.int32)
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_clients)
  return perm[:pool_size].astype(jnp.int32)
