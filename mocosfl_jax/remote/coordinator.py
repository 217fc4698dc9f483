"""The server's side of the remote protocol: who may send what, when; every message checked.

The training loop (main thread) drives rounds; gRPC handler threads serve the remote clients.
One round per training step:

  main thread                                  remote client k (in the step's pool)
  open_round(step, tasks)            ------>   Task      -> positions + uniforms of its batch
  wait_smashed(deadline)             <------   Smashed   (its two smashed views)
  (the jitted step runs)
  publish_grads                      ------>   Gradient  -> dL/dA_q and its learning rate
  wait_models(deadline) (sync steps) <------   Model     (its updated client model)
  publish_models                     ------>   FetchModel -> the averaged model

Every request names its client id and carries that client's token; the message is decoded
with a size limit and checked against what this round expects (kind, step, pool membership,
tensor names, dtypes, shapes, finite values) before the training loop sees it. A refused message
is answered with a gRPC error that says why, and logged; the round goes on without it. A client
that is not connected, or that misses the deadline, is left out of the step (`missing`), and
takes part again in a later step when it asks for one.

No JAX here: arrays are numpy, the step runs in the training loop.
"""
from __future__ import annotations

import dataclasses
import hmac
import threading
import time
from typing import Callable, Mapping

import numpy as np

from mocosfl_jax.remote import transport
from mocosfl_jax.remote import wire

log = transport.log


@dataclasses.dataclass
class Round:
  step: int
  epoch: int
  batch_idx: int
  sync: bool
  tasks: dict                       # client -> (positions [B], uniforms [2, B, U])
  received: dict = dataclasses.field(default_factory=dict)    # client -> (q, k)
  handed: set = dataclasses.field(default_factory=set)        # clients that took their task
  collecting: bool = True
  grads: dict | None = None         # client -> reply bytes, once the step ran
  models: dict = dataclasses.field(default_factory=dict)      # client -> flat tensors
  collecting_models: bool = False
  averaged: dict | None = None      # client -> reply bytes


class Coordinator:
  """Thread-safe state of the remote clients for the training loop and the gRPC handlers.

  Args:
    tokens: client id -> token (every remote client of the run has one).
    train: whether clients train (c_lr > 0): gradients and model syncs travel.
    num_images: client id -> number of training images the server expects it to hold.
    smashed: (dtype, shape) of one smashed view a client uploads, [B', ...].
    model_spec: name -> (dtype, shape) of the client model a trainable client uploads at syncs.
    welcome: the Join reply's fields (augmentation settings, run length).
    max_bytes: the largest message accepted.
    poll_s: how long a Task / Gradient / FetchModel call waits before answering 'wait'.
    alive_s: a joined client last heard from this long ago still counts as connected (it may
      be computing: a backward, a first compilation); default 3 * poll_s. The server passes
      its deadline.
  """

  def __init__(self, *, tokens: Mapping[int, str], train: bool, num_images: Mapping[int, int],
               smashed: tuple, model_spec: Mapping[str, tuple], welcome: Mapping[str, object],
               max_bytes: int, poll_s: float = 5.0, alive_s: float | None = None):
    self.tokens = {int(k): str(v) for k, v in tokens.items()}
    self.train, self.num_images = train, dict(num_images)
    self.smashed, self.model_spec = smashed, dict(model_spec)
    self.welcome, self.max_bytes, self.poll_s = dict(welcome), max_bytes, poll_s
    self.alive_s = 3 * poll_s if alive_s is None else alive_s
    self.joined: set[int] = set()          # clients whose Join this server accepted
    self.told_done: set[int] = set()       # clients told that the run is over
    self.ready = False                     # set_models was called: Joins are answered
    self.cond = threading.Condition()
    self.round: Round | None = None
    self.recent: dict[int, Round] = {}     # the last few rounds: late Gradient / FetchModel
    self.done = False
    self.models: dict[int, bytes] = {}     # client -> its current model (Join reply tensors)
    self.last_seen: dict[int, float] = {}
    self.waiting: dict[int, int] = {}      # client -> Task calls in progress
    self.refusals: list[str] = []          # what was refused (tests and the log read it)

  # ------------------------------------------------------------------ training loop side

  def connected(self, client: int) -> bool:
    """A client counts as connected once it joined, while it waits for a task or was heard
    from within `alive_s`."""
    with self.cond:
      return self._connected_locked(client)

  def wait_connected(self, clients, timeout_s: float) -> bool:
    """Waits until every listed client is connected (True) or the timeout (False)."""
    with self.cond:
      return self._wait_until(lambda: all(self._connected_locked(c) for c in clients),
                              timeout_s)

  def set_models(self, models: Mapping[int, dict]) -> None:
    """Each client's current model (flat tensors), sent in the Join reply."""
    with self.cond:
      self.models.update({c: dict(v) for c, v in models.items()})
      self.ready = True

  def open_round(self, step: int, epoch: int, batch_idx: int, sync: bool,
                 tasks: Mapping[int, tuple]) -> None:
    with self.cond:
      self.round = Round(step, epoch, batch_idx, sync, dict(tasks))
      self.recent[step] = self.round
      for old in sorted(self.recent)[:-4]:
        del self.recent[old]
      self.cond.notify_all()

  def wait_smashed(self, deadline_s: float) -> dict:
    """Waits until every connected client of the round uploaded (a client that took its task
    counts as connected), or the deadline; closes the uploads. Returns client -> (q, k) of those that arrived."""
    r = self.round
    # A client that took its task is computing: it has until the deadline.
    arrived = lambda: all(c in r.received or not (c in r.handed or self._connected_locked(c))
                          for c in r.tasks)
    with self.cond:
      self._wait_until(arrived, deadline_s)
      r.collecting = False
      return dict(r.received)

  def publish_grads(self, grads: Mapping[int, tuple]) -> None:
    """client -> (grad, lr): each present trainable client's reply."""
    r = self.round
    with self.cond:
      r.grads = {c: wire.encode("grad", {"client": c, "step": r.step, "sync": r.sync},
                                {"grad": g, "lr": np.asarray([lr], np.float32)})
                 for c, (g, lr) in grads.items()}
      r.collecting_models = r.sync
      self.cond.notify_all()

  def wait_models(self, clients, deadline_s: float) -> dict:
    """Sync step: waits for the listed clients' uploaded models (or the deadline)."""
    r = self.round
    arrived = lambda: all(c in r.models or not self._connected_locked(c) for c in clients)
    with self.cond:
      self._wait_until(arrived, deadline_s)
      r.collecting_models = False
      return dict(r.models)

  def publish_models(self, models: Mapping[int, dict]) -> None:
    """Sync step: the averaged model for each client that uploaded."""
    r = self.round
    with self.cond:
      r.averaged = {c: wire.encode("averaged", {"client": c, "step": r.step}, m)
                    for c, m in models.items()}
      for c, m in models.items():
        self.models.setdefault(c, {}).update(m)
      self.cond.notify_all()

  def finish(self, timeout_s: float = 0.0) -> None:
    """The run is over: clients asking for work hear 'done'. Waits up to `timeout_s` for every
    connected client to have heard it (a client that asks after the server stops would keep
    retrying)."""
    with self.cond:
      self.done = True
      self.cond.notify_all()
      self._wait_until(lambda: all(c in self.told_done or not self._connected_locked(c)
                                   for c in self.joined), timeout_s)

  def _wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
    """Waits (caller holds cond) until done() or the timeout; returns done(). Wakes on every
    notify and at least twice a second, since whether a client counts as connected changes
    with time alone."""
    end = time.monotonic() + timeout_s
    while not done():
      left = end - time.monotonic()
      if left <= 0:
        return False
      self.cond.wait(min(left, 0.5))
    return True

  def _connected_locked(self, client: int) -> bool:
    return client in self.joined and (
        self.waiting.get(client, 0) > 0
        or time.monotonic() - self.last_seen.get(client, -1e9) < self.alive_s)

  # ------------------------------------------------------------------ gRPC side

  def handle(self, method: str, request: bytes, token: str | None, peer: str) -> bytes:
    """Entry point of every gRPC call (transport.serve)."""
    client = None
    try:
      kind, fields = wire.peek(request, self.max_bytes)    # header only: who is it?
      client = fields.get("client")
      self._authenticate(client, token)
      if method != "Join":
        with self.cond:
          if client not in self.joined:
            raise wire.WireError(f"client {client} has not joined this server (it may have "
                                 "restarted): join again", "NOT_FOUND")
      msg = wire.decode(request, self.max_bytes)
      with self.cond:
        self.last_seen[client] = time.monotonic()
      reply = getattr(self, f"_on_{method.lower()}")(client, msg)
      with self.cond:
        self.last_seen[client] = time.monotonic()
      return reply
    except wire.WireError as e:
      reason = f"refused {method} from {peer} (client {client}): {e}"
      with self.cond:
        self.refusals.append(reason)
      log.warning("%s", reason)
      raise transport.Refusal(e.code, str(e)) from None

  def _authenticate(self, client, token) -> None:
    if not isinstance(client, int):
      raise wire.WireError("message names no client id (field 'client')")
    if token is None:
      raise wire.WireError("no token: send 'authorization: Bearer <token>' metadata",
                           "UNAUTHENTICATED")
    want = self.tokens.get(client)
    if want is None:
      raise wire.WireError(f"client {client} is not a remote client of this run (remote: "
                           f"{sorted(self.tokens)})", "PERMISSION_DENIED")
    if not hmac.compare_digest(want.encode(), token.encode()):
      raise wire.WireError(f"wrong token for client {client}", "UNAUTHENTICATED")

  def _on_join(self, client: int, msg: wire.Message) -> bytes:
    wire.expect(msg, "join", ("client", "num_images", "train", "want_model"))
    if msg["num_images"] != self.num_images[client]:
      raise wire.WireError(
          f"client {client} holds {msg['num_images']} images but this run's partition gives it "
          f"{self.num_images[client]}: give the client its own part of the data", 
          "FAILED_PRECONDITION")
    if self.train and not msg["train"]:
      raise wire.WireError(
          "this run trains its clients (c_lr > 0): a frozen client cannot take part; run "
          "python -m mocosfl_jax.edge_client, or serve a run with c_lr=0",
          "FAILED_PRECONDITION")
    with self.cond:
      if not self.ready:
        raise wire.WireError("the server is starting; join again in a moment", "UNAVAILABLE")
      model = dict(self.models.get(client, {})) if msg["want_model"] else {}
      fields = dict(self.welcome, client=client, train=int(self.train),
                    step=-1 if self.round is None else self.round.step)
      self.joined.add(client)
      self.cond.notify_all()
    return wire.encode("welcome", fields, model)

  def _on_task(self, client: int, msg: wire.Message) -> bytes:
    wire.expect(msg, "task_request", ("client",))
    with self.cond:
      def has_task():
        r = self.round
        return (r is not None and r.collecting and client in r.tasks
                and client not in r.received)

      self.waiting[client] = self.waiting.get(client, 0) + 1
      try:
        self._wait_until(lambda: self.done or has_task(), self.poll_s)
      finally:
        self.waiting[client] -= 1
      if self.done:
        self.told_done.add(client)
        self.cond.notify_all()
        return wire.encode("done", {"client": client})
      if not has_task():
        return wire.encode("wait", {"client": client})
      round_ = self.round
      pos, uni = round_.tasks[client]
      round_.handed.add(client)
      return wire.encode("task", {"client": client, "step": round_.step, "epoch": round_.epoch,
                                  "batch_idx": round_.batch_idx, "sync": round_.sync,
                                  "train": self.train},
                         {"positions": pos, "uniforms": uni})

  def _round_for(self, client: int, step, recent: bool = False) -> Round:
    """The open round (or with `recent`, one of the last few), if `step` is its step and
    `client` is in its pool (caller holds cond)."""
    r = self.recent.get(step) if recent else self.round
    if r is None or step != r.step:
      r = self.round
      now = "no step" if r is None else f"step {r.step}"
      raise wire.WireError(f"step {step} is not the open step ({now} is): a replayed, stale or "
                           "out-of-order message", "FAILED_PRECONDITION")
    if client not in r.tasks:
      raise wire.WireError(f"client {client} is not in step {r.step}'s pool",
                           "PERMISSION_DENIED")
    return r

  def _on_smashed(self, client: int, msg: wire.Message) -> bytes:
    dtype, shape = self.smashed
    wire.expect(msg, "smashed", ("client", "step"), {"q": (dtype, shape), "k": (dtype, shape)})
    with self.cond:
      r = self._round_for(client, msg["step"])
      if client in r.received:
        raise wire.WireError(f"client {client} already sent step {r.step}'s smashed data "
                             "(a replayed message)", "FAILED_PRECONDITION")
      if client not in r.handed:
        raise wire.WireError(f"client {client} sent smashed data for step {r.step} without "
                             "taking its task from this server", "FAILED_PRECONDITION")
      if not r.collecting:
        raise wire.WireError(f"client {client}'s smashed data for step {r.step} arrived after "
                             "the deadline; the step ran without it", "FAILED_PRECONDITION")
      r.received[client] = (msg.tensors["q"], msg.tensors["k"])
      self.cond.notify_all()
    return wire.encode("ack", {"client": client, "step": msg["step"]})

  def _on_gradient(self, client: int, msg: wire.Message) -> bytes:
    wire.expect(msg, "grad_request", ("client", "step"))
    if not self.train:
      raise wire.WireError("this run's clients are frozen (c_lr=0): no gradients are sent",
                           "FAILED_PRECONDITION")
    with self.cond:
      r = self._round_for(client, msg["step"], recent=True)
      if client not in r.received and not r.collecting:
        raise wire.WireError(f"client {client} was left out of step {r.step} (its smashed data "
                             "did not arrive in time)", "FAILED_PRECONDITION")
      self._wait_until(lambda: r.grads is not None, self.poll_s)
      reply = None if r.grads is None else r.grads.get(client, b"")
    if reply is None:
      return wire.encode("wait", {"client": client})
    if not reply:
      raise wire.WireError(f"client {client} was left out of step {r.step}",
                           "FAILED_PRECONDITION")
    return reply

  def _on_model(self, client: int, msg: wire.Message) -> bytes:
    wire.expect(msg, "model", ("client", "step"), self.model_spec)
    with self.cond:
      r = self._round_for(client, msg["step"])
      if not r.sync:
        raise wire.WireError(f"step {r.step} is no sync step: no model is expected",
                             "FAILED_PRECONDITION")
      if r.grads is None or client not in r.grads:
        raise wire.WireError(f"client {client} took no part in step {r.step}",
                             "FAILED_PRECONDITION")
      if client in r.models:
        raise wire.WireError(f"client {client} already sent its model for step {r.step} "
                             "(a replayed message)", "FAILED_PRECONDITION")
      if not r.collecting_models:
        raise wire.WireError(f"client {client}'s model for step {r.step} arrived after the "
                             "deadline; the average was taken without it",
                             "FAILED_PRECONDITION")
      r.models[client] = msg.tensors
      self.cond.notify_all()
    return wire.encode("ack", {"client": client, "step": msg["step"]})

  def _on_fetchmodel(self, client: int, msg: wire.Message) -> bytes:
    wire.expect(msg, "fetch_model", ("client", "step"))
    with self.cond:
      r = self._round_for(client, msg["step"], recent=True)
      self._wait_until(lambda: r.averaged is not None, self.poll_s)
      reply = None if r.averaged is None else r.averaged.get(client, b"")
    if reply is None:
      return wire.encode("wait", {"client": client})
    if not reply:
      raise wire.WireError(f"client {client}'s model was not part of step {r.step}'s average",
                           "FAILED_PRECONDITION")
    return reply
