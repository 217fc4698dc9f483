"""The per-cut cost table: XLA-derived compute, and communication counted by hand."""
import json
import os
import subprocess
import sys

import pytest

from mocosfl_jax import costs


def test_communication_counts_key_upload_and_both_sync_directions():
  t = costs.Traffic(batch_size=2, samples_per_client=10, epochs=3, sync_every=5)
  c = costs.communication(100, 1000, t)
  assert c["upload_bytes_per_step"] == 2 * 2 * 100 * 4      # query + key rows
  assert c["download_bytes_per_step"] == 2 * 100 * 4        # gradient of the query rows
  assert c["sync_bytes_per_sync"] == 2 * 1000 * 4           # up and down
  steps = 10 // 2
  assert c["bytes_per_epoch"] == steps * (1600 + 800) + steps / 5 * 8000
  two_view = costs.communication(100, 1000, costs.Traffic(batch_size=2, loss_form="two_view",
                                                          momentum_sync=True))
  assert two_view["upload_bytes_per_step"] == 2 * 4 * 100 * 4
  assert two_view["sync_bytes_per_sync"] == 2 * 2 * 1000 * 4
  frozen = costs.communication(100, 1000, costs.Traffic(frozen_client=True))
  assert frozen["download_bytes_per_step"] == 0 and frozen["sync_bytes_per_sync"] == 0


def test_paper_raspberry_pi_figures_resnet18_c4s2():
  """The reference calculator's 39.06 MiB is our count without the key upload: ours is 2x."""
  rows = costs.cost_table("resnet18", bottleneck="C4S2", cuts=[1],
                          traffic=costs.Traffic(frozen_client=True))
  (row,) = rows
  assert row["smashed_floats"] == 1024 and row["client_params"] == 4164
  assert row["reference_calculator_mib"] == pytest.approx(39.0625)
  assert row["total_mib"] == pytest.approx(78.125)
  assert row["client_memory_bytes"] < 2**20          # the paper's "< 1 MB memory" at cut 1
  assert row["client_forward_flops"] > 2 * 1.8e6 * 0.9  # XLA counts 2 FLOPs per MAC


def test_cli_json_and_bad_arch(capsys):
  assert costs.main(["--arch", "resnet_tiny", "--cuts", "1-2", "--json"]) == 0
  table = json.loads(capsys.readouterr().out)
  assert [r["cut"] for r in table["rows"]] == [1, 2, "FL"]     # FL-MoCo's row beside the cuts
  assert costs.main(["--arch", "resnet_tiny", "--cuts", "1", "--nofl", "--json"]) == 0
  assert [r["cut"] for r in json.loads(capsys.readouterr().out)["rows"]] == [1]
  assert costs.main(["--arch", "resnet99"]) == 2
  assert "arch='resnet99' is unknown; valid" in capsys.readouterr().err


def test_cost_table_rows_grow_with_the_cut():
  rows = costs.cost_table("resnet_tiny", width=4, input_size=8, head="V1", cuts=[1, 3])
  assert [r["cut"] for r in rows] == [1, 3]
  assert all(r["client_forward_flops"] > 0 and r["client_memory_bytes"] > 0 for r in rows)
  assert rows[0]["client_params"] < rows[-1]["client_params"]
  json.dumps(rows)


@pytest.mark.parametrize("argv,message", [
    (["--cuts", "99"], r"cut=99 is invalid for resnet18: valid cuts are 1\.\.9 \(cut 9 puts"),
    (["--cuts", "0-2"], r"cut=0 is invalid for resnet18: valid cuts are 1\.\.9"),
    (["--arch", "mobilenetv2", "--cuts", "1,19"], r"cut=19 is invalid for mobilenetv2: valid "
     r"cuts are 1\.\.\d+"),
    (["--cuts", "3-1"], r"--cuts '3-1': the range '3-1' is empty"),
    (["--cuts", "one"], r"--cuts 'one': 'one' is not a cut or a range"),
    (["--sync-every", "0"], r"sync_every=0: must be an integer >= 1"),
    (["--batch-size", "0"], r"batch_size=0: must be an integer >= 1"),
    (["--batch-size", "64", "--samples-per-client", "50"],
     r"samples_per_client=50 is below batch_size=64"),
    (["--input-size", "4"], r"input_size=4 is too small for resnet18"),
    (["--head", "V9"], r"head='V9' is unknown"),
    (["--bottleneck", "C4S8", "--cuts", "1,9"],
     r"bottleneck='C4S8': stride 8 does not divide the 4x4 activation at cut 9"),
])
def test_cli_rejects_what_training_rejects(capsys, argv, message):
  assert costs.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
  assert __import__("re").search(message, err), err


def test_cli_refusal_prints_no_traceback():
  proc = subprocess.run([sys.executable, "-m", "mocosfl_jax.costs", "--cuts", "99"],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: cut=99 is invalid for resnet18: valid cuts are 1..9 (cut 9 puts the whole backbone "
      "on the client)"], proc.stderr
