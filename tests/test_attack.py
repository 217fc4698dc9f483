"""The model-inversion attack: decoder training, best-epoch selection, outputs, refusals, and the
final 'attack' protocol of a training run."""
import io
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mocosfl_jax import attack as attack_cli
from mocosfl_jax import evaluate
from mocosfl_jax.data import sources
from mocosfl_jax.privacy import attack, decoder, similarity
from mocosfl_jax.run import train

import core_testlib
from core_testlib import load_config

fast_compile = core_testlib.fast_compile      # the fixture, for this module's tests
pytestmark = pytest.mark.usefixtures("fast_compile")
tiny = load_config("tiny")
# Small and quick: 64 of the 256 synthetic training images (57 train / 7 validation pairs).
FAST = attack.Settings(fraction=0.25, decoder="res_normN1C8", epochs=3, batch_size=8,
                       num_test=16)
FAST_FLAGS = ["--fraction", "0.25", "--decoder", "res_normN1C8", "--epochs", "3",
              "--batch-size", "8", "--num-test", "16"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run that ends with the attack (FAST settings; the config sets the fraction)."""
  workdir = tmp_path_factory.mktemp("run")
  config = tiny.get_config()
  config.final_protocols = "knn,attack"
  config.attack_fraction = 0.25
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "_final_attack_settings",
               lambda c: attack.Settings(**{**FAST.__dict__, "fraction": c.attack_fraction}))
    results = train.train_and_evaluate(config, str(workdir))
  return workdir, results


def _figures_in_range(r):
  assert np.isfinite([r["mse"], r["ssim"], r["psnr"]]).all()
  assert 0.0 <= r["mse"] <= 1.0 and r["ssim"] <= 1.0 and r["psnr"] > 0.0
  assert r["best_val_mse"] == min(r["val_mse"])
  assert r["val_mse"][r["best_epoch"] - 1] == r["best_val_mse"]


def test_final_protocol_puts_the_attack_in_results(run):
  workdir, results = run
  r = results["attack"]
  assert (r["step"], r["client"], r["num_train"], r["num_val"]) == (6, 0, 57, 7)
  _figures_in_range(r)
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["attack"]["mse"] == r["mse"]
  assert json.loads((workdir / "attack_6_c0.json").read_text())["ssim"] == r["ssim"]
  assert (workdir / "attack_6_c0.png").exists() and (workdir / "attack.png").exists()
  assert set(r["baselines"]) == {"mean_image", "class_mean"}     # synthetic data has labels
  for b in r["baselines"].values():
    assert np.isfinite([b["mse"], b["ssim"], b["psnr"]]).all()


def test_baselines_are_the_mean_and_class_mean_images():
  rng = np.random.default_rng(0)
  train_t = rng.uniform(size=(6, 8, 8, 3)).astype(np.float32)
  train_l = np.array([0, 0, 1, 1, 1, 2])
  test_t = rng.uniform(size=(3, 8, 8, 3)).astype(np.float32)
  test_l = np.array([1, 0, 3])                 # class 3: the attacker holds none of it
  got = attack.baselines(train_t, train_l, test_t, test_l)
  mean = train_t.mean(0)
  guess = np.stack([train_t[2:5].mean(0), train_t[:2].mean(0), mean])
  for name, g in (("mean_image", np.broadcast_to(mean, test_t.shape)), ("class_mean", guess)):
    mse = ((g - test_t) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(got[name]["mse"], mse.mean(), rtol=1e-6)
    np.testing.assert_allclose(got[name]["psnr"], (-10 * np.log10(mse)).mean(), rtol=1e-5)
    np.testing.assert_allclose(
        got[name]["ssim"], float(np.mean(similarity.ssim(jnp.asarray(g), jnp.asarray(test_t)))),
        rtol=1e-6)
  assert "class_mean" not in attack.baselines(train_t, np.full(6, -1), test_t, test_l)


def test_command_writes_json_and_png_per_checkpoint_and_client(run, capsys):
  workdir, _ = run
  assert attack_cli.main(["--workdir", str(workdir), "--checkpoint", "3", "--client", "1",
                          *FAST_FLAGS]) == 0
  out, err = capsys.readouterr()
  assert "attacked checkpoint step 3 (--checkpoint 3), client 1: MSE" in out
  assert err.count("attack epoch") == 3                      # one progress line per epoch
  r = json.loads((workdir / "attack_3_c1.json").read_text())
  assert json.loads((workdir / "attack.json").read_text()) == r     # the latest attack
  assert json.loads((workdir / "attack_6_c0.json").read_text())["step"] == 6   # kept
  assert (r["step"], r["client"], r["num_clients"], r["num_test"]) == (3, 1, 4, 16)
  assert r["settings"]["decoder"] == "res_normN1C8" and r["settings"]["jpeg"] is False
  _figures_in_range(r)
  assert r["best_val_mse"] < r["untrained_val_mse"]          # training reduced the val MSE
  # 16 test images, 8 px scaled x8 to 64, 2 px gaps; originals on top are the test images.
  png = np.asarray(Image.open(workdir / "attack_3_c1.png"))
  assert png.shape == (2 * 64 + 3 * 2, 16 * 64 + 17 * 2, 3)
  test = sources.load("synthetic", "test", image_size=8).images
  np.testing.assert_array_equal(png[2:66:8, 2:66:8], test[0])
  np.testing.assert_array_equal(png[2:66:8, 2 + 66 * 15:66 * 16:8], test[15])


def _pairs(n, seed):
  """Smashed-like inputs [n, 4, 4, 4] and [0, 1] targets [n, 8, 8, 3] that depend on them."""
  x = jax.random.normal(jax.random.key(seed), (n, 4, 4, 4))
  y = jax.nn.sigmoid(jnp.repeat(jnp.repeat(x[..., :3], 2, axis=1), 2, axis=2))
  return x, y


DEC = decoder.build("res_normN1C8", 8, (4, 4, 4))    # XLA's convolutions: quicker to compile


@pytest.fixture
def x64():
  """float64: Adam's normalised steps turn float32 rounding of near-zero gradients into visible
  differences between two compilations of the same updates; float64 leaves them at rounding."""
  with jax.enable_x64():
    yield


def _init():
  return decoder.init(DEC, jax.random.key(0), (4, 4, 4))


def test_jitted_epoch_equals_a_python_loop_of_the_same_steps(x64):
  x, y = _pairs(21, 1)                     # batch 8: two full batches and one of 5
  key = jax.random.key(3)
  variables = _init()
  tx = attack.optimizer(1e-3)
  got_vars, got_opt, got_mse = attack.train_epoch(DEC, 1e-3, 8, variables, tx.init(
      variables["params"]), key, x, y)
  step = jax.jit(lambda c, bx, by: attack.train_step(DEC, tx, c, bx, by))
  carry, losses = (variables, tx.init(variables["params"])), []
  full, rest = attack.epoch_order(key, 21, 8)
  assert full.shape == (2, 8) and rest.shape == (5,)
  assert sorted(np.concatenate([np.ravel(full), rest]).tolist()) == list(range(21))
  for idx in [*full, rest]:
    carry, loss = step(carry, x[idx], y[idx])
    losses.append(float(loss) * len(idx))
  assert got_mse.dtype == jnp.float64
  chex.assert_trees_all_close((got_vars, got_opt), carry, rtol=1e-10, atol=1e-12)
  assert float(got_mse) == pytest.approx(sum(losses) / 21, rel=1e-12)
  assert not np.allclose(jax.tree.leaves(got_vars["batch_stats"])[0],   # running stats move
                         jax.tree.leaves(variables["batch_stats"])[0])


def test_the_best_validation_epoch_is_kept(x64, monkeypatch):
  train_pairs, val_pairs = _pairs(21, 1), _pairs(6, 2)   # the epoch above, compiled once
  fit = lambda epochs: attack.train_decoder(DEC, _init(), train_pairs, val_pairs, epochs=epochs,
                                            batch_size=8, lr=1e-3, key=jax.random.key(5),
                                            log=None)
  honest = fit(3)
  assert honest.best_val_mse < honest.untrained_val_mse      # the loop learns
  assert honest.val_mse[honest.best_epoch - 1] == honest.best_val_mse == min(honest.val_mse)

  def scripted(epochs, scores):
    calls = iter([0.9, *scores])       # the first call scores the untrained decoder
    monkeypatch.setattr(attack, "validation_mse", lambda *a: next(calls))
    return fit(epochs)

  last2 = scripted(2, [0.3, 0.2])      # falling scores: the last epoch is the best
  last3 = scripted(3, [0.3, 0.2, 0.1])
  assert (last2.best_epoch, last3.best_epoch) == (2, 3)
  picked = scripted(3, [0.3, 0.1, 0.2])
  assert (picked.best_epoch, picked.best_val_mse, picked.val_mse) == (2, 0.1, [0.3, 0.1, 0.2])
  chex.assert_trees_all_equal(picked.variables, last2.variables)   # epoch 2's weights, kept
  assert not np.array_equal(jax.tree.leaves(picked.variables)[0],
                            jax.tree.leaves(last3.variables)[0])


def test_jpeg_changes_the_targets_as_a_quality_75_round_trip():
  images = sources.load("synthetic", "test", image_size=8).images[:4]
  plain = attack.targets(images)
  np.testing.assert_array_equal(plain, images / np.float32(255))
  lossy = attack.targets(images, jpeg=True)
  assert np.abs(lossy - plain).max() > 0.05
  buf = io.BytesIO()
  Image.fromarray(images[2]).save(buf, format="JPEG", quality=75)
  np.testing.assert_array_equal(np.round(lossy[2] * 255).astype(np.uint8),
                                np.asarray(Image.open(io.BytesIO(buf.getvalue()))))


def test_pairs_split_as_the_reference_splits_them():
  state = np.random.get_state()
  try:
    np.random.seed(123)
    indices = list(range(14))
    np.random.shuffle(indices)
  finally:
    np.random.set_state(state)
  tr, va = attack.split_indices(14)
  assert tr.tolist() == indices[:12] and va.tolist() == indices[12:]
  assert [len(s) for s in attack.split_indices(2)] == [1, 1]


def _refused(capsys, argv, *needles):
  assert attack_cli.main(argv) == 2
  out, err = capsys.readouterr()
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
  assert "attack epoch" not in err and "attacked" not in out      # refused before training
  for needle in needles:
    assert needle in err, err


def test_refusals_are_one_line_before_training(run, tmp_path, capsys):
  workdir, _ = run
  w = ["--workdir", str(workdir)]
  _refused(capsys, ["--workdir", str(tmp_path)], "no checkpoint under",
           "python -m mocosfl_jax.main --config CONFIG --workdir")
  _refused(capsys, [*w, "--client", "4"], "--client 4 is out of range: the run has 4 clients")
  _refused(capsys, [*w, "--checkpoint", "5"], "no checkpoint for step=5", "available steps: [3, 6]")
  _refused(capsys, [*w, "--fraction", "0.004"], "--fraction 0.004 takes 1 of the 256 training",
           "at least 2 (--fraction >= 0.00782)")
  _refused(capsys, [*w, "--fraction", "1.5"], "--fraction 1.5: must be in (0, 1]")
  _refused(capsys, [*w, "--decoder", "custom"], "decoder 'custom' is not supported")
  _refused(capsys, [*w, "--epochs", "0"], "--epochs 0: must be an int >= 1")
  assert attack.num_pairs(256, 0.00782) == 2
  with pytest.raises(ValueError, match=r"image size \(12\) to be the smashed data's size \(5\)"):
    attack.check_data(attack.Settings(), 256, 12, (5, 5, 4))


def test_config_refusals_before_anything_is_written(tmp_path, capsys):
  config = tiny.get_config()
  config.final_protocols = "knn,attack"
  config.attack_fraction = 0.004
  with pytest.raises(ValueError, match=r"config.attack_fraction 0.004 takes 1 of the 256 "
                     r"training images.*\(config.attack_fraction >= 0.00782\)"):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  config.final_protocols = "knn"
  with pytest.raises(ValueError, match="only the final model-inversion attack uses it"):
    train.train_and_evaluate(config, str(tmp_path / "b"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  assert evaluate.main(["--workdir", str(tmp_path), "--protocol", "knn,attack"]) == 2
  assert "python -m mocosfl_jax.attack --workdir" in capsys.readouterr().err


def test_command_prints_the_results_when_it_cannot_write_them(run, monkeypatch, capsys):
  workdir, _ = run
  before = {p.name: p.read_bytes() for p in workdir.glob("attack*")}

  def read_only(path, *args):
    raise OSError(30, "Read-only file system", str(path))

  monkeypatch.setattr(attack.metrics, "write_text_atomic", read_only)
  assert attack_cli.main(["--workdir", str(workdir), "--checkpoint", "6", *FAST_FLAGS]) == 1
  out, err = capsys.readouterr()
  assert err.strip().splitlines()[-1].startswith("error: cannot write the attack's files in ")
  assert "Read-only file system; the results are printed above" in err
  printed = json.loads(out[out.index("{"):out.rindex("}") + 1])
  assert printed["step"] == 6 and np.isfinite(printed["psnr"])
  assert {p.name: p.read_bytes() for p in workdir.glob("attack*")} == before
  assert not list(workdir.glob(".attack*"))     # no temporary file left
