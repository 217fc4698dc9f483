"""Reads one client's slice (online or momentum copy, one client or their average) from a run.

Training writes `<workdir>/checkpoints/<step>/{state,meta}` through mocosfl_jax.run.checkpoints
(state = {'clients': ClientState, 'server': ServerState, ...}, every ClientState leaf with a leading
client axis N; meta JSON with 'model' = SplitConfig.to_dict(), 'step' and 'dataset' = {name, mean,
std, ...}). Export needs only `clients/<copy>`, so we restore that subtree alone (orbax partial
restore) instead of building the full abstract training state, which would need the StepConfig,
queue sizes and optimizer. Before restoring, the stored shapes are checked against
`build(cfg).init_client` (shape-only, no compile), so a checkpoint whose parameters do not match the
model in its own meta is rejected with the offending keys named.
"""
from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mocosfl_jax.run import checkpoints
from mocosfl_jax.models import SplitConfig, build

COPIES = ("online", "momentum")
CHECKPOINT_ALIASES = ("latest", "best")


@dataclasses.dataclass(frozen=True)
class ClientCheckpoint:
  """One client slice ready for export."""
  cfg: SplitConfig
  variables: dict          # {'params', 'batch_stats'} numpy float32, no client axis
  step: int
  copy: str
  client: str              # 'average' or the client index as a string
  num_clients: int
  meta: dict


def normalisation_from_meta(meta: dict) -> tuple[list[float], list[float]] | None:
  """(mean, std) from meta['dataset'] (what train.py writes) or top-level mean/std, else None."""
  for where in (meta.get("dataset"), meta.get("normalisation"), meta):
    if isinstance(where, dict) and where.get("mean") is not None and where.get("std") is not None:
      return list(map(float, where["mean"])), list(map(float, where["std"]))
  name = meta.get("dataset", {}).get("name") if isinstance(meta.get("dataset"), dict) else None
  if name:
    from mocosfl_jax.data.sources import NORMALISATION  # pylint: disable=g-import-not-at-top
    if name in NORMALISATION:
      mean, std = NORMALISATION[name]
      return list(mean), list(std)
  return None


@contextmanager
def _quiet_absl():
  """orbax logs a harmless 'Metadata file does not exist' for item directories; hide it."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _paths(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_paths(v, prefix + (str(k),)))
  elif tree is not None:
    out[prefix] = tree
  return out


def resolve_step(workdir, checkpoint: str | int = "latest") -> tuple[Path, int]:
  """(checkpoint directory, step) for 'latest', 'best' or a step number; clear errors otherwise."""
  workdir = Path(workdir).expanduser()
  if not workdir.is_dir():
    raise FileNotFoundError(f"workdir {workdir} does not exist")
  ckdir = workdir / "checkpoints"
  if not ckdir.is_dir():
    raise FileNotFoundError(f"workdir {workdir} has no checkpoints/ directory (training writes "
                            "<workdir>/checkpoints/<step>/); is this the run's --workdir?")
  with _quiet_absl(), checkpoints.Checkpointer(ckdir, read_only=True) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint under {ckdir}")
    if isinstance(checkpoint, str) and not checkpoint.isdigit():
      if checkpoint not in CHECKPOINT_ALIASES:
        raise ValueError(f"checkpoint={checkpoint!r} is invalid; valid: a step number or one of "
                         f"{list(CHECKPOINT_ALIASES)}")
      step = ckpt.latest_step() if checkpoint == "latest" else ckpt.best_step()
    else:
      step = int(checkpoint)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {ckdir}; available steps: {steps}")
  return ckdir, step


def load_client(workdir, checkpoint: str | int = "latest", copy: str = "online",
                client: str | int = "average") -> ClientCheckpoint:
  """Restores `clients/<copy>` of one step and selects a client (or averages all of them).

  'average' is the FedAvg of the N client slices (what every client holds right after a sync);
  an index picks one client's own slice. The arrays read are verified against the checksums
  saved with the step; for 'latest'/'best' a damaged step is skipped with a warning and the next
  candidate used (`ClientCheckpoint.step` says which). Raises FileNotFoundError for a missing
  workdir/step, checkpoints.DamagedCheckpointError (a ValueError) for a damaged explicit step or
  when no step is intact, and ValueError for bad options or a checkpoint incompatible with the
  model in its meta.
  """
  if copy not in COPIES:
    raise ValueError(f"copy={copy!r} is invalid; valid: {list(COPIES)}")
  ckdir, step = resolve_step(workdir, checkpoint)
  wanted = checkpoint if checkpoint in CHECKPOINT_ALIASES else step
  with _quiet_absl(), checkpoints.Checkpointer(ckdir, read_only=True) as ckpt:
    return ckpt.first_intact(wanted, lambda s: _load_step(ckpt, s, copy, client))


def _load_step(ckpt: checkpoints.Checkpointer, step: int, copy: str,
               client: str | int) -> ClientCheckpoint:
  """load_client for one step; read errors and checksum mismatches are DamagedCheckpointError."""
  ckdir = ckpt.directory
  meta = ckpt.read_meta(step)
  if not isinstance(meta.get("model"), dict):
    raise ValueError(f"checkpoint step {step} in {ckdir}: meta has no 'model' entry "
                     f"(SplitConfig.to_dict()); meta keys: {sorted(meta)}")
  cfg = SplitConfig.from_dict(meta["model"])
  net = build(cfg)
  expected = _paths(jax.tree.map(lambda s: tuple(s.shape),
                                 jax.eval_shape(net.init_client, jax.random.key(0))))
  state_dir = ckdir / str(step) / checkpoints.STATE
  ckpt.check_files(step, (checkpoints.STATE,))
  with ckpt.reading(step):
    stored_tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  clients = stored_tree.get("clients") if isinstance(stored_tree, dict) else None
  if not isinstance(clients, dict) or copy not in clients:
    raise ValueError(f"checkpoint step {step} in {ckdir} has no 'clients/{copy}' entry (not a "
                     "MocoSFL training checkpoint?)")
  stored = {p: tuple(m.shape) for p, m in _paths(clients[copy]).items()}
  sizes = {s[0] for s in stored.values() if s}
  num = sizes.pop() if len(sizes) == 1 else None
  problems = [f"missing '{'/'.join(p)}' {s}" for p, s in expected.items() if p not in stored]
  problems += [f"unexpected '{'/'.join(p)}' {s}" for p, s in stored.items() if p not in expected]
  problems += [f"'{'/'.join(p)}': checkpoint {stored[p]} vs model (N,)+{s}"
               for p, s in expected.items() if p in stored and stored[p][1:] != s]
  if num is None:
    problems.append(f"leading client axis differs between leaves: {sorted(sizes)}")
  if problems:
    raise ValueError(f"checkpoint step {step} in {ckdir} is incompatible with the model in its "
                     f"meta ({cfg}): {len(problems)} mismatches, e.g. {problems[:4]}")
  if client != "average":
    index = int(client) if str(client).lstrip("-").isdigit() else None
    if index is None or not 0 <= index < num:
      raise ValueError(f"client={client!r} is invalid; valid: 'average' or 0..{num - 1}")
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct((num, *s.shape), s.dtype),
                          jax.eval_shape(net.init_client, jax.random.key(0)))
  item = {"clients": {copy: abstract}}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  with ckpt.reading(step):
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  stacked = restored["clients"][copy]
  ckpt.verify(step, stacked, prefix=("clients", copy))
  if client == "average":
    pick = lambda a: np.mean(np.asarray(a, np.float64), axis=0).astype(np.float32)
  else:
    pick = lambda a: np.asarray(a[index], np.float32)
  variables = jax.tree.map(pick, dict(stacked))
  variables = {"params": variables.get("params", {}),
               "batch_stats": variables.get("batch_stats", {})}
  return ClientCheckpoint(cfg, variables, step, copy, str(client), num, meta)
