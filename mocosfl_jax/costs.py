"""Per-cut client cost table: parameters, smashed data, FLOPs, memory and communication.

    python -m mocosfl_jax.costs --arch resnet18 --bottleneck C4S2 --frozen-client --json

Beside the split rows, an 'FL' row gives the same costs for the FL-MoCo baseline (every client
trains the whole network: backbone and projection head; algorithm/flmoco.py), the paper's
comparison.

FLOPs and memory are not hand formulas: they come from XLA's cost and memory analysis of the
compiled client functions at batch 1 (FLOPs count a multiply-add as 2, unlike fvcore's 1).

Communication is counted per client, in float32 bytes, and differs from the reference's
`overhead_calculator.py` on purpose: the reference counts the query upload and the gradient
download but forgets the key-view upload (every step the client also sends its momentum
network's activations), and counts a model sync in one direction only. We count
  per step:  upload query + key activations, download the query gradient
             (two_view form: 2B rows each way; frozen client: uploads only),
  per sync:  upload the client model and download the average (x2 with momentum sync).
FL-MoCo exchanges no activations; its clients upload and download the whole online network once
per round of `local_epochs` epochs (the reference's avg_freq 1), and its training step runs both
views through the online network with gradient (the symmetric loss) and the momentum network.
"""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
from absl import flags

from mocosfl_jax import cli
from mocosfl_jax.algorithm import traffic
from mocosfl_jax.algorithm.plan import LOSS_FORMS
from mocosfl_jax.models import SplitConfig, build, num_layers, validate
from mocosfl_jax.models.layers import count_params

MIB = 2**20
FLOAT_BYTES = traffic.FLOAT_BYTES


@dataclasses.dataclass(frozen=True)
class Traffic:
  """What a client exchanges; the reference calculator's settings are the defaults.

  See docs/reference.md, 'Cost accounting', for that calculator and how our counts differ.
  """
  batch_size: int = 1
  samples_per_client: int = 50
  epochs: int = 200
  sync_every: int = 50           # steps between FedAvg rounds (the paper configs: ~50)
  loss_form: str = "original"    # 'original' | 'two_view' | 'single'
  momentum_sync: bool = False    # MonAcoSFL also ships the momentum model
  frozen_client: bool = False    # TAResSFL deployment: no gradient, no sync
  local_epochs: int = 5          # FL-MoCo: epochs per round, one sync per round


def validate_traffic(t: Traffic) -> None:
  """Raises ValueError naming the field for counts training would reject (or divide by)."""
  for name in ("batch_size", "samples_per_client", "epochs", "sync_every", "local_epochs"):
    value = getattr(t, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}: must be an integer >= 1")
  if t.samples_per_client < t.batch_size:
    raise ValueError(f"samples_per_client={t.samples_per_client} is below batch_size="
                     f"{t.batch_size}: a client would never complete a step")
  if t.loss_form not in LOSS_FORMS:
    raise ValueError(f"loss_form={t.loss_form!r} is unknown; valid: {list(LOSS_FORMS)}")


def validate_cuts(arch: str, cuts) -> list[int]:
  """The cuts to tabulate (default: all), checked as training checks config.cut."""
  n = num_layers(arch)
  cuts = list(range(1, n + 1)) if cuts is None else list(cuts)
  if not cuts:
    raise ValueError(f"cuts=[]: give at least one cut; {arch} has cuts 1..{n}")
  for cut in cuts:
    if isinstance(cut, bool) or not isinstance(cut, int) or not 1 <= cut <= n:
      raise ValueError(f"cut={cut!r} is invalid for {arch}: valid cuts are 1..{n} (cut {n} puts "
                       "the whole backbone on the client)")
  return cuts


def _compiled_stats(fn, *args) -> tuple[float, int]:
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  return float(cost.get("flops", 0.0)), int(total)


def client_compute(net, frozen: bool) -> dict:
  """XLA FLOPs of one forward and bytes of one client training (or inference) step, batch 1."""
  params = jax.eval_shape(net.init_client, jax.random.key(0))
  x = jax.ShapeDtypeStruct((1, *net.input_shape), jnp.float32)
  fwd_flops, infer_bytes = _compiled_stats(lambda v, x: net.apply_client(v, x)[0], params, x)
  if frozen:
    return {"client_forward_flops": fwd_flops, "client_memory_bytes": infer_bytes}

  def train_step(online, momentum, buf, x_q, x_k, grad):
    # online forward + backward of the received gradient, SGD momentum update, target forward.
    smashed, vjp = jax.vjp(lambda p: net.apply_client({**online, "params": p}, x_q, True)[0],
                           online["params"])
    (g,) = vjp(grad)
    buf = jax.tree.map(lambda b, g, p: 0.9 * b + g + 5e-4 * p, buf, g, online["params"])
    new = jax.tree.map(lambda p, b: p - 0.05 * b, online["params"], buf)
    key = net.apply_client(momentum, x_k)[0]
    return new, buf, smashed, key

  grad = jax.ShapeDtypeStruct((1, *net.smashed_shape), jnp.float32)
  _, train_bytes = _compiled_stats(train_step, params, params, params["params"], x, x, grad)
  return {"client_forward_flops": fwd_flops, "client_memory_bytes": train_bytes}


def communication(smashed_floats: int, client_params: int, t: Traffic) -> dict:
  rows = 2 * t.batch_size if t.loss_form == "two_view" else t.batch_size
  up, down = traffic.step_bytes(rows, smashed_floats, t.frozen_client)
  steps_per_epoch = t.samples_per_client // t.batch_size
  models = 2 if t.momentum_sync else 1
  sync = 0 if t.frozen_client else 2 * models * client_params * FLOAT_BYTES
  syncs_per_epoch = steps_per_epoch / t.sync_every
  per_epoch = steps_per_epoch * (up + down) + syncs_per_epoch * sync
  return {
      "upload_bytes_per_step": up,
      "download_bytes_per_step": down,
      "sync_bytes_per_sync": sync,
      "bytes_per_epoch": per_epoch,
      "total_mib": t.epochs * per_epoch / MIB,
      "reference_calculator_mib": _reference_calculator_mib(smashed_floats, client_params, t),
  }


def _reference_calculator_mib(smashed_floats, client_params, t: Traffic) -> float:
  """What the reference's overhead_calculator prints: no key upload, one-way weights."""
  activations = 2 * t.epochs * t.samples_per_client * smashed_floats
  if t.frozen_client:
    return activations / 2 * FLOAT_BYTES / MIB
  syncs_per_epoch = max(1, (t.samples_per_client // t.batch_size) // t.sync_every)
  return (activations + t.epochs * syncs_per_epoch * client_params) * FLOAT_BYTES / MIB


def fl_compute(net) -> dict:
  """XLA FLOPs of one forward of the whole network and bytes of one FL-MoCo training step,
  batch 1 (as `client_compute`)."""
  c_vars = jax.eval_shape(net.init_client, jax.random.key(0))
  s_vars = jax.eval_shape(net.init_server, jax.random.key(0))
  x = jax.ShapeDtypeStruct((1, *net.input_shape), jnp.float32)

  def forward(c, s, x):
    return net.apply_server(s, net.apply_client(c, x)[0])[0]

  fwd_flops, _ = _compiled_stats(forward, c_vars, s_vars, x)

  def train_step(online, momentum, buf, x_q, x_k):
    # Both views through the online network with gradient (symmetric loss), the momentum
    # network on both views, SGD with momentum on every parameter.
    def loss(params):
      c, s = ({**online[0], "params": params[0]}, {**online[1], "params": params[1]})
      z = forward(c, s, jnp.concatenate([x_q, x_k]))
      return jnp.sum(z * jax.lax.stop_gradient(forward(*momentum, jnp.concatenate([x_k, x_q]))))
    params = (online[0]["params"], online[1]["params"])
    g = jax.grad(loss)(params)
    buf = jax.tree.map(lambda b, g, p: 0.9 * b + g + 5e-4 * p, buf, g, params)
    return jax.tree.map(lambda p, b: p - 0.05 * b, params, buf), buf

  params = (c_vars["params"], s_vars["params"])
  _, train_bytes = _compiled_stats(train_step, (c_vars, s_vars), (c_vars, s_vars), params, x, x)
  return {"client_forward_flops": fwd_flops, "client_memory_bytes": train_bytes}


def fl_communication(params: int, t: Traffic) -> dict:
  """FL-MoCo's traffic: no activations; the whole model up and the average down per round."""
  sync = 2 * params * FLOAT_BYTES
  per_epoch = sync / t.local_epochs
  return {
      "upload_bytes_per_step": 0,
      "download_bytes_per_step": 0,
      "sync_bytes_per_sync": sync,
      "bytes_per_epoch": per_epoch,
      "total_mib": t.epochs * per_epoch / MIB,
      # The reference calculator's FL scheme: (E // f) one-way model transfers.
      "reference_calculator_mib": (t.epochs // t.local_epochs) * params * FLOAT_BYTES / MIB,
  }


def fl_row(arch: str, *, input_size: int = 32, head: str = "V2", traffic: Traffic = Traffic(),
           width: int = 64) -> dict:
  """The FL-MoCo row: every client holds the whole network (backbone and head)."""
  validate_traffic(traffic)
  cfg = SplitConfig(arch=arch, cut=1, bottleneck="None", input_size=input_size, head=head,
                    width=width, conv_impl="lax")
  validate(cfg)
  net = build(cfg)
  params = sum(count_params(jax.eval_shape(f, jax.random.key(0))["params"])
               for f in (net.init_client, net.init_server))
  row = {"cut": "FL", "client_params": params, "server_params": 0, "smashed_shape": "-",
         "smashed_floats": 0}
  row.update(fl_compute(net))
  row.update(fl_communication(params, traffic))
  return row


def cost_table(arch: str, *, bottleneck: str = "None", input_size: int = 32, head: str = "V2",
               cuts=None, traffic: Traffic = Traffic(), width: int = 64) -> list[dict]:
  """One row per cut (default: every cut). Every argument is checked before anything compiles:
  ValueError naming the field, as training reports a bad config (models.validate)."""
  validate_traffic(traffic)
  # conv_impl='lax': memory of plain convolutions, as a device (or ONNX) runs them; the CPU
  # matmul form's shifted-view patches would inflate the buffers.
  configs = [SplitConfig(arch=arch, cut=cut, bottleneck=bottleneck, input_size=input_size,
                         head=head, width=width, conv_impl="lax")
             for cut in validate_cuts(arch, cuts)]
  for cfg in configs:
    validate(cfg)
  rows = []
  for cfg in configs:
    cut = cfg.cut
    net = build(cfg)
    client_params = count_params(jax.eval_shape(net.init_client, jax.random.key(0))["params"])
    server_params = count_params(jax.eval_shape(net.init_server, jax.random.key(0))["params"])
    smashed = math.prod(net.smashed_shape)
    row = {"cut": cut, "client_params": client_params, "server_params": server_params,
           "smashed_shape": "x".join(map(str, net.smashed_shape[::-1])),
           "smashed_floats": smashed}
    row.update(client_compute(net, traffic.frozen_client))
    row.update(communication(smashed, client_params, traffic))
    rows.append(row)
  return rows


def format_table(rows: list[dict]) -> str:
  head = (f"{'cut':>3} {'client params':>13} {'server params':>13} {'smashed CxHxW':>14} "
          f"{'floats/img':>10} {'fwd MFLOP':>9} {'mem MiB':>8} {'up KiB/step':>11} "
          f"{'down KiB/step':>13} {'sync MiB':>8} {'MiB/epoch':>9} {'total MiB':>9} {'ref calc':>8}")
  lines = [head]
  for r in rows:
    lines.append(
        f"{r['cut']:>3} {r['client_params']:>13,} {r['server_params']:>13,} "
        f"{r['smashed_shape']:>14} {r['smashed_floats']:>10,} "
        f"{r['client_forward_flops'] / 1e6:>9.1f} {r['client_memory_bytes'] / MIB:>8.2f} "
        f"{r['upload_bytes_per_step'] / 1024:>11.1f} {r['download_bytes_per_step'] / 1024:>13.1f} "
        f"{r['sync_bytes_per_sync'] / MIB:>8.2f} {r['bytes_per_epoch'] / MIB:>9.2f} "
        f"{r['total_mib']:>9.1f} {r['reference_calculator_mib']:>8.1f}")
  return "\n".join(lines)


def _parse_cuts(text: str | None):
  if not text:
    return None
  cuts = []
  for part in text.split(","):
    lo, dash, hi = part.strip().partition("-")
    try:  # '3-' (no high end) is refused, not read as '3'
      span = range(int(lo), int(hi if dash else lo) + 1)
    except ValueError:
      raise ValueError(f"--cuts {text!r}: {part!r} is not a cut or a range; expected e.g. '1-9' "
                       "or '1,2,5'") from None
    if not span:
      raise ValueError(f"--cuts {text!r}: the range {part!r} is empty; write it low-high")
    cuts.extend(span)
  return cuts


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("arch", "resnet18", "Backbone.", **fv)
  flags.DEFINE_string("bottleneck", "None", "Client-side bottleneck, e.g. C4S2.", **fv)
  flags.DEFINE_integer("input-size", 32, "Input image size.", **fv)
  flags.DEFINE_string("head", "V2", "Projection head.", **fv)
  flags.DEFINE_integer("width", 64, "Base channel width (64: the paper's ResNets).", **fv)
  flags.DEFINE_string("cuts", None, "e.g. '1-9' or '1,2,5' (default: every cut).", **fv)
  flags.DEFINE_integer("batch-size", 1, "Images per client step.", **fv)
  flags.DEFINE_integer("samples-per-client", 50, "Training images per client.", **fv)
  flags.DEFINE_integer("epochs", 200, "Training epochs.", **fv)
  flags.DEFINE_integer("sync-every", 50, "Steps between syncs.", **fv)
  flags.DEFINE_enum("loss-form", "original", ["original", "two_view", "single"], "Loss form.",
                    **fv)
  flags.DEFINE_bool("momentum-sync", False, "MonAcoSFL: sync momentum models.", **fv)
  flags.DEFINE_bool("frozen-client", False, "TAResSFL deployment.", **fv)
  flags.DEFINE_integer("local-epochs", 5, "FL-MoCo row: epochs per round (one sync each).",
                       **fv)
  flags.DEFINE_bool("fl", True, "Add the FL-MoCo row (whole network on every client).", **fv)
  flags.DEFINE_bool("json", False, "Print JSON instead of a table.", **fv)


def costs_command(a) -> int:
  """Prints the cost table (or its JSON) for the flags' architecture and traffic."""
  traffic = Traffic(a.batch_size, a.samples_per_client, a.epochs, a.sync_every, a.loss_form,
                    a.momentum_sync, a.frozen_client, a.local_epochs)
  rows = cost_table(a.arch, bottleneck=a.bottleneck, input_size=a.input_size, head=a.head,
                    cuts=_parse_cuts(a.cuts), traffic=traffic, width=a.width)
  if a.fl:
    rows.append(fl_row(a.arch, input_size=a.input_size, head=a.head, traffic=traffic,
                       width=a.width))
  if a.json:
    print(json.dumps({"arch": a.arch, "width": a.width, "bottleneck": a.bottleneck,
                      "input_size": a.input_size,
                      "traffic": dataclasses.asdict(traffic), "rows": rows}, indent=1))
  else:
    print(f"{a.arch} width {a.width} {a.input_size}px bottleneck={a.bottleneck} head={a.head} | "
          f"{dataclasses.asdict(traffic)}")
    print(format_table(rows))
  return 0


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, costs_command, argv, errors=(ValueError,))


if __name__ == "__main__":
  main()
