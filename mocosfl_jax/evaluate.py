"""Evaluate a run's checkpoint: kNN, linear probe, semi-supervised probes (1% and 10% labels).

    python -m mocosfl_jax.evaluate --workdir runs/quickstart --checkpoint best \
        --protocol knn,linear,semi --recipe reference,clean

The command-line front of evaluation/protocols.py (what each protocol computes is described
there). Results are printed and then written to `<workdir>/eval_<step>.json` (whole or not at
all; when it cannot be written the printed results stay and the status is 1).
"""
import json
import sys
import time
from pathlib import Path

from absl import flags

from mocosfl_jax import cli
from mocosfl_jax.evaluation import probes
from mocosfl_jax.evaluation.protocols import PROTOCOLS, evaluate
from mocosfl_jax.run import metrics


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).",
                      flag_values=flag_values, required=True)
  flags.DEFINE_string("checkpoint", "best", "latest, best or a step number.",
                      flag_values=flag_values)
  flags.DEFINE_string("protocol", "knn,linear,semi", "Comma list of knn, linear, semi.",
                      flag_values=flag_values)
  flags.DEFINE_string("recipe", "reference,clean",
                      "Probe recipes: reference, clean, flmoco (an FL-MoCo run's reference "
                      "linear probe is flmoco's).", flag_values=flag_values)
  flags.DEFINE_integer("epochs", 100, "Probe training epochs.", flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, "Probe seed.", flag_values=flag_values)


def evaluate_command(args) -> int:
  """Evaluates, prints the results and writes them to <workdir>/eval_<step>.json."""
  protocols = tuple(filter(None, args.protocol.split(",")))
  recipes = tuple(filter(None, args.recipe.split(",")))
  if "attack" in protocols:   # its own flags (client, fraction, decoder) and files
    raise ValueError("the model-inversion attack is its own command: python -m "
                     f"mocosfl_jax.attack --workdir {args.workdir} --checkpoint {args.checkpoint}")
  bad = [x for x in protocols if x not in PROTOCOLS] + [r for r in recipes if r not in
                                                         probes.RECIPES]
  if bad:
    raise ValueError(f"unknown protocol/recipe {bad}; valid: {PROTOCOLS} and {probes.RECIPES}")
  t0 = time.time()
  results = evaluate(args.workdir, args.checkpoint, protocols, recipes, args.epochs, args.seed)
  print(f"evaluated checkpoint step {results['step']} (--checkpoint {args.checkpoint})")
  results["seconds"] = time.time() - t0
  out = Path(args.workdir) / f"eval_{results['step']}.json"
  print(json.dumps(results, indent=1))   # first: results survive a file that cannot be written
  try:
    metrics.write_text_atomic(out, json.dumps(results, indent=1))
  except OSError as e:
    print(f"error: cannot write {out}: {e.strerror or e}; the results are printed above",
          file=sys.stderr)
    return 1
  print(f"written to {out}")
  return 0


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, evaluate_command, argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
  main()
