"""Exports the client slice of a MocoSFL run to ONNX (for numpy + onnxruntime devices).

    python -m mocosfl_jax.deploy.to_onnx --workdir runs/r18 --out client.onnx
        [--checkpoint latest|best|STEP] [--copy online|momentum] [--client ID|average]
        [--layout NCHW|NHWC] [--dynamic-batch] [--opset 18] [--cut N]
        [--mean R,G,B --std R,G,B] [--no-verify]
    python -m mocosfl_jax.deploy.to_onnx --out client.onnx --mean ... --std ...
        --random-init '{"arch": "resnet18", "cut": 2, "bottleneck": "C4S2"}'   # untrained weights

Defaults: the latest checkpoint, the online copy, and the FedAvg average of all clients (what each
client holds right after a sync). `--cut` is a guard: it must equal the checkpoint's cut. Before
writing, the model is verified against the JAX `apply_client` on random inputs (skip with
--no-verify); a model that fails is not written. Untrained weights (--random-init) serve size and
latency planning only. Errors print one line and exit with status 2 (mocosfl_jax/cli.py).

`export_onnx` is the same export as a function; the graph itself is built by `onnx_export`, the
checkpoint read by `client_checkpoint`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from absl import flags

from mocosfl_jax import cli

VERIFY_TOL = 1e-4  # absolute, relative to max(1, max |reference|).


class _TripleParser(flags.ArgumentParser):
  """'R,G,B' -> [R, G, B] floats."""

  def parse(self, argument):
    if isinstance(argument, (list, tuple)):
      values = [float(v) for v in argument]
    else:
      try:
        values = [float(v) for v in str(argument).replace(" ", "").split(",")]
      except ValueError:
        values = []
    if len(values) != 3:
      raise ValueError(f"{argument!r} must be three comma-separated numbers, e.g. "
                       "0.4914,0.4822,0.4465")
    return values

  def flag_type(self):
    return "three comma-separated numbers"


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).", **fv)
  flags.DEFINE_string("random-init", None, "SplitConfig fields as JSON; exports untrained "
                      "weights (no checkpoint).", **fv)
  flags.mark_flags_as_mutual_exclusive(["workdir", "random-init"], required=True, **fv)
  flags.DEFINE_string("out", None, "Output .onnx file.", required=True, **fv)
  flags.DEFINE_string("checkpoint", "latest", "latest | best | STEP.", **fv)
  flags.DEFINE_string("copy", "online", "online | momentum.", **fv)
  flags.DEFINE_string("client", "average", "Client index or 'average'.", **fv)
  flags.DEFINE_string("layout", "NCHW", "NCHW | NHWC (input and output).", **fv)
  flags.DEFINE_bool("dynamic-batch", False, "Symbolic batch dimension.", **fv)
  flags.DEFINE_integer("batch-size", 1, "Fixed batch without --dynamic-batch.", **fv)
  flags.DEFINE_integer("opset", None, "ONNX opset >= 18 (default 18; >= 21 uses native "
                       "GroupNormalization).", **fv)
  flags.DEFINE_integer("cut", None, "Guard: must equal the checkpoint's cut.", **fv)
  flags.DEFINE(_TripleParser(), "mean", None, "RGB mean on [0,1] if the checkpoint has none.",
               serializer=flags.ListSerializer(","), **fv)
  flags.DEFINE(_TripleParser(), "std", None, "RGB std on [0,1] if the checkpoint has none.",
               serializer=flags.ListSerializer(","), **fv)
  flags.DEFINE_integer("seed", 0, "--random-init seed.", **fv)
  flags.DEFINE_bool("no-verify", False, "Skip the onnxruntime-vs-JAX check.", **fv)


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


def export_onnx(out: str, *, workdir: str | None = None, random_init: dict | None = None,
                checkpoint: str = "latest", copy: str = "online", client: str = "average",
                layout: str = "NCHW", dynamic_batch: bool = False, batch_size: int = 1,
                opset: int | None = None, cut: int | None = None, mean=None, std=None,
                seed: int = 0, verify_model: bool = True) -> dict:
  """Exports one client slice of a run (or untrained weights) to `out`; returns a report.

  Args:
    out: the .onnx file to write (parent folders are created).
    workdir: training run directory; exactly one of `workdir` and `random_init`.
    random_init: SplitConfig fields; the slice gets untrained weights drawn with `seed`.
    checkpoint, copy, client: which checkpoint ('latest', 'best' or a step), which copy
      ('online' or 'momentum') and which client (an index or 'average') to export.
    layout, dynamic_batch, batch_size, opset: the graph's form (see onnx_export.export_client).
    cut: if given, must equal the checkpoint's cut.
    mean, std: RGB normalisation on [0, 1]; required when the checkpoint's meta has none.
    verify_model: check the graph against JAX's apply_client before writing.

  Raises:
    ValueError, FileNotFoundError, RuntimeError: with a message naming the problem; nothing
    is written then.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import onnx  # pylint: disable=g-import-not-at-top

  from mocosfl_jax.deploy import client_checkpoint, onnx_export  # pylint: disable=g-import-not-at-top
  from mocosfl_jax.models import SplitConfig, build  # pylint: disable=g-import-not-at-top

  if (workdir is None) == (random_init is None):
    raise ValueError("give exactly one of workdir and random_init")
  opset = onnx_export.DEFAULT_OPSET if opset is None else opset
  onnx_export.validate_options(layout, opset, batch_size)
  if workdir is not None:
    ck = client_checkpoint.load_client(workdir, checkpoint, copy, client)
    cfg, variables = ck.cfg, ck.variables
    source = {"checkpoint_step": ck.step, "copy": ck.copy, "client": ck.client,
              "num_clients": ck.num_clients, "workdir": str(Path(workdir).resolve()),
              "dataset": (ck.meta.get("dataset") or {}).get("name", "unknown")
              if isinstance(ck.meta.get("dataset"), dict) else str(ck.meta.get("dataset"))}
    from_meta = client_checkpoint.normalisation_from_meta(ck.meta)
  else:
    cfg = SplitConfig.from_dict(random_init)
    variables = jax.tree.map(np.asarray, jax.jit(build(cfg).init_client)(jax.random.key(seed)))
    source = {"checkpoint_step": "none (random init, seed %d)" % seed, "copy": "none",
              "client": "none", "dataset": "unknown"}
    from_meta = None
  net = build(cfg)
  if cut is not None and cut != net.cut:
    raise ValueError(f"--cut {cut} differs from the checkpoint's cut {net.cut} "
                     f"({cfg.arch}); the client slice cannot be re-cut at export, omit --cut or "
                     f"pass --cut {net.cut}")
  if mean is not None or std is not None:
    if mean is None or std is None:
      raise ValueError("--mean and --std must be given together")
    if from_meta is not None and (from_meta[0], from_meta[1]) != (mean, std):
      print(f"warning: --mean/--std override the checkpoint's {from_meta}", file=sys.stderr)
  elif from_meta is not None:
    mean, std = from_meta
  else:
    raise ValueError("no normalisation mean/std in the checkpoint meta; pass --mean R,G,B and "
                     "--std R,G,B (the training dataset's constants)")

  t0 = time.time()
  model = onnx_export.export_client(cfg, variables, mean=mean, std=std, layout=layout,
                                    dynamic_batch=dynamic_batch, batch_size=batch_size,
                                    opset=opset, source=source)
  report = {"out": out, "nodes": len(model.graph.node),
            "export_s": round(time.time() - t0, 3), **onnx_export.read_metadata(model)}
  if verify_model:  # before writing: a model that fails the check is never left behind.
    batch = 2 if dynamic_batch else batch_size
    report["verify_max_abs_diff"] = verify(model.SerializeToString(), cfg, variables, layout,
                                           batch)
  path = Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  onnx.save(model, str(path))
  report["bytes"] = os.path.getsize(path)
  return report


def export_command(args) -> int:
  """Parses --random-init, exports, and prints the report one `key: value` per line."""
  random_init = None
  if args.random_init is not None:
    try:
      random_init = json.loads(args.random_init)
    except ValueError as e:
      raise ValueError(f"--random-init {args.random_init!r} is not JSON: {e}") from None
    if not isinstance(random_init, dict):
      raise ValueError("--random-init must be a JSON object of SplitConfig fields, got "
                       f"{random_init!r}")
  report = export_onnx(args.out, workdir=args.workdir, random_init=random_init,
                       checkpoint=args.checkpoint, copy=args.copy, client=args.client,
                       layout=args.layout, dynamic_batch=args.dynamic_batch,
                       batch_size=args.batch_size, opset=args.opset, cut=args.cut,
                       mean=args.mean, std=args.std, seed=args.seed,
                       verify_model=not args.no_verify)
  for key, value in report.items():
    print(f"{key}: {value if isinstance(value, str) else json.dumps(value, default=str)}")
  return 0


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, export_command, argv,
                 errors=(ValueError, FileNotFoundError, RuntimeError))


if __name__ == "__main__":
  main()
