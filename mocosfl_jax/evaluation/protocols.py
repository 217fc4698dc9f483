"""Evaluate a run's checkpoint: kNN, linear probe, semi-supervised probes (1% and 10% labels).

    results = protocols.evaluate(workdir, "best", ("knn", "linear", "semi"))

Everything is rebuilt from the checkpoint's own metadata (model, config, dataset): no training
process is needed. Features come from client 0's online slice + the server's online nets
(features.py). The kNN monitor uses the projection output; the probes use pooled backbone
features. Both the reference's "best test accuracy over epochs" and the final-epoch accuracy are
reported.
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from mocosfl_jax import experiment as experiment_lib
from mocosfl_jax.algorithm import plan, state as state_lib
from mocosfl_jax.evaluation import features, knn, probes
from mocosfl_jax.models import SplitConfig, build
from mocosfl_jax.run import checkpoints

PROTOCOLS = ("knn", "linear", "semi")


def restore_for_eval(workdir, checkpoint="best"):
  """(experiment, net, clients, server, step) from a run directory's checkpoint and its meta.

  `step` is the step actually used: for 'best'/'latest' a damaged step is skipped with a
  warning (run.checkpoints), so it can differ from the one the alias names.
  """
  ckpt_dir = Path(workdir) / "checkpoints"
  if checkpoints.latest_step(ckpt_dir) is None:
    raise FileNotFoundError(f"no checkpoint under {ckpt_dir}; is --workdir a training run "
                            "directory (python -m mocosfl_jax.main --workdir ...)?")
  step = int(checkpoint) if str(checkpoint).isdigit() else checkpoint

  def load(ckpt, s):
    meta = ckpt.read_meta(s)
    if "model" not in meta or "step_config" not in meta or "config" not in meta:
      raise ValueError(f"checkpoint {s} in {ckpt_dir} has no model/config metadata; it was not "
                       "written by mocosfl_jax.run.train")
    net = build(SplitConfig.from_dict(meta["model"]))
    cfg = plan.StepConfig(**meta["step_config"])
    abstract = state_lib.abstract_train_state(net, cfg)
    return meta, net, ckpt.restore(s, {"clients": abstract.clients, "server": abstract.server})

  with checkpoints.Checkpointer(ckpt_dir, read_only=True) as ckpt:
    meta, net, restored = ckpt.first_intact(step, lambda s: load(ckpt, s))
  exp = experiment_lib.resolve(ml_collections.ConfigDict(meta["config"]))
  return exp, net, restored.state["clients"], restored.state["server"], restored.step


def evaluate(workdir, checkpoint="best", protocols=("knn",), recipes=("reference",),
             epochs: int = 100, seed: int = 0, batch_size: int = 256) -> dict:
  """Runs `protocols` on a run's checkpoint; returns the results as a dict."""
  exp, net, clients, server, step = restore_for_eval(workdir, checkpoint)
  mean, std = jnp.asarray(exp.aug.mean), jnp.asarray(exp.aug.std)
  results = {"workdir": str(Path(workdir).absolute()), "step": step, "dataset": exp.train.name}
  if "knn" in protocols:
    fn = features.embed_fn(net, mean, std)
    results["knn_accuracy"] = features.knn_accuracy(fn, clients, server, exp.train, exp.test,
                                                    k=knn.DEFAULT_K, t=knn.DEFAULT_T,
                                                    batch_size=batch_size)
  if {"linear", "semi"} & set(protocols):
    fn = features.features_fn(net, mean, std)
    args = (features.client0(clients), server.online)
    keep = exp.train.labels >= 0
    train_x = knn.extract_features(fn, exp.train.images[keep], batch_size, args=args)
    test_x = knn.extract_features(fn, exp.test.images, batch_size, args=args)
    train_y, test_y, classes = exp.train.labels[keep], exp.test.labels, exp.train.num_classes
    key = jax.random.key(seed)
    for recipe in recipes:
      if "linear" in protocols:
        r = probes.linear_probe(train_x, train_y, test_x, test_y, classes, key=key,
                                recipe=recipe, epochs=epochs)
        results[f"linear_{recipe}"] = {"final": r.final_accuracy, "best": r.best_accuracy,
                                       "best_epoch": r.best_epoch}
      if "semi" in protocols:
        for fraction in (0.1, 0.01):
          name = f"semi{int(fraction * 100)}_{recipe}"
          try:
            r = probes.semi_supervised_probe(train_x, train_y, test_x, test_y, classes, key=key,
                                             fraction=fraction, recipe=recipe, epochs=epochs)
          except ValueError as e:  # e.g. 1% of a tiny dataset selects nothing
            results[name] = {"error": str(e)}
            continue
          results[name] = {"final": r.final_accuracy, "best": r.best_accuracy,
                           "best_epoch": r.best_epoch, "num_labels": r.num_train}
  return results
