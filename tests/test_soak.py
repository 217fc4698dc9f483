"""A run SIGKILLed inside checkpoint writes, rerun after each kill, ends with the files of a run
that was never interrupted (the short form of mocosfl_jax/benchmarks/soak.py, which kills ten
times, also at random training steps)."""
import random
import signal

from mocosfl_jax.benchmarks import soak

from core_testlib import CONFIG_DIR

STEPS = 16   # two kills land in it; fewer steps than the benchmark's run keep the test short


def test_kills_inside_checkpoint_writes_leave_the_uninterrupted_runs_files(tmp_path, monkeypatch):
  monkeypatch.setattr(soak, "CONFIG", CONFIG_DIR / "tiny.py")   # the checkout's, installed or not
  # Every run compiles with most optimisations off: they are compared with each other only.
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  reference = soak.finish(tmp_path / "uninterrupted", STEPS)
  assert reference.returncode == 0, reference.stderr[-2000:]
  workdir = tmp_path / "killed"
  rng = random.Random(0)
  log = [soak.kill_once(workdir, kind, rng, STEPS) for kind in ("commit", "write")]
  # Both were SIGKILLed: the first inside a commit, before the rename that publishes the step,
  # so it left the step's temporary directory behind; the second 0-200 ms into a write (a small
  # write can finish in that time, so whether it left one depends on timing).
  assert [r["returncode"] for r in log] == [-signal.SIGKILL] * 2, log
  assert log[0]["left_tmp_dir"], log
  rerun = soak.finish(workdir, STEPS)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  records, results = soak.comparable(workdir)
  want_records, want_results = soak.comparable(tmp_path / "uninterrupted")
  assert records == want_records
  assert results == want_results
