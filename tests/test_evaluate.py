"""evaluate.py reads a run's checkpoint alone and reports kNN and both probe recipes."""
import json

from mocosfl_jax import evaluate
from mocosfl_jax.run import checkpoints, train

from core_testlib import load_config

tiny = load_config("tiny")


def test_evaluate_cli_on_a_finished_run(tmp_path, capsys):
  config = tiny.get_config()
  config.final_protocols = "knn,linear"
  results = train.train_and_evaluate(config, str(tmp_path))
  linear = results["probes"]["linear_reference"]
  assert 0.0 <= linear["final"] <= linear["best"] <= 100.0
  rc = evaluate.main(["--workdir", str(tmp_path), "--checkpoint", "latest", "--protocol",
                      "knn,linear,semi", "--recipe", "reference,clean", "--epochs", "3"])
  assert rc == 0
  out = json.loads((tmp_path / "eval_6.json").read_text())
  # The run's own kNN settings (tiny: k 10, batch 64), so the figure is results.json's exactly.
  assert out["step"] == 6 and out["test_knn_accuracy"] == results["last"]["test_knn_accuracy"]
  saved = json.loads((tmp_path / "results.json").read_text())
  assert out["test_knn_accuracy"] == saved["last"]["test_knn_accuracy"]
  for key in ("linear_reference", "linear_clean", "semi10_reference", "semi10_clean"):
    assert set(out[key]) >= {"final", "best", "best_epoch"}
  assert "evaluated checkpoint step 6 (--checkpoint latest)" in capsys.readouterr().out
  # A damaged newest step: 'latest' evaluates the newest intact one and says so; asking for the
  # damaged step by number is a one-line error naming it.
  steps = checkpoints.complete_steps(tmp_path / "checkpoints")
  arrays = max((p for p in (tmp_path / "checkpoints" / "6" / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
  arrays.write_bytes(arrays.read_bytes()[:arrays.stat().st_size // 2])
  assert evaluate.main(["--workdir", str(tmp_path), "--checkpoint", "latest",
                        "--protocol", "knn"]) == 0
  assert f"evaluated checkpoint step {steps[-2]} (--checkpoint latest)" in capsys.readouterr().out
  assert evaluate.main(["--workdir", str(tmp_path), "--checkpoint", "6", "--protocol", "knn"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: checkpoint step 6 in ")
  assert "is damaged: 1 of its files differ" in err
  assert len(err.strip().splitlines()) == 1


def test_evaluate_reproduces_the_selected_checkpoint_of_a_run_with_validation(tmp_path, capsys):
  config = tiny.get_config()
  config.val_fraction = 0.25
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["selection"].startswith("best validation kNN")
  assert evaluate.main(["--workdir", str(tmp_path), "--protocol", "knn"]) == 0   # best
  best = results["best"]
  out = json.loads((tmp_path / f"eval_{best['step']}.json").read_text())
  assert out["val_knn_accuracy"] == best["val_knn_accuracy"]
  assert out["test_knn_accuracy"] == best["test_knn_accuracy"]
  capsys.readouterr()


def test_evaluate_errors_name_the_problem(tmp_path, capsys):
  assert evaluate.main(["--workdir", str(tmp_path)]) == 2
  assert "no checkpoint under" in capsys.readouterr().err
  assert evaluate.main(["--workdir", str(tmp_path), "--protocol", "knn,svm"]) == 2
  assert "unknown protocol/recipe ['svm']" in capsys.readouterr().err
