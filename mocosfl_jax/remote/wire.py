"""What travels between the server and its remote clients: safetensors bytes, checked on arrival.

Every message is one safetensors blob: named little-endian tensors (dtype and shape in its
header) and a string metadata map carrying the message's fields (`kind`, `client`, `step`, ...).
Nothing is ever unpickled: safetensors' header is JSON, its tensors are raw bytes, and its
parser refuses headers whose offsets do not cover the buffer exactly (truncated or padded
bytes). Whoever receives a message checks it against what it expects before anything touches
the training step: the kind, the fields, every tensor's name, dtype and shape, and finite values
(`expect`). A refusal is a `WireError` whose `code` names the gRPC status to answer with.

Imports numpy and safetensors only (no JAX): export/edge_client.py uses it on devices.
"""
from __future__ import annotations

import json
import struct
from typing import Iterable, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as st_numpy

# What a message may carry in its metadata map, and what each field must parse as.
_INT_FIELDS = ("client", "step", "epoch", "batch_idx", "num_images", "num_steps", "sync",
               "train", "want_model", "batch_size", "input_size")
_MAX_HEADER = 1 << 20


class WireError(ValueError):
  """A message that is refused. `code`: 'INVALID_ARGUMENT', 'UNAUTHENTICATED', 'NOT_FOUND',
  'FAILED_PRECONDITION', 'RESOURCE_EXHAUSTED' or 'PERMISSION_DENIED' (grpc.StatusCode names)."""

  def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
    super().__init__(message)
    self.code = code


class Message:
  """A decoded message: kind, int/str fields, and named numpy tensors."""

  def __init__(self, kind: str, fields: Mapping[str, object], tensors: Mapping[str, np.ndarray]):
    self.kind, self.fields, self.tensors = kind, dict(fields), dict(tensors)

  def __getitem__(self, name):
    return self.fields[name]

  def __repr__(self):
    shapes = {k: (str(v.dtype), v.shape) for k, v in self.tensors.items()}
    return f"Message({self.kind!r}, {self.fields}, {shapes})"


def encode(kind: str, fields: Mapping[str, object] | None = None,
           tensors: Mapping[str, np.ndarray] | None = None) -> bytes:
  """Message -> bytes. Tensors must be numeric numpy arrays (any shape, stored contiguous)."""
  meta = {"kind": kind}
  for k, v in (fields or {}).items():
    meta[k] = str(int(v)) if k in _INT_FIELDS else str(v)
  arrays = {k: np.ascontiguousarray(v) for k, v in (tensors or {}).items()}
  return st_numpy.save(arrays, metadata=meta)


def _header(data: bytes) -> dict:
  if len(data) < 8:
    raise WireError(f"message of {len(data)} bytes is truncated (a message starts with an "
                    "8-byte header length)")
  (n,) = struct.unpack("<Q", data[:8])
  if n > _MAX_HEADER or 8 + n > len(data):
    raise WireError(f"message header claims {n} bytes but the message has {len(data)}: "
                    "truncated or not a safetensors message")
  try:
    header = json.loads(data[8:8 + n])
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise WireError("message header is not JSON: garbage bytes or not a safetensors message") \
        from None
  if not isinstance(header, dict):
    raise WireError("message header is not a JSON object")
  return header


def peek(data: bytes, max_bytes: int) -> tuple[str, dict]:
  """(kind, fields) from the header alone, without reading any tensor (who sent it, before
  anything else is done with it)."""
  if len(data) > max_bytes:
    raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes",
                    "RESOURCE_EXHAUSTED")
  header = _header(data)
  meta = header.get("__metadata__") or {}
  if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str):
    raise WireError("message carries no 'kind' in its metadata")
  return meta["kind"], _fields(meta)


def decode(data: bytes, max_bytes: int) -> Message:
  """bytes -> Message, refusing oversized, truncated, garbage and malformed messages."""
  kind, fields = peek(data, max_bytes)
  try:
    tensors = st_numpy.load(bytes(data))
  except SafetensorError as e:
    raise WireError(f"message is not valid safetensors ({e})") from None
  except (KeyError, TypeError, ValueError) as e:   # e.g. a dtype numpy does not have (BF16)
    raise WireError(f"message holds a tensor this protocol does not accept ({e!r})") from None
  return Message(kind, fields, tensors)


def _fields(meta: dict) -> dict:
  fields = {}
  for k, v in meta.items():
    if k == "kind":
      continue
    if k in _INT_FIELDS:
      try:
        fields[k] = int(v)
      except ValueError:
        raise WireError(f"field {k!r} must be an integer, got {v!r}") from None
    else:
      fields[k] = v
  return fields


def expect(msg: Message, kind: str, fields: Iterable[str] = (),
           tensors: Mapping[str, tuple] | None = None) -> Message:
  """Checks a message against what the receiver expects; returns it.

  Args:
    kind: the message kind.
    fields: names of fields that must be present.
    tensors: name -> (dtype, shape): exactly these tensors, each of this dtype and shape, with
      finite values if floating point.
  """
  if msg.kind != kind:
    raise WireError(f"expected a {kind!r} message, got {msg.kind!r}")
  missing = [f for f in fields if f not in msg.fields]
  if missing:
    raise WireError(f"{kind!r} message lacks field(s) {missing}")
  tensors = tensors or {}
  if set(msg.tensors) != set(tensors):
    raise WireError(f"{kind!r} message carries tensors {sorted(msg.tensors)}, expected "
                    f"{sorted(tensors)}")
  for name, (dtype, shape) in tensors.items():
    check_tensor(f"{kind}.{name}", msg.tensors[name], dtype, shape)
  return msg


def check_tensor(name: str, x: np.ndarray, dtype, shape) -> None:
  """Refuses a tensor of the wrong dtype or shape, or with NaN / Inf values."""
  dtype = np.dtype(dtype)
  if x.dtype != dtype:
    raise WireError(f"{name} has dtype {x.dtype}, expected {dtype}")
  if tuple(x.shape) != tuple(shape):
    raise WireError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
  if np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(x)):
    raise WireError(f"{name} holds NaN or Inf values")
