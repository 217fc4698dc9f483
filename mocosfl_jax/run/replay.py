"""The loss-threshold saving in a training run: status per epoch, stored stacks, resume, report.

    rp = ReplayRun(exp, net, workdir, ckpt, pool_key)    # config.loss_threshold > 0
    status = rp.begin_step(epoch, b)                     # 'A', 'B' or 'C' (this epoch's)
    ... A/B: the simulated step with keep_smashed, then rp.store(b, smashed_q, smashed_k)
    ... C:   state, m = rp.replay(state, epoch, b)
    rp.add_loss(m['loss']); after the epoch's last step rp.end_epoch(epoch) -> its log record

The status machine and the replayed server step are algorithm/replay.py. The stacks of every
step of the last A/B epoch ([S, P, B', ...] twice: A_q and A_k) stay on the device while their
size is at most config.replay_device_bytes, else they go to memory-mapped .npy files in
workdir/replay/ as they are produced (np.lib.format.open_memmap, never pickle). Files are named
by the epoch whose stacks they hold, so a checkpoint taken while one epoch's stacks are being
rewritten by a later epoch still finds its own; files that no kept checkpoint and not the run
itself need are deleted.

Resume: a checkpoint's meta holds `snapshot()` (status machine, this epoch's losses so far, the
epoch and number of stored steps, step counts per status). Device-kept stacks are written to
the same files when a checkpoint is taken, so every checkpoint can be resumed from, mid-C
included; a resume whose files are gone is refused with a message naming them.
"""
import math
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mocosfl_jax import precision
from mocosfl_jax.algorithm import plan
from mocosfl_jax.algorithm import replay as replay_lib
from mocosfl_jax.algorithm import traffic

REPLAY_STREAM = 0x4e91a7   # folded into the run's seed: the C epochs' order, its own stream


class ReplayFilesMissingError(ValueError):
  """A resume needs stored smashed data that is no longer in the workdir."""


class ReplayRun:
  """Host-side state of the saving during one run (one process, one device)."""

  def __init__(self, exp, net, workdir, ckpt, pool_key: jax.Array):
    c, cfg = exp.config, exp.step
    self.cfg, self.net, self.ckpt, self.pool_key = cfg, net, ckpt, pool_key
    self.threshold, self.warmup = float(c.loss_threshold), int(c.replay_warmup_epochs)
    self.order_key = jax.random.fold_in(jax.random.key(c.seed), REPLAY_STREAM)
    self.dir = Path(workdir) / "replay"
    self.step_shape = (cfg.pool_size, cfg.rows_per_client) + tuple(net.smashed_shape)
    self.dtype = np.dtype(precision.float_dtype())
    self.stack_bytes = 2 * cfg.steps_per_epoch * math.prod(self.step_shape) * self.dtype.itemsize
    self.on_device = self.stack_bytes <= c.replay_device_bytes
    up, down = traffic.step_bytes(cfg.rows_per_client, math.prod(net.smashed_shape),
                                  cfg.frozen_clients)
    self.upload_per_step, self.download_per_step = cfg.pool_size * up, cfg.pool_size * down

    self.machine = replay_lib.StatusMachine()
    self.epoch_losses: list = []     # this epoch's step losses (device scalars, or floats)
    self.stack_epoch: Optional[int] = None   # epoch whose stacks are held
    self.rows = 0                    # its steps stored so far
    self.steps = {k: 0 for k in replay_lib.STATUSES}
    self._q, self._k = [], []        # device stacks, or the two memmaps
    self._order = (None, None)       # (epoch, shuffle map) of the C epoch in progress
    self._persisted = (None, 0)      # (epoch, rows) already in the files (device mode)
    self._ckpt_epochs: dict = {}     # checkpoint step -> the stack epoch it needs

  # ---- the training loop's calls ---------------------------------------------------------------
  @property
  def status(self) -> str:
    return self.machine.status

  def begin_step(self, epoch: int, b: int) -> str:
    """This epoch's status; at the first step of an A/B epoch its stacks start anew."""
    if b == 0 and self.status != "C":
      self.stack_epoch, self.rows = epoch, 0
      self._open(epoch, create=True)
    return self.status

  def store(self, b: int, smashed_q, smashed_k) -> None:
    """Keeps step b's stacks ([P, B', ...] each) of the A/B epoch in progress."""
    if self.on_device:
      self._q[b], self._k[b] = smashed_q, smashed_k
    else:
      self._q[b], self._k[b] = np.asarray(smashed_q), np.asarray(smashed_k)
    self.rows = b + 1

  def replay(self, state, epoch: int, b: int):
    """Step b of a C epoch: the server step on stored step shuffle_map[b]."""
    if self._order[0] != epoch:
      self._order = (epoch, np.asarray(replay_lib.shuffle_map(
          self.order_key, epoch, self.cfg.steps_per_epoch)))
    i = int(self._order[1][b])
    q, k = self._q[i], self._k[i]
    if not self.on_device:
      q, k = jnp.asarray(q), jnp.asarray(k)
    return replay_lib.replay_step(self.net, self.cfg, state, q, k,
                                  self.pool_of(self.stack_epoch), jnp.int32(epoch))

  def add_loss(self, loss) -> None:
    self.epoch_losses.append(loss)
    self.steps[self.status] += 1

  def end_epoch(self, epoch: int) -> dict:
    """Updates the status machine with the epoch's mean loss; returns the epoch's log record."""
    losses = [float(x) for x in jax.device_get(self.epoch_losses)]
    mean = sum(losses) / len(losses)      # as the reference: a Python sum over the steps / S
    ran = self.status
    self.machine = replay_lib.record_loss(self.machine, epoch + 1, mean, self.threshold,
                                          self.warmup)
    self.epoch_losses = []
    return {"replay_status": ran, "replay_next_status": self.status, "replay_epoch_loss": mean}

  def pool_of(self, epoch: int) -> jax.Array:
    cfg = self.cfg
    return plan.sample_pool(self.pool_key, epoch, cfg.num_clients, cfg.pool_size)

  # ---- checkpoints -----------------------------------------------------------------------------
  def snapshot(self, step: int) -> dict:
    """What a checkpoint at `step` stores (the stacks themselves are made durable here)."""
    if self.stack_epoch is not None:
      self._persist()
    self._ckpt_epochs[int(step)] = self.stack_epoch
    return {"machine": self.machine.asdict(),
            "epoch_losses": [float(x) for x in jax.device_get(self.epoch_losses)],
            "stack_epoch": self.stack_epoch, "rows": self.rows, "steps": dict(self.steps)}

  def restore(self, snap: dict) -> None:
    """Continues from a checkpoint's `snapshot()`; refuses when its stored stacks are gone."""
    self.machine = replay_lib.StatusMachine.from_dict(snap["machine"])
    self.epoch_losses = [float(x) for x in snap["epoch_losses"]]
    self.stack_epoch, self.rows = snap["stack_epoch"], int(snap["rows"])
    self.steps = {k: int(snap["steps"][k]) for k in replay_lib.STATUSES}
    for s in self.ckpt.all_steps():       # the kept checkpoints' stacks stay on disk
      try:
        self._ckpt_epochs[s] = self.ckpt.read_meta(s).get("replay", {}).get("stack_epoch")
      except ValueError:                   # damaged: it will never be resumed from
        pass
    if self.stack_epoch is None:
      return
    paths = self._paths(self.stack_epoch)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
      raise ReplayFilesMissingError(
          f"the checkpoint needs the smashed data stored in epoch {self.stack_epoch} "
          f"({self.rows} steps), and {', '.join(missing)} is missing; restore those files or "
          "start the run in a new workdir")
    self._open(self.stack_epoch, create=False)
    if self.on_device:
      files = [np.load(p, mmap_mode="r") for p in paths]
      for i in range(self.rows):
        self._q[i], self._k[i] = (jnp.asarray(np.array(f[i])) for f in files)
      self._persisted = (self.stack_epoch, self.rows)

  # ---- results ---------------------------------------------------------------------------------
  def report(self, num_epochs: int) -> dict:
    """results.json's 'replay': epochs and steps per status, the saving, the bytes saved."""
    ran = self.machine.history + (self.status if self.epoch_losses else "")
    per_epoch = {k: ran.count(k) for k in replay_lib.STATUSES}
    saved_b = self.steps["B"] * self.download_per_step
    saved_c = self.steps["C"] * (self.upload_per_step + self.download_per_step)
    total = sum(self.steps.values())
    return {
        "loss_threshold": self.threshold, "warmup_epochs": self.warmup,
        "epoch_status": ran, "epochs": per_epoch,
        "saving_epochs": replay_lib.reference_saving(per_epoch),
        "reference_counts": self.machine.counts(),
        "reference_saving_epochs": replay_lib.reference_saving(self.machine.counts()),
        "num_epochs": num_epochs, "steps": dict(self.steps),
        "bytes_saved": {"gradient_download_in_B": saved_b, "upload_and_download_in_C": saved_c,
                        "total": saved_b + saved_c},
        "activation_bytes_all_A": total * (self.upload_per_step + self.download_per_step),
        "storage": "device" if self.on_device else "file", "stack_bytes": self.stack_bytes,
    }

  # ---- storage ---------------------------------------------------------------------------------
  def _paths(self, epoch: int):
    return (self.dir / f"epoch{epoch}_smashed_q.npy", self.dir / f"epoch{epoch}_smashed_k.npy")

  def _open(self, epoch: int, create: bool) -> None:
    s = self.cfg.steps_per_epoch
    if self.on_device:
      self._q, self._k = [None] * s, [None] * s
      return
    self.dir.mkdir(parents=True, exist_ok=True)
    mode = "w+" if create else "r+"
    self._q, self._k = (np.lib.format.open_memmap(p, mode=mode, dtype=self.dtype,
                                                  shape=(s,) + self.step_shape)
                        for p in self._paths(epoch))
    if create:
      self._prune()

  def _persist(self) -> None:
    """Makes rows [0, rows) of the held stacks durable (device mode: copies them to files)."""
    if not self.on_device:
      self._q.flush()
      self._k.flush()
      return
    epoch, done = self._persisted
    start = done if epoch == self.stack_epoch else 0
    if start >= self.rows:
      return
    self.dir.mkdir(parents=True, exist_ok=True)
    shape = (self.cfg.steps_per_epoch,) + self.step_shape
    for path, rows in zip(self._paths(self.stack_epoch), (self._q, self._k)):
      f = np.lib.format.open_memmap(path, mode="w+" if start == 0 else "r+", dtype=self.dtype,
                                    shape=shape)
      f[start:self.rows] = np.stack(jax.device_get(rows[start:self.rows]))
      f.flush()
      del f
    self._persisted = (self.stack_epoch, self.rows)
    self._prune()

  def _prune(self) -> None:
    """Deletes stack files that neither the run nor a kept checkpoint needs."""
    live = set(self.ckpt.all_steps())
    newest = max(live, default=-1)      # later steps may still be in flight (async saves)
    keep = {self.stack_epoch} | {e for s, e in self._ckpt_epochs.items()
                                 if s in live or s > newest}
    for path in self.dir.glob("epoch*_smashed_*.npy"):
      epoch = int(path.name[len("epoch"):].split("_")[0])
      if epoch not in keep:
        path.unlink()
