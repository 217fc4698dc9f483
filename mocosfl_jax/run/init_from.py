"""Warm start of a new run from another run's checkpoint (`config.init_from`).

    warm = init_from.load(config.init_from, exp.model)   # before anything is compiled or written
    state = init_from.apply(state, warm, config.init_momentum)

What the reference's --initialze_path / --load_server do, usable for any warm start (TAResSFL's
deployment starts 100 frozen clients from an expert trained with one client,
configs/taressfl_deploy.py): every one of this run's N clients gets the source run's client 0
online variables (params and BatchNorm statistics; the source may have any number of clients),
the server gets the source's server online variables. Optimiser states, the key queue and the
counters start fresh, from this run's seed. The momentum nets start as copies of the loaded
online nets (`init_momentum='copy'`), or keep this run's random initialisation (`'random'`: the
reference, which copies its momentum nets before it loads the checkpoint; docs/reference.md,
'Warm start').

Only a new run reads the source: a run resumed in its own workdir continues from its own
checkpoint (run/train.py), and init_from stays part of its config, so changing it on resume is
refused like any field that changes the trajectory. The source is read through run.checkpoints:
its files and arrays are checked against their checksums, and for 'latest'/'best' a damaged step
is skipped with a warning (left in place: the source is opened read-only). A missing source, a
step it does not hold, or a source of another model is a ValueError naming the problem and the
fix, raised before anything is compiled or written.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from absl import logging
import jax
import numpy as np

from mocosfl_jax import config as config_lib
from mocosfl_jax.algorithm import plan, state as state_lib
from mocosfl_jax.algorithm.state import TrainState
from mocosfl_jax.models import SplitConfig, build
from mocosfl_jax.run import checkpoints

# Model fields a warm start needs equal (they set the shapes of the loaded variables);
# conv_impl changes float rounding only.
MODEL_FIELDS = ("arch", "cut", "bottleneck", "width", "ws", "c_residual", "head", "input_size")


@dataclasses.dataclass(frozen=True)
class WarmStart:
  """What a new run starts from: the source's client 0 and server online variables (host arrays).

  Attributes:
    directory: the source run's directory.
    step: the checkpoint step read.
    num_clients: the source's N.
    client: client 0's online variables {'params', 'batch_stats'}, without the client axis.
    server: the server's online variables {'params', 'batch_stats'}.
  """
  directory: Path
  step: int
  num_clients: int
  client: dict
  server: dict


def load(init_from: str, model: SplitConfig) -> WarmStart | None:
  """Reads the run `init_from` names (None for ''), checked against this run's `model`."""
  parsed = config_lib.parse_init_from(init_from)
  if parsed is None:
    return None
  directory, step = parsed
  where = f"config.init_from={init_from!r}"
  run = Path(directory).expanduser().absolute()
  make = (f"train one there first (python -m mocosfl_jax.main --config ... --workdir "
          f"{directory}) or name a run directory that holds checkpoints")
  if not run.is_dir():
    raise ValueError(f"{where}: {run} does not exist; {make}")
  ckdir = run / "checkpoints"
  steps = checkpoints.complete_steps(ckdir)
  if not steps:
    raise ValueError(f"{where}: {run} holds no checkpoint (no complete step under {ckdir}); "
                     f"{make}")
  if isinstance(step, int) and step not in steps:
    raise ValueError(f"{where}: {run} has no checkpoint step {step}; steps there: {steps}")
  with checkpoints.Checkpointer(ckdir, read_only=True) as ckpt:
    return ckpt.first_intact(step, lambda s: _read(ckpt, s, model, where))


def _read(ckpt: checkpoints.Checkpointer, step: int, model: SplitConfig, where: str) -> WarmStart:
  meta = ckpt.read_meta(step)
  if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("step_config"), dict):
    raise ValueError(f"{where}: checkpoint step {step} in {ckpt.directory} has no model and "
                     "step_config metadata; name a run directory of python -m mocosfl_jax.main")
  try:
    theirs = SplitConfig.from_dict(meta["model"])
    cfg = plan.StepConfig(**meta["step_config"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: the metadata of checkpoint step {step} in {ckpt.directory} "
                     f"does not describe a run of this version ({e})") from None
  differ = [f for f in MODEL_FIELDS if getattr(theirs, f) != getattr(model, f)]
  if differ:
    show = lambda m: " and ".join(f"{f}={getattr(m, f)!r}" for f in differ)
    raise ValueError(f"{where}: the init_from run has {show(theirs)}, this config "
                     f"{show(model)}; a warm start needs the same model (input_size is the "
                     "image size): set them as the run has, or name a run of this model")
  abstract = state_lib.abstract_train_state(build(theirs), cfg)
  restored = ckpt.restore(step, {"clients": abstract.clients, "server": abstract.server})
  clients, server = restored.state["clients"], restored.state["server"]
  return WarmStart(directory=ckpt.directory.parent, step=restored.step,
                   num_clients=cfg.num_clients,
                   client=jax.tree.map(lambda x: np.asarray(x[0]), dict(clients.online)),
                   server=jax.tree.map(np.asarray, dict(server.online)))


def _put(like: jax.Array, value: np.ndarray, stacked: bool) -> jax.Array:
  """`value` as a new array shaped, typed and placed as `like` (each call a fresh buffer, so the
  donated state never holds one buffer twice); `stacked`: repeated over like's client axis."""
  host = np.asarray(value, like.dtype)
  host = np.broadcast_to(host, like.shape) if stacked else host
  if host.shape != like.shape:
    raise ValueError(f"init_from: a loaded array has shape {host.shape}, this run's "
                     f"{like.shape}")
  return jax.make_array_from_callback(like.shape, like.sharding, lambda index: host[index])


def apply(state: TrainState, warm: WarmStart, init_momentum: str = "copy") -> TrainState:
  """`state` (a new run's) with the loaded online variables in every client and the server.

  init_momentum 'copy': the momentum nets (clients' and server's) are copies of the loaded
  online nets; 'random': they stay as in `state`. Everything else of `state` is kept.
  """
  if init_momentum not in ("copy", "random"):
    raise ValueError(f"init_momentum={init_momentum!r}; valid: 'copy', 'random'")
  clients, server = state.clients, state.server
  client_vars = lambda like: jax.tree.map(lambda l, v: _put(l, v, True), like, warm.client)
  server_vars = lambda like: jax.tree.map(lambda l, v: _put(l, v, False), like, warm.server)
  clients = clients.replace(online=client_vars(clients.online))
  server = server.replace(online=server_vars(server.online))
  if init_momentum == "copy":
    clients = clients.replace(momentum=client_vars(clients.momentum))
    server = server.replace(momentum=server_vars(server.momentum))
  logging.info("init_from: step %d of %s (client 0 of %d -> %d clients, and the server); "
               "momentum nets: %s", warm.step, warm.directory, warm.num_clients,
               clients.count.shape[0], init_momentum)
  return state.replace(clients=clients, server=server)
