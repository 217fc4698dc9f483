"""Tests for mocosfl_jax.run.checkpoints: round trip, retention, crash safety, error messages."""
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mocosfl_jax.run import checkpoints as ckpt


def _state(width=4):
  params = {"dense": {"kernel": jnp.arange(3.0 * width).reshape(3, width), "bias": jnp.ones(width)}}
  opt_state = optax.adam(1e-3).init(params)
  return {"params": params, "batch_stats": {}, "opt_state": opt_state,
          "rng": jax.random.key(7), "step": jnp.int32(12)}


def _save_all(directory, accs, **kwargs):
  with ckpt.Checkpointer(directory, keep_latest=2, keep_best=1, **kwargs) as c:
    for step, acc in enumerate(accs):
      c.save(step, _state(), meta={"step_note": step}, metrics={"knn_accuracy": acc})
    c.wait_until_finished()
    return c.all_steps(), c.best_step(), c.latest_step()


def test_round_trip_with_optax_state_and_typed_key(tmp_path):
  state = _state()
  state["opt_state"] = optax.adam(1e-3).update(state["params"], state["opt_state"])[1]
  meta = {"config": {"lr": 0.06, "cuts": (1, 2)}, "split_config": {"arch": "resnet_tiny"},
          "sampler": {"epoch": 3, "seed": np.int64(5)}}
  with ckpt.Checkpointer(tmp_path / "ck") as c:
    assert c.save(5, state, meta=meta, metrics={"knn_accuracy": 42.0})
  restored = ckpt.maybe_restore(tmp_path / "ck", jax.tree.map(jnp.zeros_like, _state()))
  assert restored.step == 5
  assert isinstance(restored.state["opt_state"][0], optax.ScaleByAdamState)
  assert jax.dtypes.issubdtype(restored.state["rng"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored.state["rng"]),
                                jax.random.key_data(state["rng"]))
  np.testing.assert_array_equal(jax.random.normal(restored.state["rng"], (3,)),
                                jax.random.normal(state["rng"], (3,)))
  chex.assert_trees_all_equal(restored.state["opt_state"], state["opt_state"])
  chex.assert_trees_all_equal(restored.state["params"], state["params"])
  assert restored.state["batch_stats"] == {} and int(restored.state["step"]) == 12
  assert restored.meta["config"] == {"lr": 0.06, "cuts": [1, 2]}
  assert restored.meta["sampler"] == {"epoch": 3, "seed": 5}
  assert restored.meta["step"] == 5 and restored.meta["metrics"] == {"knn_accuracy": 42.0}
  # Abstract target (ShapeDtypeStructs, key dtype included) works the same.
  abstract = jax.eval_shape(_state)
  again = ckpt.maybe_restore(tmp_path / "ck", abstract)
  chex.assert_trees_all_equal(again.state["params"], state["params"])
  assert ckpt.read_meta(tmp_path / "ck", 5)["split_config"] == {"arch": "resnet_tiny"}


def test_keeps_latest_two_plus_best(tmp_path):
  steps, best, latest = _save_all(tmp_path / "ck", [0.1, 0.9, 0.3, 0.5, 0.2])
  assert steps == [1, 3, 4] and best == 1 and latest == 4
  with ckpt.Checkpointer(tmp_path / "ck", read_only=True) as c:
    assert c.restore("best", _state()).meta["metrics"]["knn_accuracy"] == 0.9
    assert c.restore("latest", _state()).step == 4
  assert ckpt.read_meta(tmp_path / "ck", "best")["step_note"] == 1


def test_min_mode_keeps_lowest(tmp_path):
  steps, best, _ = _save_all(tmp_path / "ck", [0.5, 0.1, 0.9, 0.7], best_mode="min")
  assert steps == [1, 2, 3] and best == 1


def test_half_written_steps_are_ignored(tmp_path):
  directory = tmp_path / "ck"
  _save_all(directory, [0.1, 0.2])
  # What orbax leaves when killed mid-write: a tmp dir (never renamed to its final name) ...
  # (the name a SIGKILL during an async save leaves behind)
  shutil.copytree(directory / "1", directory / "2.orbax-checkpoint-tmp")
  (directory / "2.orbax-checkpoint-tmp" / "commit_success.txt").unlink()
  # ... and a numeric dir without commit markers (non-atomic filesystem / manual copy).
  shutil.copytree(directory / "1", directory / "3")
  (directory / "3" / "commit_success.txt").unlink()
  (directory / "3" / "_CHECKPOINT_METADATA").unlink()
  assert ckpt.latest_step(directory) == 1
  with ckpt.Checkpointer(directory, read_only=True) as c:
    assert c.all_steps() == [0, 1] and c.latest_step() == 1
  assert ckpt.maybe_restore(directory, _state()).step == 1
  # A writer moves the broken dir aside and can write those steps again.
  with ckpt.Checkpointer(directory) as c:
    assert c.latest_step() == 1
    c.save(2, _state(), metrics={"knn_accuracy": 0.3})
    c.save(3, _state(), metrics={"knn_accuracy": 0.4})
    c.wait_until_finished()
    assert c.latest_step() == 3
  names = {p.name for p in directory.iterdir()}
  assert any(n.startswith("3.incomplete-") for n in names)
  assert "2.orbax-checkpoint-tmp" not in names  # orbax's tmp leftovers are cleaned by writers


def test_shape_mismatch_names_key_and_shapes(tmp_path):
  _save_all(tmp_path / "ck", [0.1])
  # Keys are visited in pytree (sorted-dict) order, so the optimizer's copy is reported first.
  with pytest.raises(ValueError, match=r"shape mismatch at key 'opt_state/0/mu/dense/bias': "
                     r"checkpoint has \(4,\), requested state has \(6,\)"):
    ckpt.maybe_restore(tmp_path / "ck", _state(width=6))
  extra = dict(_state(), ema={"w": jnp.ones(2)})
  with pytest.raises(ValueError, match="no key 'ema/w'"):
    ckpt.maybe_restore(tmp_path / "ck", extra)
  fewer = {k: v for k, v in _state().items() if k != "rng"}
  with pytest.raises(ValueError, match="has key 'rng'"):
    ckpt.maybe_restore(tmp_path / "ck", fewer)


def test_missing_things_have_clear_errors(tmp_path):
  assert ckpt.maybe_restore(tmp_path / "nothing", _state()) is None
  (tmp_path / "empty").mkdir()
  assert ckpt.maybe_restore(tmp_path / "empty", _state()) is None
  assert ckpt.latest_step(tmp_path / "empty") is None
  with pytest.raises(FileNotFoundError, match="nothing"):
    ckpt.read_meta(tmp_path / "nothing")
  _save_all(tmp_path / "ck", [0.1, 0.2])
  with pytest.raises(FileNotFoundError, match=r"step=7.*available steps: \[0, 1\]"):
    ckpt.read_meta(tmp_path / "ck", 7)
  with pytest.raises(ValueError, match="'newest'"):
    ckpt.read_meta(tmp_path / "ck", "newest")
  with ckpt.Checkpointer(tmp_path / "ck") as c:
    with pytest.raises(ValueError, match="step 1 already exists"):
      c.save(1, _state())
    with pytest.raises(ValueError, match=r"meta.bad: value of type object"):
      c.save(2, _state(), meta={"bad": object()})


# ----------------------------------------------------------------------------------------------
# Damage: checksums, fallback to the newest intact step, setting damaged steps aside.


def _big_state(seed=0):
  """_state() plus a queue-sized random array, which orbax stores as raw bytes in its own file."""
  return dict(_state(), queue=jax.random.normal(jax.random.key(seed), (256, 128)))


def _save_steps(directory, steps=(0, 1, 2)):
  with ckpt.Checkpointer(directory, keep_latest=len(steps), keep_best=1) as c:
    for step in steps:
      c.save(step, _big_state(step), meta={"note": step}, metrics={"knn_accuracy": float(step)})


def _array_file(step_dir):
  """The file holding the array bytes of a step: the largest one under state/."""
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _damage(path, how):
  data = path.read_bytes()
  if how == "flip":
    i = len(data) // 2
    path.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:])
  elif how == "truncate":
    path.write_bytes(data[:len(data) // 3])
  elif how == "delete":
    path.unlink()
  elif how == "garbage":
    path.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), np.uint8).tobytes())


def _queue_of(restored):
  return np.asarray(restored.state["queue"])


@pytest.mark.parametrize("how", ["flip", "truncate", "delete", "garbage"])
def test_damaged_newest_step_is_set_aside_and_resume_uses_the_previous(tmp_path, caplog, how):
  directory = tmp_path / "ck"
  _save_steps(directory)
  _damage(_array_file(directory / "2"), how)
  with ckpt.Checkpointer(directory, keep_latest=3, keep_best=0) as c:
    assert c.latest_step() == 2
    restored = c.restore("latest", _big_state())
    assert restored.step == 1 and restored.meta["note"] == 1
    np.testing.assert_array_equal(_queue_of(restored), np.asarray(_big_state(1)["queue"]))
    assert c.all_steps() == [0, 1] and c.latest_step() == 1
    c.save(2, _big_state(2))  # the step can be written again
    c.wait_until_finished()
    assert c.all_steps() == [0, 1, 2]
  assert (directory / "damaged" / "2" / "state").is_dir()  # set aside, never deleted
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("step 2" in w and "damaged" in w and "used step 1" in w for w in warnings), warnings


def test_read_only_users_skip_a_damaged_step_without_moving_it(tmp_path, caplog):
  directory = tmp_path / "ck"
  _save_steps(directory)
  _damage(_array_file(directory / "2"), "flip")
  restored = ckpt.maybe_restore(directory, _big_state())
  assert restored.step == 1
  assert (directory / "2").is_dir() and not (directory / "damaged").exists()
  assert any("step 2" in r.getMessage() and "read-only" in r.getMessage()
             for r in caplog.records)


def test_explicit_damaged_step_is_one_line_error_naming_it(tmp_path):
  directory = tmp_path / "ck"
  _save_steps(directory)
  array_file = _array_file(directory / "2")
  _damage(array_file, "flip")
  rel = array_file.relative_to(directory / "2").as_posix()
  with pytest.raises(ckpt.DamagedCheckpointError,
                     match=rf"^checkpoint step 2 in .* is damaged: 1 of its files differ from the "
                     rf"sha256 recorded when the step was written, e.g. \['{rel}'\]$") as e:
    ckpt.maybe_restore(directory, _big_state(), step=2)
  assert "\n" not in str(e.value)
  _damage(directory / "2" / "meta" / "metadata", "delete")
  with pytest.raises(ckpt.DamagedCheckpointError,
                     match=r"step 2 .* is damaged: 1 of its files are missing, e.g. "
                     r"\['meta/metadata'\]$"):
    ckpt.read_meta(directory, 2)
  assert ckpt.read_meta(directory, "latest")["note"] == 1


def test_arrays_are_verified_when_the_file_sums_were_never_written(tmp_path):
  """A writer killed between orbax's commit and sha256sums.json: the arrays' own checksums,
  committed with the step, still catch the damage (and name the array)."""
  directory = tmp_path / "ck"
  _save_steps(directory)
  assert all((directory / str(s) / ckpt.FILE_SUMS).is_file() for s in (0, 1, 2))
  for step in (1, 2):
    (directory / str(step) / ckpt.FILE_SUMS).unlink()
  _damage(_array_file(directory / "2"), "flip")
  with pytest.raises(ckpt.DamagedCheckpointError,
                     match=r"^checkpoint step 2 in .* is damaged: 1 entries differ from the sha256 "
                     r"saved with them \(bytes changed on disk\), e.g. \['queue'\]$"):
    ckpt.maybe_restore(directory, _big_state(), step=2)
  _damage(_array_file(directory / "1"), "truncate")
  with pytest.raises(ckpt.DamagedCheckpointError,
                     match=r"^checkpoint step 1 in .* is damaged: unreadable \(ValueError: .*"
                     r"queue"):
    ckpt.maybe_restore(directory, _big_state(), step=1)
  assert ckpt.maybe_restore(directory, _big_state()).step == 0


def test_all_steps_damaged_is_one_error_and_nothing_moves(tmp_path):
  directory = tmp_path / "ck"
  _save_steps(directory)
  for step, how in zip((0, 1, 2), ("flip", "truncate", "delete")):
    _damage(_array_file(directory / str(step)), how)
  with ckpt.Checkpointer(directory, keep_latest=3, keep_best=0) as c:
    with pytest.raises(ckpt.DamagedCheckpointError,
                       match=r"^no intact checkpoint for 'latest' in .*: step 2: 1 of its files "
                       r"are missing, .*; step 1: 1 of its files differ .*; step 0: 1 of its "
                       r"files differ") as e:
      c.restore("latest", _big_state())
    assert c.all_steps() == [0, 1, 2]
  assert "\n" not in str(e.value) and not (directory / "damaged").exists()


def test_damaged_best_falls_back_to_the_next_best(tmp_path):
  directory = tmp_path / "ck"
  with ckpt.Checkpointer(directory, keep_latest=4, keep_best=1) as c:
    for step, acc in enumerate([0.5, 0.9, 0.7, 0.1]):
      c.save(step, _big_state(step), metrics={"knn_accuracy": acc})
  _damage(_array_file(directory / "1"), "flip")
  with ckpt.Checkpointer(directory, read_only=True) as c:
    assert c.best_step() == 1 and c.candidates("best") == [1, 2, 0, 3]
    assert c.restore("best", _big_state()).step == 2


def test_unreadable_metrics_file(tmp_path):
  directory = tmp_path / "ck"
  _save_steps(directory)
  _damage(directory / "2" / "metrics" / "metrics", "truncate")
  with pytest.raises(ckpt.DamagedCheckpointError, match=r"step 2 .* metrics file .* move it to"):
    ckpt.Checkpointer(directory, read_only=True)
  with ckpt.Checkpointer(directory, keep_latest=3, keep_best=0) as c:  # a writer sets it aside
    assert c.all_steps() == [0, 1] and c.restore("latest", _big_state()).step == 1
  assert (directory / "damaged" / "2").is_dir()


def test_steps_saved_without_checksums_still_load_with_one_warning(tmp_path, caplog):
  directory = tmp_path / "ck"
  _save_steps(directory)
  for step in (0, 1, 2):
    shutil.rmtree(directory / str(step) / "checksums")
    (directory / str(step) / ckpt.FILE_SUMS).unlink()
  restored = ckpt.maybe_restore(directory, _big_state())
  assert restored.step == 2
  np.testing.assert_array_equal(_queue_of(restored), np.asarray(_big_state(2)["queue"]))
  assert ckpt.maybe_restore(directory, _big_state(), step=1).step == 1
  unverified = [r for r in caplog.records if "cannot be verified" in r.getMessage()]
  assert len(unverified) == 1
