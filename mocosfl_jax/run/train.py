"""The training run: resolve the config, build data and state, run jitted steps, evaluate, checkpoint.

    results = train.train_and_evaluate(config, workdir)

One simulated step is one jit call that donates the state (`simulated_step`): it draws every pool
client's batch indices (stateless per-client streams, so resume is exact), gathers the uint8
images on device, augments two views and runs `parallel.train_step_fn`. Rerunning in the same
workdir resumes from the latest checkpoint. Checkpoints are selected on kNN accuracy over a
validation split held out of the training data, never the test set (the reference selects on
test; docs/reference.md); test numbers are reported for both the last and the selected
checkpoint.
"""
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mocosfl_jax import config as config_lib
from mocosfl_jax import experiment as experiment_lib
from mocosfl_jax import parallel
from mocosfl_jax.algorithm import plan
from mocosfl_jax.algorithm.state import TrainState
from mocosfl_jax.data import augment, partition as partition_lib, sampler
from mocosfl_jax.evaluation import features, protocols
from mocosfl_jax.models import build
from mocosfl_jax.run import checkpoints, metrics

# Fields that may change when a run is resumed (they do not change the trajectory).
RESUMABLE_CHANGES = {"log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                     "keep_checkpoints", "final_protocols", "eval_batch_size", "num_steps",
                     "data_dir", "client_parallel", "client_chunk", "distributed", "conv_impl"}


class NonFiniteLossError(FloatingPointError):
  pass


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 11), donate_argnums=(3,))
def simulated_step(net, cfg: plan.StepConfig, aug: experiment_lib.AugSpec, state: TrainState,
                   images: sampler.TrainImages, table, data_key, aug_key, pool, epoch, batch_idx,
                   par=None):
  """Batch indices -> gather -> two views -> the training step, in one compiled call."""
  ids = jnp.arange(cfg.num_clients, dtype=jnp.int32) if pool is None else pool
  batch = images.batch(table, ids, state.clients.draws[ids], cfg.batch_size, data_key)
  views_q, views_k = augment.two_views(jax.random.fold_in(aug_key, state.server.step), batch,
                                       jnp.asarray(aug.mean), jnp.asarray(aug.std), aug.pipeline,
                                       crop_scale=aug.crop_scale)
  return parallel.train_step_fn(net, cfg, state, pool, views_q, views_k, epoch, batch_idx,
                                par=par)


def _check_resumable(saved: dict, current: dict, workdir) -> None:
  changed = sorted(k for k in set(saved) | set(current)
                   if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
  if changed:
    diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
    raise ValueError(f"{workdir} holds a run with a different config ({diffs}); use a new "
                     "--workdir, or the saved config to resume")


def _saved(state: TrainState) -> dict:
  """What a checkpoint holds (the optimizer follows from the config)."""
  return {"clients": state.clients, "server": state.server}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir` if any) and returns the results."""
  workdir = Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  # Multi-host: jax.distributed must start before anything touches the backend.
  config = config_lib.with_defaults(config)
  parallel.maybe_initialize_distributed(config.distributed or None)
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())

  # ---- Config, data, model ----
  exp = experiment_lib.resolve(config)
  config = exp.config
  net, cfg, par = build(exp.model), exp.step, exp.par
  config_dict = config.to_dict()
  logging.info("plan: model %s | %s | %d steps, eval every %d", exp.model, cfg, exp.num_steps,
               exp.eval_every)
  primary = jax.process_index() == 0      # multi-host: one process writes the run files
  if primary:
    (workdir / "config.json").write_text(json.dumps(
        {"config": config_dict, "model": exp.model.to_dict(), "step": dataclasses.asdict(cfg),
         "num_steps": exp.num_steps}, indent=1))
    partition_lib.write_partition_summary(
        partition_lib.partition_summary(exp.parts, exp.train.labels, exp.train.num_classes),
        workdir)

  # ---- State and training images ----
  init_key, data_key, aug_key, pool_key = jax.random.split(jax.random.key(config.seed), 4)
  # shard_map: clients (state and training images) on their leading axis over the mesh, server
  # replicated; built shard by shard, so each process holds only its own clients, and global
  # arrays from the start (orbax needs them when several processes save).
  mesh = par.mesh if par.mode == "shard_map" else None
  state = parallel.create_train_state(net, cfg, init_key, mesh=mesh)
  images = (parallel.place_images_by_client(exp.train.images, exp.parts, mesh) if mesh
            else sampler.TrainImages.flat(exp.train.images))
  held = {k: parallel.addressable_bytes(v) for k, v in
          (("client_state", state.clients), ("server_state", state.server),
           ("train_images", images))}
  logging.info("process %d holds on its devices (bytes): %s", jax.process_index(),
               json.dumps(held))

  # ---- Resume ----
  ckpt_dir = workdir / "checkpoints"
  ckpt = checkpoints.Checkpointer(ckpt_dir, keep_latest=config.keep_checkpoints, keep_best=1,
                                  best_metric="knn_accuracy")
  start = 0
  if ckpt.latest_step() is not None:
    restored = ckpt.restore("latest", _saved(state))
    _check_resumable(restored.meta.get("config", {}), config_dict, workdir)
    state = state.replace(**restored.state)
    start = restored.step
    logging.info("resumed from step %d in %s", start, ckpt_dir)
  writer = (metrics.MetricsWriter(workdir, resume_step=start if start else None) if primary
            else metrics.MetricsWriter.null())
  meta = {"config": config_dict, "model": exp.model.to_dict(),
          "step_config": dataclasses.asdict(cfg),
          "dataset": {"name": exp.train.name, "mean": exp.aug.mean, "std": exp.aug.std,
                      "input_size": exp.train.input_size, "num_classes": exp.train.num_classes}}

  # ---- Evaluation and checkpoints ----
  embed = features.embed_fn(net, jnp.asarray(exp.aug.mean), jnp.asarray(exp.aug.std))

  def knn(state, query):
    return features.knn_accuracy(embed, state.clients, state.server, exp.train, query,
                                 k=config.knn_k, t=config.knn_t,
                                 batch_size=config.eval_batch_size)

  def save(step, state, metrics=None):
    if step not in ckpt.all_steps():
      ckpt.save(step, _saved(state), meta=meta, metrics=metrics)

  def evaluate_and_save(step, state, extra=None):
    t0 = time.time()
    acc = knn(state, exp.val)
    writer.write(step, {"knn_accuracy": acc, "eval_seconds": time.time() - t0, **(extra or {})})
    save(step, state, {"knn_accuracy": acc})

  if start == 0:
    evaluate_and_save(0, state, {"test_knn_accuracy": knn(state, exp.test)})

  # ---- Train loop ----
  try:
    state = _train_loop(exp, net, state, start, images, ckpt, writer,
                        keys=(data_key, aug_key, pool_key), evaluate_and_save=evaluate_and_save,
                        save=save)
    results = _final_report(exp, knn, ckpt, state)
  finally:  # let pending checkpoint writes finish even on Ctrl-C, so resume finds them
    ckpt.close()
    writer.close()
  probes_wanted = [x for x in config.final_protocols.split(",") if x in ("linear", "semi")]
  if probes_wanted:  # evaluates the selected checkpoint from disk, exactly as evaluate does
    results["probes"] = protocols.evaluate(workdir, "best", tuple(probes_wanted))
  if not primary:
    return results
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  try:
    metrics.plot_metrics(workdir)
  except Exception as e:  # plotting must never lose a finished run
    logging.warning("plotting failed: %s", e)
  return results


def _train_loop(exp, net, state, start, images, ckpt, writer, *, keys, evaluate_and_save, save):
  data_key, aug_key, pool_key = keys
  cfg, config = exp.step, exp.config
  table = sampler.ClientTable.from_partition(exp.parts, cfg.batch_size)
  progress = metrics.Progress(exp.num_steps, every=config.log_every_steps)
  logging.info("Initial compilation, this might take a few minutes...")
  t_last, s_last = time.time(), start
  pool = None
  everyone = cfg.pool_size == cfg.num_clients
  for s in range(start, exp.num_steps):
    epoch, b = divmod(s, cfg.steps_per_epoch)
    if everyone:               # all clients in natural order: the step updates them in place
      pool = None
    elif pool is None or b == 0:
      pool = plan.sample_pool(pool_key, epoch, cfg.num_clients, cfg.pool_size)
    state, m = simulated_step(net, cfg, exp.aug, state, images, table, data_key, aug_key, pool,
                              jnp.int32(epoch), jnp.int32(b), exp.par)
    loss = float(m["loss"])
    done = s + 1
    if not math.isfinite(loss):
      ckpt.wait_until_finished()
      raise NonFiniteLossError(
          f"non-finite loss ({loss}) at step {done} (epoch {epoch}); stopped without saving. "
          f"The last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}; lower "
          "lr/c_lr and resume or restart.")
    if done % config.log_every_steps == 0 or done == exp.num_steps:
      rate = (done - s_last) / max(time.time() - t_last, 1e-9)
      t_last, s_last = time.time(), done
      # Scalars only: per-client metrics may be sharded over other hosts' devices.
      scalars = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
      writer.write(done, {**scalars, "epoch": epoch, "steps_per_sec": rate})
      progress.update(done, force=True, loss=loss, acc=scalars.get("contrastive_acc", 0.0))
    if done % exp.eval_every == 0 or done == exp.num_steps:
      evaluate_and_save(done, state)
    elif done % config.checkpoint_every_steps == 0:
      save(done, state)
  ckpt.wait_until_finished()
  return state


def _final_report(exp, knn, ckpt, state) -> dict:
  """Test kNN of the last state and of the checkpoint selected on validation kNN."""
  last_step = exp.num_steps
  results = {"last": {"step": last_step, "val_knn_accuracy": knn(state, exp.val),
                      "test_knn_accuracy": knn(state, exp.test)}}
  best = ckpt.best_step()
  if best is not None and best != last_step:
    r = ckpt.restore(best, _saved(state))
    results["best"] = {"step": best,
                       "val_knn_accuracy": r.meta.get("metrics", {}).get("knn_accuracy"),
                       "test_knn_accuracy": knn(state.replace(**r.state), exp.test)}
  else:
    results["best"] = dict(results["last"])
  first = [r for r in metrics.read_metrics(ckpt.directory.parent) if r["step"] == 0
           and "test_knn_accuracy" in r]
  if first:
    results["init_test_knn_accuracy"] = first[0]["test_knn_accuracy"]
  return results
