"""Runs an exported MocoSFL client slice on a device: numpy + onnxruntime only (no JAX).

    python run_client.py --model client.onnx --images DIR [--out smashed.npy]
    python run_client.py --model client.onnx --npy images.npy [--out smashed.npy] [--bench 200]

Self-contained on purpose, the one module of the package that imports nothing from it: copy this
file and the .onnx to the device (a Raspberry Pi, say), `pip install numpy onnxruntime` (+ pillow
for --images, imported only then) and run it there. Where the package is installed it also runs
as `python -m mocosfl_jax.deploy.run_client`, and quantize.py reuses its `ClientModel`. It keeps
the standard library's argparse for that reason, unlike the package's other commands, but refuses
as they do: a bad flag or input (a missing file, a file that is not an ONNX model, a wrong size)
is one `error: ...` line on stderr and status 2.
Inputs:
* --images DIR: every .png/.jpg/.jpeg/.bmp/.webp in DIR (sorted), read as RGB uint8;
* --npy FILE: uint8 images [N,H,W,3] or [H,W,3] (normalised here), or float32 tensors already
  normalised in the model's layout (passed through; NaN or Inf values are rejected).
uint8 images are normalised with the model's metadata, (x / 255 - mean) / std, as in training,
and transposed to the model's layout. Wrong sizes are rejected (expected vs got); --resize resizes
folder images with pillow instead. --bench N times N single-batch runs after a warm-up and reports
the median latency per image and the peak resident memory (`peak_rss_mib`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# What onnxruntime raises when it loads a model (its own classes, not subclasses of ValueError):
# bytes that are no ONNX model at all, and a model this onnxruntime cannot run (IR version,
# opset or operator too new, invalid graph).
_NOT_ONNX = tuple(getattr(ort_errors, n) for n in ("InvalidProtobuf", "NoModel", "InvalidArgument")
                  if hasattr(ort_errors, n))
_UNLOADABLE = tuple(getattr(ort_errors, n) for n in ("Fail", "InvalidGraph", "NotImplemented",
                                                      "RuntimeException")
                    if hasattr(ort_errors, n))


def peak_rss_mib() -> float:
  """Peak resident set size of this process: Linux's VmHWM where there is one (ru_maxrss
  survives exec there, so a process started by a large one would report its parent's peak),
  else ru_maxrss (KiB on Linux, bytes on macOS)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _load_failure(path: str, e: Exception) -> ValueError:
  """onnxruntime's load error as one line naming the file (its own message carries an error
  code prefix and, for some errors, a C++ source location and signature)."""
  lines = str(e).strip().splitlines()
  reason = lines[0] if lines else type(e).__name__
  reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", reason)
  reason = reason.replace(f"Load model from {path} failed:", "")
  reason = re.sub(r"^\S+:\d+ [^(]*\(.*?\) ", "", reason).strip()[:200]
  if isinstance(e, _NOT_ONNX):
    return ValueError(f"not an ONNX model: {path} ({reason}); give the .onnx written by "
                      "python -m mocosfl_jax.deploy.to_onnx")
  return ValueError(f"onnxruntime {ort.__version__} cannot load the ONNX model {path}: {reason}")


def _meta_value(text: str):
  try:
    return json.loads(text)
  except ValueError:
    return text


class ClientModel:
  """An onnxruntime session plus the exporter's metadata (layout, size, normalisation)."""

  def __init__(self, path: str, threads: int = 0):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"model file {path} does not exist")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    try:
      self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except _NOT_ONNX + _UNLOADABLE as e:
      raise _load_failure(path, e) from e
    raw = self.session.get_modelmeta().custom_metadata_map
    self.meta = {k: _meta_value(v) for k, v in raw.items()}
    for key in ("layout", "input_size", "mean", "std"):
      if key not in self.meta:
        raise ValueError(f"{path} lacks metadata '{key}'; export it with "
                         "python -m mocosfl_jax.deploy.to_onnx")
    self.layout = self.meta["layout"]
    self.size = int(self.meta["input_size"])
    self.mean = np.asarray(self.meta["mean"], np.float32)
    self.std = np.asarray(self.meta["std"], np.float32)
    inp = self.session.get_inputs()[0]
    self.input_name = inp.name
    self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None  # None: dynamic
    self.item_shape = ((3, self.size, self.size) if self.layout == "NCHW"
                       else (self.size, self.size, 3))

  def prepare(self, images: np.ndarray) -> np.ndarray:
    """uint8 RGB [N,H,W,3] -> normalised float32 in the model's layout; floats pass through."""
    images = np.asarray(images)
    want = (self.size, self.size, 3)
    if images.dtype == np.uint8:
      if images.ndim == 3:
        images = images[None]
      if images.ndim != 4 or images.shape[1:] != want:
        raise ValueError(f"uint8 images have shape {images.shape}; expected (N, {self.size}, "
                         f"{self.size}, 3) RGB for this model (input_size {self.size})")
      x = (images.astype(np.float32) / 255.0 - self.mean) / self.std
      return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if self.layout == "NCHW" else x)
    if images.dtype != np.float32:
      raise ValueError(f"input dtype {images.dtype} is not supported; expected uint8 images or "
                       "float32 already-normalised tensors")
    if images.ndim != 4 or images.shape[1:] != self.item_shape:
      raise ValueError(f"float32 input has shape {images.shape}; expected (N, "
                       f"{', '.join(map(str, self.item_shape))}) normalised {self.layout}")
    finite = np.isfinite(images)
    if not finite.all():  # the model would pass them on and the server would train on them
      first = tuple(int(i) for i in np.argwhere(~finite)[0])
      raise ValueError(f"float32 input holds {int(images.size - finite.sum())} NaN/Inf values "
                       f"(first at index {first}: {images[first]}); expected finite normalised "
                       "tensors")
    return images

  def run(self, x: np.ndarray) -> np.ndarray:
    """Runs prepared input, in chunks of the model's fixed batch if it has one."""
    b = self.batch
    if b is None:
      return self.session.run(None, {self.input_name: x})[0]
    if len(x) % b:
      raise ValueError(f"got {len(x)} images; this model has a fixed batch of {b} (export with "
                       "--dynamic-batch for any batch)")
    return np.concatenate([self.session.run(None, {self.input_name: x[i:i + b]})[0]
                           for i in range(0, len(x), b)])


def read_image_dir(directory: str, size: int, resize: bool) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only for image folders)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"image directory {directory} does not exist")
  names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_SUFFIXES))
  if not names:
    raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {directory}")
  images = []
  for name in names:
    with Image.open(os.path.join(directory, name)) as im:
      im = im.convert("RGB")
      if im.size != (size, size):
        if not resize:
          raise ValueError(f"image {name} is {im.size[0]}x{im.size[1]}; expected {size}x{size} "
                           "for this model (pass --resize to resize)")
        im = im.resize((size, size), Image.BILINEAR)
      images.append(np.asarray(im, np.uint8))
  return np.stack(images)


def machine_description() -> dict:
  desc = {"machine": platform.machine(), "platform": platform.platform(),
          "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "onnxruntime": ort.__version__, "numpy": np.__version__}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
          desc["cpu"] = line.split(":", 1)[1].strip()
          break
    with open("/proc/meminfo") as f:
      desc["mem_total"] = f.readline().split(":", 1)[1].strip()
    desc["loadavg_at_start"] = list(os.getloadavg())
  except OSError:
    pass
  return desc


def bench(model: ClientModel, x: np.ndarray, iters: int, warmup: int = 5) -> dict:
  """Median latency per image over `iters` runs of one batch (batch 1 unless fixed larger)."""
  b = model.batch or 1
  if len(x) < b:
    x = np.concatenate([x] * -(-b // len(x)))
  batch = np.ascontiguousarray(x[:b])
  feed = {model.input_name: batch}
  for _ in range(warmup):
    model.session.run(None, feed)
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    model.session.run(None, feed)
    times.append(time.perf_counter() - t)
  ms = sorted(1e3 * t / b for t in times)
  return {"batch": b, "iters": iters, "median_ms_per_image": statistics.median(ms),
          "p10_ms_per_image": ms[len(ms) // 10], "p90_ms_per_image": ms[(9 * len(ms)) // 10],
          "images_per_s": 1e3 / statistics.median(ms)}


class _Parser(argparse.ArgumentParser):
  """argparse with the package's refusal: one `error: ...` line on stderr and status 2 (argparse
  prints its usage first, which buries the error; --help still prints the usage)."""

  def error(self, message):
    self.exit(2, f"error: {message} (--help lists the flags)\n")


def _count(text: str) -> int:
  """An integer >= 0 (for --bench and --threads)."""
  try:
    value = int(text)
  except ValueError:
    value = -1
  if value < 0:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0")
  return value


def parse_args(argv=None):
  p = _Parser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="exported client .onnx")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--images", help="directory of RGB images")
  src.add_argument("--npy", help=".npy of uint8 images [N,H,W,3] or normalised float32")
  p.add_argument("--out", help="write smashed activations here (.npy); else print a summary")
  p.add_argument("--bench", type=_count, default=0, metavar="N", help="time N runs")
  p.add_argument("--bench-json", help="also write the benchmark and machine description here")
  p.add_argument("--threads", type=_count, default=0, help="intra-op threads (0: onnxruntime's)")
  p.add_argument("--resize", action="store_true", help="resize folder images to the model size")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  rss_start = peak_rss_mib()
  try:
    t = time.perf_counter()
    model = ClientModel(args.model, args.threads)
    load_s = time.perf_counter() - t
    if args.images:
      images = read_image_dir(args.images, model.size, args.resize)
    else:
      if not os.path.isfile(args.npy):
        raise FileNotFoundError(f"npy file {args.npy} does not exist")
      images = np.load(args.npy, allow_pickle=False)
    x = model.prepare(images)
    smashed = model.run(x)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summary = {"model": args.model, "images": len(x), "smashed_shape": list(smashed.shape),
             "layout": model.layout, "smashed_mean": float(smashed.mean()),
             "smashed_std": float(smashed.std()), "session_load_s": round(load_s, 4)}
  if args.out:
    np.save(args.out, smashed.astype(np.float32))
    summary["out"] = args.out
  if args.bench:
    summary["bench"] = bench(model, x, args.bench)
    summary["bench"].update({"peak_rss_mib": round(peak_rss_mib(), 1),
                             "rss_before_model_mib": round(rss_start, 1),
                             "model_bytes": os.path.getsize(args.model),
                             "threads": args.threads or "onnxruntime default"})
  print(json.dumps(summary, indent=1))
  if args.bench_json:
    record = {"summary": summary, "model_metadata": model.meta, "machine": machine_description()}
    with open(args.bench_json, "w") as f:
      json.dump(record, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
