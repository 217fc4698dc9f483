"""Training state as pytrees: the stacked state of all clients, the server's state, and both.

Every `ClientState` leaf has a leading client axis N. All clients start identical (the reference
deep-copies one randomly initialised client net N times) and every momentum net starts as a copy
of its online net. Copies are real copies, so every buffer can be donated to the step.
`ClientState.lr_scale` [N] multiplies each client's learning rate (0 freezes a client).
With TAResSFL's simulated attacker (`StepConfig.ressfl`) the clients are an
`AttackedClientState`, which adds each client's attacker; without it the state (and so every
checkpoint) has exactly the fields of `ClientState`.
"""
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mocosfl_jax import precision
from mocosfl_jax.algorithm import optim
from mocosfl_jax.algorithm import queue as queue_lib
from mocosfl_jax.algorithm import ressfl
from mocosfl_jax.algorithm.plan import StepConfig

PyTree = Any


@flax.struct.dataclass
class ClientState:
  """Stacked state of clients (leading client axis on every leaf: all N, or a pool's rows).

  Attributes:
    online: client online variables {'params', 'batch_stats'}.
    momentum: client momentum (target) variables, same structure.
    opt_state: per-client SGD state (momentum buffers); kept across FedAvg, as the reference.
    count: int32 participations so far (the reference's per-participation scheduler counter).
    draws: int32 batches drawn so far (the per-client data sampler's position).
    lr_scale: float multiplier of the client learning rate (1: normal, 0: frozen client).
  """
  online: PyTree
  momentum: PyTree
  opt_state: PyTree
  count: jax.Array
  draws: jax.Array
  lr_scale: jax.Array


@flax.struct.dataclass
class AttackedClientState(ClientState):
  """`ClientState` plus each client's simulated attacker (algorithm/ressfl.py).

  A subclass rather than an optional field: a field left None would still appear in the
  checkpoint's tree, so runs without the attacker would no longer restore older checkpoints.
  Like every client leaf the attacker follows the pool's gather and scatter; FedAvg (sync.py)
  replaces only `online` (and `momentum`), so attackers are never averaged.

  Attributes:
    attacker: ressfl.AttackerState (decoder variables and Adam state), stacked over clients.
  """
  attacker: PyTree


@flax.struct.dataclass
class ServerState:
  """Server W, momentum W', optimizer state, key queue(s) and counters.

  Attributes:
    online / momentum: server variables {'params', 'batch_stats'}.
    opt_state: SGD state of W.
    queue: [K, D] shared queue, or [N, K // N, D] per-client queues.
    ptr: int32 scalar (shared) or int32 [N] (per-client) write pointer(s).
    step: int32 global steps taken.
    epoch: int32 0-based epoch of the last step.
    div_lambda: divergence-aware aggregation ('fedema') only, else None (no leaf, so the
      checkpoints of other runs keep their tree): float [N], each client's lambda, 0 until the
      auto-scaler sets it at the client's first sync. The aggregator (the server) keeps it.
  """
  online: PyTree
  momentum: PyTree
  opt_state: PyTree
  queue: jax.Array
  ptr: jax.Array
  step: jax.Array
  epoch: jax.Array
  div_lambda: Any = None


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes: the clients, the server, and the optimizer (static).

  `tx` is the learning-rate-free PyTorch SGD of both sides (optim.make_sgd); learning rates come
  from the schedules each step. Checkpoints store {'clients', 'server'}: `tx` follows from the
  run's config.
  """
  clients: ClientState
  server: ServerState
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def _copy(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _stack(tree: PyTree, n: int) -> PyTree:
  return jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x)[None], n, axis=0), tree)


def optimizer(cfg: StepConfig) -> optax.GradientTransformation:
  """The run's SGD of both sides: one object per (momentum, weight_decay), so every TrainState
  of a run has the same static part and jitted steps compile once."""
  return _sgd(cfg.momentum, cfg.weight_decay)


@functools.lru_cache(maxsize=None)
def _sgd(momentum: float, weight_decay: float) -> optax.GradientTransformation:
  return optim.make_sgd(momentum, weight_decay)


def init_fn(net, cfg: StepConfig, key: jax.Array) -> TrainState:
  """The initial TrainState (un-jitted; `create_train_state` jits it)."""
  k_client, k_server, k_queue = jax.random.split(key, 3)
  tx = optimizer(cfg)
  n = cfg.num_clients

  client_vars = dict(net.init_client(k_client))
  client_vars.setdefault('batch_stats', {})
  clients = ClientState(
      online=_stack(client_vars, n),
      momentum=_stack(client_vars, n),
      opt_state=_stack(tx.init(client_vars['params']), n),
      count=jnp.zeros((n,), jnp.int32),
      draws=jnp.zeros((n,), jnp.int32),
      lr_scale=jnp.ones((n,), precision.float_dtype()),
  )
  if cfg.ressfl is not None:   # its own key stream: the other initial values stay as they are
    attackers = ressfl.init(net, cfg.ressfl, jax.random.fold_in(key, 0x5e55f1), n)
    clients = AttackedClientState(**vars(clients), attacker=attackers)

  server_vars = dict(net.init_server(k_server))
  server_vars.setdefault('batch_stats', {})
  if cfg.feature_sharing:
    q = queue_lib.init_queue(k_queue, cfg.queue_size, net.key_dim)
    ptr = jnp.zeros((), jnp.int32)
  else:
    q = queue_lib.init_client_queues(k_queue, n, cfg.client_queue_size, net.key_dim,
                                     normalise=cfg.client_queues != 'reference')
    ptr = jnp.zeros((n,), jnp.int32)
  server = ServerState(
      online=_copy(server_vars),
      momentum=_copy(server_vars),
      opt_state=_copy(tx.init(server_vars['params'])),
      queue=q,
      ptr=ptr,
      step=jnp.zeros((), jnp.int32),
      epoch=jnp.zeros((), jnp.int32),
      div_lambda=(jnp.zeros((n,), precision.float_dtype()) if cfg.divergence_aware == 'fedema'
                  else None),
  )
  return TrainState(clients=clients, server=server, tx=tx)


@functools.partial(jax.jit, static_argnums=(0, 1))
def create_train_state(net, cfg: StepConfig, key: jax.Array) -> TrainState:
  """Initial TrainState for `net` under `cfg`, deterministic in `key`, as one jitted computation.

  On a device mesh, `parallel.create_sharded_train_state` builds the same values with each
  device holding only its own clients' rows.
  """
  return init_fn(net, cfg, key)


def abstract_train_state(net, cfg: StepConfig) -> TrainState:
  """The TrainState's shapes and dtypes (ShapeDtypeStructs), without computing anything."""
  return jax.eval_shape(functools.partial(init_fn, net, cfg), jax.random.key(0))
