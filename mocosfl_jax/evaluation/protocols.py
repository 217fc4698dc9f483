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
from mocosfl_jax.algorithm import flmoco, plan, state as state_lib
from mocosfl_jax.evaluation import features, knn, probes
from mocosfl_jax.models import SplitConfig, build
from mocosfl_jax.run import checkpoints

PROTOCOLS = ("knn", "linear", "semi")


def knn_monitor(exp: experiment_lib.Experiment, net):
  """The run's kNN evaluation: `fn(clients, server, splits=None) -> {'<split>_knn_accuracy': %}`.

  The one kNN function of training (every evaluation, results.json) and of `evaluate`, so both
  give the same figure for the same checkpoint: the bank is the run's training data, k, t and the
  batch size are the run's `knn_k`, `knn_t` and `eval_batch_size`. `splits` names attributes of
  the experiment; the default is 'test', preceded by 'val' when the run holds one out. The bank
  is embedded once for all of them.
  """
  embed = features.embed_fn(net, jnp.asarray(exp.aug.mean), jnp.asarray(exp.aug.std))
  c = exp.config
  default = ("val", "test") if exp.val is not None else ("test",)
  fl = exp.step.method == "flmoco"

  def fn(clients, server, splits=None) -> dict:
    if fl:        # the training state's layout: every client's whole network
      clients, server = flmoco.global_model(clients, server)
    queries = {name: getattr(exp, name) for name in (splits or default)}
    accs = features.knn_accuracies(embed, clients, server, exp.train, queries, k=c.knn_k,
                                   t=c.knn_t, batch_size=c.eval_batch_size)
    return {f"{name}_knn_accuracy": acc for name, acc in accs.items()}

  return fn


def selects_on_validation(config) -> bool:
  """Whether a run selected a checkpoint: only with a validation split (`val_fraction` > 0)."""
  return config.get("val_fraction", 0.0) > 0


def restore_for_eval(workdir, checkpoint="best"):
  """(experiment, net, clients, server, step) from a run directory's checkpoint and its meta.

  'best' is the checkpoint the run selected on validation kNN; a run without a validation split
  selected nothing, and 'best' is then its latest checkpoint (as results.json reports). `step` is
  the step actually used: for 'best'/'latest' a damaged step is skipped with a warning
  (run.checkpoints), so it can differ from the one the alias names.
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
    abstract = (flmoco.abstract_state(net, cfg) if cfg.method == "flmoco"
                else state_lib.abstract_train_state(net, cfg))
    return meta, net, ckpt.restore(s, {"clients": abstract.clients, "server": abstract.server})

  with checkpoints.Checkpointer(ckpt_dir, read_only=True) as ckpt:
    if step == "best":
      try:
        if not selects_on_validation(ckpt.read_meta("latest").get("config", {})):
          step = "latest"
      except (ValueError, OSError):   # a damaged latest step: first_intact skips it below
        pass
    meta, net, restored = ckpt.first_intact(step, lambda s: load(ckpt, s))
  # Not strict: a run written before a "setting has no effect" check existed still evaluates.
  exp = experiment_lib.resolve(ml_collections.ConfigDict(meta["config"]), strict=False)
  return exp, net, restored.state["clients"], restored.state["server"], restored.step


def evaluate(workdir, checkpoint="best", protocols=("knn",), recipes=("reference",),
             epochs: int = 100, seed: int = 0, batch_size: int | None = None) -> dict:
  """Runs `protocols` on a run's checkpoint; returns the results as a dict.

  kNN is `knn_monitor` (the run's own settings): on the test split, and on the validation split
  too when the run held one out. `batch_size` (default: the run's eval_batch_size) is the
  feature-extraction batch of the probes.
  """
  exp, net, clients, server, step = restore_for_eval(workdir, checkpoint)
  mean, std = jnp.asarray(exp.aug.mean), jnp.asarray(exp.aug.std)
  batch_size = batch_size or exp.config.eval_batch_size
  results = {"workdir": str(Path(workdir).absolute()), "step": step, "dataset": exp.train.name}
  if "knn" in protocols:
    results.update(knn_monitor(exp, net)(clients, server))
  fl = exp.step.method == "flmoco"
  if {"linear", "semi"} & set(protocols):
    if fl:                          # client 0's whole network (the average after a sync)
      clients, server = flmoco.global_model(clients, server)
    fn = features.features_fn(net, mean, std)
    args = (features.client0(clients), server.online)
    keep = exp.train.labels >= 0
    train_x = knn.extract_features(fn, exp.train.images[keep], batch_size, args=args)
    test_x = knn.extract_features(fn, exp.test.images, batch_size, args=args)
    train_y, test_y, classes = exp.train.labels[keep], exp.test.labels, exp.train.num_classes
    key = jax.random.key(seed)
    for recipe in recipes:
      if "linear" in protocols:
        # An FL-MoCo run's 'reference' linear probe is the reference's FL-MoCo recipe.
        linear = "flmoco" if fl and recipe == "reference" else recipe
        r = probes.linear_probe(train_x, train_y, test_x, test_y, classes, key=key,
                                recipe=linear, epochs=epochs, lr=probes.linear_lr(linear))
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
