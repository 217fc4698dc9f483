"""Every field of a run and its default; configs/*.py override a few.

Lives in the package (not configs/) so config files import it wherever the package is installed.
The defaults are the MocoSFL scripts' 5-client cross-silo setting (CIFAR-10, ResNet-18 cut 1,
B 20, avg_freq 10, lr 0.06), not the reference's bare command-line defaults; docs/reference.md,
'Argument defaults', maps every reference argument to its field here.

    python -m mocosfl_jax.main --config configs/default.py --workdir runs/x --config.num_clients=5

Sentinels: -1 means "derive" (c_lr -> lr, num_steps -> num_epochs x steps_per_epoch,
eval_every_steps -> once per epoch as the reference's kNN monitor, image_size -> the
dataset's). Field names follow the reference's argparse names where they exist (cut = cutlayer,
queue_size = K, temperature = T).
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = "cifar10"
  c.data_dir = ""                 # tfds data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.image_size = -1
  c.val_fraction = 0.0            # 0: every training image goes to the clients (the reference);
                                  # > 0: held out for checkpoint selection (fewer steps per epoch)
  c.partition = "auto"            # auto (iid if noniid_ratio == 1 else shards) | iid | shards | dirichlet
  c.noniid_ratio = 1.0
  c.dirichlet_alpha = 0.5
  c.data_proportion = 1.0         # fraction of the training set used; 0 (no target images) is
                                  # allowed with an aux_dataset (TAResSFL's expert)
  c.aux_dataset = ""              # '' none; else B of its images (split IID over the clients)
                                  # follow each client's B target images every step (TAResSFL)
  c.augmentation = "mocov2"       # mocov2 | mocov1 | none
  c.crop_min_scale = 0.08         # random resized crop area (min, 1); the reference's 0.08
  # Federation.
  c.num_clients = 5
  c.sample_ratio = 1.0
  c.batch_size = 20
  c.auto_adjust = False           # the reference's --auto_adjust (flavour: whose rules)
  c.flavour = "mocosfl"           # mocosfl | monacosfl: whose auto_adjust (needs auto_adjust)
  c.adjust_batch_for_large_clients = True  # monacosfl auto_adjust: False is its
                                           # --dont_adjust_batch_size_for_large_clients
  c.avg_freq = 10                 # syncs per epoch (flmoco: per round; left at 10 it becomes 1,
                                  # the reference's FL-MoCo default)
  c.hetero = ""                   # '' off | 'reference' | 'a_b|c|d_e': clients < int(a*N) are
                                  # rich (int(c)*B images per step, share d of the data); the
                                  # reference's --hetero (algorithm/hetero.py)
  # Model.
  c.arch = "resnet18"
  c.cut = 1
  c.bottleneck = "None"
  c.head = "V2"
  c.ws = True
  c.c_residual = True
  c.width = 64
  # Algorithm.
  c.method = "mocosfl"            # mocosfl (split learning; MonAcoSFL by its fields) | flmoco:
                                  # the FL-MoCo baseline, every client holds the whole network
                                  # and its own queue of queue_size keys (algorithm/flmoco.py)
  c.local_epochs = 5              # flmoco: passes over a client's data per round (FedAvg at the
                                  # sync rule, avg_freq syncs per round; the reference's 5)
  c.loss_form = "original"        # original (MocoSFL) | two_view (MonAcoSFL) | single (V1)
  c.momentum_sync = False         # True = MonAcoSFL
  c.queue_size = 6000
  c.temperature = 0.1
  c.tau = 0.99
  c.lr = 0.06
  c.c_lr = -1.0
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.lr_schedule = "cosine"
  c.client_schedule = "per_participation"   # the reference's quirk (default) | per_epoch
  c.num_epochs = 200
  c.feature_sharing = True
  # Loss-threshold communication saving (algorithm/replay.py, run/replay.py): epochs in status
  # A (full protocol), B (no gradient download, no client training) or C (the server replays
  # the last A/B epoch's smashed data), chosen by the drop of the epoch's mean loss.
  c.loss_threshold = 0.0          # 0: off (always A, the default); the reference's --loss_threshold
  c.replay_warmup_epochs = 10     # epochs that always stay in A (the reference's 10)
  c.replay_device_bytes = 2**30   # the stored stacks stay on the device up to this size, else
                                  # a memory-mapped file in the workdir (replay/)
  c.moco_version = ""             # "" (none) | V1 | smallV2 | V2 | largeV2: the reference's preset
                                  # of head, loss_form, lr_schedule, augmentation (experiment.py)
  c.fedavg_set = "pool"           # pool (the pool's mean) | reference (client 0 + pool[1:])
  c.client_queues = "clean"       # per-client queues: clean | reference (MocoSFL's; all clients)
  c.divergence_aware = "off"      # off | fedema (mu = min(1, lambda * div)) | reference (no-op)
  c.div_mu = 0.7                  # fedema: mu the auto-scaler gives each client at its first sync
  # TAResSFL (algorithm/ressfl.py): a simulated attacker per client, trained in every step, and
  # a regulariser that pushes the attacker's SSIM down to ressfl_target_ssim.
  c.ressfl = False
  c.ressfl_alpha = 2.0            # the regulariser's weight (the reference's --ressfl_alpha)
  c.ressfl_target_ssim = 0.6      # no penalty while the attacker's SSIM stays at or below this
  c.attacker_decoder = "res_normN4C64"   # res_normN<blocks>C<channels>; GroupNorm + WS below
                                         # batch_size 20, else BatchNorm (as the reference)
  # Warm start (a new run only: a run resumed in its own workdir continues from its checkpoint).
  c.init_from = ""                # "" | DIR | DIR:STEP | DIR:best | DIR:latest: every client
                                  # starts from that run's client 0, the server from its server
                                  # (the reference's --initialze_path / --load_server)
  c.init_momentum = "copy"        # copy: momentum nets start as the loaded online nets | random:
                                  # they keep this run's random init (the reference, with init_from)
  # Parallelism (parallel.py; speed and memory only, never the numbers).
  c.client_parallel = "vmap"      # vmap (one device) | shard_map (pool over every device)
  c.client_chunk = 0              # 0: all clients at once; k: lax.map over chunks of k clients
  c.distributed = False           # jax.distributed.initialize (also $MOCOSFL_DISTRIBUTED=1)
  c.conv_impl = "auto"            # auto (winograd on CPU, XLA's conv elsewhere) | winograd | matmul | lax
  # Run.
  c.seed = 1234
  c.num_steps = -1
  c.log_every_steps = 10
  c.eval_every_steps = -1
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.knn_k = 200
  c.knn_t = 0.1
  c.eval_batch_size = 256
  c.final_protocols = "knn,linear,semi"  # run at the end (as the reference); evaluate runs them too
                                         # (knn, linear, semi; attack: the model-inversion attack)
  c.attack_fraction = 0.01        # final 'attack': share of the training images the attacker holds
  return c


def parse_arg(arg: str | None, defaults: dict) -> dict:
  """'a=1,b=x' -> dict with the defaults' types; unknown keys are an error naming the valid ones."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is unknown; valid: {sorted(defaults)}")
    out[key] = type(defaults[key])(value)
  return out


INIT_FROM_STEPS = ("latest", "best")


def parse_init_from(value: str):
  """config.init_from -> None ('') or (run directory, step: an int, 'latest' or 'best').

  The text after the last ':' names the checkpoint; a directory whose name holds ':' needs an
  explicit ':latest'. Malformed values are a ValueError naming the field and the forms.
  """
  forms = "'' (off), 'DIR', 'DIR:STEP', 'DIR:best' or 'DIR:latest'"
  if not isinstance(value, str):
    raise ValueError(f"config.init_from={value!r}: must be a string, one of {forms}")
  if value == "":
    return None
  directory, colon, step = value.rpartition(":")
  if not colon:
    directory, step = value, "latest"
  if not directory.strip() or directory != directory.strip():
    raise ValueError(f"config.init_from={value!r}: no run directory (or spaces around it); "
                     f"valid: {forms}")
  if step in INIT_FROM_STEPS:
    return directory, step
  if step.isascii() and step.isdigit():
    return directory, int(step)
  raise ValueError(f"config.init_from={value!r}: {step!r} after the last ':' is not a step "
                   f"number, 'best' or 'latest'; valid: {forms} (a directory whose name holds ':' "
                   "needs ':latest' after it)")


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with every field `get_config` defines (missing ones at their default).

  Unknown fields are an error naming them. Used on configs read back from older runs.
  """
  c = get_config()
  unknown = sorted(set(config.keys()) - set(c.keys()))
  if unknown:
    raise ValueError(f"config has unknown fields {unknown}; valid: {sorted(c.keys())}")
  c.update(config)
  return c
