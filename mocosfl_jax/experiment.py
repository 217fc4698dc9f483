"""What a run config resolves to: data, partition, model, step config and client mapping.

    exp = experiment.resolve(config)      # checks every field, loads and partitions the data
    net = models.build(exp.model)

This is the one place where a config (configs/*.py, mocosfl_jax/config.py's fields) is checked
and turned into the static objects the library runs on. Fields that belong to one of those
objects are checked by it, once (`SplitConfig` by models.validate, `StepConfig` by its own
validate, `ClientParallel` by its constructor); the rest are checked here. Errors are
ValueErrors that name the field, its value and what is allowed.
"""
import dataclasses
import functools
import math
from typing import Optional

import ml_collections

from mocosfl_jax import config as config_lib
from mocosfl_jax.algorithm import hetero as hetero_lib
from mocosfl_jax.algorithm import plan
from mocosfl_jax.algorithm import ressfl
from mocosfl_jax.algorithm.mapping import ClientParallel
from mocosfl_jax.data import partition as partition_lib
from mocosfl_jax.data import sources
from mocosfl_jax.models import SplitConfig, build, num_layers, validate as validate_model
from mocosfl_jax.privacy import decoder as decoder_lib

AUGMENTATIONS = ("mocov2", "mocov1", "none")
# What the reference's `moco_version` sets (get_sfl_args): head (and with it K_dim), loss form
# (symmetric or not), schedule (cos) and augmentation. Each field lists the values that agree
# with the version; the first is what the preset sets. V2-style versions are symmetric, so
# MonAcoSFL's two-view form agrees with them too.
_SYMMETRIC = ("original", "two_view")
MOCO_VERSIONS = {
    "V1": dict(head=("V1",), loss_form=("single",), lr_schedule=("multistep",),
               augmentation=("mocov1",)),
    **{v: dict(head=(v,), loss_form=_SYMMETRIC, lr_schedule=("cosine",),
               augmentation=("mocov2",)) for v in ("smallV2", "V2", "largeV2")},
}
INIT_MOMENTUM = ("copy", "random")
FINAL_PROTOCOLS = ("knn", "linear", "semi", "attack")


@dataclasses.dataclass(frozen=True)
class AugSpec:
  """Static augmentation settings (hashable so the jitted step can close over them)."""
  pipeline: str
  mean: tuple
  std: tuple
  crop_scale: tuple = (0.08, 1.0)


@dataclasses.dataclass(frozen=True)
class AuxSpec:
  """Static shape of a step's rows with an auxiliary set: per client, `batch_size` target images
  (when `with_target`: data_proportion > 0) then `batch_size` auxiliary ones, each set
  normalised with its own constants (`aug` is the auxiliary set's)."""
  aug: AugSpec
  batch_size: int
  with_target: bool


@dataclasses.dataclass
class AuxData:
  """The auxiliary training set (config.aux_dataset) split IID over the clients."""
  spec: AuxSpec
  train: sources.ArrayDataset
  parts: list


@dataclasses.dataclass
class Experiment:
  """Everything derived from a config before any compilation."""
  config: ml_collections.ConfigDict      # every field present (defaults filled in)
  model: SplitConfig
  step: plan.StepConfig
  par: ClientParallel
  aug: AugSpec
  num_steps: int
  eval_every: int
  train: sources.ArrayDataset
  val: Optional[sources.ArrayDataset]   # None when val_fraction == 0 (nothing is selected)
  test: sources.ArrayDataset
  parts: list
  aux: Optional[AuxData] = None          # config.aux_dataset (None without one)


def _need(cond, field, value, msg):
  if not cond:
    raise ValueError(f"config.{field}={value!r}: {msg}")


def apply_moco_version(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with config.moco_version's preset applied ("" leaves it as it is).

  A field the preset sets is taken as unset while it holds its default (get_config's) and then
  takes the preset's value; set to anything else it must agree with the version (e.g. V2 with
  loss_form='two_view', MonAcoSFL's symmetric form), else the config is refused naming both.
  """
  version = c.moco_version
  if version == "":
    return c
  _need(version in MOCO_VERSIONS, "moco_version", version,
        f"valid: '' (none), {', '.join(MOCO_VERSIONS)}")
  defaults = config_lib.get_config()
  out = ml_collections.ConfigDict(c.to_dict())
  for field, allowed in MOCO_VERSIONS[version].items():
    if c[field] in allowed:
      continue
    _need(c[field] == defaults[field], field, c[field],
          f"moco_version={version!r} sets {field} to {allowed[0]!r} (agrees: "
          f"{', '.join(map(repr, allowed))}); drop {field} or moco_version")
    out[field] = allowed[0]
  return out


def check_fields(c: ml_collections.ConfigDict, *, strict: bool = True) -> None:
  """Checks the fields that no library object owns (see the module docstring).

  Besides values out of range, `strict` refuses settings that would be silently ignored
  (`check_nothing_ignored`): a user who sets them expects an effect. A config read back from a
  finished run is resolved with strict=False, so runs written before a check existed still load.
  """
  _need(c.dataset not in sources.AUX_ONLY_DATASETS, "dataset", c.dataset,
        "is unlabelled and has no test split; use it as config.aux_dataset")
  _need(c.dataset in sources.DATASETS, "dataset", c.dataset, f"unknown; valid: {sources.DATASETS}")
  n = _as_config_error(num_layers, c.arch)
  _need(c.cut <= n, "cut", c.cut,
        f"{c.arch} has cuts 1..{n} (cut {n} puts the whole backbone on the client)")
  _need(c.num_clients >= 1, "num_clients", c.num_clients, "must be >= 1")
  _need(c.batch_size >= 1, "batch_size", c.batch_size, "must be >= 1")
  _need(0.0 <= c.val_fraction < 1.0, "val_fraction", c.val_fraction, "must be in [0, 1)")
  _need(c.partition in partition_lib.METHODS, "partition", c.partition,
        f"valid: {', '.join(partition_lib.METHODS)}")
  _need(0.0 < c.noniid_ratio <= 1.0, "noniid_ratio", c.noniid_ratio, "must be in (0, 1]")
  _need(c.dirichlet_alpha > 0, "dirichlet_alpha", c.dirichlet_alpha, "must be > 0")
  _need(c.aux_dataset in ("",) + sources.DATASETS + sources.AUX_ONLY_DATASETS, "aux_dataset",
        c.aux_dataset, f"unknown; valid: '' (none), "
        f"{', '.join(sources.DATASETS + sources.AUX_ONLY_DATASETS)}")
  _need(c.aux_dataset != c.dataset, "aux_dataset", c.aux_dataset,
        "is the training dataset itself; use another set or '' (data_proportion sets how much "
        "of the training set is used)")
  if c.aux_dataset:
    _need(0.0 <= c.data_proportion <= 1.0, "data_proportion", c.data_proportion,
          "must be in [0, 1] (0: auxiliary images only)")
  else:
    _need(0.0 < c.data_proportion <= 1.0, "data_proportion", c.data_proportion,
          "must be in (0, 1]; 0 (no training images) needs an aux_dataset")
  _need(c.augmentation in AUGMENTATIONS, "augmentation", c.augmentation,
        f"valid: {', '.join(AUGMENTATIONS)}")
  _need(0.0 < c.crop_min_scale <= 1.0, "crop_min_scale", c.crop_min_scale, "must be in (0, 1]")
  _need(c.flavour in plan.FLAVOURS, "flavour", c.flavour, f"valid: {plan.FLAVOURS}")
  for p in filter(None, c.final_protocols.split(",")):
    _need(p in FINAL_PROTOCOLS, "final_protocols", c.final_protocols,
          f"comma list of {', '.join(FINAL_PROTOCOLS)}")
  _need(0.0 < c.attack_fraction <= 1.0, "attack_fraction", c.attack_fraction, "must be in (0, 1]")
  _need(c.num_steps == -1 or c.num_steps >= 1, "num_steps", c.num_steps,
        "must be >= 1, or -1 for num_epochs x steps_per_epoch")
  _need(c.eval_every_steps == -1 or c.eval_every_steps >= 1, "eval_every_steps",
        c.eval_every_steps, "must be >= 1, or -1 for once per epoch")
  _need(c.image_size == -1 or c.image_size >= 1, "image_size", c.image_size,
        "must be >= 1, or -1 for the dataset's own size")
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "knn_k",
                "eval_batch_size"):
    _need(isinstance(c[field], int) and c[field] >= 1, field, c[field], "must be an int >= 1")
  _need(c.knn_t > 0, "knn_t", c.knn_t, "must be > 0")
  _need(c.ressfl_alpha >= 0, "ressfl_alpha", c.ressfl_alpha, "must be >= 0")
  _need(0.0 <= c.ressfl_target_ssim < 1.0, "ressfl_target_ssim", c.ressfl_target_ssim,
        "must be in [0, 1) (0: the penalty always applies)")
  _as_config_error(_attacker_decoder, c.attacker_decoder)
  _need(c.loss_threshold >= 0, "loss_threshold", c.loss_threshold, "must be >= 0 (0: off)")
  for field in ("replay_warmup_epochs", "replay_device_bytes"):
    _need(isinstance(c[field], int) and c[field] >= 0, field, c[field], "must be an int >= 0")
  if c.loss_threshold > 0:
    _need(not c.ressfl, "loss_threshold", c.loss_threshold,
          "the saving's status B skips the client training that TAResSFL's regulariser needs; "
          "use loss_threshold=0 with ressfl=True")
    _need(c.client_parallel == "vmap" and not c.distributed, "loss_threshold", c.loss_threshold,
          f"the replayed smashed data are kept by one process on one device; use "
          f"client_parallel='vmap' and distributed=False (got {c.client_parallel!r}, "
          f"{c.distributed!r}) or loss_threshold=0")
    _need(c.method == "mocosfl", "loss_threshold", c.loss_threshold,
          f"with method={c.method!r} no smashed data are sent, so there is nothing to save or "
          "replay; use loss_threshold=0 or method='mocosfl'")
    _need(c.divergence_aware == "off", "loss_threshold", c.loss_threshold,
          f"status B keeps the clients' models as they are, which divergence_aware="
          f"{c.divergence_aware!r} would mix; use loss_threshold=0 or divergence_aware='off'")
    _need(not c.hetero, "loss_threshold", c.loss_threshold,
          f"the stored smashed stacks hold one batch size per client, and hetero={c.hetero!r} "
          "gives rich clients wider rows; use loss_threshold=0 or hetero=''")
  config_lib.parse_init_from(c.init_from)   # the form only; run/init_from.py reads the run
  _need(c.init_momentum in INIT_MOMENTUM, "init_momentum", c.init_momentum,
        f"valid: {', '.join(INIT_MOMENTUM)}")
  _need(c.method in plan.METHODS, "method", c.method, f"valid: {', '.join(plan.METHODS)}")
  _need(isinstance(c.local_epochs, int) and c.local_epochs >= 1, "local_epochs", c.local_epochs,
        "must be an int >= 1")
  if c.method == "flmoco":
    check_flmoco(c)
  if _as_config_error(hetero_lib.resolve, c.hetero, c.num_clients) is not None:
    _check_hetero(c)
  if strict:
    check_nothing_ignored(c)


def check_flmoco(c: ml_collections.ConfigDict) -> None:
  """Refuses what FL-MoCo (every client trains the whole network) cannot mean, naming the fix.

  The step's own settings (loss form, momentum sync, per-client queues, TAResSFL) are checked
  by plan.StepConfig.
  """
  why = "with method='flmoco' (every client trains the whole network; nothing is split)"
  _need(c.bottleneck == "None", "bottleneck", c.bottleneck,
        f"{why} there is no smashed data to compress; use bottleneck='None'")
  _need(c.client_parallel == "vmap" and c.client_chunk == 0, "client_parallel",
        f"{c.client_parallel}, client_chunk={c.client_chunk}",
        f"{why} the clients run vmapped on one device; use client_parallel='vmap', "
        "client_chunk=0")
  _need(not c.aux_dataset, "aux_dataset", c.aux_dataset,
        f"{why} the auxiliary set belongs to TAResSFL's expert; use aux_dataset=''")
  _need(not c.init_from, "init_from", c.init_from,
        f"{why} a warm start from a split run's checkpoint is not supported; use init_from=''")
  _need("attack" not in c.final_protocols.split(","), "final_protocols", c.final_protocols,
        f"{why} no smashed data leaves a client, so there is nothing for the model-inversion "
        "attack to invert; drop 'attack'")
  _need(not c.auto_adjust, "auto_adjust", c.auto_adjust,
        f"{why} MocoSFL's auto_adjust rules do not apply (the reference's FL-MoCo has none); "
        "set batch_size and avg_freq explicitly and drop auto_adjust")
  _need(c.client_queues == "clean", "client_queues", c.client_queues,
        f"{why} every client already has its own queue of queue_size keys; the per-client "
        "queue switch does not apply: drop client_queues")
  _need(not c.distributed, "distributed", c.distributed,
        f"{why} the clients run on one device in one process; use distributed=False")


def check_nothing_ignored(c: ml_collections.ConfigDict) -> None:
  """Refuses settings that have no effect in the config they are in, naming the fix."""
  defaults = config_lib.get_config()
  _need(c.noniid_ratio == 1.0 or c.partition in ("auto", "shards"), "noniid_ratio",
        c.noniid_ratio, f"only partition='shards' (or 'auto') uses it, and partition="
        f"{c.partition!r}; drop noniid_ratio or set partition='shards'")
  _need(c.dirichlet_alpha == defaults.dirichlet_alpha or c.partition == "dirichlet",
        "dirichlet_alpha", c.dirichlet_alpha, f"only partition='dirichlet' uses it, and "
        f"partition={c.partition!r}; drop dirichlet_alpha or set partition='dirichlet'")
  _need(c.flavour == defaults.flavour or c.auto_adjust, "flavour", c.flavour,
        "chooses whose auto_adjust rules apply and has no effect without "
        "config.auto_adjust=True; set auto_adjust=True or drop flavour")
  _need(c.adjust_batch_for_large_clients or (c.auto_adjust and c.flavour == "monacosfl"),
        "adjust_batch_for_large_clients", c.adjust_batch_for_large_clients,
        "only MonAcoSFL's auto_adjust uses it; set auto_adjust=True and flavour='monacosfl'")
  _need(not c.auto_adjust or c.sample_ratio == 1.0, "sample_ratio", c.sample_ratio,
        "auto_adjust sets the sampling ratio from num_clients (0.5 for 200 clients, 0.1 for "
        "1000); drop sample_ratio or set auto_adjust=False")
  _need(c.attack_fraction == defaults.attack_fraction or "attack" in c.final_protocols.split(","),
        "attack_fraction", c.attack_fraction, f"only the final model-inversion attack uses it, "
        f"and final_protocols={c.final_protocols!r}; add 'attack' to final_protocols or drop "
        "attack_fraction")
  for field in ("ressfl_alpha", "ressfl_target_ssim", "attacker_decoder"):
    _need(c.ressfl or c[field] == defaults[field], field, c[field],
          "only TAResSFL's simulated attacker uses it; set ressfl=True or drop it")
  _need(c.method != "flmoco" or c.c_lr < 0 or c.lr == defaults.lr, "lr", c.lr,
        f"FL-MoCo clients train at c_lr={c.c_lr!r} and there is no server; drop lr, or set lr "
        "alone (c_lr defaults to it)")
  _need(c.local_epochs == defaults.local_epochs or c.method == "flmoco", "local_epochs",
        c.local_epochs, "only the FL-MoCo baseline has local epochs; set method='flmoco' or "
        "drop local_epochs")
  _need(c.client_schedule == defaults.client_schedule or c.method != "flmoco",
        "client_schedule", c.client_schedule, "FL-MoCo steps every client's schedule once per "
        "round (the reference); drop client_schedule or set method='mocosfl'")
  for field in ("replay_warmup_epochs", "replay_device_bytes"):
    _need(c.loss_threshold > 0 or c[field] == defaults[field], field, c[field],
          "only the loss-threshold saving uses it; set loss_threshold > 0 or drop it")
  _need(c.init_momentum == defaults.init_momentum or c.init_from, "init_momentum",
        c.init_momentum, "only a warm start uses it (what the momentum nets start from); set "
        "init_from=DIR or drop init_momentum")
  _need(c.client_queues == defaults.client_queues or not c.feature_sharing, "client_queues",
        c.client_queues, "describes per-client queues, and feature_sharing=True uses the shared "
        "queue; set feature_sharing=False or drop client_queues")
  _need(c.div_mu == defaults.div_mu or c.divergence_aware == "fedema", "div_mu", c.div_mu,
        f"only divergence_aware='fedema' uses it, and divergence_aware="
        f"{c.divergence_aware!r}; set divergence_aware='fedema' or drop div_mu")


def _check_hetero(c: ml_collections.ConfigDict) -> None:
  """What heterogeneous clients do not run with (algorithm/hetero_step.py)."""
  why = f"is not implemented with hetero={c.hetero!r}"
  _need(c.method == "mocosfl", "method", c.method,
        f"the FL-MoCo baseline {why}; use method='mocosfl' or hetero=''")
  _need(not c.distributed, "distributed", c.distributed,
        f"several processes {why}; use distributed=False")
  _need(c.feature_sharing, "feature_sharing", c.feature_sharing,
        f"per-client queues {why} (nor hetero-aware in the reference); use True")
  _need(not c.ressfl, "ressfl", c.ressfl, f"the simulated attacker {why}")
  _need(not c.aux_dataset, "aux_dataset", c.aux_dataset, f"an auxiliary set {why}")
  _need(c.divergence_aware == "off", "divergence_aware", c.divergence_aware,
        f"divergence-aware aggregation {why} (its FedAvg is the plain mean); use 'off'")
  _need(c.fedavg_set == "pool", "fedavg_set", c.fedavg_set,
        f"the reference's FedAvg set (client 0 + pool[1:]) {why} (its FedAvg is the pool's "
        "mean); use 'pool'")
  _need(c.client_parallel == "vmap" and c.client_chunk == 0, "client_parallel",
        (c.client_parallel, c.client_chunk), f"only vmap without chunks {why}")
  method = partition_lib.resolve_method(c.partition, c.noniid_ratio)
  _need(method in ("iid", "shards"), "partition", c.partition,
        f"the reference's hetero splits are iid and shards; dirichlet {why}")


def _attacker_decoder(name: str) -> None:
  try:
    decoder_lib.parse_name(name)
  except ValueError as e:
    raise ValueError(f"attacker_decoder={name!r}: {e}") from None


def _as_config_error(fn, *args, **kwargs):
  """fn(...), its ValueError ("field=value ...") re-raised as "config.field=value ..."."""
  try:
    return fn(*args, **kwargs)
  except ValueError as e:
    raise ValueError(f"config.{e}") from None


def resolve(config: ml_collections.ConfigDict, *, strict: bool = True) -> Experiment:
  """Checks the config, loads and partitions the data, derives S, E, P and the step config.

  strict=False (a config read back from a run) skips only `check_nothing_ignored`.
  """
  c = apply_moco_version(config_lib.with_defaults(config))
  check_fields(c, strict=strict)
  par = _as_config_error(ClientParallel, c.client_parallel, c.client_chunk)
  _as_config_error(plan.check_sample_ratio, c.sample_ratio)
  num_epochs, batch_size, avg_freq = c.num_epochs, c.batch_size, c.avg_freq
  sample_ratio, queue_size = c.sample_ratio, c.queue_size
  if c.method == "flmoco" and avg_freq == config_lib.get_config().avg_freq:
    avg_freq = 1                  # unset: the reference's FL-MoCo default, one FedAvg per round
  if c.auto_adjust:
    adj = _as_config_error(
        plan.auto_adjust, c.num_clients, c.flavour, batch_size=c.batch_size,
        num_epochs=c.num_epochs, queue_size=c.queue_size, avg_freq=c.avg_freq,
        feature_sharing=c.feature_sharing,
        adjust_batch_for_large=c.adjust_batch_for_large_clients)
    batch_size, avg_freq, sample_ratio = adj["batch_size"], adj["avg_freq"], adj["sample_ratio"]
    num_epochs, queue_size = adj["num_epochs"], adj["queue_size"]
  elif sample_ratio < 1.0:
    num_epochs = plan.sampling_epochs(num_epochs, sample_ratio)  # reference: E x int(1/r)
  spec = hetero_lib.resolve(c.hetero, c.num_clients)
  rich, rich_batch, hetero_split = 0, 0, None
  if spec is not None:
    rich, rich_batch = spec.rich_clients(c.num_clients), spec.rich_batch(batch_size)
    hetero_split = (rich, spec.rich_data, spec.poor_data)

  image_size = None if c.image_size == -1 else c.image_size
  data_dir = c.data_dir or None
  full_train = sources.load(c.dataset, "train", data_dir=data_dir, image_size=image_size)
  test = sources.load(c.dataset, "test", data_dir=data_dir, image_size=image_size)
  train, val = full_train, None
  if c.val_fraction > 0:
    train, val = sources.holdout(full_train, c.val_fraction, c.seed, labelled_only=True)
  model = SplitConfig(arch=c.arch, cut=c.cut, input_size=train.input_size,
                      bottleneck=c.bottleneck, head=c.head, ws=c.ws, c_residual=c.c_residual,
                      width=c.width, conv_impl=c.conv_impl)
  _as_config_error(validate_model, model)

  method = partition_lib.resolve_method(c.partition, c.noniid_ratio)
  _need((train.labels >= 0).all() or method == "iid", "partition", c.partition,
        f"{c.dataset}'s training split has unlabelled rows, which only partition='iid' can "
        f"split (noniid_ratio=1)")
  split = functools.partial(
      partition_lib.partition, train.labels, c.num_clients, method=c.partition,
      noniid_ratio=c.noniid_ratio, alpha=c.dirichlet_alpha, data_proportion=c.data_proportion,
      seed=c.seed, num_classes=train.num_classes)
  if hetero_split is None:
    parts = split()
  else:
    try:
      parts = split(hetero=hetero_split)
    except ValueError as e:
      raise ValueError(f"config.hetero={c.hetero!r}: {e}") from None
  with_target = c.data_proportion > 0
  if rich:
    smallest = min(len(p) for p in parts[:rich])
    _need(smallest >= rich_batch, "hetero", c.hetero,
          f"the rich batch int(c) * batch_size = {rich_batch} exceeds the {smallest} samples of "
          "the smallest rich client; lower batch_size or the multiplier c, or raise d")
  if with_target:
    smallest = min(len(p) for p in parts[rich:])
    _need(smallest >= batch_size, "batch_size", batch_size,
          f"the smallest client holds {smallest} samples; lower batch_size or num_clients")
  # reference: len(client 0's loader); with hetero client 0 is rich (its batch is rich B)
  steps_per_epoch = math.ceil(len(parts[0]) / (rich_batch or batch_size))
  if c.method == "flmoco":                 # a round: local_epochs passes over client 0's data
    steps_per_epoch *= c.local_epochs
  aux, rows = None, batch_size
  if c.aux_dataset:
    aux = _aux_data(c, batch_size, with_target, full_train.input_size, data_dir)
    # The reference's TAResSFL script: S = the longer of client 0's two loaders.
    steps_per_epoch = max(steps_per_epoch, math.ceil(len(aux.parts[0]) / batch_size))
    rows = batch_size * (2 if with_target else 1)
  ressfl_cfg = None
  if c.ressfl:
    smashed = build(model).smashed_shape
    try:
      decoder_lib.upsampling_stages(train.input_size, smashed[0])
    except ValueError as e:
      raise ValueError(f"config.ressfl=True: the attacker's decoder cannot map smashed data "
                       f"{smashed} to images of {train.input_size} px ({e}); change cut, "
                       "bottleneck or image_size") from None
    ressfl_cfg = _as_config_error(
        plan.RessflConfig, alpha=c.ressfl_alpha, target_ssim=c.ressfl_target_ssim,
        decoder=c.attacker_decoder, norm=ressfl.decoder_norm(batch_size),
        mean=tuple(map(float, train.mean)), std=tuple(map(float, train.std)),
        milestones=ressfl.milestones(sample_ratio))

  step_cfg = _as_config_error(
      plan.StepConfig,
      num_clients=c.num_clients, batch_size=rows, queue_size=queue_size,
      temperature=c.temperature, loss_form=c.loss_form, momentum_sync=c.momentum_sync,
      tau=c.tau, lr=c.lr, c_lr=None if c.c_lr < 0 else c.c_lr, momentum=c.momentum,
      weight_decay=c.weight_decay, lr_schedule=c.lr_schedule,
      client_schedule=c.client_schedule, num_epochs=num_epochs,
      steps_per_epoch=steps_per_epoch, avg_freq=min(avg_freq, steps_per_epoch),
      feature_sharing=c.feature_sharing, sample_ratio=sample_ratio, ressfl=ressfl_cfg,
      method=c.method, rich_clients=rich, rich_batch_size=rich_batch,
      fedavg_set=c.fedavg_set, client_queues=c.client_queues,
      divergence_aware=c.divergence_aware, div_mu=c.div_mu)
  if strict:   # known only now: auto_adjust may have set the sampling ratio
    _need(c.fedavg_set == "pool" or step_cfg.pool_size < step_cfg.num_clients, "fedavg_set",
          c.fedavg_set, "client 0 + pool[1:] is the pool's mean when every client takes part "
          "(sample_ratio=1); drop fedavg_set or sample clients (sample_ratio < 1)")
  num_steps = c.num_steps if c.num_steps > 0 else num_epochs * steps_per_epoch
  eval_every = c.eval_every_steps if c.eval_every_steps > 0 else steps_per_epoch
  aug = AugSpec(c.augmentation, tuple(map(float, train.mean)), tuple(map(float, train.std)),
                (float(c.crop_min_scale), 1.0))
  return Experiment(c, model, step_cfg, par, aug, num_steps, eval_every, train, val, test, parts,
                    aux)


def _aux_data(c, batch_size: int, with_target: bool, image_size: int, data_dir) -> AuxData:
  """The auxiliary set at the training images' size, split IID over the clients (as the
  reference's loader of it), normalised with its own constants."""
  train = sources.load(c.aux_dataset, "train", data_dir=data_dir, image_size=image_size)
  parts = partition_lib.partition(train.labels, c.num_clients, method="iid", seed=c.seed)
  smallest = min(len(p) for p in parts)
  _need(smallest >= batch_size, "batch_size", batch_size,
        f"the smallest client holds {smallest} images of aux_dataset={c.aux_dataset!r}; lower "
        "batch_size or num_clients")
  aug = AugSpec(c.augmentation, tuple(map(float, train.mean)), tuple(map(float, train.std)),
                (float(c.crop_min_scale), 1.0))
  return AuxData(AuxSpec(aug, batch_size, with_target), train, parts)
