"""Run metrics: an append-only `metrics.jsonl`, a reader, PNG curves and a progress line.

Why JSON lines: one flushed line per record survives a crash (at worst the last line is cut and
is skipped on read), is greppable, and needs no extra dependency (no TensorBoard). On resume the
file is truncated to records with ``step <= restored step`` so the curves never contain a stretch
of steps from a run that was later rolled back to an older checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"

# Plot groups: file stem -> predicate over metric names. Every metric the training run logs lands
# in one of them (tests/test_train.py checks); `epoch` is the only record field not plotted.
_PLOT_GROUPS = {
    "loss": lambda k: "loss" in k,
    "contrastive_accuracy": lambda k: ("acc" in k and "knn" not in k and "probe" not in k
                                       and "linear" not in k and "semi" not in k),
    "learning_rate": lambda k: k == "lr" or k.endswith("_lr") or k.startswith("lr_")
                               or "learning_rate" in k,
    "knn_accuracy": lambda k: "knn" in k,
    "divergence": lambda k: "divergence" in k or k.startswith("div_"),
    "positive_logit": lambda k: k.startswith("pos_logit"),
    "sync": lambda k: k == "synced",
    "speed": lambda k: k in ("steps_per_sec", "eval_seconds"),
    # TAResSFL (algorithm/ressfl.py): the simulated attacker's SSIM and the regulariser's state.
    "attacker_ssim": lambda k: k.endswith("_ssim"),
    "regulariser": lambda k: k.startswith("regulariser_"),
}
NOT_PLOTTED = ("epoch",)


def plot_group(name: str) -> str | None:
  """The plot (file stem) metric `name` is drawn in, or None."""
  return next((stem for stem, wanted in _PLOT_GROUPS.items() if wanted(name)), None)


def _to_value(name: str, value):
  if isinstance(value, str):
    return value
  try:
    arr = np.asarray(value)
  except Exception as e:  # noqa: BLE001 - re-raised with the field name.
    raise ValueError(f"metric {name!r}: cannot convert {type(value).__name__} to float") from e
  if arr.ndim != 0 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
    raise ValueError(f"metric {name!r}: expected a numeric scalar or str, got shape {arr.shape} "
                     f"dtype {arr.dtype}")
  return float(arr)


def _parse_lines(lines: Iterable[str], path: Path) -> list[dict]:
  records = []
  for i, line in enumerate(lines):
    line = line.strip()
    if not line:
      continue
    try:
      rec = json.loads(line)
    except ValueError:
      logging.warning("metrics: skipping unreadable line %d of %s (cut by a crash?)", i + 1, path)
      continue
    if isinstance(rec, dict) and "step" in rec:
      records.append(rec)
  return records


def read_metrics(run_dir) -> list[dict]:
  """All records of `<run_dir>/metrics.jsonl` in file order; [] if the file does not exist."""
  path = Path(run_dir) / METRICS_FILE
  if not path.exists():
    return []
  with path.open() as f:
    return _parse_lines(f, path)


def write_text_atomic(path, text: str) -> None:
  """Writes `path` whole or not at all: a temporary file beside it, fsync, then os.replace.

  For the run's JSON files (config.json, results.json, eval_<step>.json): a full disk, a
  read-only directory or a kill mid-write leaves the previous file (or none), never a cut one,
  and removes the temporary file when the write fails.
  """
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    with tmp.open("w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def truncate_metrics(run_dir, step: int | None) -> int:
  """Drops records with step > `step` (all records if `step` is None); returns how many.

  Rewrites via a temporary file + os.replace so a crash here cannot lose the kept records.
  """
  path = Path(run_dir) / METRICS_FILE
  if not path.exists():
    return 0
  with path.open() as f:
    lines = f.readlines()
  records = _parse_lines(lines, path)
  keep = [r for r in records if step is not None and r["step"] <= step]
  removed = len(lines) - len(keep)
  if removed:
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
      for r in keep:
        f.write(json.dumps(r) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return len(records) - len(keep)


class MetricsWriter:
  """Appends one JSON record per `write` to `<run_dir>/metrics.jsonl`, flushed immediately.

  Args:
    run_dir: run directory (created if missing).
    resume_step: the step restored from a checkpoint; later records are dropped. None means a
      fresh start: any existing records belong to a run that never checkpointed and are dropped.
  """

  def __init__(self, run_dir, resume_step: int | None = None):
    self.run_dir = Path(run_dir)
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.path = self.run_dir / METRICS_FILE
    self.dropped = truncate_metrics(self.run_dir, resume_step)
    if self.dropped:
      logging.info("metrics: dropped %d record(s) after step %s in %s", self.dropped, resume_step,
                   self.path)
    self._f = self.path.open("a")

  def write(self, step: int, values: Mapping | None = None, **kwargs) -> dict:
    """Writes {'step': step, **values, **kwargs}; numeric scalars (jax/numpy too) become floats."""
    rec = {"step": int(step)}
    for k, v in {**dict(values or {}), **kwargs}.items():
      if k == "step":
        raise ValueError("metric name 'step' is reserved for the record's step")
      rec[str(k)] = _to_value(k, v)
    self._f.write(json.dumps(rec) + "\n")
    self._f.flush()
    return rec

  def close(self):
    if not self._f.closed:
      self._f.close()

  @classmethod
  def null(cls) -> "MetricsWriter":
    """A writer that records nothing (non-primary processes of a multi-host run)."""
    w = cls.__new__(cls)
    w.run_dir, w.dropped = None, 0
    w._f = open(os.devnull, "w")  # pylint: disable=consider-using-with
    return w

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _series(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  out: dict[str, list] = {}
  for r in records:
    for k, v in r.items():
      if k == "step" or isinstance(v, str) or v is None or not math.isfinite(v):
        continue
      out.setdefault(k, []).append((r["step"], v))
  return {k: (np.array([s for s, _ in pts]), np.array([v for _, v in pts]))
          for k, pts in out.items()}


def plot_metrics(run_dir, out_dir=None) -> list[Path]:
  """Writes one PNG per metric group present (loss, contrastive accuracy, learning rates, kNN
  accuracy, divergence, positive logit, sync, speed, attacker SSIM, regulariser) to `out_dir`
  (default `<run_dir>/plots`); returns the written paths."""
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  series = _series(read_metrics(run_dir))
  out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / PLOTS_DIR
  written = []
  for stem in _PLOT_GROUPS:
    names = sorted(k for k in series if plot_group(k) == stem)
    if not names:
      continue
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
      steps, values = series[name]
      ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=name)
    ax.set_xlabel("step")
    ax.set_title(stem.replace("_", " "))
    if stem == "learning_rate" and all(np.all(series[n][1] > 0) for n in names):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{stem}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  return written


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def format_progress(step: int, total: int, rate: float, values: Mapping | None = None) -> str:
  """One progress line: 'step 120/1000 (12.0%) | 3.41 steps/s | ETA 4m18s | loss 5.1234'."""
  pct = 100.0 * step / total if total else 0.0
  eta = (total - step) / rate if rate > 0 else math.inf
  parts = [f"step {step}/{total} ({pct:.1f}%)", f"{rate:.2f} steps/s", f"ETA {_fmt_duration(eta)}"]
  for k, v in (values or {}).items():
    parts.append(f"{k} {float(v):.4g}" if not isinstance(v, str) else f"{k} {v}")
  return " | ".join(parts)


class Progress:
  """Prints a progress line every `every` steps (plain lines: safe for logs and non-tty).

  The rate is measured from the first `update` so jit compile time of step one does not inflate
  the ETA. `clock` is injectable for tests.
  """

  def __init__(self, total_steps: int, *, every: int = 10, stream=None, clock=time.monotonic):
    if every < 1:
      raise ValueError(f"every={every}: must be >= 1")
    self.total = int(total_steps)
    self.every = every
    self.stream = stream if stream is not None else sys.stderr
    self.clock = clock
    self._t0 = None
    self._s0 = None
    self.last_line = ""

  def rate(self, step: int) -> float:
    if self._t0 is None:
      return 0.0
    dt = self.clock() - self._t0
    return (step - self._s0) / dt if dt > 0 else 0.0

  def update(self, step: int, force: bool = False, **values) -> str | None:
    """Call after each step; returns the printed line (or None when not printing)."""
    if self._t0 is None:
      self._t0, self._s0 = self.clock(), step
    if not force and step % self.every and step != self.total:
      return None
    self.last_line = format_progress(step, self.total, self.rate(step), values)
    print(self.last_line, file=self.stream, flush=True)
    return self.last_line
