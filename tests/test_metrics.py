"""Tests for mocosfl_jax.run.metrics: jsonl append / resume truncation, plots, progress line."""
import io
import json

import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.run import metrics


def _write_steps(run_dir, steps, resume_step=None):
  with metrics.MetricsWriter(run_dir, resume_step=resume_step) as w:
    for s in steps:
      w.write(s, {"loss": jnp.float32(10.0 / (s + 1))}, lr=np.float64(0.06), knn_accuracy=s * 1.5)


def test_append_and_read_converts_to_python_floats(tmp_path):
  _write_steps(tmp_path, range(3))
  records = metrics.read_metrics(tmp_path)
  assert [r["step"] for r in records] == [0, 1, 2]
  assert records[1] == {"step": 1, "loss": 5.0, "lr": 0.06, "knn_accuracy": 1.5}
  assert all(type(v) is float for r in records for k, v in r.items() if k != "step")
  with metrics.MetricsWriter(tmp_path, resume_step=2) as w:
    with pytest.raises(ValueError, match="metric 'x'"):
      w.write(3, x=np.ones(2))
    assert w.write(3, phase="eval")["phase"] == "eval"


def test_resume_truncates_later_steps_and_survives_cut_line(tmp_path):
  _write_steps(tmp_path, range(6))
  with (tmp_path / metrics.METRICS_FILE).open("a") as f:
    f.write('{"step": 6, "loss": 0.')  # crash in the middle of a write
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == list(range(6))
  _write_steps(tmp_path, [4, 5], resume_step=3)  # restored checkpoint at step 3
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
  lines = (tmp_path / metrics.METRICS_FILE).read_text().splitlines()
  assert all(json.loads(line) for line in lines)  # the cut line is gone
  _write_steps(tmp_path, [0], resume_step=None)  # fresh start: old records dropped
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [0]


def test_plot_metrics_writes_pngs(tmp_path):
  with metrics.MetricsWriter(tmp_path) as w:
    for s in range(5):
      w.write(s, loss=1.0 / (s + 1), contrastive_accuracy=10.0 * s, lr=0.06, client_lr=0.03,
              knn_accuracy=20.0 + s)
  paths = metrics.plot_metrics(tmp_path)
  names = sorted(p.name for p in paths)
  assert names == ["contrastive_accuracy.png", "knn_accuracy.png", "learning_rate.png", "loss.png"]
  for p in paths:
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


def test_progress_line_non_tty():
  clock = iter([0.0, 10.0, 20.0]).__next__
  stream = io.StringIO()
  prog = metrics.Progress(total_steps=100, every=10, stream=stream, clock=clock)
  assert prog.update(0, loss=5.0) is not None  # first call starts the clock, prints step 0
  assert prog.update(5, loss=4.0) is None
  line = prog.update(20, loss=3.25, lr=0.06)
  assert line == "step 20/100 (20.0%) | 1.00 steps/s | ETA 1m20s | loss 3.25 | lr 0.06"
  assert stream.getvalue().splitlines()[-1] == line
