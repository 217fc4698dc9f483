"""Trains a run whose pool holds remote clients: `python -m mocosfl_jax.serve`.

    python -m mocosfl_jax.serve --config CONFIG --workdir DIR --remote 0,1 \
        [--listen HOST:PORT] [--tokens FILE] [--deadline SECONDS] [--tls_cert F --tls_key F]

The run is `python -m mocosfl_jax.main`'s (same config, checkpoints, evaluation, results, and a
rerun resumes it), except that the clients listed in --remote are devices that connect over
gRPC (mocosfl_jax.edge_client with JAX, or export/edge_client.py with an ONNX client slice);
the other clients are simulated in the server's vmapped step, as in the reference's demo. Each
step the server hands each remote client of the pool the positions of its batch and its
augmentation draws, waits up to --deadline for its two smashed views, runs the step, and sends
trainable clients their gradient; at sync steps it averages the clients' uploaded models
(mocosfl_jax/remote/). A remote client that is not connected or misses the deadline is left
out of that step (logged) and takes part again when it comes back.

Security: every client authenticates with its own token (--tokens: a JSON file
{"client id": "token"}; without it, random tokens are written to DIR/remote_tokens.json, readable
by the owner only). Messages are safetensors checked against the shapes the server expects,
and bounded in size; nothing is unpickled. --tls_cert/--tls_key turn on TLS (clients then pass
--tls_ca). Without TLS, tokens and tensors travel in clear: use it on loopback or a trusted
network only.

Once listening, the server writes DIR/server.json ({"address": "host:port"}; --listen with
port 0 picks a free port).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import secrets

from absl import flags, logging
from ml_collections import config_flags

from mocosfl_jax import cli
from mocosfl_jax import main as main_lib
from mocosfl_jax.data import sources
from mocosfl_jax.run import workdir_lock

DEFAULT_DEADLINE_S = 60.0


def define_flags(flag_values: flags.FlagValues, argv) -> None:
  config_flags.DEFINE_config_file("config", None, "Run config file.", flag_values=flag_values,
                                  lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "Run directory (resumes if it holds checkpoints).",
                      flag_values=flag_values)
  flags.DEFINE_string("remote", None, "Comma-separated ids of the clients that are remote "
                      "devices, e.g. 0,1.", flag_values=flag_values)
  flags.DEFINE_string("listen", "127.0.0.1:50051", "HOST:PORT to listen on (0.0.0.0 for every "
                      "interface; port 0 picks a free one, written to WORKDIR/server.json).",
                      flag_values=flag_values)
  flags.DEFINE_string("tokens", None, "JSON file {\"client id\": \"token\"}; default: random "
                      "tokens written to WORKDIR/remote_tokens.json.", flag_values=flag_values)
  flags.DEFINE_float("deadline", DEFAULT_DEADLINE_S, "Seconds a step waits for a remote "
                     "client's smashed data (and, at syncs, its model) before it runs without "
                     "it.", flag_values=flag_values)
  flags.DEFINE_float("poll", 5.0, "Seconds a client's request for work waits before the server "
                     "answers 'wait' (clients keep asking; a client is counted as connected "
                     "while it asks).", flag_values=flag_values)
  flags.DEFINE_float("wait_for_clients", 120.0, "Seconds the first step (also after a restart) "
                     "waits for every remote client to connect.", flag_values=flag_values)
  flags.DEFINE_string("tls_cert", None, "PEM certificate: serve over TLS.", flag_values=flag_values)
  flags.DEFINE_string("tls_key", None, "PEM private key of --tls_cert.", flag_values=flag_values)


def _remote_ids(text: str | None) -> list[int]:
  if not text:
    raise ValueError("--remote: give the ids of the remote clients, e.g. --remote 0,1")
  try:
    ids = sorted({int(x) for x in text.split(",") if x.strip()})
  except ValueError:
    raise ValueError(f"--remote {text!r}: expected comma-separated client ids, e.g. 0,1") \
        from None
  if not ids:
    raise ValueError("--remote: give at least one client id")
  return ids


def _tokens(path: str | None, remote: list[int], workdir: Path) -> tuple[dict[int, str], bool]:
  """(tokens, whether they are new): the tokens file's, the run's own from an earlier start
  (workdir/remote_tokens.json), or new random ones (written by `_write_tokens` once the run
  holds its workdir)."""
  if path is None:
    path = workdir / "remote_tokens.json"
    if not path.exists():
      return {c: secrets.token_urlsafe(24) for c in remote}, True
  try:
    raw = json.loads(Path(path).read_text())
    tokens = {int(k): v for k, v in raw.items() if isinstance(v, str)}
  except (OSError, ValueError, AttributeError) as e:
    raise ValueError(f"--tokens {path}: cannot read a JSON object {{\"client id\": \"token\"}} "
                     f"({e})") from None
  missing = [c for c in remote if not tokens.get(c)]
  if missing:
    raise ValueError(f"--tokens {path} has no token for remote client(s) {missing}; add them")
  short = [c for c in remote if len(tokens[c]) < 16]
  if short:
    raise ValueError(f"--tokens {path}: the tokens of client(s) {short} are shorter than 16 "
                     "characters; use long random tokens (python -c 'import secrets; "
                     "print(secrets.token_urlsafe(24))')")
  return {c: tokens[c] for c in remote}, False


def _write_tokens(workdir: Path, tokens: dict[int, str]) -> None:
  path = workdir / "remote_tokens.json"
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)   # owner-only
  with os.fdopen(fd, "w") as f:
    json.dump({str(c): t for c, t in tokens.items()}, f, indent=1)
  logging.info("wrote new client tokens to %s (give each device its own)", path)


def _tls_files(cert: str | None, key: str | None):
  """(cert PEM, key PEM) bytes, checked to be a certificate and its key, or None."""
  import ssl  # pylint: disable=g-import-not-at-top
  if (cert is None) != (key is None):
    raise ValueError("--tls_cert and --tls_key go together: give both, or neither")
  if cert is None:
    return None
  try:
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    return Path(cert).read_bytes(), Path(key).read_bytes()
  except (OSError, ssl.SSLError) as e:
    raise ValueError(f"--tls_cert {cert} / --tls_key {key}: not a PEM certificate and its "
                     f"private key ({e})") from None


def make_stepper_factory(args, workdir: Path):
  """make_stepper(exp, net) for train_and_evaluate: checks the run suits remote clients, builds
  the coordinator, and starts the gRPC server when training starts."""
  remote = _remote_ids(args.remote)
  from mocosfl_jax.remote import transport  # pylint: disable=g-import-not-at-top
  listen = transport.check_address(args.listen, "--listen", listen=True)
  tls = _tls_files(args.tls_cert, args.tls_key)
  if args.deadline <= 0 or args.poll <= 0 or args.wait_for_clients < 0:
    raise ValueError("--deadline and --poll must be positive seconds, --wait_for_clients not "
                     "negative")

  def make_stepper(exp, net):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from mocosfl_jax.algorithm import state as state_lib  # pylint: disable=g-import-not-at-top
    from mocosfl_jax.remote import coordinator, steps, transport  # pylint: disable=g-import-not-at-top
    from mocosfl_jax.run import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    cfg = exp.step
    bad = [c for c in remote if not 0 <= c < cfg.num_clients]
    if bad:
      raise ValueError(f"--remote: client(s) {bad} do not exist (num_clients={cfg.num_clients})")
    if exp.aux is not None or cfg.ressfl is not None:
      raise ValueError("serve runs MocoSFL / MonAcoSFL steps; an auxiliary dataset or the "
                       "TAResSFL attacker (expert pretraining) runs with python -m "
                       "mocosfl_jax.main")
    if not cfg.feature_sharing:
      raise ValueError("serve needs the shared queue (feature_sharing=True); per-client queues "
                       "run with python -m mocosfl_jax.main")
    if cfg.fedavg_set != "pool" or cfg.divergence_aware != "off":
      raise ValueError("serve averages the pool (fedavg_set='pool', divergence_aware='off'); "
                       "the reference's FedAvg set and divergence-aware aggregation run with "
                       "python -m mocosfl_jax.main")
    if exp.par.mode != "vmap":
      raise ValueError(f"serve runs the pool with vmap; client_parallel={exp.par.mode!r} runs "
                       "with python -m mocosfl_jax.main")
    tokens, new_tokens = _tokens(args.tokens, remote, workdir)
    abstract = state_lib.abstract_train_state(net, cfg)
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), abstract.clients)
    model_spec = {**steps.tensor_spec(one.online, "online"),
                  **steps.tensor_spec(one.momentum, "momentum")}
    smashed = (np.dtype(np.float32), (cfg.rows_per_client,) + tuple(net.smashed_shape))
    nbytes = lambda spec: sum(int(np.prod(s)) * np.dtype(d).itemsize for d, s in spec.values())
    model_bytes = nbytes({**model_spec, **steps.tensor_spec(one.opt_state, "opt")})
    max_bytes = max(model_bytes, 2 * nbytes({"q": smashed})) + (1 << 16)
    welcome = {"num_steps": exp.num_steps, "pipeline": exp.aug.pipeline,
               "mean": ",".join(map(repr, exp.aug.mean)), "std": ",".join(map(repr, exp.aug.std)),
               "crop_scale": ",".join(map(repr, exp.aug.crop_scale)),
               "batch_size": cfg.batch_size, "loss_form": cfg.loss_form,
               "input_size": exp.model.input_size}
    coord = coordinator.Coordinator(
        tokens=tokens, train=not cfg.frozen_clients,
        num_images={c: len(exp.parts[c]) for c in remote}, smashed=smashed,
        model_spec=model_spec, welcome=welcome, max_bytes=max_bytes, poll_s=args.poll,
        alive_s=args.deadline)
    # Bound now, so a bad address or a busy port is refused before anything is written; Joins
    # are answered 'starting, retry' until the state is ready.
    try:
      server, port = transport.serve(coord.handle, listen, hard_limit_bytes=4 * max_bytes,
                                     tls=tls)
    except OSError as e:
      raise ValueError(f"--listen {listen}: {e}") from None

    def start_serving():
      """Once the run holds its workdir and its state is ready (restored or new)."""
      if new_tokens:
        _write_tokens(workdir, tokens)
      address = f"{listen.rsplit(':', 1)[0]}:{port}"
      metrics_lib.write_text_atomic(workdir / "server.json",
                                    json.dumps({"address": address, "tls": bool(tls)}))
      logging.info("serving remote clients %s on %s (%s)", remote, address,
                   "TLS" if tls else "no TLS: trusted networks only")
      if not coord.wait_connected(remote, args.wait_for_clients):
        logging.warning("after %.0f s, remote client(s) %s are not connected; training starts "
                        "without them", args.wait_for_clients,
                        [c for c in remote if not coord.connected(c)])

    return steps.RemoteStepper(exp, net, coord, remote, deadline_s=args.deadline,
                               server=server, on_start=start_serving)

  return make_stepper


def serve(args) -> int:
  from mocosfl_jax.run import train as train_lib  # pylint: disable=g-import-not-at-top
  if args.config is None or args.workdir is None:
    raise ValueError("give --config and --workdir")
  try:
    args.config.keys()
  except OSError as e:
    raise ValueError(main_lib.explain_config_error(e) or str(e)) from None
  workdir = Path(args.workdir).expanduser().absolute()
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {args.workdir} is a file, not a directory; pass a run "
                     "directory (a new one starts a run, an existing one resumes it)")
  make = make_stepper_factory(args, workdir)
  made = {}

  def make_stepper(exp, net):
    made["stepper"] = make(exp, net)
    return made["stepper"]

  try:
    results = train_lib.train_and_evaluate(args.config, str(workdir), make_stepper=make_stepper)
  except KeyboardInterrupt as e:
    raise main_lib.RunStoppedError(f"interrupted; {main_lib.resume_hint(workdir)}",
                                   main_lib.INTERRUPTED) from e
  finally:
    stepper = made.get("stepper")
    if stepper is not None:
      stepper.coord.finish(timeout_s=3 * stepper.coord.poll_s)   # clients hear 'done'
      if stepper.server is not None:
        stepper.server.stop(grace=2 * stepper.coord.poll_s).wait()
  print(json.dumps(results, indent=1))
  return 0


def main(argv=None) -> int:
  return cli.run(define_flags, serve, argv,
                 errors=(ValueError, FileNotFoundError, sources.DatasetNotPreparedError,
                         FloatingPointError, workdir_lock.WorkdirLockedError,
                         main_lib.RunStoppedError),
                 explain=main_lib.explain_config_error)


if __name__ == "__main__":
  main()
