"""Evaluate a run's checkpoint: kNN, linear probe, semi-supervised probes (1% and 10% labels).

    python -m mocosfl_jax.evaluate --workdir runs/quickstart --checkpoint best \
        --protocol knn,linear,semi --recipe reference,clean

Everything is rebuilt from the checkpoint's own metadata (model, config, dataset): no training
process is needed. Features come from client 0's online slice + the server's online backbone
(the reference's choice; after a sync every client holds the same model). The kNN monitor uses
the projection output, as the reference's monitor; the probes use pooled backbone features. Both the
reference's "best test accuracy over epochs" and the final-epoch accuracy are reported.
Results are printed and written to `<workdir>/eval_<step>.json`.
"""
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from mocosfl_jax import cli
from mocosfl_jax.run import checkpoints, train
from mocosfl_jax.evaluation import knn, probes
from mocosfl_jax.algorithm import plan, state as state_lib
from mocosfl_jax.models import SplitConfig, build

PROTOCOLS = ("knn", "linear", "semi")


def restore_for_eval(workdir, checkpoint="best"):
  """(plan, net, clients, server, step) from a run directory's checkpoint and its metadata."""
  ckpt_dir = Path(workdir) / "checkpoints"
  if checkpoints.latest_step(ckpt_dir) is None:
    raise FileNotFoundError(f"no checkpoint under {ckpt_dir}; is --workdir a training run "
                            "directory (python -m mocosfl_jax.main --workdir ...)?")
  step = int(checkpoint) if str(checkpoint).isdigit() else checkpoint
  with checkpoints.Checkpointer(ckpt_dir, read_only=True) as ckpt:
    meta = ckpt.read_meta(step)
    if "model" not in meta or "step_config" not in meta or "config" not in meta:
      raise ValueError(f"checkpoint {step} in {ckpt_dir} has no model/config metadata; it was not "
                       "written by mocosfl_jax.run.train")
    config = ml_collections.ConfigDict(meta["config"])
    p = train.resolve(config)
    net = build(SplitConfig.from_dict(meta["model"]))
    cfg = plan.StepConfig(**meta["step_config"])
    abstract = jax.eval_shape(lambda: dict(zip(("clients", "server"),
                                               state_lib.init_state(net, cfg, jax.random.key(0)))))
    restored = ckpt.restore(step, abstract)
  return p, net, restored.state["clients"], restored.state["server"], restored.step


def evaluate(workdir, checkpoint="best", protocols=("knn",), recipes=("reference",),
             epochs: int = 100, seed: int = 0, batch_size: int = 256) -> dict:
  p, net, clients, server, step = restore_for_eval(workdir, checkpoint)
  mean, std = jnp.asarray(p.aug.mean), jnp.asarray(p.aug.std)
  args = (train.client0(clients), server.online)
  results = {"workdir": str(Path(workdir).absolute()), "step": step, "dataset": p.train.name}
  if "knn" in protocols:
    fn = train.embed_fn(net, mean, std)
    bank = knn.extract_features(fn, p.train.images, batch_size, args=args)
    test = knn.extract_features(fn, p.test.images, batch_size, args=args)
    keep = p.train.labels >= 0
    results["knn_accuracy"] = knn.knn_accuracy(bank[keep], p.train.labels[keep], test,
                                               p.test.labels, p.train.num_classes,
                                               k=min(200, int(keep.sum())))
  if {"linear", "semi"} & set(protocols):
    fn = train.features_fn(net, mean, std)
    keep = p.train.labels >= 0
    train_x = knn.extract_features(fn, p.train.images[keep], batch_size, args=args)
    test_x = knn.extract_features(fn, p.test.images, batch_size, args=args)
    train_y = p.train.labels[keep]
    key = jax.random.key(seed)
    for recipe in recipes:
      if "linear" in protocols:
        r = probes.linear_probe(train_x, train_y, test_x, p.test.labels, p.train.num_classes,
                                key=key, recipe=recipe, epochs=epochs)
        results[f"linear_{recipe}"] = {"final": r.final_accuracy, "best": r.best_accuracy,
                                       "best_epoch": r.best_epoch}
      if "semi" in protocols:
        for fraction in (0.1, 0.01):
          try:
            r = probes.semi_supervised_probe(train_x, train_y, test_x, p.test.labels,
                                             p.train.num_classes, key=key, fraction=fraction,
                                             recipe=recipe, epochs=epochs)
          except ValueError as e:  # e.g. 1% of a tiny dataset selects nothing
            results[f"semi{int(fraction * 100)}_{recipe}"] = {"error": str(e)}
            continue
          results[f"semi{int(fraction * 100)}_{recipe}"] = {
              "final": r.final_accuracy, "best": r.best_accuracy, "best_epoch": r.best_epoch,
              "num_labels": r.num_train}
  return results


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  del argv
  flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).",
                      flag_values=flag_values, required=True)
  flags.DEFINE_string("checkpoint", "best", "latest, best or a step number.",
                      flag_values=flag_values)
  flags.DEFINE_string("protocol", "knn,linear,semi", "Comma list of knn, linear, semi.",
                      flag_values=flag_values)
  flags.DEFINE_string("recipe", "reference,clean", "Probe recipes: reference and/or clean.",
                      flag_values=flag_values)
  flags.DEFINE_integer("epochs", 100, "Probe training epochs.", flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, "Probe seed.", flag_values=flag_values)


def evaluate_command(args) -> int:
  """Evaluates, prints the results and writes them to <workdir>/eval_<step>.json."""
  protocols = tuple(filter(None, args.protocol.split(",")))
  recipes = tuple(filter(None, args.recipe.split(",")))
  bad = [x for x in protocols if x not in PROTOCOLS] + [r for r in recipes if r not in
                                                         probes.RECIPES]
  if bad:
    raise ValueError(f"unknown protocol/recipe {bad}; valid: {PROTOCOLS} and {probes.RECIPES}")
  t0 = time.time()
  results = evaluate(args.workdir, args.checkpoint, protocols, recipes, args.epochs, args.seed)
  results["seconds"] = time.time() - t0
  out = Path(args.workdir) / f"eval_{results['step']}.json"
  out.write_text(json.dumps(results, indent=1))
  print(json.dumps(results, indent=1))
  print(f"written to {out}")
  return 0


def main(argv=None) -> int:
  """Runs the command (argv without the program name; None: sys.argv, as a program)."""
  return cli.run(define_flags, evaluate_command, argv, errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
  main()
