"""A remote client that runs its slice in JAX: `python -m mocosfl_jax.edge_client`.

    python -m mocosfl_jax.edge_client --server HOST:PORT --config CONFIG --client_id K \
        --token_file FILE [--data IMAGES.npy] [--tls_ca CA.pem]

It takes part in a run served by `python -m mocosfl_jax.serve` with the same config: it joins
(receiving its current model from the server), then for every step it is sampled in it
augments its batch with the draws the server sends (so its views are those of the simulated
run), runs the online and momentum slices, uploads the two smashed views, and, when the run
trains its clients (c_lr > 0), pulls the server's gradient back through its online slice,
takes the SGD step with the learning rate the server sends, and at sync steps uploads its model
and takes the average. Its images are --data (uint8 [n, H, W, 3], read without pickle) or, by
default, its part of the config's dataset (what the simulated client K would hold).

A frozen deployment (c_lr = 0, TAResSFL's Raspberry Pi) needs no JAX on the device:
export/edge_client.py runs an exported ONNX slice with numpy and onnxruntime.
"""
from __future__ import annotations

import functools
from pathlib import Path

from absl import flags, logging
from ml_collections import config_flags
import numpy as np

from mocosfl_jax import cli
from mocosfl_jax import main as main_lib
from mocosfl_jax.data import sources


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  config_flags.DEFINE_config_file("config", None, "The run's config file (the server's).",
                                  flag_values=flag_values, lock_config=True,
                                  sys_argv=list(argv))
  flags.DEFINE_string("server", None, "HOST:PORT of python -m mocosfl_jax.serve.",
                      flag_values=flag_values)
  flags.DEFINE_integer("client_id", None, "This client's id in the run.",
                       flag_values=flag_values)
  flags.DEFINE_string("token_file", None, "File holding this client's token (one line), or "
                      "the server's JSON tokens file.", flag_values=flag_values)
  flags.DEFINE_string("data", None, "uint8 images [n, H, W, 3] (.npy); default: this client's "
                      "part of the config's dataset.", flag_values=flag_values)
  flags.DEFINE_string("tls_ca", None, "PEM CA certificate: connect over TLS.",
                      flag_values=flag_values)
  flags.DEFINE_float("retry_for", 300.0, "Seconds to keep retrying while the server cannot be "
                     "reached (it may be starting or restarting).", flag_values=flag_values)


class JaxClient:
  """The client slice in JAX (remote/client_loop.py's `compute`)."""

  trainable = True

  def __init__(self, exp, net, images: np.ndarray):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from mocosfl_jax.algorithm import parties, state as state_lib  # pylint: disable=g-import-not-at-top
    from mocosfl_jax.data import augment  # pylint: disable=g-import-not-at-top
    from mocosfl_jax.remote import steps  # pylint: disable=g-import-not-at-top
    self.steps, self.images = steps, images
    cfg, aug = exp.step, exp.aug
    tx = state_lib.optimizer(cfg)
    abstract = state_lib.abstract_train_state(net, cfg).clients
    self.template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), abstract)
    mean, std = jnp.asarray(aug.mean), jnp.asarray(aug.std)
    view = functools.partial(augment.augment_from_uniforms, mean=mean, std=std,
                             pipeline=aug.pipeline, crop_scale=aug.crop_scale)

    @jax.jit
    def forward(online, momentum, uniforms, batch):
      q = jax.vmap(view)(uniforms[0], batch)
      k = jax.vmap(view)(uniforms[1], batch)
      a_q, a_k, online, momentum, _ = parties.client_send(net, cfg, online, momentum, q, k)
      return a_q, a_k, online, momentum, q, k

    @jax.jit
    def backward(online, opt_state, q, k, grad, lr):
      return parties.client_receive(net, cfg, tx, online, opt_state, q, k, grad, lr)

    self._forward, self._backward = forward, backward
    self.online = self.momentum = self.opt_state = None
    self.views = None

  def join(self, welcome) -> None:
    t, s = self.template, self.steps
    self.online = s.from_tensors(t.online, welcome.tensors, "online")
    self.momentum = s.from_tensors(t.momentum, welcome.tensors, "momentum")
    self.opt_state = s.from_tensors(t.opt_state, welcome.tensors, "opt")

  def forward(self, task):
    pos = task.tensors["positions"]
    if pos.min() < 0 or pos.max() >= len(self.images):
      raise RuntimeError(f"the server asked for images {pos.tolist()} but this client holds "
                         f"{len(self.images)}")
    a_q, a_k, self.online, self.momentum, q, k = self._forward(
        self.online, self.momentum, task.tensors["uniforms"], self.images[pos])
    self.views = (q, k)
    return np.asarray(a_q, np.float32), np.asarray(a_k, np.float32)

  def backward(self, grad: np.ndarray, lr: float) -> None:
    q, k = self.views
    self.online, self.opt_state = self._backward(self.online, self.opt_state, q, k, grad,
                                                 np.float32(lr))

  def model(self) -> dict:
    return {**self.steps.row_tensors(self.online, "online"),
            **self.steps.row_tensors(self.momentum, "momentum")}

  def set_model(self, tensors: dict) -> None:
    t, s = self.template, self.steps
    self.online = s.from_tensors(t.online, tensors, "online")
    self.momentum = s.from_tensors(t.momentum, tensors, "momentum")


def run(args) -> int:
  from mocosfl_jax import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.models import build  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.remote import client_loop, transport  # pylint: disable=g-import-not-at-top
  for name in ("config", "server", "client_id", "token_file"):
    if getattr(args, name) is None:
      raise ValueError(f"--{name} is required")
  transport.check_address(args.server, "--server")
  exp = experiment_lib.resolve(args.config)
  net = build(exp.model)
  k = args.client_id
  if not 0 <= k < exp.step.num_clients:
    raise ValueError(f"--client_id {k} is not a client of this run (num_clients="
                     f"{exp.step.num_clients})")
  images = (client_loop.read_npy_images(args.data, exp.model.input_size) if args.data
            else exp.train.images[np.asarray(exp.parts[k])])
  token = client_loop.read_token(args.token_file, k, "--token_file")
  tls_ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
  compute = JaxClient(exp, net, images)
  limit = 1 << 30
  conn = transport.Connection(args.server, token, hard_limit_bytes=limit, tls_ca=tls_ca)
  loop = client_loop.ClientLoop(conn, k, len(images), compute, want_model=True, max_bytes=limit,
                                retry_for_s=args.retry_for)
  try:
    steps = loop.run()
  except transport.RemoteError as e:
    raise ValueError(f"the server at {args.server} refused this client: {e.details} "
                     f"({e.code})") from None
  except client_loop.Unreachable as e:
    raise ValueError(str(e)) from None
  finally:
    conn.close()
  logging.info("took part in %d steps", steps)
  return 0


def main(argv=None) -> int:
  return cli.run(define_flags, run, argv,
                 errors=(ValueError, FileNotFoundError, sources.DatasetNotPreparedError),
                 explain=main_lib.explain_config_error)


if __name__ == "__main__":
  main()
