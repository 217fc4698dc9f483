"""A remote client's side of the protocol, whatever computes its slice (JAX or ONNX).

    loop = ClientLoop(connection, client_id, num_images, compute, want_model=...)
    loop.run()

`compute` is the client's model: `join(welcome)` takes the server's Join reply (the augmentation
settings and, for JAX clients, the client's current model), `forward(task)` returns the two
smashed views of the task's batch, `backward(grad, lr)` applies the server's gradient (trainable
clients), `model()` and `set_model(tensors)` exchange the model at syncs. The loop asks for work,
answers it, and survives the server going away: while the server is unreachable it retries,
and when it is back it joins again (a restarted server resumes from its checkpoint and hands
the client its model as of that checkpoint).

Imports numpy and the transport only (no JAX): export/edge_client.py uses it on devices.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np

from mocosfl_jax.remote import transport
from mocosfl_jax.remote import wire

log = logging.getLogger("mocosfl_jax.remote.client")

RETRY = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")


class Rejoin(Exception):
  """The server restarted or forgot this client: join again."""


class Unreachable(ConnectionError):
  """The server could not be reached for the client's whole retry time."""


class ClientLoop:
  def __init__(self, conn: transport.Connection, client: int, num_images: int, compute, *,
               want_model: bool, max_bytes: int, call_timeout_s: float = 60.0,
               retry_for_s: float = 600.0):
    self.conn, self.client, self.num_images, self.compute = conn, client, num_images, compute
    self.want_model, self.max_bytes = want_model, max_bytes
    self.call_timeout_s, self.retry_for_s = call_timeout_s, retry_for_s
    self.steps_done = 0
    self.train = False

  def _call(self, method: str, kind: str, fields=None, tensors=None) -> wire.Message:
    """One call; retries while the server is unreachable (up to retry_for_s), and rejoins when
    the server does not know this client (it restarted)."""
    request = wire.encode(kind, {"client": self.client, **(fields or {})}, tensors)
    give_up = time.monotonic() + self.retry_for_s
    delay = 0.2
    while True:
      try:
        reply = self.conn.call(method, request, self.call_timeout_s)
        return wire.decode(reply, self.max_bytes)
      except transport.RemoteError as e:
        if e.code == "NOT_FOUND" and method != "Join":
          raise Rejoin() from None
        if e.code not in RETRY:
          raise
        if time.monotonic() > give_up:
          raise Unreachable(f"cannot reach the server at {self.conn.address} for "
                            f"{self.retry_for_s:.0f} s ({e.code}: {e.details})") from None
        log.info("server at %s unreachable (%s: %s); retrying", self.conn.address, e.code,
                 e.details)
        time.sleep(delay)
        delay = min(2 * delay, 5.0)
        if method != "Join":
          raise Rejoin() from None

  def join(self) -> None:
    welcome = self._call("Join", "join", {"num_images": self.num_images,
                                          "train": int(self.compute.trainable),
                                          "want_model": int(self.want_model)})
    if welcome.kind != "welcome":
      raise RuntimeError(f"unexpected reply to join: {welcome.kind}")
    self.train = bool(welcome["train"])
    self.compute.join(welcome)
    log.info("client %d joined (server at step %s, %s)", self.client, welcome["step"] + 1,
             "trainable" if self.train else "frozen")

  def run(self) -> int:
    """Works until the server says the run is done; returns the number of steps taken part in."""
    self.join()
    while True:
      try:
        if not self._one():
          return self.steps_done
      except Rejoin:
        self.join()

  def _wait(self, method: str, kind: str, fields: dict, want: str) -> wire.Message:
    while True:
      msg = self._call(method, kind, fields)
      if msg.kind == want:
        return msg
      if msg.kind != "wait":
        raise RuntimeError(f"unexpected reply to {method}: {msg.kind}")

  def _one(self) -> bool:
    task = self._call("Task", "task_request")
    if task.kind == "done":
      log.info("client %d: the run is done (%d steps taken part in)", self.client,
               self.steps_done)
      return False
    if task.kind == "wait":
      return True
    if task.kind != "task":
      raise RuntimeError(f"unexpected reply to Task: {task.kind}")
    step = task["step"]
    t0 = time.perf_counter()
    q, k = self.compute.forward(task)
    try:
      self._call("Smashed", "smashed", {"step": step}, {"q": q, "k": k})
      if self.train:
        grad = self._wait("Gradient", "grad_request", {"step": step}, "grad")
        wire.expect(grad, "grad", ("step", "sync"), {"grad": (q.dtype, q.shape),
                                                     "lr": (np.float32, (1,))})
        self.compute.backward(grad.tensors["grad"], float(grad.tensors["lr"][0]))
        if grad["sync"]:
          self._call("Model", "model", {"step": step}, self.compute.model())
          averaged = self._wait("FetchModel", "fetch_model", {"step": step}, "averaged")
          self.compute.set_model(averaged.tensors)
    except transport.RemoteError as e:
      if e.code in ("FAILED_PRECONDITION", "PERMISSION_DENIED"):
        log.warning("client %d, step %d: %s", self.client, step + 1, e.details)
        return True
      raise
    self.steps_done += 1
    log.info("client %d: step %d in %.3f s", self.client, step + 1, time.perf_counter() - t0)
    return True


def read_token(path: str, client: int, flag: str = "--token-file") -> str:
  """The token in `path`: a one-line file, or the server's {"client id": "token"} JSON."""
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError as e:
    raise ValueError(f"{flag} {path}: {e.strerror or e}") from None
  if text.startswith("{"):
    try:
      return str(json.loads(text)[str(client)])
    except (ValueError, KeyError):
      raise ValueError(f"{flag} {path} holds no token for client {client}") from None
  if not text:
    raise ValueError(f"{flag} {path} is empty")
  return text


def read_npy_images(path: str, size: int, flag: str = "--data") -> np.ndarray:
  """uint8 [n, size, size, 3] images from a .npy file, read without pickle and checked."""
  try:
    images = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"{flag} {path}: not a .npy array readable without pickle ({e})") from None
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
    raise ValueError(f"{flag} {path} holds {images.dtype} {images.shape}; expected uint8 "
                     f"(n, {size}, {size}, 3) RGB images")
  return images
