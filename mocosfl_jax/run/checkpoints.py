"""Checkpoints: a thin wrapper over orbax's CheckpointManager.

Why a wrapper: the run needs "latest N for resume + best-by-validation for the final evaluation"
(the best only when the run holds a validation split out; orbax's ``max_to_keep`` +
``best_fn`` keeps the N *best* and deletes the newest step, which breaks resume, and a
preservation policy of ``LatestN`` + ``BestN`` keeps both), typed PRNG keys (orbax stores plain
arrays only), metadata readable without any training code, and error messages that
name the offending path / key.

Layout of one step directory ``<directory>/<step>/``:
  state/      the state pytree (StandardSave; typed PRNG keys stored as ``jax.random.key_data``)
  meta/       JSON (JsonSave): caller metadata (resolved config, SplitConfig as dict, sampler
              info) plus ``step`` and ``metrics``.
  checksums/  JSON (JsonSave): sha256 of every state leaf's bytes (with dtype and shape) and of
              the meta JSON, computed from the very arrays handed to orbax and committed in the
              same step, so a committed step always carries the checksums of what it holds.
  sha256sums.json  sha256 and size of every file of the three items, written by the writer once
              orbax has committed the step (at its next save, wait_until_finished or close).

Crash safety: orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames it when the write is
complete (after writing ``commit_success.txt``), so a killed run leaves only a tmp directory, which
orbax never lists as a step. We additionally treat a numeric step directory without a commit marker
as incomplete (e.g. copied by hand or written by a non-atomic filesystem): read-only users ignore
it, writers rename it aside to ``<step>.incomplete-<ns>`` so the step can be written again.

Damage: orbax/tensorstore do not checksum array bytes, so a flipped byte in an array file loads
silently (a queue of 1e38s, and the run then blames the learning rate), and a truncated, missing or
garbage file fails deep inside tensorstore (which then also prints stray asyncio tracebacks from
reads still in flight). Every read first checks the step's files against sha256sums.json, without
touching tensorstore, then recomputes the sha256 of the arrays it restored and compares them with
the checksums item (this covers steps whose writer died before writing sha256sums.json); a step
that fails either check, or any read, is damaged. Asked for 'latest' or 'best', the restore falls
back to the next candidate (older steps; for 'best' the next best) with a warning naming the
damaged step; a writer moves the damaged steps it skipped into ``<directory>/damaged/<step>``
(never deletes them) so the run can write those steps again; read-only users leave them in place.
Nothing is moved when no step is intact: that is one error listing each step's problem. An
explicit step number that is damaged is an error naming the step and the problem. Steps written
before checksums were recorded still load, with a warning that they cannot be verified. A step
whose orbax metrics file is unreadable breaks orbax's step listing itself: writers set it aside
when they open the directory, read-only users get an error saying so. Arrays spread over the
devices of several processes (multi-host) have no array checksum (each process would hash only
its shards); everything a single process holds is checked.

Difference from the reference (docs/reference.md, 'Checkpoint selection'): it keeps only the
best-kNN checkpoint; we keep the latest N as well, so runs can resume.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from mocosfl_jax import cli

STATE = "state"
META = "meta"
CHECKSUMS = "checksums"
DAMAGED = "damaged"
FILE_SUMS = "sha256sums.json"
_SEALED_ITEMS = (STATE, META, CHECKSUMS)
_CHECKSUM_FORMAT = 1
_METRICS_FILE = ("metrics", "metrics")  # orbax's per-step metrics item, read when it lists steps
_COMMIT_FILE = "commit_success.txt"
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
_STEP_ALIASES = ("latest", "best")
_BEST_MODES = ("max", "min")
_UNVERIFIED_WARNED: set[str] = set()  # directories already warned about (warn once)


T = TypeVar("T")


class DamagedCheckpointError(ValueError):
  """A committed step whose files cannot be read or whose bytes differ from their checksums."""

  def __init__(self, message: str, step: int | None = None):
    super().__init__(message)
    self.step = step


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


def _one_line(e: BaseException, limit: int = 240) -> str:
  """An exception as one short line: its innermost cause (orbax wraps tensorstore's precise
  message, which names the file and what is wrong, in a generic one that prints a spec)."""
  e = cli.root_cause(e)
  text = " ".join(str(e).split()) or "no message"
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _unreadable_metrics(step_dir: Path) -> str | None:
  """Why orbax could not parse the step's metrics file (it lists steps through it), or None."""
  path = step_dir.joinpath(*_METRICS_FILE)
  if not path.exists():
    return None
  try:
    json.loads(path.read_text())
  except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError and JSONDecodeError
    return f"its metrics file {'/'.join(_METRICS_FILE)} is unreadable ({_one_line(e)})"
  return None


def _file_sha256(path: Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _write_file_sums(step_dir: Path) -> None:
  """Records size and sha256 of every file of the step's items (atomically: tmp + rename)."""
  files = {}
  for item in _SEALED_ITEMS:
    for path in sorted((step_dir / item).rglob("*")):
      if path.is_file() and path.name != _COMMIT_FILE:
        files[path.relative_to(step_dir).as_posix()] = [path.stat().st_size, _file_sha256(path)]
  tmp = step_dir / f"{FILE_SUMS}.tmp"
  tmp.write_text(json.dumps({"format": _CHECKSUM_FORMAT, "files": files}, indent=1))
  tmp.replace(step_dir / FILE_SUMS)


def _set_aside(directory: Path, step_dir: Path) -> Path | None:
  """Moves a damaged step directory to <directory>/damaged/<step> (a fresh name if taken)."""
  dest = directory / DAMAGED / step_dir.name
  if dest.exists():
    dest = dest.with_name(f"{step_dir.name}-{time.time_ns()}")
  dest.parent.mkdir(exist_ok=True)
  try:
    step_dir.rename(dest)
  except FileNotFoundError:  # another process (multi-host) moved it first
    return None
  return dest


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


def _digest(array: np.ndarray) -> str:
  flat = np.ascontiguousarray(array).reshape(-1)
  return hashlib.sha256(flat.view(np.uint8)).hexdigest()


def _meta_digest(meta: Mapping) -> str:
  return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _host_leaves(tree, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  """{key path: host numpy array, or None for arrays spread over other processes' devices}."""
  flat = [(_fmt(prefix + _path_names(p)), x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  local = [isinstance(x, np.ndarray) or not isinstance(x, jax.Array) or x.is_fully_addressable
           for _, x in flat]
  fetched = iter(jax.device_get([x for (_, x), ok in zip(flat, local) if ok]))
  return {name: np.asarray(next(fetched)) if ok else None for (name, _), ok in zip(flat, local)}


def _checksums(data_tree, meta_json: Mapping) -> dict:
  """The checksums item: sha256 per state leaf (None where not held by this process) + meta."""
  leaves = {name: {"sha256": None if a is None else _digest(a),
                   "dtype": None if a is None else str(a.dtype),
                   "shape": None if a is None else list(a.shape)}
            for name, a in _host_leaves(data_tree).items()}
  return {"format": _CHECKSUM_FORMAT, "algorithm": "sha256", STATE: leaves,
          META: _meta_digest(meta_json)}


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
  hook is a safety net. Steps saved without the metric rank as worst for "best". Every restore is
  verified against the checksums saved with the step (module docstring, 'Damage').
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
    self._set_aside_unlistable()

    worst = -math.inf if best_mode == "max" else math.inf

    def metric_fn(metrics) -> float:
      value = (metrics or {}).get(best_metric)
      if value is None or not math.isfinite(float(value)):
        return worst
      return float(value)

    self._metric_fn = metric_fn
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
        item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler(),
                       CHECKSUMS: ocp.JsonCheckpointHandler()})
    self._unsealed: set[int] = set()  # saved here, sha256sums.json not yet written
    self._closed = False
    atexit.register(self.close)

  def _set_aside_unlistable(self):
    """Steps whose metrics file orbax cannot parse: orbax fails to list *any* step with them."""
    for step, path in sorted(_numeric_step_dirs(self.directory).items()):
      why = _unreadable_metrics(path) if _is_complete(path) else None
      if why is None:
        continue
      if self.read_only:
        raise DamagedCheckpointError(
            f"checkpoint step {step} in {self.directory} is damaged: {why}; no step can be read "
            f"while it is there: move it to {self.directory / DAMAGED / str(step)} (resuming "
            "the training run does that)", step)
      dest = _set_aside(self.directory, path)
      if dest is not None:
        logging.warning("checkpoints: step %d in %s is damaged (%s); moved it to %s", step,
                        self.directory, why, dest)

  # -- context / lifetime ---------------------------------------------------------------------
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def wait_until_finished(self):
    """Blocks until async writes are committed (call before reading or exiting)."""
    self._mngr.wait_until_finished()
    self._seal_committed(finished=True)

  def close(self):
    if self._closed:
      return
    self._closed = True
    atexit.unregister(self.close)
    self._mngr.wait_until_finished()
    self._seal_committed(finished=True)
    self._mngr.close()

  def _seal_committed(self, finished: bool = False):
    """Writes sha256sums.json for the steps saved here that orbax has committed since.

    `finished`: no write is pending, so a step that is not there was removed by the retention
    policy (or its write failed) and is dropped; otherwise it may still be in orbax's tmp dir.
    """
    for step in sorted(self._unsealed):
      step_dir = self.directory / str(step)
      if not (step_dir.is_dir() and _is_complete(step_dir)):
        if finished:
          self._unsealed.discard(step)
        continue
      self._unsealed.discard(step)
      if jax.process_index() != 0:
        continue
      try:
        _write_file_sums(step_dir)
      except FileNotFoundError:  # removed meanwhile by the retention policy
        pass

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

  def candidates(self, step) -> list[int]:
    """The steps to try, in order, for `step`: a number is itself alone; 'latest' is every step,
    newest first; 'best' is the best step, then the others by metric (ties: newest first)."""
    first = self._resolve(step)
    if not isinstance(step, str):
      return [first]
    rest = [s for s in reversed(self.all_steps()) if s != first]
    if step == "best":
      sign = -1.0 if self.best_mode == "max" else 1.0

      def rank(s):
        try:
          return sign * self._metric_fn(self._mngr.metrics(s))
        except Exception:  # pylint: disable=broad-except  (unreadable metrics rank last)
          return math.inf
      rest.sort(key=rank)  # stable: equal metrics keep newest first
    return [first, *rest]

  # -- damage ----------------------------------------------------------------------------------
  def _damaged(self, step: int, reason: str) -> DamagedCheckpointError:
    err = DamagedCheckpointError(f"checkpoint step {step} in {self.directory} is damaged: "
                                 f"{reason}", step)
    err.reason = reason
    return err

  @contextlib.contextmanager
  def reading(self, step: int):
    """Turns any error raised while reading `step`'s files into a DamagedCheckpointError."""
    try:
      yield
    except DamagedCheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (tensorstore/orbax/json read errors)
      raise self._damaged(step, f"unreadable ({_one_line(e)})") from e

  def checksums(self, step: int) -> dict | None:
    """The checksums saved with `step`, or None for a step written before they were recorded."""
    if not (self.directory / str(step) / CHECKSUMS).is_dir():
      return None
    with self.reading(step):
      sums = self._mngr.restore(step, args=ocp.args.Composite(
          **{CHECKSUMS: ocp.args.JsonRestore()}))[CHECKSUMS]
    if not isinstance(sums, Mapping) or sums.get("format") != _CHECKSUM_FORMAT:
      raise self._damaged(step, f"its {CHECKSUMS} file is not format {_CHECKSUM_FORMAT}")
    return dict(sums)

  def check_files(self, step: int, items: tuple[str, ...] = _SEALED_ITEMS):
    """Raises DamagedCheckpointError if a file of `items` differs from sha256sums.json.

    Plain file reads, no tensorstore: damage is found before orbax touches it. A step without
    sha256sums.json (written before them, or its writer died first) passes; `verify` still
    checks its arrays.
    """
    step_dir = self.directory / str(step)
    path = step_dir / FILE_SUMS
    if not path.exists():
      return
    try:
      files = json.loads(path.read_text())["files"]
      listed = [(rel, int(size), str(digest)) for rel, (size, digest) in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise self._damaged(step, f"its {FILE_SUMS} is unreadable ({_one_line(e)})") from e
    missing, changed = [], []
    for rel, size, digest in listed:
      if rel.split("/")[0] not in items:
        continue
      file = step_dir / rel
      try:
        if file.stat().st_size != size or _file_sha256(file) != digest:
          changed.append(rel)
      except FileNotFoundError:
        missing.append(rel)
      except OSError as e:
        raise self._damaged(step, f"file {rel} is unreadable ({_one_line(e)})") from e
    if missing:
      raise self._damaged(step, f"{len(missing)} of its files are missing, e.g. {missing[:3]}")
    if changed:
      raise self._damaged(step, f"{len(changed)} of its files differ from the sha256 recorded "
                          f"when the step was written, e.g. {changed[:3]}")

  def verify(self, step: int, tree=None, meta: Mapping | None = None,
             prefix: tuple[str, ...] = ()):
    """Raises DamagedCheckpointError if restored arrays (`tree`, rooted at `prefix` of the saved
    state) or `meta` differ from the checksums saved with `step`.

    Arrays restored with another dtype than saved, and arrays spread over other processes'
    devices, cannot be compared byte for byte and are skipped.
    """
    sums = self.checksums(step)
    if sums is None:
      key = str(self.directory)
      if key not in _UNVERIFIED_WARNED:
        _UNVERIFIED_WARNED.add(key)
        logging.warning("checkpoints: %s holds steps saved without checksums (written before "
                        "they were recorded); step %d cannot be verified and is used as it is",
                        self.directory, step)
      return
    recorded = sums.get(STATE) or {}
    missing, changed = [], []
    for name, array in ({} if tree is None else _host_leaves(tree, prefix)).items():
      rec = recorded.get(name)
      if not isinstance(rec, Mapping):
        missing.append(name)
      elif (array is not None and rec.get("sha256") is not None
            and rec.get("dtype") == str(array.dtype) and rec.get("shape") == list(array.shape)
            and _digest(array) != rec["sha256"]):
        changed.append(name)
    if meta is not None and sums.get(META) not in (None, _meta_digest(meta)):
      changed.insert(0, "<meta JSON>")
    if changed:
      raise self._damaged(step, f"{len(changed)} entries differ from the sha256 saved with them "
                          f"(bytes changed on disk), e.g. {changed[:3]}")
    if missing:
      raise self._damaged(step, f"its {CHECKSUMS} file lists no checksum for {len(missing)} "
                          f"entries, e.g. {missing[:3]}")

  def first_intact(self, step, attempt: Callable[[int], T]) -> T:
    """`attempt(s)` for the first intact candidate of `step` (see `candidates`).

    `attempt` reads step `s` (through `reading`/`verify`) and raises DamagedCheckpointError when
    it is damaged; any other error propagates. A damaged explicit step is that error. For
    'latest'/'best', each damaged candidate is reported in a warning naming it and, once an
    intact one is found, a writer moves the damaged ones to <directory>/damaged/; when no
    candidate is intact nothing is moved and the error lists every step's problem.
    """
    tried = self.candidates(step)
    damaged = []
    for s in tried:
      try:
        result = attempt(s)
      except DamagedCheckpointError as e:
        if not isinstance(step, str):
          raise
        damaged.append((s, getattr(e, "reason", str(e))))
        continue
      for bad, reason in damaged:
        if self.read_only:
          logging.warning("checkpoints: step %d in %s is damaged (%s); skipped it (left in place: "
                          "opened read-only) and used step %d", bad, self.directory, reason, s)
        else:
          dest = _set_aside(self.directory, self.directory / str(bad))
          logging.warning("checkpoints: step %d in %s is damaged (%s); moved it to %s and used "
                          "step %d", bad, self.directory, reason, dest, s)
      if damaged and not self.read_only:
        self._mngr.reload()
      return result
    problems = "; ".join(f"step {s}: {reason}" for s, reason in damaged)
    raise DamagedCheckpointError(f"no intact checkpoint for {step!r} in {self.directory}: "
                                 f"{problems}")

  # -- save / restore --------------------------------------------------------------------------
  def save(self, step: int, state, *, meta: Mapping | None = None,
           metrics: Mapping[str, float] | None = None) -> bool:
    """Saves `state` (any pytree; typed keys become key_data), JSON `meta` and their checksums.

    `metrics` ranks the step for "best" and is copied into meta['metrics']. Returns orbax's flag.
    The checksums are computed here, synchronously, from the arrays handed to orbax (jax arrays
    are immutable, so they are the bytes the async write stores) and commit with the step.
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
    data = _keys_to_data(state)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(data),
                                 META: ocp.args.JsonSave(meta_json),
                                 CHECKSUMS: ocp.args.JsonSave(_checksums(data, meta_json))})
    saved = self._mngr.save(step, args=args, metrics=metrics or None)
    if saved:
      self._unsealed.add(step)
    self._seal_committed()  # the previous step, if orbax has committed it by now
    return saved

  def restore(self, step, abstract_target) -> Restored:
    """Restores `step` (int, 'latest' or 'best') into the structure of `abstract_target`.

    `abstract_target` is the state pytree (concrete arrays or ShapeDtypeStructs); typed-key leaves
    come back as typed keys and optax NamedTuples keep their types. Raises ValueError naming the
    first key whose presence or shape differs between checkpoint and target, and
    DamagedCheckpointError (a ValueError) as `first_intact` says.
    """
    self.wait_until_finished()
    leaves, treedef = jax.tree.flatten(abstract_target)
    impls = [_key_impl(x) if _is_key(x) else None for x in leaves]
    target = jax.tree.unflatten(treedef, [_abstract_leaf(x) for x in leaves])

    def attempt(s: int) -> Restored:
      self.check_files(s)
      self._check_compatible(s, target)
      with self.reading(s):
        restored = self._mngr.restore(s, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(target), META: ocp.args.JsonRestore()}))
      out = treedef.flatten_up_to(restored[STATE])
      meta = dict(restored[META])
      self.verify(s, jax.tree.unflatten(treedef, out), meta)
      out = [jax.random.wrap_key_data(x, impl=impl) if impl is not None else x
             for x, impl in zip(out, impls)]
      return Restored(s, jax.tree.unflatten(treedef, out), meta)

    return self.first_intact(step, attempt)

  def read_meta(self, step="latest") -> dict:
    """The JSON metadata of `step` (verified against its checksum), without touching the state."""
    self.wait_until_finished()

    def attempt(s: int) -> dict:
      self.check_files(s, (META, CHECKSUMS))
      with self.reading(s):
        meta = dict(self._mngr.restore(s, args=ocp.args.Composite(
            **{META: ocp.args.JsonRestore()}))[META])
      self.verify(s, meta=meta)
      return meta

    return self.first_intact(step, attempt)

  def _check_compatible(self, step: int, target):
    try:
      stored_tree = self._mngr.item_metadata(step)[STATE]
    except Exception:  # pylint: disable=broad-except  (unreadable: the restore reports it)
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
