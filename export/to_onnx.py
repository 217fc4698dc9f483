"""Exports the client slice of a MocoSFL run to ONNX (for numpy + onnxruntime devices).

    python export/to_onnx.py --workdir runs/r18 --out client.onnx [--checkpoint latest|best|STEP]
        [--copy online|momentum] [--client ID|average] [--layout NCHW|NHWC] [--dynamic-batch]
        [--opset 18] [--cut N] [--mean R,G,B --std R,G,B] [--no-verify]
    python export/to_onnx.py --random-init '{"arch": "resnet18", "cut": 2, "bottleneck": "C4S2"}'
        --out client.onnx --mean ... --std ...     # untrained weights: size/latency planning only

Defaults: the latest checkpoint, the online copy, and the FedAvg average of all clients (what each
client holds right after a sync). `--cut` is a guard: it must equal the checkpoint's cut. Before
writing, the model is verified against the JAX `apply_client` on random inputs (skip with
--no-verify); a model that fails is not written. Errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, for `import export`.

VERIFY_TOL = 1e-4  # absolute, relative to max(1, max |reference|).


def _triple(text: str) -> list[float]:
  try:
    values = [float(v) for v in text.replace(" ", "").split(",")]
  except ValueError:
    values = []
  if len(values) != 3:
    raise argparse.ArgumentTypeError(f"{text!r} must be three comma-separated numbers, e.g. "
                                     "0.4914,0.4822,0.4465")
  return values


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="training run directory (holds checkpoints/)")
  src.add_argument("--random-init", metavar="JSON",
                   help="SplitConfig fields as JSON; exports untrained weights (no checkpoint)")
  p.add_argument("--out", required=True, help="output .onnx file")
  p.add_argument("--checkpoint", default="latest", help="latest | best | STEP (default latest)")
  p.add_argument("--copy", default="online", help="online | momentum (default online)")
  p.add_argument("--client", default="average", help="client index or 'average' (default)")
  p.add_argument("--layout", default="NCHW", help="NCHW (default) | NHWC (input and output)")
  p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension")
  p.add_argument("--batch-size", type=int, default=1, help="fixed batch without --dynamic-batch")
  p.add_argument("--opset", type=int, default=None,
                 help="ONNX opset >= 18 (default 18; >= 21 uses native GroupNormalization)")
  p.add_argument("--cut", type=int, default=None, help="guard: must equal the checkpoint's cut")
  p.add_argument("--mean", type=_triple, help="RGB mean on [0,1] if the checkpoint has none")
  p.add_argument("--std", type=_triple, help="RGB std on [0,1] if the checkpoint has none")
  p.add_argument("--seed", type=int, default=0, help="--random-init seed")
  p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-JAX check")
  return p.parse_args(argv)


def verify(model_bytes: bytes, cfg, variables, layout: str, batch: int, seed: int = 0) -> float:
  """Max |onnxruntime - JAX apply_client| on random normalised inputs; raises if too large."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.models import build  # pylint: disable=g-import-not-at-top

  net = build(cfg)
  x = np.random.default_rng(seed).standard_normal((batch, *net.input_shape)).astype(np.float32)
  ref = np.asarray(net.apply_client(
      {k: {**v} for k, v in variables.items()}, jnp.asarray(x), train=False)[0])
  try:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
  except Exception as e:  # pylint: disable=broad-except  (onnxruntime raises its own types)
    raise RuntimeError(f"onnxruntime {ort.__version__} cannot load the exported model (try a "
                       f"lower --opset, or --no-verify to keep it anyway): {e}") from None
  feed = x if layout == "NHWC" else x.transpose(0, 3, 1, 2)
  out = sess.run(None, {sess.get_inputs()[0].name: feed})[0]
  if layout == "NCHW":
    out = out.transpose(0, 2, 3, 1)
  diff = float(np.max(np.abs(out - ref)))
  if not diff <= VERIFY_TOL * max(1.0, float(np.max(np.abs(ref)))):
    raise RuntimeError(f"exported model disagrees with JAX apply_client: max abs diff {diff:.3g}")
  return diff


def run(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top

  from mocosfl_jax.deploy import client_checkpoint, onnx_export  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.models import SplitConfig, build  # pylint: disable=g-import-not-at-top

  opset = onnx_export.DEFAULT_OPSET if args.opset is None else args.opset
  onnx_export.validate_options(args.layout, opset, args.batch_size)
  if args.workdir is not None:
    ck = client_checkpoint.load_client(args.workdir, args.checkpoint, args.copy, args.client)
    cfg, variables = ck.cfg, ck.variables
    source = {"checkpoint_step": ck.step, "copy": ck.copy, "client": ck.client,
              "num_clients": ck.num_clients, "workdir": str(Path(args.workdir).resolve()),
              "dataset": (ck.meta.get("dataset") or {}).get("name", "unknown")
              if isinstance(ck.meta.get("dataset"), dict) else str(ck.meta.get("dataset"))}
    from_meta = client_checkpoint.normalisation_from_meta(ck.meta)
  else:
    try:
      fields = json.loads(args.random_init)
    except ValueError as e:
      raise ValueError(f"--random-init {args.random_init!r} is not JSON: {e}") from None
    if not isinstance(fields, dict):
      raise ValueError(f"--random-init must be a JSON object of SplitConfig fields, got {fields!r}")
    cfg = SplitConfig.from_dict(fields)
    variables = jax.tree.map(np.asarray, jax.jit(build(cfg).init_client)(jax.random.key(args.seed)))
    source = {"checkpoint_step": "none (random init, seed %d)" % args.seed, "copy": "none",
              "client": "none", "dataset": "unknown"}
    from_meta = None
  net = build(cfg)
  if args.cut is not None and args.cut != net.cut:
    raise ValueError(f"--cut {args.cut} differs from the checkpoint's cut {net.cut} "
                     f"({cfg.arch}); the client slice cannot be re-cut at export, omit --cut or "
                     f"pass --cut {net.cut}")
  if args.mean is not None or args.std is not None:
    if args.mean is None or args.std is None:
      raise ValueError("--mean and --std must be given together")
    if from_meta is not None and (from_meta[0], from_meta[1]) != (args.mean, args.std):
      print(f"warning: --mean/--std override the checkpoint's {from_meta}", file=sys.stderr)
    mean, std = args.mean, args.std
  elif from_meta is not None:
    mean, std = from_meta
  else:
    raise ValueError("no normalisation mean/std in the checkpoint meta; pass --mean R,G,B and "
                     "--std R,G,B (the training dataset's constants)")

  t0 = time.time()
  model = onnx_export.export_client(cfg, variables, mean=mean, std=std, layout=args.layout,
                                    dynamic_batch=args.dynamic_batch, batch_size=args.batch_size,
                                    opset=opset, source=source)
  report = {"out": args.out, "nodes": len(model.graph.node),
            "export_s": round(time.time() - t0, 3), **onnx_export.read_metadata(model)}
  if not args.no_verify:  # before writing: a model that fails the check is never left behind.
    batch = 2 if args.dynamic_batch else args.batch_size
    report["verify_max_abs_diff"] = verify(model.SerializeToString(), cfg, variables,
                                           args.layout, batch)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  onnx.save(model, str(out))
  report["bytes"] = os.path.getsize(out)
  return report


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    report = run(args)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for key, value in report.items():
    print(f"{key}: {value if isinstance(value, str) else json.dumps(value, default=str)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
