"""gRPC transport for the server and its remote clients: bytes in, bytes out, tokens, TLS, limits.

One gRPC service, `mocosfl.Federation`, with unary methods whose requests and replies are
`wire` messages (safetensors bytes; no protobuf schema to compile, no pickle). gRPC gives what
a hand-written socket protocol lacks: framing of messages of any size up to a bound, deadlines
on every call, HTTP/2 keep-alive and reconnection, and TLS.

* Authentication: every call carries `authorization: Bearer <token>` metadata; the server
  checks it against the token of the client id the message names (`coordinator`).
* TLS: `tls=(cert_pem, key_pem)` on the server, the CA certificate on the client; without it the
  channel is plain TCP (for loopback tests and trusted networks only).
* Size: gRPC refuses messages over `hard_limit_bytes` before they reach a handler; the
  coordinator refuses messages over its own, exact, limit with a log line.

Imports grpc only (no JAX, no numpy): export/edge_client.py uses it on devices.
"""
from __future__ import annotations

from concurrent import futures
import logging
from typing import Callable

import grpc

SERVICE = "mocosfl.Federation"
METHODS = ("Join", "Task", "Smashed", "Gradient", "Model", "FetchModel")

log = logging.getLogger("mocosfl_jax.remote")


def check_address(text: str, flag: str, *, listen: bool = False) -> str:
  """HOST:PORT, or a ValueError naming the flag. A server may listen on port 0 (a free port)."""
  host, sep, port = text.rpartition(":")
  lowest = 0 if listen else 1
  if not sep or not host or not port.isdigit() or not lowest <= int(port) <= 65535:
    example = ("127.0.0.1:50051 or 0.0.0.0:50051 (port 0 picks a free one)" if listen
               else "192.168.1.2:50051")
    raise ValueError(f"{flag} {text!r}: expected HOST:PORT, e.g. {example}")
  return text


class RemoteError(RuntimeError):
  """A call the other side refused or that failed: `code` is the grpc.StatusCode name."""

  def __init__(self, code: str, details: str):
    super().__init__(f"{code}: {details}")
    self.code, self.details = code, details


class Refusal(Exception):
  """Raised by a handler: the call is answered with this gRPC status and message."""

  def __init__(self, code: str, message: str):
    super().__init__(message)
    self.code = code


def _options(hard_limit_bytes: int):
  return [("grpc.max_receive_message_length", hard_limit_bytes),
          ("grpc.max_send_message_length", hard_limit_bytes),
          ("grpc.so_reuseport", 0)]    # a second server on the same port fails to bind


def token_of(context: grpc.ServicerContext) -> str | None:
  for key, value in context.invocation_metadata():
    if key == "authorization" and value.startswith("Bearer "):
      return value[len("Bearer "):]
  return None


def serve(handle: Callable[[str, bytes, str | None, str], bytes], address: str, *,
          hard_limit_bytes: int, tls: tuple[bytes, bytes] | None = None,
          workers: int = 32) -> tuple[grpc.Server, int]:
  """Starts a gRPC server whose every method calls handle(method, request, token, peer).

  `handle` returns the reply bytes or raises Refusal(code, message). Returns (server, port)
  (port: the bound port, useful with 'host:0').
  """
  def method(name):
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
      try:
        return handle(name, request, token_of(context), context.peer())
      except Refusal as r:
        context.abort(getattr(grpc.StatusCode, r.code), str(r))
    return grpc.unary_unary_rpc_method_handler(unary)

  server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                       options=_options(hard_limit_bytes),
                       maximum_concurrent_rpcs=4 * workers)
  server.add_generic_rpc_handlers(
      (grpc.method_handlers_generic_handler(SERVICE, {m: method(m) for m in METHODS}),))
  try:
    if tls is None:
      port = server.add_insecure_port(address)
    else:
      cert, key = tls
      port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
  except RuntimeError:
    port = 0
  if port == 0:
    raise OSError(f"cannot listen on {address}: the port is in use, or the address (or the "
                  "TLS certificate and key) is not valid")
  server.start()
  return server, port


class Connection:
  """A client's channel to the server: `call(method, bytes, timeout)` -> reply bytes."""

  def __init__(self, address: str, token: str | None, *, hard_limit_bytes: int,
               tls_ca: bytes | None = None):
    opts = _options(hard_limit_bytes)
    self.address = address
    self.channel = (grpc.insecure_channel(address, options=opts) if tls_ca is None else
                    grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), opts))
    self.metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    self._stubs = {m: self.channel.unary_unary(f"/{SERVICE}/{m}") for m in METHODS}

  def call(self, method: str, request: bytes, timeout: float) -> bytes:
    try:
      return self._stubs[method](request, timeout=timeout, metadata=self.metadata)
    except grpc.RpcError as e:
      raise RemoteError(e.code().name, e.details() or "") from None

  def close(self):
    self.channel.close()
