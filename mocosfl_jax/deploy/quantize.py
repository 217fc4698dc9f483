"""Optional int8 quantisation of an exported client slice, with the activation error it costs.

    python -m mocosfl_jax.deploy.quantize --model client.onnx --out client_int8.onnx
        [--mode dynamic|static] [--calib images.npy|DIR] [--eval images.npy|DIR]

dynamic (default): int8 weights (ConvInteger), activation ranges computed at run time, no
calibration. static: QDQ format, per-channel int8 weights and uint8 activations calibrated (MinMax)
on a few real images; convolutions then run in int8, which is faster, but on these GroupNorm
networks its activation error is an order of magnitude above dynamic's, with every calibration
method tried. The likely cause, not fully diagnosed, is per-tensor uint8 activations ahead of each
GroupNorm, which rescales low-variance groups back up. So static is offered, not recommended.
Measured sizes, latencies and errors: bench/results/onnx_client.json.

The float and the int8 model are both run on the evaluation images (default: the calibration
images, else random normalised inputs) and the smashed-activation error is reported (max/mean
abs, relative RMS, cosine): the server was trained on float activations and only the user can
decide what error is acceptable. No JAX: numpy, onnx and onnxruntime. Metadata is carried over
and 'quantization' is added.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from absl import flags
from onnxruntime import quantization as q

from mocosfl_jax import cli
from mocosfl_jax.deploy import run_client

MODES = ("static", "dynamic")


class _Reader(q.CalibrationDataReader):

  def __init__(self, name: str, x: np.ndarray, batch: int | None):
    b = batch or 1
    self._feeds = iter([{name: x[i:i + b]} for i in range(0, len(x) - b + 1, b)])

  def get_next(self):
    return next(self._feeds, None)


def load_inputs(model: run_client.ClientModel, source: str) -> np.ndarray:
  """Normalised model inputs from a .npy (uint8 or float) or an image directory."""
  if os.path.isdir(source):
    return model.prepare(run_client.read_image_dir(source, model.size, resize=True))
  if not os.path.isfile(source):
    raise FileNotFoundError(f"calibration/evaluation input {source} does not exist")
  return model.prepare(np.load(source, allow_pickle=False))


def activation_error(reference: np.ndarray, approx: np.ndarray) -> dict:
  f, a = reference.astype(np.float64).ravel(), approx.astype(np.float64).ravel()
  denom = np.linalg.norm(f) * np.linalg.norm(a)
  return {"max_abs": float(np.max(np.abs(f - a))), "mean_abs": float(np.mean(np.abs(f - a))),
          "relative_rms": float(np.linalg.norm(f - a) / max(np.linalg.norm(f), 1e-12)),
          "cosine": float(f @ a / denom) if denom > 0 else float("nan"),
          "float_abs_max": float(np.max(np.abs(f)))}


def _same_file(a: str, b: str) -> bool:
  """Whether two paths name one file: equal once resolved, or samefile (hard links)."""
  if os.path.realpath(a) == os.path.realpath(b):
    return True
  try:
    return os.path.samefile(a, b)
  except OSError:  # one of them does not exist
    return False


def check_out_is_not_an_input(out_path: str, inputs: dict) -> None:
  """ValueError if `out_path` is one of the input files ({flag: path}): writing would replace it."""
  for flag, path in inputs.items():
    if path is not None and _same_file(out_path, path):
      raise ValueError(f"--out {out_path} is the same file as --{flag} {path}; writing the int8 "
                       f"model there would replace the input: choose another --out")


def quantize(model_path: str, out_path: str, calib: str | None, mode: str = "dynamic",
             eval_source: str | None = None) -> dict:
  """Writes the int8 model to `out_path` and returns the error/size report.

  Refuses (ValueError) an `out_path` that is the model or a calibration/evaluation file.
  """
  check_out_is_not_an_input(out_path, {"model": model_path, "calib": calib, "eval": eval_source})
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is invalid; valid: {list(MODES)}")
  if mode == "static" and calib is None:
    raise ValueError("static quantisation needs --calib (a .npy of images or an image directory)")
  fmodel = run_client.ClientModel(model_path)
  with tempfile.TemporaryDirectory() as tmp:
    pre = os.path.join(tmp, "pre.onnx")
    q.quant_pre_process(model_path, pre, skip_symbolic_shape=True)
    if mode == "static":
      x_cal = load_inputs(fmodel, calib)
      q.quantize_static(pre, out_path, _Reader(fmodel.input_name, x_cal, fmodel.batch),
                        quant_format=q.QuantFormat.QDQ, per_channel=True,
                        activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                        calibrate_method=q.CalibrationMethod.MinMax)
    else:
      q.quantize_dynamic(pre, out_path, weight_type=q.QuantType.QUInt8)
  qproto = onnx.load(out_path)
  props = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
  props["quantization"] = json.dumps({"mode": mode, "calibration": calib})
  del qproto.metadata_props[:]
  onnx.helper.set_model_props(qproto, props)
  onnx.save(qproto, out_path)
  qmodel = run_client.ClientModel(out_path)
  x_eval = load_inputs(fmodel, eval_source or calib) if (eval_source or calib) else None
  if x_eval is None:  # dynamic without any images: random normalised inputs.
    x_eval = np.random.default_rng(0).standard_normal((4, *fmodel.item_shape)).astype(np.float32)
  report = {"mode": mode, "float_bytes": os.path.getsize(model_path),
            "int8_bytes": os.path.getsize(out_path), "eval_images": len(x_eval),
            **activation_error(fmodel.run(x_eval), qmodel.run(x_eval))}
  return report


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("model", None, "Exported float client .onnx.", required=True, **fv)
  flags.DEFINE_string("out", None, "Where the int8 model goes.", required=True, **fv)
  flags.DEFINE_string("calib", None, "Calibration images: .npy (uint8 [N,H,W,3]) or a "
                      "directory.", **fv)
  flags.DEFINE_string("eval", None, "Evaluation images for the error report (default: "
                      "--calib).", **fv)
  flags.DEFINE_string("mode", "dynamic", "dynamic (default) | static.", **fv)


def quantize_command(args) -> int:
  """Quantises and prints the error/size report as JSON."""
  report = quantize(args.model, args.out, args.calib, args.mode, args.eval)
  print(json.dumps(report, indent=1))
  return 0


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  if argv is None:  # a program's output is the report; onnxruntime's optimiser warnings are noise
    ort.set_default_logger_severity(3)
  return cli.run(define_flags, quantize_command, argv, errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
  main()
