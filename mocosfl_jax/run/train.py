"""The training loop: resolve the config, build data and state, run jitted steps, evaluate, checkpoint.

One simulated step is one jit call that donates the state: it draws every pool client's batch
indices (stateless per-client streams, so resume is exact), gathers the uint8 images on device,
augments two views and runs `step.train_step_fn`. Checkpoint selection uses kNN accuracy on a
validation split held out of the training data, never the test set (the reference selects on
test, spec §10.13); test numbers are reported for both the last and the selected checkpoint.
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

from mocosfl_jax.run import checkpoints, metrics
from mocosfl_jax.evaluation import knn
from mocosfl_jax import parallel
from mocosfl_jax.algorithm import plan
from mocosfl_jax.algorithm import state as state_lib, step as step_lib
from mocosfl_jax.data import augment, partition as partition_lib, sampler, sources
from mocosfl_jax.models import SplitConfig, build, num_layers

# Fields that may change when a run is resumed (they do not change the trajectory).
RESUMABLE_CHANGES = {"log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                     "keep_checkpoints", "final_protocols", "eval_batch_size", "num_steps",
                     "data_dir", "client_parallel", "client_chunk", "distributed", "conv_impl"}


class NonFiniteLossError(FloatingPointError):
  pass


@dataclasses.dataclass(frozen=True)
class AugSpec:
  """Static augmentation settings (hashable so the jitted step can close over them)."""
  pipeline: str
  mean: tuple
  std: tuple
  crop_scale: tuple = (0.08, 1.0)


@dataclasses.dataclass
class Plan:
  """Everything derived from the config before any compilation."""
  model: SplitConfig
  step: plan.StepConfig
  aug: AugSpec
  num_steps: int
  eval_every: int
  train: sources.ArrayDataset
  val: sources.ArrayDataset
  test: sources.ArrayDataset
  parts: list


def _need(cond, field, value, msg):
  if not cond:
    raise ValueError(f"config.{field}={value!r}: {msg}")


def check_config(c: ml_collections.ConfigDict) -> None:
  """Rejects invalid values with the field's name, before data loading or compilation."""
  _need(c.dataset in sources.DATASETS, "dataset", c.dataset, f"unknown; valid: {sources.DATASETS}")
  from mocosfl_jax.models import ARCHS
  _need(c.arch in ARCHS, "arch", c.arch, f"unknown; valid: {list(ARCHS)}")
  n = num_layers(c.arch)
  _need(isinstance(c.cut, int) and 1 <= c.cut <= n, "cut", c.cut,
        f"{c.arch} has cuts 1..{n} (cut {n} puts the whole backbone on the client)")
  _need(0.0 < c.sample_ratio <= 1.0, "sample_ratio", c.sample_ratio, "must be in (0, 1]")
  _need(c.num_clients >= 1, "num_clients", c.num_clients, "must be >= 1")
  _need(c.batch_size >= 1, "batch_size", c.batch_size, "must be >= 1")
  _need(0.0 <= c.val_fraction < 1.0, "val_fraction", c.val_fraction, "must be in [0, 1)")
  _need(c.augmentation in ("mocov2", "mocov1", "none"), "augmentation", c.augmentation,
        "valid: mocov2, mocov1, none")
  _need(0.0 < c.crop_min_scale <= 1.0, "crop_min_scale", c.crop_min_scale, "must be in (0, 1]")
  _need(c.flavour in plan.FLAVOURS, "flavour", c.flavour, f"valid: {plan.FLAVOURS}")
  from mocosfl_jax.models.conv import CONV_IMPLS
  conv = c.get("conv_impl", "auto")
  _need(conv in CONV_IMPLS, "conv_impl", conv, f"unknown; valid: {list(CONV_IMPLS)}")
  mode, chunk = c.get("client_parallel", "vmap"), c.get("client_chunk", 0)
  _need(mode in parallel.MODES, "client_parallel", mode, f"valid: {list(parallel.MODES)}")
  _need(isinstance(chunk, int) and chunk >= 0, "client_chunk", chunk,
        "must be an int >= 0 (0 = all clients at once)")
  for p in filter(None, c.final_protocols.split(",")):
    _need(p in ("knn", "linear", "semi"), "final_protocols", c.final_protocols,
          "comma list of knn, linear, semi")


def resolve(c: ml_collections.ConfigDict) -> Plan:
  """Validates the config, loads and partitions the data, derives S, E, P and the step config."""
  check_config(c)
  num_epochs, batch_size, avg_freq = c.num_epochs, c.batch_size, c.avg_freq
  sample_ratio, queue_size = c.sample_ratio, c.queue_size
  if c.auto_adjust:
    adj = plan.auto_adjust(c.num_clients, c.flavour, batch_size=c.batch_size,
                           num_epochs=c.num_epochs, queue_size=c.queue_size,
                           feature_sharing=c.feature_sharing)
    batch_size, avg_freq, sample_ratio = adj["batch_size"], adj["avg_freq"], adj["sample_ratio"]
    num_epochs, queue_size = adj["num_epochs"], adj["queue_size"]
  elif sample_ratio < 1.0:
    num_epochs = plan.sampling_epochs(num_epochs, sample_ratio)  # reference: E x int(1/r)

  image_size = None if c.image_size == -1 else c.image_size
  data_dir = c.data_dir or None
  full_train = sources.load(c.dataset, "train", data_dir=data_dir, image_size=image_size)
  test = sources.load(c.dataset, "test", data_dir=data_dir, image_size=image_size)
  if c.val_fraction > 0:
    train, val = sources.holdout(full_train, c.val_fraction, c.seed)
  else:
    train, val = full_train, test
  labelled = train.labels >= 0
  _need(labelled.all() or c.partition == "iid", "partition", c.partition,
        "unlabelled training data (stl10) can only be split 'iid'")
  parts = partition_lib.partition(
      train.labels, c.num_clients, method=c.partition, noniid_ratio=c.noniid_ratio,
      alpha=c.dirichlet_alpha, data_proportion=c.data_proportion, seed=c.seed,
      num_classes=train.num_classes)
  smallest = min(len(p) for p in parts)
  _need(smallest >= batch_size, "batch_size", batch_size,
        f"the smallest client holds {smallest} samples; lower batch_size or num_clients")
  steps_per_epoch = math.ceil(len(parts[0]) / batch_size)  # reference: len(client 0's loader)

  model = SplitConfig(arch=c.arch, cut=c.cut, input_size=train.input_size,
                      bottleneck=c.bottleneck, head=c.head, ws=c.ws, c_residual=c.c_residual,
                      width=c.width, conv_impl=c.get("conv_impl", "auto"))
  try:
    step_cfg = plan.StepConfig(
        num_clients=c.num_clients, batch_size=batch_size, queue_size=queue_size,
        temperature=c.temperature, loss_form=c.loss_form, momentum_sync=c.momentum_sync,
        tau=c.tau, lr=c.lr, c_lr=None if c.c_lr < 0 else c.c_lr, momentum=c.momentum,
        weight_decay=c.weight_decay, lr_schedule=c.lr_schedule,
        client_schedule=c.client_schedule, num_epochs=num_epochs,
        steps_per_epoch=steps_per_epoch, avg_freq=min(avg_freq, steps_per_epoch),
        feature_sharing=c.feature_sharing, sample_ratio=sample_ratio)
  except ValueError as e:
    raise ValueError(f"config: {e}") from None
  num_steps = c.num_steps if c.num_steps > 0 else num_epochs * steps_per_epoch
  eval_every = c.eval_every_steps if c.eval_every_steps > 0 else steps_per_epoch
  aug = AugSpec(c.augmentation, tuple(map(float, train.mean)), tuple(map(float, train.std)),
                (float(c.crop_min_scale), 1.0))
  return Plan(model, step_cfg, aug, num_steps, eval_every, train, val, test, parts)


# ---- jitted functions -----------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 1, 2, 12), donate_argnums=(3, 4))
def simulated_step(net, cfg: plan.StepConfig, aug: AugSpec, clients, server,
                   images: sampler.TrainImages, table, data_key, aug_key, pool, epoch, batch_idx,
                   par=None):
  """Batch indices -> gather -> two views -> the training step, in one compiled call."""
  ids = jnp.arange(cfg.num_clients, dtype=jnp.int32) if pool is None else pool
  batch = images.batch(table, ids, clients.draws[ids], cfg.batch_size, data_key)
  views_q, views_k = augment.two_views(jax.random.fold_in(aug_key, server.step), batch,
                                       jnp.asarray(aug.mean), jnp.asarray(aug.std), aug.pipeline,
                                       crop_scale=aug.crop_scale)
  return step_lib.train_step_fn(net, cfg, clients, server, pool, views_q, views_k, epoch,
                                batch_idx, par=par)


def _normalise(images, mean, std):
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def embed_fn(net, mean, std):
  """Jitted L2-normalised projection of client 0's online net + server online (the kNN feature)."""

  @jax.jit
  def fn(client_vars, server_vars, images):
    smashed, _ = net.apply_client(client_vars, _normalise(images, mean, std))
    proj, _ = net.apply_server(server_vars, smashed)
    return knn.l2_normalize(proj)

  return fn


def features_fn(net, mean, std):
  """Jitted pooled backbone features (no head) for linear and semi-supervised probes."""

  @jax.jit
  def fn(client_vars, server_vars, images):
    smashed, _ = net.apply_client(client_vars, _normalise(images, mean, std))
    return net.server_features(server_vars, smashed)

  return fn


def client0(clients):
  return jax.tree.map(lambda a: a[0], clients.online)


def knn_eval(fn, clients, server, bank: sources.ArrayDataset, query: sources.ArrayDataset,
             c: ml_collections.ConfigDict) -> float:
  args = (client0(clients), server.online)
  bank_f = knn.extract_features(fn, bank.images, c.eval_batch_size, args=args)
  query_f = knn.extract_features(fn, query.images, c.eval_batch_size, args=args)
  keep = bank.labels >= 0
  return knn.knn_accuracy(bank_f[keep], bank.labels[keep], query_f, query.labels,
                          bank.num_classes, k=min(c.knn_k, int(keep.sum())), t=c.knn_t)


# ---- the loop -------------------------------------------------------------------------------

def _check_resumable(saved: dict, current: dict, workdir) -> None:
  changed = sorted(k for k in set(saved) | set(current)
                   if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
  if changed:
    diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
    raise ValueError(f"{workdir} holds a run with a different config ({diffs}); use a new "
                     "--workdir, or the saved config to resume")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir` if any) and returns the results."""
  workdir = Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  parallel.maybe_initialize_distributed(config.get("distributed", None) or None)  # before JAX
  p = resolve(config)
  net = build(p.model)
  cfg = p.step
  config_dict = config.to_dict()
  logging.info("plan: model %s | %s | %d steps, eval every %d", p.model, cfg, p.num_steps,
               p.eval_every)
  primary = jax.process_index() == 0      # multi-host: one process writes the run files
  if primary:
    (workdir / "config.json").write_text(json.dumps(
        {"config": config_dict, "model": p.model.to_dict(), "step": dataclasses.asdict(cfg),
         "num_steps": p.num_steps}, indent=1))
    partition_lib.write_partition_summary(
        partition_lib.partition_summary(p.parts, p.train.labels, p.train.num_classes), workdir)

  root = jax.random.key(config.seed)
  init_key, data_key, aug_key, pool_key = jax.random.split(root, 4)
  par = parallel.from_config(config.get("client_parallel", "vmap"), config.get("client_chunk", 0))
  # shard_map: clients (state and training images) on their leading axis over the mesh, server
  # replicated; built shard by shard, so each process holds only its own clients, and global
  # arrays from the start (orbax needs them when several processes save).
  sharded = par.mode == "shard_map"
  clients, server = state_lib.init_state(net, cfg, init_key, mesh=par.mesh if sharded else None)
  images = (sampler.TrainImages.sharded_by_client(p.train.images, p.parts, par.mesh) if sharded
            else sampler.TrainImages.flat(p.train.images))
  held = {k: parallel.addressable_bytes(v) for k, v in
          (("client_state", clients), ("server_state", server), ("train_images", images))}
  logging.info("process %d holds on its devices (bytes): %s", jax.process_index(),
               json.dumps(held))
  ckpt_dir = workdir / "checkpoints"
  ckpt = checkpoints.Checkpointer(ckpt_dir, keep_latest=config.keep_checkpoints, keep_best=1,
                                  best_metric="knn_accuracy")
  start = 0
  if ckpt.latest_step() is not None:
    restored = ckpt.restore("latest", {"clients": clients, "server": server})
    _check_resumable(restored.meta.get("config", {}), config_dict, workdir)
    clients, server = restored.state["clients"], restored.state["server"]
    start = restored.step
    logging.info("resumed from step %d in %s", start, ckpt_dir)
  writer = (metrics.MetricsWriter(workdir, resume_step=start if start else None) if primary
            else metrics.MetricsWriter.null())
  meta = {"config": config_dict, "model": p.model.to_dict(), "step_config": dataclasses.asdict(cfg),
          "dataset": {"name": p.train.name, "mean": p.aug.mean, "std": p.aug.std,
                      "input_size": p.train.input_size, "num_classes": p.train.num_classes}}

  table = sampler.ClientTable.from_partition(p.parts, cfg.batch_size)
  embed = embed_fn(net, jnp.asarray(p.aug.mean), jnp.asarray(p.aug.std))

  def save(step, clients, server, metrics=None):
    if step not in ckpt.all_steps():
      ckpt.save(step, {"clients": clients, "server": server}, meta=meta, metrics=metrics)

  def evaluate_and_save(step, clients, server, extra=None):
    t0 = time.time()
    acc = knn_eval(embed, clients, server, p.train, p.val, config)
    writer.write(step, {"knn_accuracy": acc, "eval_seconds": time.time() - t0, **(extra or {})})
    save(step, clients, server, {"knn_accuracy": acc})
    return acc

  if start == 0:
    test0 = knn_eval(embed, clients, server, p.train, p.test, config)
    evaluate_and_save(0, clients, server, {"test_knn_accuracy": test0})

  try:
    results = _train_loop(config, p, net, cfg, ckpt, writer, clients, server, start, images,
                          table, par, keys=(data_key, aug_key, pool_key),
                          evaluate_and_save=evaluate_and_save, save=save, embed=embed)
  finally:  # let pending checkpoint writes finish even on Ctrl-C, so resume finds them
    ckpt.close()
    writer.close()
  probes_wanted = [x for x in config.final_protocols.split(",") if x in ("linear", "semi")]
  if probes_wanted:  # evaluates the selected checkpoint from disk, exactly as evaluate.py does
    from mocosfl_jax import evaluate
    results["probes"] = evaluate.evaluate(workdir, "best", tuple(probes_wanted))
  if not primary:
    return results
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  try:
    metrics.plot_metrics(workdir)
  except Exception as e:  # plotting must never lose a finished run
    logging.warning("plotting failed: %s", e)
  return results


def _train_loop(config, p, net, cfg, ckpt, writer, clients, server, start, images, table, par,
                *, keys, evaluate_and_save, save, embed):
  data_key, aug_key, pool_key = keys
  ckpt_dir = ckpt.directory
  progress = metrics.Progress(p.num_steps, every=config.log_every_steps)
  logging.info("Initial compilation, this might take a few minutes...")
  t_last, s_last = time.time(), start
  pool = None
  everyone = cfg.pool_size == cfg.num_clients
  for s in range(start, p.num_steps):
    epoch, b = divmod(s, cfg.steps_per_epoch)
    if everyone:               # all clients in natural order: the step updates them in place
      pool = None
    elif pool is None or b == 0:
      pool = plan.sample_pool(pool_key, epoch, cfg.num_clients, cfg.pool_size)
    clients, server, m = simulated_step(net, cfg, p.aug, clients, server, images, table,
                                        data_key, aug_key, pool, jnp.int32(epoch), jnp.int32(b),
                                        par)
    loss = float(m["loss"])
    done = s + 1
    if not math.isfinite(loss):
      ckpt.wait_until_finished()
      last = ckpt.latest_step()
      raise NonFiniteLossError(
          f"non-finite loss ({loss}) at step {done} (epoch {epoch}); stopped without saving. "
          f"The last good checkpoint is step {last} in {ckpt_dir}; lower lr/c_lr and resume or "
          "restart.")
    if done % config.log_every_steps == 0 or done == p.num_steps:
      rate = (done - s_last) / max(time.time() - t_last, 1e-9)
      t_last, s_last = time.time(), done
      # Scalars only: per-client metrics may be sharded over other hosts' devices.
      scalars = {k: float(v) for k, v in m.items() if np.ndim(v) == 0}
      writer.write(done, {**scalars, "epoch": epoch, "steps_per_sec": rate})
      progress.update(done, force=True, loss=loss, acc=scalars.get("contrastive_acc", 0.0))
    if done % p.eval_every == 0 or done == p.num_steps:
      evaluate_and_save(done, clients, server)
    elif done % config.checkpoint_every_steps == 0:
      save(done, clients, server)

  ckpt.wait_until_finished()
  return final_report(config, p, net, embed, ckpt, clients, server, p.num_steps)

def final_report(config, p: Plan, net, embed, ckpt, clients, server, last_step: int) -> dict:
  """Test kNN of the last state and of the checkpoint selected on validation kNN."""
  results = {"last": {"step": last_step,
                      "val_knn_accuracy": knn_eval(embed, clients, server, p.train, p.val, config),
                      "test_knn_accuracy": knn_eval(embed, clients, server, p.train, p.test,
                                                    config)}}
  best = ckpt.best_step()
  if best is not None and best != last_step:
    r = ckpt.restore(best, {"clients": clients, "server": server})
    bc, bs = r.state["clients"], r.state["server"]
    results["best"] = {"step": best,
                       "val_knn_accuracy": r.meta.get("metrics", {}).get("knn_accuracy"),
                       "test_knn_accuracy": knn_eval(embed, bc, bs, p.train, p.test, config)}
  else:
    results["best"] = dict(results["last"])
  first = [r for r in metrics.read_metrics(ckpt.directory.parent) if r["step"] == 0
           and "test_knn_accuracy" in r]
  if first:
    results["init_test_knn_accuracy"] = first[0]["test_knn_accuracy"]
  return results
