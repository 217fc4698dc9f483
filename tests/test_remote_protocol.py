"""The server's side of the remote protocol over loopback gRPC: what it accepts, and bad traffic.

Each bad message is refused with a gRPC error that says why, logged as a refusal, and the open
step goes on: the same client's good message is accepted afterwards. No JAX here: the
coordinator and transport are what a remote client talks to (remote/coordinator.py).
"""
import json
import os
import pickle
import threading
import time

import numpy as np
import pytest

from mocosfl_jax.remote import coordinator as coordinator_lib
from mocosfl_jax.remote import transport, wire

TOKENS = {1: "token-of-client-one-0123456789", 2: "token-of-client-two-0123456789"}
SMASHED = (np.dtype(np.float32), (2, 4, 4, 3))
MODEL = {"online['params']['w']": (np.dtype(np.float32), (3, 3)),
         "momentum['params']['w']": (np.dtype(np.float32), (3, 3))}
MAX_BYTES = 4096
STEP = 5


def _smashed(fill=0.5, dtype=np.float32, shape=SMASHED[1]):
  return np.full(shape, fill, dtype)


def smashed_message(client=1, step=STEP, q=None, k=None):
  return wire.encode("smashed", {"client": client, "step": step},
                     {"q": _smashed() if q is None else q, "k": _smashed() if k is None else k})


@pytest.fixture
def served():
  """A coordinator serving over loopback, with step 5 open for client 1 (client 2 is remote
  but not in this step's pool)."""
  coord = coordinator_lib.Coordinator(
      tokens=TOKENS, train=True, num_images={1: 10, 2: 12}, smashed=SMASHED, model_spec=MODEL,
      welcome={"num_steps": 10}, max_bytes=MAX_BYTES, poll_s=0.5)
  coord.set_models({c: {k: np.zeros(s, d) for k, (d, s) in MODEL.items()} for c in TOKENS})
  server, port = transport.serve(coord.handle, "127.0.0.1:0", hard_limit_bytes=4 * MAX_BYTES)
  coord.open_round(STEP, 0, STEP, True, {1: (np.arange(2, dtype=np.int32),
                                              np.zeros((2, 2, 35), np.float32))})
  conns = []

  def connect(token=TOKENS[1]):
    conn = transport.Connection(f"127.0.0.1:{port}", token, hard_limit_bytes=1 << 20)
    conns.append(conn)
    return conn

  for client in TOKENS:    # both clients join; client 1 takes its task for step 5
    call(connect(TOKENS[client]), "Join", join_message(client, 10 if client == 1 else 12))
  call(connect(), "Task", wire.encode("task_request", {"client": 1}))
  yield coord, connect
  for c in conns:
    c.close()
  server.stop(0).wait()


def join_message(client=1, num_images=10, train=1):
  return wire.encode("join", {"client": client, "num_images": num_images, "train": train,
                              "want_model": 1})


def call(conn, method, data):
  return wire.decode(conn.call(method, data, timeout=10), 1 << 20)


def test_a_client_joins_takes_its_task_and_its_smashed_data_reaches_the_step(served):
  coord, connect = served
  conn = connect()
  welcome = call(conn, "Join", join_message())
  assert welcome.kind == "welcome" and welcome["num_steps"] == 10 and welcome["train"] == 1
  assert set(welcome.tensors) == set(MODEL)
  assert coord.connected(1)
  coord.round.handed.discard(1)             # the task again, as after a reconnect
  task = call(conn, "Task", wire.encode("task_request", {"client": 1}))
  assert task.kind == "task" and task["step"] == STEP and task["sync"] == 1
  np.testing.assert_array_equal(task.tensors["positions"], [0, 1])
  assert call(conn, "Smashed", smashed_message()).kind == "ack"
  got = coord.wait_smashed(5)
  np.testing.assert_array_equal(got[1][0], _smashed())
  assert coord.refusals == []


def _bf16_message():
  """A valid safetensors blob whose tensor has a dtype numpy has no type for (BF16)."""
  header = json.dumps({"__metadata__": {"kind": "smashed", "client": "1", "step": str(STEP)},
                       "q": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
  return len(header).to_bytes(8, "little") + header + b"\0" * 4


# (name, how to send it, gRPC code, what the error says)
BAD = {
    "missing token": (lambda c: c(None).call("Smashed", smashed_message(), 10),
                      "UNAUTHENTICATED", "no token"),
    "unknown token": (lambda c: c("not-the-token-of-anyone-xxxx").call(
        "Smashed", smashed_message(), 10), "UNAUTHENTICATED", "wrong token for client 1"),
    "another client's token": (lambda c: c(TOKENS[2]).call("Smashed", smashed_message(), 10),
                                "UNAUTHENTICATED", "wrong token for client 1"),
    "client id not remote": (lambda c: c().call("Smashed", smashed_message(client=9), 10),
                             "PERMISSION_DENIED", "client 9 is not a remote client"),
    "client not in the pool": (lambda c: c(TOKENS[2]).call(
        "Smashed", smashed_message(client=2), 10), "PERMISSION_DENIED",
        "client 2 is not in step 5's pool"),
    "wrong shape": (lambda c: c().call("Smashed", smashed_message(
        q=_smashed(shape=(2, 4, 4, 4))), 10), "INVALID_ARGUMENT",
        "smashed.q has shape (2, 4, 4, 4), expected (2, 4, 4, 3)"),
    "wrong dtype": (lambda c: c().call("Smashed", smashed_message(
        k=_smashed(dtype=np.float64)), 10), "INVALID_ARGUMENT",
        "smashed.k has dtype float64, expected float32"),
    "NaN values": (lambda c: c().call("Smashed", smashed_message(q=_smashed(np.nan)), 10),
                   "INVALID_ARGUMENT", "NaN or Inf"),
    "Inf values": (lambda c: c().call("Smashed", smashed_message(k=_smashed(np.inf)), 10),
                   "INVALID_ARGUMENT", "NaN or Inf"),
    "oversized message": (lambda c: c().call("Smashed", smashed_message(
        q=_smashed(shape=(2, 4, 4, 3 * 40))), 10), "RESOURCE_EXHAUSTED",
        f"exceeds the limit of {MAX_BYTES} bytes"),
    "truncated message": (lambda c: c().call("Smashed", smashed_message()[:-7], 10),
                          "INVALID_ARGUMENT", "not valid safetensors"),
    "header cut short": (lambda c: c().call("Smashed", smashed_message()[:30], 10),
                         "INVALID_ARGUMENT", "truncated"),
    "garbage bytes": (lambda c: c().call("Smashed", os.urandom(600), 10),
                      "INVALID_ARGUMENT", "message"),
    "a pickle": (lambda c: c().call("Smashed", pickle.dumps({"q": _smashed()}), 10),
                 "INVALID_ARGUMENT", "message"),
    "out-of-order step": (lambda c: c().call("Smashed", smashed_message(step=STEP + 1), 10),
                          "FAILED_PRECONDITION", "step 6 is not the open step (step 5 is)"),
    "stale step": (lambda c: c().call("Smashed", smashed_message(step=STEP - 1), 10),
                   "FAILED_PRECONDITION", "step 4 is not the open step"),
    "wrong kind for the method": (lambda c: c().call("Smashed", wire.encode(
        "model", {"client": 1, "step": STEP}), 10), "INVALID_ARGUMENT",
        "expected a 'smashed' message"),
    "unsupported dtype": (lambda c: c().call("Smashed", _bf16_message(), 10),
                          "INVALID_ARGUMENT", "does not accept"),
    "smashed data without taking the task": (lambda c: c(TOKENS[2]).call(
        "Smashed", smashed_message(client=2), 10), "PERMISSION_DENIED", "not in step 5's pool"),
    "extra tensor": (lambda c: c().call("Smashed", wire.encode(
        "smashed", {"client": 1, "step": STEP},
        {"q": _smashed(), "k": _smashed(), "x": _smashed()}), 10), "INVALID_ARGUMENT",
        "carries tensors"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_traffic_is_refused_logged_and_the_step_goes_on(served, name, caplog):
  coord, connect = served
  send, code, says = BAD[name]
  with pytest.raises(transport.RemoteError) as e:
    send(connect)
  assert e.value.code == code, e.value
  assert says in e.value.details, e.value.details
  assert len(coord.refusals) == 1 and says in coord.refusals[0]
  assert any("refused Smashed" in r.getMessage() for r in caplog.records)
  # The step goes on: client 1's good message is accepted and reaches the step.
  assert call(connect(), "Smashed", smashed_message()).kind == "ack"
  assert set(coord.wait_smashed(5)) == {1}


def test_a_message_over_the_transport_limit_is_refused_by_grpc(served):
  coord, connect = served
  with pytest.raises(transport.RemoteError) as e:
    connect().call("Smashed", smashed_message(q=_smashed(shape=(2, 4, 4, 3 * 200))), 10)
  assert e.value.code == "RESOURCE_EXHAUSTED"
  assert call(connect(), "Smashed", smashed_message()).kind == "ack"


def test_a_replayed_message_is_refused(served):
  coord, connect = served
  conn = connect()
  call(conn, "Smashed", smashed_message())
  with pytest.raises(transport.RemoteError) as e:
    conn.call("Smashed", smashed_message(q=_smashed(2.0)), 10)
  assert e.value.code == "FAILED_PRECONDITION" and "replayed" in e.value.details
  np.testing.assert_array_equal(coord.wait_smashed(5)[1][0], _smashed())   # the first one


def test_smashed_data_after_the_deadline_is_refused_and_the_step_ran_without_it(served):
  coord, connect = served
  t0 = time.monotonic()
  assert coord.wait_smashed(0.3) == {}            # took its task, never answered: the deadline
  assert time.monotonic() - t0 >= 0.3
  with pytest.raises(transport.RemoteError) as e:
    connect().call("Smashed", smashed_message(), 10)
  assert e.value.code == "FAILED_PRECONDITION" and "after the deadline" in e.value.details


def test_a_client_that_is_not_connected_is_not_waited_for(served):
  coord, _ = served
  coord.round.handed.clear()
  coord.joined.discard(1)                  # as a server that restarted: client 1 never joined it
  t0 = time.monotonic()
  assert coord.wait_smashed(30) == {}
  assert time.monotonic() - t0 < 5


def test_a_client_must_join_before_anything_else(served):
  coord, connect = served
  coord.joined.discard(1)                  # as after a server restart
  with pytest.raises(transport.RemoteError) as e:
    connect().call("Task", wire.encode("task_request", {"client": 1}), 10)
  assert e.value.code == "NOT_FOUND" and "join again" in e.value.details


def test_a_refused_join_does_not_count_as_connected(served):
  coord, connect = served
  coord.joined.discard(2)
  with pytest.raises(transport.RemoteError):
    connect(TOKENS[2]).call("Join", join_message(2, num_images=99), 10)
  assert not coord.connected(2)


def test_a_second_server_cannot_take_the_same_port(served):
  coord, connect = served
  port = int(connect().address.rsplit(":", 1)[1])
  with pytest.raises(OSError, match="cannot listen"):
    transport.serve(coord.handle, f"127.0.0.1:{port}", hard_limit_bytes=4 * MAX_BYTES)


@pytest.mark.parametrize("fields,says", [
    ({"num_images": 11, "train": 1}, "holds 11 images but this run's partition gives it 10"),
    ({"num_images": 10, "train": 0}, "a frozen client cannot take part")])
def test_join_refusals(served, fields, says):
  _, connect = served
  with pytest.raises(transport.RemoteError) as e:
    connect().call("Join", wire.encode("join", {"client": 1, "want_model": 0, **fields}), 10)
  assert e.value.code == "FAILED_PRECONDITION" and says in e.value.details


def test_gradient_and_model_exchange_of_a_sync_step(served):
  coord, connect = served
  conn = connect()
  call(conn, "Smashed", smashed_message())
  coord.wait_smashed(5)
  coord.publish_grads({1: (_smashed(0.25), 0.01)})
  grad = call(conn, "Gradient", wire.encode("grad_request", {"client": 1, "step": STEP}))
  np.testing.assert_array_equal(grad.tensors["grad"], _smashed(0.25))
  assert grad["sync"] == 1 and grad.tensors["lr"].tolist() == [np.float32(0.01)]
  # A model with a wrong tensor is refused; the right one is accepted and averaged.
  bad = {k: np.zeros(s, np.float32) for k, (_, s) in MODEL.items()}
  bad["online['params']['w']"] = np.zeros((3, 4), np.float32)
  with pytest.raises(transport.RemoteError) as e:
    conn.call("Model", wire.encode("model", {"client": 1, "step": STEP}, bad), 10)
  assert "has shape (3, 4), expected (3, 3)" in e.value.details
  good = {k: np.ones(s, np.float32) for k, (_, s) in MODEL.items()}
  call(conn, "Model", wire.encode("model", {"client": 1, "step": STEP}, good))
  got = coord.wait_models([1], 5)
  np.testing.assert_array_equal(got[1]["online['params']['w']"], np.ones((3, 3)))
  threading.Timer(0.2, coord.publish_models, ({1: {k: 2 * v for k, v in good.items()}},)).start()
  averaged = call(conn, "FetchModel", wire.encode("fetch_model", {"client": 1, "step": STEP}))
  assert averaged.kind == "averaged"
  np.testing.assert_array_equal(averaged.tensors["online['params']['w']"], 2 * np.ones((3, 3)))


def test_the_run_ending_tells_waiting_clients(served):
  coord, connect = served
  threading.Timer(0.2, coord.finish).start()
  coord.round.collecting = False
  assert call(connect(), "Task", wire.encode("task_request", {"client": 1})).kind == "done"


def test_tls_carries_the_protocol_and_refuses_plain_clients(tmp_path):
  """--tls_cert/--tls_key: a client trusting the certificate joins; a plain-text client cannot
  talk to the TLS server."""
  import shutil, subprocess  # pylint: disable=g-import-not-at-top,multiple-imports
  if shutil.which("openssl") is None:
    pytest.skip("needs the openssl command to make a certificate")
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                  "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
                  "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                 check=True, capture_output=True)
  cert, key = (tmp_path / "cert.pem").read_bytes(), (tmp_path / "key.pem").read_bytes()
  coord = coordinator_lib.Coordinator(
      tokens=TOKENS, train=False, num_images={1: 10, 2: 12}, smashed=SMASHED, model_spec={},
      welcome={"num_steps": 10}, max_bytes=MAX_BYTES, poll_s=0.5)
  coord.set_models({})
  server, port = transport.serve(coord.handle, "127.0.0.1:0", hard_limit_bytes=4 * MAX_BYTES,
                                 tls=(cert, key))
  join = wire.encode("join", {"client": 1, "num_images": 10, "train": 0, "want_model": 0})
  try:
    secure = transport.Connection(f"127.0.0.1:{port}", TOKENS[1], hard_limit_bytes=1 << 20,
                                  tls_ca=cert)
    assert call(secure, "Join", join).kind == "welcome"
    plain = transport.Connection(f"127.0.0.1:{port}", TOKENS[1], hard_limit_bytes=1 << 20)
    with pytest.raises(transport.RemoteError) as e:
      plain.call("Join", join, timeout=5)
    assert e.value.code == "UNAVAILABLE"
    secure.close()
    plain.close()
  finally:
    server.stop(0).wait()
