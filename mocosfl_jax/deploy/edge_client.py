"""A frozen remote client on a device: an ONNX client slice, numpy, onnxruntime and gRPC; no JAX.

    python export/edge_client.py --server HOST:PORT --model client.onnx --data DIR_or_NPY \
        --client-id K --token-file FILE [--tls-ca CA.pem] [--threads N]

What the reference's Raspberry Pi runs in TAResSFL's deployment: the client slice is frozen
(the run's c_lr = 0), so the device only encodes. It joins a run served by
`python -m mocosfl_jax.serve`, and for every step it is sampled in it takes the batch positions
and augmentation draws the server sends, augments its own images in numpy exactly as the
training pipeline does (mocosfl_jax/remote/edge_augment.py), runs the ONNX slice on both views
(the frozen online and momentum slices are the same weights) and uploads the two smashed
views. Images never leave the device.

--model: the slice exported from the run's checkpoint, `python -m mocosfl_jax.deploy.to_onnx
--workdir RUN --out client.onnx --dynamic-batch` (either layout). --data: a folder of images or
a .npy of uint8 [n, H, W, 3] (read without pickle): this client's own images, in the order the
run's partition gives them (the server checks their number). --token-file: this client's token
(one line) or the server's JSON tokens file.

Device install: `pip install numpy onnxruntime grpcio safetensors` and the package without its
training dependencies (`pip install --no-deps mocosfl_jax`, or copy the mocosfl_jax/remote and
mocosfl_jax/deploy folders): the modules this imports load no JAX.
"""
from __future__ import annotations

import logging
import os
import sys

import numpy as np

from mocosfl_jax.deploy import run_client
from mocosfl_jax.remote import client_loop, edge_augment, transport


class OnnxClient:
  """The frozen ONNX slice as client_loop's `compute`."""

  trainable = False

  def __init__(self, model: run_client.ClientModel, images: np.ndarray):
    self.model, self.images = model, images
    self.settings = None

  def join(self, welcome) -> None:
    f = welcome.fields
    size = int(f["input_size"])
    if size != self.model.size or self.images.shape[1:3] != (size, size):
      raise ValueError(f"the run trains on {size}x{size} images; the model takes "
                       f"{self.model.size} and --data holds {self.images.shape[1:3]}")
    floats = lambda text: tuple(float(x) for x in text.split(","))
    self.settings = dict(mean=floats(f["mean"]), std=floats(f["std"]), pipeline=f["pipeline"],
                         crop_scale=floats(f["crop_scale"]))
    if not (np.allclose(self.model.mean, self.settings["mean"])
            and np.allclose(self.model.std, self.settings["std"])):
      raise ValueError(f"the model normalises with mean {self.model.mean.tolist()} std "
                       f"{self.model.std.tolist()}, the run with {self.settings['mean']} "
                       f"{self.settings['std']}: export the model from this run")

  def _encode(self, views: np.ndarray) -> np.ndarray:
    x = views.transpose(0, 3, 1, 2) if self.model.layout == "NCHW" else views
    out = self.model.run(np.ascontiguousarray(x, np.float32))
    out = out.transpose(0, 2, 3, 1) if self.model.layout == "NCHW" else out
    return np.ascontiguousarray(out, np.float32)

  def forward(self, task):
    pos = task.tensors["positions"]
    if pos.min() < 0 or pos.max() >= len(self.images):
      raise RuntimeError(f"the server asked for images {pos.tolist()} but this client holds "
                         f"{len(self.images)}")
    q, k = edge_augment.two_views(task.tensors["uniforms"], self.images[pos], **self.settings)
    return self._encode(q), self._encode(k)


def read_data(path: str, size: int) -> np.ndarray:
  """This client's images: a folder of image files, or a uint8 .npy [n, H, W, 3]."""
  if os.path.isdir(path):
    try:
      return run_client.read_image_dir(path, size, resize=False)
    except OSError as e:   # PIL's UnidentifiedImageError is an OSError
      raise ValueError(f"--data {path}: cannot read an image ({e})") from None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--data {path} does not exist")
  return client_loop.read_npy_images(path, size)


def parse_args(argv=None):
  p = run_client._Parser(description=__doc__.split("\n\n")[0])  # pylint: disable=protected-access
  p.add_argument("--server", required=True, help="HOST:PORT of python -m mocosfl_jax.serve")
  p.add_argument("--model", required=True, help="the ONNX client slice")
  p.add_argument("--data", required=True, help="folder of images or uint8 .npy [n,H,W,3]")
  p.add_argument("--client-id", type=int, required=True)
  p.add_argument("--token-file", required=True)
  p.add_argument("--tls-ca", default=None, help="PEM CA certificate: connect over TLS")
  p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
  p.add_argument("--retry-for", type=float, default=300.0,
                 help="seconds to keep retrying while the server cannot be reached")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  try:
    transport.check_address(args.server, "--server")
    model = run_client.ClientModel(args.model, threads=args.threads)
    images = read_data(args.data, model.size)
    token = client_loop.read_token(args.token_file, args.client_id)
    tls_ca = None
    if args.tls_ca:
      with open(args.tls_ca, "rb") as f:
        tls_ca = f.read()
    limit = 1 << 26
    conn = transport.Connection(args.server, token, hard_limit_bytes=limit, tls_ca=tls_ca)
    loop = client_loop.ClientLoop(conn, args.client_id, len(images), OnnxClient(model, images),
                                  want_model=False, max_bytes=limit, retry_for_s=args.retry_for)
    try:
      steps = loop.run()
    finally:
      conn.close()
  except (ValueError, FileNotFoundError, client_loop.Unreachable) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except transport.RemoteError as e:
    print(f"error: the server at {args.server} refused this client: {e.details} ({e.code})",
          file=sys.stderr)
    return 2
  logging.info("took part in %d steps; peak memory %.1f MiB", steps, run_client.peak_rss_mib())
  return 0


if __name__ == "__main__":
  sys.exit(main())
