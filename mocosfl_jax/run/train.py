"""The training run: resolve the config, build data and state, run jitted steps, evaluate, checkpoint.

    results = train.train_and_evaluate(config, workdir)

One simulated step is one jit call that donates the state (`simulated_step`): it draws every pool
client's batch indices (stateless per-client streams, so resume is exact), gathers the uint8
images on device, augments two views and runs `parallel.train_step_fn`. The loop never waits for
a step: metrics stay on the device and are fetched as window means at log steps (and checked for
non-finite values there and before any checkpoint is written). Rerunning in the same workdir
resumes from the latest checkpoint; the workdir is locked while a run trains in it.

Evaluation follows the reference's cadence (kNN once per epoch by default, linear and
semi-supervised probes at the end). With the default `val_fraction=0` every training image goes to
the clients, as in the reference, and nothing is selected: results.json reports the last
checkpoint and the test kNN curve. With `val_fraction > 0` a validation split is held out of the
training data and the checkpoint with the best validation kNN is selected and reported beside
the last one; the test set never selects anything (the reference selects on test;
docs/reference.md, 'Checkpoint selection').
"""
import contextlib
import dataclasses
import functools
import json
import time
from pathlib import Path

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from mocosfl_jax import config as config_lib
from mocosfl_jax import experiment as experiment_lib
from mocosfl_jax import parallel
from mocosfl_jax.algorithm import flmoco, hetero_step, plan
from mocosfl_jax.algorithm.state import TrainState
from mocosfl_jax.data import augment, partition as partition_lib, sampler
from mocosfl_jax.evaluation import protocols
from mocosfl_jax.models import build
from mocosfl_jax.privacy import attack as attack_lib
from mocosfl_jax.run import checkpoints, init_from, metrics, workdir_lock
from mocosfl_jax.run import replay as replay_run

# Fields that may change when a run is resumed (they do not change the trajectory).
RESUMABLE_CHANGES = {"log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                     "keep_checkpoints", "final_protocols", "eval_batch_size", "num_steps",
                     "data_dir", "client_parallel", "client_chunk", "distributed", "conv_impl",
                     "attack_fraction"}


_ATTACK_NAMES = {"fraction": "config.attack_fraction"}


def _final_attack_settings(config) -> attack_lib.Settings:
  """The final model-inversion attack: the reference's settings, the configured fraction."""
  return attack_lib.Settings(fraction=config.attack_fraction)


class NonFiniteLossError(FloatingPointError):
  pass


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 11, 13),
                   static_argnames=("train_clients", "keep_smashed"), donate_argnums=(3,))
def simulated_step(net, cfg: plan.StepConfig, aug: experiment_lib.AugSpec, state: TrainState,
                   images: sampler.TrainImages, table, data_key, aug_key, pool, epoch, batch_idx,
                   par=None, aux=None, aux_spec: experiment_lib.AuxSpec | None = None, *,
                   train_clients: bool = True, keep_smashed: bool = False):
  """Batch indices -> gather -> two views -> the training step, in one compiled call.

  With an auxiliary set (`aux` = (TrainImages, ClientTable), `aux_spec` static) every client's
  rows are its B training images (none when `table` is None) then B auxiliary ones, each drawn
  from its own stream at the client's draw counter and normalised with its own constants.
  `train_clients` / `keep_smashed` (static): the loss-threshold saving's status B and the
  smashed stacks it keeps (`step.train_step`).
  """
  step_key = jax.random.fold_in(aug_key, state.server.step)
  if cfg.rich_clients:
    return _hetero_step(net, cfg, aug, state, images, table, data_key, step_key, epoch,
                        batch_idx, pool)
  ids = jnp.arange(cfg.num_clients, dtype=jnp.int32) if pool is None else pool
  b = cfg.batch_size if aux_spec is None else aux_spec.batch_size
  views = []
  if table is not None:
    batch = images.batch(table, ids, state.clients.draws[ids], b, data_key)
    views.append(augment.two_views(step_key, batch, jnp.asarray(aug.mean), jnp.asarray(aug.std),
                                   aug.pipeline, crop_scale=aug.crop_scale))
  if aux is not None:
    aux_images, aux_table, a = aux[0], aux[1], aux_spec.aug
    batch = aux_images.batch(aux_table, ids, state.clients.draws[ids], b,
                             jax.random.fold_in(data_key, 1))
    views.append(augment.two_views(jax.random.fold_in(step_key, 1), batch, jnp.asarray(a.mean),
                                   jnp.asarray(a.std), a.pipeline, crop_scale=a.crop_scale))
  views_q, views_k = (jnp.concatenate(v, axis=1) for v in zip(*views))
  return parallel.train_step_fn(net, cfg, state, pool, views_q, views_k, epoch, batch_idx,
                                par=par, train_clients=train_clients, keep_smashed=keep_smashed)


def _hetero_step(net, cfg, aug, state, images, tables, data_key, step_key, epoch, batch_idx,
                 pool):
  """`simulated_step` with rich clients: each group (the pool's rich clients, then its poor
  ones; `pool` None: clients 0..R-1 and R..N-1) draws its batch size from its own table
  (`tables`, clients' own streams) and is augmented with its own key."""
  r, n = cfg.rich_clients, cfg.num_clients
  if pool is None:
    members = (jnp.arange(r, dtype=jnp.int32), jnp.arange(r, n, dtype=jnp.int32))
  else:
    members = (pool.rich, pool.poor)
  views = []
  for g, (table, ids, b) in enumerate(((tables[0], members[0], cfg.rich_batch_size),
                                       (tables[1], members[1], cfg.batch_size))):
    if ids.shape[0] == 0:      # no client of this group in the pool
      views.append((None, None))
      continue
    batch = images.batch(table, ids - table.first_id, state.clients.draws[ids], b, data_key)
    views.append(augment.two_views(jax.random.fold_in(step_key, g), batch, jnp.asarray(aug.mean),
                                   jnp.asarray(aug.std), aug.pipeline,
                                   crop_scale=aug.crop_scale))
  views_q, views_k = zip(*views)
  return hetero_step.train_step_fn(net, cfg, state, views_q, views_k, epoch, batch_idx,
                                   pool=pool)


def run_keys(seed: int):
  """(init, data, aug, pool) keys of a run with `seed`; the pool key draws every epoch's pool
  (`plan.sample_pool`), so what a run's pools hold can be counted without running it."""
  return tuple(jax.random.split(jax.random.key(seed), 4))


def hetero_tables(parts, cfg: plan.StepConfig):
  """(rich, poor) ClientTables: clients 0..R-1 at the rich batch, R..N-1 at B."""
  r = cfg.rich_clients
  return (sampler.ClientTable.from_partition(parts[:r], cfg.rich_batch_size),
          sampler.ClientTable.from_partition(parts[r:], cfg.batch_size, first_id=r))


def check_resumable(saved: dict, current: dict, workdir) -> None:
  """Refuses to resume a run whose trajectory-changing fields differ from the saved config."""
  saved = config_lib.with_defaults(ml_collections.ConfigDict(saved)).to_dict()
  changed = sorted(k for k in set(saved) | set(current)
                   if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
  if changed:
    diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
    raise ValueError(f"{workdir} holds a run with a different config ({diffs}); use a new "
                     "--workdir, or the saved config (config.json) to resume")


def _refuse_if_workdir_held(workdir: Path, primary: bool) -> None:
  """Process 0 checks the workdir lock; on several hosts every process learns the outcome (a
  refusal on process 0 alone would leave the others waiting in their first collective)."""
  refusal = None
  if primary:
    try:
      workdir_lock.refuse_if_held(workdir)
    except workdir_lock.WorkdirLockedError as e:
      refusal = e
  if jax.process_count() > 1:
    held = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
    if int(held) and refusal is None:
      refusal = workdir_lock.WorkdirLockedError(
          f"{workdir} is in use by a training run (process 0 found its lock held); wait for it "
          "to finish or stop it, or use another --workdir")
  if refusal is not None:
    raise refusal


def _saved_config(workdir: Path) -> dict | None:
  """The config of the run in `workdir` (None for a new run): from its latest checkpoint, or,
  when no step can be read (a damaged step is set aside only once the run reopens its
  checkpoints), from the run's config.json."""
  ckpt_dir = workdir / "checkpoints"
  if checkpoints.latest_step(ckpt_dir) is None:
    return None
  try:
    return checkpoints.read_meta(ckpt_dir, "latest").get("config", {})
  except checkpoints.DamagedCheckpointError:
    path = workdir / "config.json"
    if not path.exists():
      raise
    return json.loads(path.read_text()).get("config", {})


def _saved(state: TrainState) -> dict:
  """What a checkpoint holds (the optimizer follows from the config)."""
  return {"clients": state.clients, "server": state.server}


class MetricWindow:
  """Per-step scalar metrics kept on the device; `flush` fetches their means in one transfer.

  Means over the window for the loss and accuracies (the reference logs epoch means), the last
  value for learning rates, and for divergences the mean over the window's sync steps (they are
  measured at syncs only).

  The training loop appends each step's metrics without waiting for the step, so dispatch runs
  ahead of the device; the host reads values only at log steps and before checkpoints. A
  checkpoint written inside a window stores the window so far (`snapshot`), and a resume starts
  from it, so the logged means are those of an uninterrupted run.
  """

  def __init__(self, snapshot: dict | None = None):
    self._steps, self._values = [], []
    if snapshot:
      self._steps = [int(s) for s in snapshot["steps"]]
      self._values = [dict(v) for v in snapshot["values"]]

  def __len__(self):
    return len(self._steps)

  def add(self, step: int, m: dict) -> None:
    self._steps.append(step)
    # Scalars only: per-client metrics may be sharded over other hosts' devices.
    self._values.append({k: v for k, v in m.items() if np.ndim(v) == 0})

  def snapshot(self) -> dict:
    """The window so far as plain floats (JSON), fetched in one transfer.

    Raises NonFiniteLossError(step, loss) for the window's first non-finite loss.
    """
    values = [{k: float(x) for k, x in v.items()} for v in jax.device_get(self._values)]
    bad = [i for i, v in enumerate(values) if not np.isfinite(v["loss"])]
    if bad:
      raise NonFiniteLossError(self._steps[bad[0]], values[bad[0]]["loss"])
    return {"steps": list(self._steps), "values": values}

  def flush(self) -> dict:
    """Means over the window ({} if empty), which restarts; checks the losses first."""
    if not self._steps:
      return {}
    values = self.snapshot()["values"]        # float64 from here: a resumed window agrees
    self._steps, self._values = [], []
    out = {}
    synced = [v for v in values if v.get("synced", 0) > 0]
    for k in values[-1]:
      if k.endswith("_lr"):            # the schedule's value now, not a mean
        out[k] = float(values[-1][k])
      elif k.startswith("div_"):       # measured at syncs only (0 elsewhere): mean over syncs
        if synced:
          out[k] = float(np.mean([v[k] for v in synced]))
      else:
        out[k] = float(np.mean([v[k] for v in values]))
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       make_stepper=None) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir` if any) and returns the results.

  `make_stepper(exp, net)`, called once the config resolves and before anything is written (it
  may refuse the config), returns the step that replaces the simulated one (remote/steps.py's
  RemoteStepper: a federation with remote clients).

  Every config field is checked, and a resume is checked against the saved config, before
  anything is written to `workdir`.
  """
  workdir = Path(workdir).expanduser().absolute()
  # Multi-host: jax.distributed must start before anything touches the backend.
  config = config_lib.with_defaults(config)
  parallel.maybe_initialize_distributed(config.distributed or None)
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())

  # ---- Config, data, model (nothing written yet) ----
  exp = experiment_lib.resolve(config)
  config = exp.config
  net, cfg = build(exp.model), exp.step
  if make_stepper is not None and cfg.method != "mocosfl":
    raise ValueError(f"config.method={cfg.method!r}: remote clients run the split step "
                     "(method='mocosfl'); FL-MoCo, where every client trains the whole "
                     "network, has no server step and runs with python -m mocosfl_jax.main")
  if make_stepper is not None and cfg.rich_clients:
    raise ValueError(f"config.hetero={config.hetero!r}: heterogeneous clients run in the "
                     "simulated step only; remote clients are not implemented with them")
  if make_stepper is not None and config.loss_threshold > 0:
    raise ValueError(f"config.loss_threshold={config.loss_threshold!r}: the loss-threshold "
                     "saving runs in simulated training only; use loss_threshold=0 with remote "
                     "clients")
  stepper = None if make_stepper is None else make_stepper(exp, net)
  config_dict = config.to_dict()
  if "attack" in config.final_protocols.split(","):   # refused now, not after training
    attack_lib.check_data(_final_attack_settings(config), len(exp.train.images),
                          exp.model.input_size, net.smashed_shape, names=_ATTACK_NAMES)
  logging.info("plan: model %s | %s | %d steps, eval every %d", exp.model, cfg, exp.num_steps,
               exp.eval_every)
  primary = jax.process_index() == 0      # multi-host: one process writes the run files
  _refuse_if_workdir_held(workdir, primary)  # before reading checkpoints a live run may rewrite
  saved = _saved_config(workdir)
  if saved is not None:
    check_resumable(saved, config_dict, workdir)
  # A new run reads its warm start now (refusals before anything is written); a resumed one
  # continues from its own checkpoint.
  warm = init_from.load(config.init_from, exp.model) if saved is None else None

  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(workdir) if primary else contextlib.nullcontext():
    return _run(exp, net, workdir, primary, warm, stepper)


def _run(exp, net, workdir: Path, primary: bool, warm=None, stepper=None) -> dict:
  config, cfg, par = exp.config, exp.step, exp.par
  config_dict = config.to_dict()
  if primary:
    metrics.write_text_atomic(workdir / "config.json", json.dumps(
        {"config": config_dict, "model": exp.model.to_dict(), "step": dataclasses.asdict(cfg),
         "num_steps": exp.num_steps}, indent=1))
    partition_lib.write_partition_summary(
        partition_lib.partition_summary(exp.parts, exp.train.labels, exp.train.num_classes),
        workdir)

  # ---- State and training images ----
  init_key, data_key, aug_key, pool_key = run_keys(config.seed)
  # shard_map: clients (state and training images) on their leading axis over the mesh, server
  # replicated; built shard by shard, so each process holds only its own clients, and global
  # arrays from the start (orbax needs them when several processes save).
  mesh = par.mesh if par.mode == "shard_map" else None
  if cfg.method == "flmoco":     # every client holds the whole network (algorithm/flmoco.py)
    state = flmoco.create_state(net, cfg, init_key)
  else:
    state = parallel.create_train_state(net, cfg, init_key, mesh=mesh)
  images = (parallel.place_images_by_client(exp.train.images, exp.parts, mesh) if mesh
            else sampler.TrainImages.flat(exp.train.images))
  aux_images = None
  if exp.aux is not None:      # data_proportion 0: the training images are never drawn
    images = images if exp.aux.spec.with_target else None
    aux_images = (parallel.place_images_by_client(exp.aux.train.images, exp.aux.parts, mesh)
                  if mesh else sampler.TrainImages.flat(exp.aux.train.images))
  held = {k: parallel.addressable_bytes(v) for k, v in
          (("client_state", state.clients), ("server_state", state.server),
           ("train_images", images), ("aux_images", aux_images))}
  logging.info("process %d holds on its devices (bytes): %s", jax.process_index(),
               json.dumps(held))

  # ---- Resume ----
  selecting = exp.val is not None
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", keep_latest=config.keep_checkpoints,
                                  keep_best=1 if selecting else 0, best_metric="knn_accuracy")
  start, window = 0, None
  rp = (replay_run.ReplayRun(exp, net, workdir, ckpt, pool_key)
        if config.loss_threshold > 0 else None)
  if ckpt.latest_step() is not None:
    restored = ckpt.restore("latest", _saved(state))
    state = state.replace(**restored.state)
    start, window = restored.step, restored.meta.get("metric_window")
    if rp is not None:
      rp.restore(restored.meta["replay"])
    logging.info("resumed from step %d in %s", start, ckpt.directory)
  elif warm is not None:
    state = init_from.apply(state, warm, config.init_momentum)
  writer = (metrics.MetricsWriter(workdir, resume_step=start if start else None) if primary
            else metrics.MetricsWriter.null())
  meta = {"config": config_dict, "model": exp.model.to_dict(),
          "step_config": dataclasses.asdict(cfg),
          "dataset": {"name": exp.train.name, "mean": exp.aug.mean, "std": exp.aug.std,
                      "input_size": exp.train.input_size, "num_classes": exp.train.num_classes}}

  # ---- Evaluation and checkpoints ----
  monitor = protocols.knn_monitor(exp, net)   # test kNN, and validation kNN when selecting

  def save(step, state, metrics=None, window=None):
    """Writes a checkpoint; `window`: the metric window in progress, resumed from it."""
    if step not in ckpt.all_steps():
      extra = {} if rp is None else {"replay": rp.snapshot(step)}
      ckpt.save(step, _saved(state), meta={**meta, "metric_window": window, **extra},
                metrics=metrics)

  def evaluate_and_save(step, state, always_save=False, window=None):
    """kNN on every split; the checkpoint is written when selection needs it (or when due)."""
    t0 = time.time()
    record = monitor(state.clients, state.server)
    writer.write(step, {**record, "eval_seconds": time.time() - t0})
    if selecting:
      save(step, state, {"knn_accuracy": record["val_knn_accuracy"]}, window)
    elif always_save:
      save(step, state, window=window)
    return record

  if start == 0:
    evaluate_and_save(0, state, always_save=True)

  # ---- Train loop ----
  try:
    state, last_eval = _train_loop(exp, net, state, start, images, ckpt, writer,
                                   keys=(data_key, aug_key, pool_key), window=window,
                                   evaluate_and_save=evaluate_and_save, save=save,
                                   aux_images=aux_images, stepper=stepper, replay=rp)
    if last_eval is None:  # resumed at the end: the last evaluation is not in memory
      last_eval = monitor(state.clients, state.server)
    results = _final_report(exp, monitor, ckpt, state, last_eval, workdir)
    if rp is not None:
      results["replay"] = rp.report(exp.step.num_epochs)
  finally:  # let pending checkpoint writes finish even on Ctrl-C, so resume finds them
    ckpt.close()
    writer.close()
  probes_wanted = [x for x in config.final_protocols.split(",") if x in ("linear", "semi")]
  if probes_wanted:  # evaluates the reported checkpoint from disk, exactly as evaluate does
    results["probes"] = protocols.evaluate(workdir, results["reported_step"],
                                           tuple(probes_wanted))
  if "attack" in config.final_protocols.split(","):   # client 0 of the reported checkpoint
    results["attack"], grid = attack_lib.attack(workdir, results["reported_step"], 0,
                                                _final_attack_settings(config),
                                                names=_ATTACK_NAMES)
    if primary:
      attack_lib.write_outputs(workdir, results["attack"], grid)
  if not primary:
    return results
  metrics.write_text_atomic(workdir / "results.json", json.dumps(results, indent=1))
  try:
    metrics.plot_metrics(workdir)
  except Exception as e:  # plotting must never lose a finished run
    logging.warning("plotting failed: %s", e)
  return results


def _train_loop(exp, net, state, start, images, ckpt, writer, *, keys, window, evaluate_and_save,
                save, aux_images=None, stepper=None, replay=None):
  """Runs steps start..num_steps; returns (state, the last step's evaluation record or None).

  `window`: the metric window the checkpoint at `start` was written in (None: empty).
  `aux_images`: the auxiliary set's TrainImages when the run has one.
  `stepper`: when given, runs each step instead of `simulated_step`:
  stepper(state, s, epoch, b, pool, images, table, data_key, aug_key) -> (state, metrics).
  `replay`: the loss-threshold saving (run/replay.py's ReplayRun) when config.loss_threshold > 0:
  each epoch runs in its status (A, B or C) and its end is logged with the status.
  """
  data_key, aug_key, pool_key = keys
  cfg, config = exp.step, exp.config
  aux, aux_spec = None, None
  if cfg.rich_clients:
    table = hetero_tables(exp.parts, cfg)
  elif exp.aux is None:
    table = sampler.ClientTable.from_partition(exp.parts, cfg.batch_size)
  else:                        # B images of each set per client and step
    aux_spec = exp.aux.spec
    table = (sampler.ClientTable.from_partition(exp.parts, aux_spec.batch_size)
             if aux_spec.with_target else None)
    aux = (aux_images, sampler.ClientTable.from_partition(exp.aux.parts, aux_spec.batch_size))
  progress = metrics.Progress(exp.num_steps, every=config.log_every_steps)
  window = MetricWindow(window)
  logging.info("Initial compilation, this might take a few minutes...")
  if stepper is not None:
    stepper.start(state)
  t_last, s_last = time.time(), start
  pool = None
  last_eval = None
  everyone = cfg.pool_size == cfg.num_clients
  rich_counts = set()

  def flush_window(done, keep=False):
    try:
      return window.snapshot() if keep else window.flush()
    except NonFiniteLossError as e:
      bad_step, loss = e.args
      ckpt.wait_until_finished()
      raise NonFiniteLossError(
          f"non-finite loss ({loss}) at step {bad_step + 1} (epoch "
          f"{bad_step // cfg.steps_per_epoch}); stopped at step "
          f"{done} without saving. The last good checkpoint is step {ckpt.latest_step()} in "
          f"{ckpt.directory}; lower lr/c_lr and resume or restart.") from None

  for s in range(start, exp.num_steps):
    epoch, b = divmod(s, cfg.steps_per_epoch)
    if everyone:               # all clients in natural order: the step updates them in place
      pool = None
    elif pool is None or b == 0:
      pool = plan.sample_pool(pool_key, epoch, cfg.num_clients, cfg.pool_size)
      if cfg.rich_clients:     # its rich count is a shape: one compiled step per count
        pool = hetero_step.split_pool(pool, cfg)
        if pool.rich.shape[0] not in rich_counts:
          rich_counts.add(pool.rich.shape[0])
          logging.info("epoch %d: %d rich clients in the pool of %d, a count not seen before "
                       "in this process: the step compiles for it", epoch, pool.rich.shape[0],
                       cfg.pool_size)
    status = "A" if replay is None else replay.begin_step(epoch, b)
    if stepper is None and cfg.method == "flmoco":
      state, m = flmoco.simulated_step(net, cfg, exp.aug, state, images, table, data_key,
                                       aug_key, pool, jnp.int32(epoch), jnp.int32(b),
                                       jnp.int32(s))
    elif status == "C":          # the server alone, on the last A/B epoch's smashed data
      state, m = replay.replay(state, epoch, b)
    elif replay is not None:   # A or B, keeping the smashed stacks
      state, m = simulated_step(net, cfg, exp.aug, state, images, table, data_key, aug_key, pool,
                                jnp.int32(epoch), jnp.int32(b), exp.par, aux, aux_spec,
                                train_clients=status == "A", keep_smashed=True)
      replay.store(b, m.pop("smashed_q"), m.pop("smashed_k"))
    elif stepper is None:
      state, m = simulated_step(net, cfg, exp.aug, state, images, table, data_key, aug_key, pool,
                                jnp.int32(epoch), jnp.int32(b), exp.par, aux, aux_spec)
    else:
      state, m = stepper(state, s, epoch, b, pool, images, table, data_key, aug_key)
    window.add(s, m)
    done = s + 1
    if replay is not None:
      replay.add_loss(m["loss"])
      if b == cfg.steps_per_epoch - 1:
        writer.write(done, replay.end_epoch(epoch))
    last = done == exp.num_steps
    evaluating = done % exp.eval_every == 0 or last
    saving = evaluating or done % config.checkpoint_every_steps == 0
    in_window = None
    if saving and not (done % config.log_every_steps == 0 or last):
      in_window = flush_window(done, keep=True)   # checked: never checkpoint a non-finite state
    elif done % config.log_every_steps == 0 or last:
      means = flush_window(done)
      rate = (done - s_last) / max(time.time() - t_last, 1e-9)
      t_last, s_last = time.time(), done
      writer.write(done, {**means, "epoch": epoch, "steps_per_sec": rate})
      progress.update(done, force=True, loss=means["loss"],
                      acc=means.get("contrastive_acc", 0.0))
    if evaluating:
      record = evaluate_and_save(done, state, always_save=last
                                 or done % config.checkpoint_every_steps == 0, window=in_window)
      last_eval = record if last else None
    elif saving:
      save(done, state, window=in_window)
  ckpt.wait_until_finished()
  return state, last_eval


def _final_report(exp, monitor, ckpt, state, last_eval: dict, workdir: Path) -> dict:
  """results.json: the last checkpoint, the validation-selected one if any, and the test curve."""
  last_step = exp.num_steps
  results = {"last": {"step": last_step, **last_eval}}
  if exp.val is not None:
    results["selection"] = (f"best validation kNN (val_fraction={exp.config.val_fraction} of the "
                            "training split held out)")
    if ckpt.best_step() != last_step:
      r = ckpt.restore("best", _saved(state))   # past a damaged step to the next best, if any
      test = monitor(r.state["clients"], r.state["server"], ("test",))["test_knn_accuracy"]
      results["best"] = {"step": r.step,
                         "val_knn_accuracy": r.meta.get("metrics", {}).get("knn_accuracy"),
                         "test_knn_accuracy": test}
    else:
      results["best"] = dict(results["last"])
    results["reported_step"] = results["best"]["step"]
  else:
    results["selection"] = ("none: val_fraction=0 (every training image trains, as the "
                            "reference); the last checkpoint is reported")
    results["reported_step"] = last_step
  curve = [r for r in metrics.read_metrics(workdir) if "test_knn_accuracy" in r]
  if curve:
    top = max(curve, key=lambda r: r["test_knn_accuracy"])
    results["init_test_knn_accuracy"] = next(
        (r["test_knn_accuracy"] for r in curve if r["step"] == 0), None)
    # The reference's reported kNN figure: it selects on the test set, so this is optimistic.
    results["max_test_knn_accuracy"] = {"step": top["step"], "value": top["test_knn_accuracy"]}
  return results
