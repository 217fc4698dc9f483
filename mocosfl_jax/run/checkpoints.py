"""Checkpoints: a thin wrapper over orbax's CheckpointManager.

Why a wrapper: the run needs "latest N for resume + best-by-validation for the final evaluation"
(orbax's ``max_to_keep`` + ``best_fn`` keeps the N *best* and deletes the newest step, which breaks
resume; a preservation policy of ``LatestN`` + ``BestN`` keeps both), typed PRNG keys (orbax
stores plain arrays only), metadata readable without any training code, and error messages that
name the offending path / key.

Layout of one step directory ``<directory>/<step>/``:
  state/  the state pytree (StandardSave; typed PRNG keys stored as ``jax.random.key_data``)
  meta/   JSON (JsonSave): caller metadata (resolved config, SplitConfig as dict, sampler info)
          plus ``step`` and ``metrics``.

Crash safety: orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames it when the write is
complete (after writing ``commit_success.txt``), so a killed run leaves only a tmp directory, which
orbax never lists as a step. We additionally treat a numeric step directory without a commit marker
as incomplete (e.g. copied by hand or written by a non-atomic filesystem): read-only users ignore
it, writers rename it aside to ``<step>.incomplete-<ns>`` so the step can be written again.
Difference from the reference (docs/reference.md, 'Checkpoint selection'): it keeps only the
best-kNN checkpoint; we keep the latest N as well, so runs can resume.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

STATE = "state"
META = "meta"
_COMMIT_FILE = "commit_success.txt"
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
_STEP_ALIASES = ("latest", "best")
_BEST_MODES = ("max", "min")


class Restored(NamedTuple):
  """What `Checkpointer.restore` returns."""
  step: int
  state: Any
  meta: dict


# ----------------------------------------------------------------------------------------------
# Step-directory bookkeeping (no orbax needed).


def _is_complete(step_dir: Path) -> bool:
  """A step directory is complete once orbax's finalisation markers exist."""
  if (step_dir / _COMMIT_FILE).exists():
    return True
  try:
    meta = json.loads((step_dir / _STEP_METADATA_FILE).read_text())
  except (OSError, ValueError):
    return False
  return meta.get("commit_timestamp_nsecs") is not None


def _numeric_step_dirs(directory: Path) -> dict[int, Path]:
  if not directory.is_dir():
    return {}
  return {int(p.name): p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()}


def complete_steps(directory) -> list[int]:
  """Sorted steps under `directory` whose write finished; [] if the directory does not exist."""
  return sorted(s for s, p in _numeric_step_dirs(Path(directory)).items() if _is_complete(p))


def latest_step(directory) -> int | None:
  """Latest complete step, or None for a missing or empty directory (i.e. "start fresh")."""
  steps = complete_steps(directory)
  return steps[-1] if steps else None


def _quarantine_incomplete(directory: Path) -> list[Path]:
  moved = []
  for step, path in sorted(_numeric_step_dirs(directory).items()):
    if not _is_complete(path):
      dest = path.with_name(f"{path.name}.incomplete-{time.time_ns()}")
      logging.warning("checkpoints: step %d in %s has no commit marker (interrupted write?); "
                      "moving it to %s", step, directory, dest.name)
      path.rename(dest)
      moved.append(dest)
  return moved


# ----------------------------------------------------------------------------------------------
# Pytree helpers.


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(x):
  if isinstance(x, jax.Array):
    return jax.random.key_impl(x)
  # Abstract key (ShapeDtypeStruct with a key dtype): jax has no public accessor for the impl.
  return getattr(x.dtype, "_impl", None)


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_leaf(x):
  if _is_key(x):
    return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return ocp.utils.to_shape_dtype_struct(x)
  x = np.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _path_names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _fmt(path: tuple[str, ...]) -> str:
  return "/".join(path) or "<root>"


def _jsonable(value, where: str):
  """Converts numpy/jax scalars, tuples and dataclasses to JSON types; raises naming the field."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    value = dataclasses.asdict(value)
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
    return np.asarray(value).item()
  raise ValueError(f"{where}: value of type {type(value).__name__} is not JSON-serialisable; "
                   "valid: dict, list, tuple, str, int, float, bool, None, scalar arrays, dataclasses")


# ----------------------------------------------------------------------------------------------


class Checkpointer:
  """Keeps the latest `keep_latest` steps plus the `keep_best` best by `metrics[best_metric]`.

  Use as a context manager (or call `close`) so pending async writes finish before exit; an atexit
  hook is a safety net. Steps saved without the metric rank as worst for "best".
  """

  def __init__(self, directory, *, keep_latest: int = 2, keep_best: int = 1,
               best_metric: str = "knn_accuracy", best_mode: str = "max",
               async_save: bool = True, read_only: bool = False):
    if keep_latest < 1:
      raise ValueError(f"keep_latest={keep_latest}: must be >= 1 (resume needs the latest step)")
    if keep_best < 0:
      raise ValueError(f"keep_best={keep_best}: must be >= 0")
    if best_mode not in _BEST_MODES:
      raise ValueError(f"best_mode={best_mode!r}: valid values are {_BEST_MODES}")
    self.directory = Path(directory).expanduser().absolute()
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.read_only = read_only
    if read_only:
      if not self.directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
    else:
      self.directory.mkdir(parents=True, exist_ok=True)
      _quarantine_incomplete(self.directory)

    worst = -math.inf if best_mode == "max" else math.inf

    def metric_fn(metrics) -> float:
      value = (metrics or {}).get(best_metric)
      if value is None or not math.isfinite(float(value)):
        return worst
      return float(value)

    cm = ocp.checkpoint_managers
    policies = [cm.LatestN(n=keep_latest)]
    if keep_best:
      policies.append(cm.BestN(get_metric_fn=metric_fn, reverse=(best_mode == "min"), n=keep_best,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        best_fn=metric_fn if keep_best else None,
        best_mode=best_mode, keep_checkpoints_without_metrics=False, create=not read_only,
        read_only=read_only, save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()})
    self._closed = False
    atexit.register(self.close)

  # -- context / lifetime ---------------------------------------------------------------------
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def wait_until_finished(self):
    """Blocks until async writes are committed (call before reading or exiting)."""
    self._mngr.wait_until_finished()

  def close(self):
    if self._closed:
      return
    self._closed = True
    atexit.unregister(self.close)
    self._mngr.wait_until_finished()
    self._mngr.close()

  # -- queries ---------------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    """Complete steps on disk (pending async writes excluded until committed)."""
    steps = set(self._mngr.all_steps())
    return [s for s in complete_steps(self.directory) if s in steps]

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """Best step by `best_metric`; falls back to the latest if no step carries the metric."""
    best = self._mngr.best_step()
    return best if best in self.all_steps() else self.latest_step()

  def _resolve(self, step) -> int:
    if isinstance(step, str):
      if step not in _STEP_ALIASES:
        raise ValueError(f"step={step!r}: valid values are an int or one of {_STEP_ALIASES}")
      resolved = self.latest_step() if step == "latest" else self.best_step()
    else:
      resolved = int(step)
    steps = self.all_steps()
    if resolved is None or resolved not in steps:
      raise FileNotFoundError(f"no checkpoint for step={step!r} in {self.directory}; "
                              f"available steps: {steps}")
    return resolved

  # -- save / restore --------------------------------------------------------------------------
  def save(self, step: int, state, *, meta: Mapping | None = None,
           metrics: Mapping[str, float] | None = None) -> bool:
    """Saves `state` (any pytree; typed keys become key_data) and JSON `meta` at `step`.

    `metrics` ranks the step for "best" and is copied into meta['metrics']. Returns orbax's flag.
    """
    if self.read_only:
      raise ValueError(f"Checkpointer for {self.directory} was opened with read_only=True")
    step = int(step)
    if step < 0:
      raise ValueError(f"step={step}: must be >= 0")
    if step in self._mngr.all_steps():
      raise ValueError(f"step {step} already exists in {self.directory}; "
                       f"available steps: {self.all_steps()}")
    metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
    meta_json = _jsonable({**dict(meta or {}), "step": step, "metrics": metrics}, "meta")
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(_keys_to_data(state)),
                                 META: ocp.args.JsonSave(meta_json)})
    return self._mngr.save(step, args=args, metrics=metrics or None)

  def restore(self, step, abstract_target) -> Restored:
    """Restores `step` (int, 'latest' or 'best') into the structure of `abstract_target`.

    `abstract_target` is the state pytree (concrete arrays or ShapeDtypeStructs); typed-key leaves
    come back as typed keys and optax NamedTuples keep their types. Raises ValueError naming the
    first key whose presence or shape differs between checkpoint and target.
    """
    self.wait_until_finished()
    step = self._resolve(step)
    leaves, treedef = jax.tree.flatten(abstract_target)
    impls = [_key_impl(x) if _is_key(x) else None for x in leaves]
    target = jax.tree.unflatten(treedef, [_abstract_leaf(x) for x in leaves])
    self._check_compatible(step, target)
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(target), META: ocp.args.JsonRestore()}))
    out = treedef.flatten_up_to(restored[STATE])
    out = [jax.random.wrap_key_data(x, impl=impl) if impl is not None else x
           for x, impl in zip(out, impls)]
    return Restored(step, jax.tree.unflatten(treedef, out), dict(restored[META]))

  def read_meta(self, step="latest") -> dict:
    """The JSON metadata of `step`, without touching the state."""
    self.wait_until_finished()
    step = self._resolve(step)
    return dict(self._mngr.restore(step, args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()}))[META])

  def _check_compatible(self, step: int, target):
    try:
      stored_tree = self._mngr.item_metadata(step)[STATE]
    except (KeyError, TypeError, ValueError, FileNotFoundError):
      stored_tree = None
    if stored_tree is None:  # Old/foreign layout without metadata: let orbax decide.
      return
    stored = {_path_names(p): getattr(x, "shape", None)
              for p, x in jax.tree_util.tree_flatten_with_path(stored_tree)[0]}
    requested = {_path_names(p): x.shape
                 for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    where = f"checkpoint step {step} in {self.directory}"
    for path, shape in requested.items():
      if path not in stored:
        raise ValueError(f"{where} has no key '{_fmt(path)}' (shape {tuple(shape)}) that the "
                         f"requested state needs; checkpoint keys: "
                         f"{sorted(_fmt(p) for p in stored)[:20]}")
      if stored[path] is not None and tuple(stored[path]) != tuple(shape):
        raise ValueError(f"{where}: shape mismatch at key '{_fmt(path)}': checkpoint has "
                         f"{tuple(stored[path])}, requested state has {tuple(shape)} "
                         "(different model config?)")
    for path, shape in stored.items():
      if path not in requested:
        raise ValueError(f"{where} has key '{_fmt(path)}' (shape {shape}) that the requested "
                         "state does not have (different model config?)")


# ----------------------------------------------------------------------------------------------
# Functional helpers that need no training-code state.


def read_meta(directory, step="latest") -> dict:
  """Reads the JSON metadata of `step` (int, 'latest' or 'best') under `directory`."""
  with Checkpointer(directory, read_only=True) as ckpt:
    return ckpt.read_meta(step)


def maybe_restore(directory, abstract_target, step="latest", **kwargs) -> Restored | None:
  """Resume helper: the restored `step`, or None when `directory` is missing or holds no step."""
  if latest_step(directory) is None:
    return None
  with Checkpointer(directory, read_only=True, **kwargs) as ckpt:
    return ckpt.restore(step, abstract_target)
