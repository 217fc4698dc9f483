"""Evaluate a run's checkpoint: kNN, linear probe, semi-supervised probes (1% and 10% labels).

    python -m mocosfl_jax.evaluate --workdir runs/quickstart --checkpoint best \
        --protocol knn,linear,semi --recipe reference,clean

The command-line front of evaluation/protocols.py (what each protocol computes is described
there). Results are printed and written to `<workdir>/eval_<step>.json`.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from mocosfl_jax.evaluation import probes
from mocosfl_jax.evaluation.protocols import PROTOCOLS, evaluate


def main(argv=None) -> int:
  a = argparse.ArgumentParser(prog="python -m mocosfl_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  a.add_argument("--workdir", required=True)
  a.add_argument("--checkpoint", default="best", help="latest, best or a step number")
  a.add_argument("--protocol", default="knn,linear,semi")
  a.add_argument("--recipe", default="reference,clean", help="reference and/or clean")
  a.add_argument("--epochs", type=int, default=100)
  a.add_argument("--seed", type=int, default=0)
  args = a.parse_args(argv)
  protocols = tuple(filter(None, args.protocol.split(",")))
  recipes = tuple(filter(None, args.recipe.split(",")))
  bad = [x for x in protocols if x not in PROTOCOLS] + [r for r in recipes if r not in
                                                         probes.RECIPES]
  if bad:
    print(f"error: unknown protocol/recipe {bad}; valid: {PROTOCOLS} and {probes.RECIPES}",
          file=sys.stderr)
    return 2
  t0 = time.time()
  try:
    results = evaluate(args.workdir, args.checkpoint, protocols, recipes, args.epochs, args.seed)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results["seconds"] = time.time() - t0
  out = Path(args.workdir) / f"eval_{results['step']}.json"
  out.write_text(json.dumps(results, indent=1))
  print(json.dumps(results, indent=1))
  print(f"written to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
