"""Training state as pytrees: stacked per-client state and server state (spec §1.1, §11.2).

Every ClientState leaf has a leading client axis N. All clients start identical (the reference
deep-copies one randomly initialised client net N times) and every target (momentum) net starts
as a copy of its online net. Copies are real copies, so both halves can be donated to the step.

Room for later extensions without changing the step signature:
* `ClientState.lr_scale` [N] multiplies each client's LR (0 freezes a client, e.g. TAResSFL's
  c_lr = 0 deployment);
* `ClientState.extra` / `ServerState.extra` dicts (pytrees) for e.g. hetero batch masks or
  attacker state; the step passes them through unchanged.
"""
import functools
from typing import Any, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from mocosfl_jax.algorithm import optim
from mocosfl_jax import parallel
from mocosfl_jax.algorithm import queue as queue_lib
from mocosfl_jax.algorithm.plan import StepConfig

PyTree = Any


@flax.struct.dataclass
class ClientState:
  """Stacked state of all N clients (leading axis N on every leaf).

  Attributes:
    online: client online variables {'params', 'batch_stats'}.
    momentum: client target (momentum) variables, same structure.
    opt_state: per-client SGD state (momentum buffers); persists across FedAvg (§1.7).
    count: int32 [N] participations so far (the reference's per-participation scheduler counter).
    draws: int32 [N] batches drawn so far (for a per-client data sampler).
    lr_scale: float32 [N] multiplier of the client LR (1: normal, 0: frozen client).
    extra: free-form pytree dict for later extensions.
  """
  online: PyTree
  momentum: PyTree
  opt_state: PyTree
  count: jax.Array
  draws: jax.Array
  lr_scale: jax.Array
  extra: dict = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class ServerState:
  """Server W, target W', optimizer state, key queue(s) and counters.

  Attributes:
    online / momentum: server variables {'params', 'batch_stats'}.
    opt_state: SGD state of W.
    queue: [K, D] shared queue, or [N, K // N, D] per-client queues.
    ptr: int32 scalar (shared) or int32 [N] (per-client) write pointer(s).
    step: int32 global steps taken.
    epoch: int32 0-based epoch of the last step.
    extra: free-form pytree dict for later extensions.
  """
  online: PyTree
  momentum: PyTree
  opt_state: PyTree
  queue: jax.Array
  ptr: jax.Array
  step: jax.Array
  epoch: jax.Array
  extra: dict = flax.struct.field(default_factory=dict)


def _copy(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _stack(tree: PyTree, n: int) -> PyTree:
  return jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x)[None], n, axis=0), tree)


def init_state(net, cfg: StepConfig, key: jax.Array,
               mesh: Optional[jax.sharding.Mesh] = None) -> Tuple[ClientState, ServerState]:
  """Initial (ClientState, ServerState) for `net` under `cfg`, deterministic in `key`.

  Runs as one jitted computation (one compile instead of hundreds of eager op dispatches).
  With `mesh`, it is compiled with the shardings of `parallel.state_shardings` as outputs, so
  each device only ever materialises its own clients' rows (multi-host: no process builds the
  whole [N, ...] state); the values equal the unsharded init.
  """
  if mesh is None:
    return _init_state(net, cfg, key)
  return sharded_init_fn(net, cfg, mesh)(key)


@functools.lru_cache(maxsize=8)
def sharded_init_fn(net, cfg: StepConfig, mesh: jax.sharding.Mesh):
  """jit(key -> state) whose outputs carry `parallel.state_shardings` (see `init_state`)."""
  shapes = jax.eval_shape(_init_state, net, cfg, jax.random.key(0))
  return jax.jit(functools.partial(_init_body, net, cfg),
                 out_shardings=parallel.state_shardings(*shapes, mesh))


def _init_body(net, cfg: StepConfig, key: jax.Array) -> Tuple[ClientState, ServerState]:
  k_client, k_server, k_queue = jax.random.split(key, 3)
  tx = optim.make_sgd(cfg.momentum, cfg.weight_decay)
  n = cfg.num_clients

  client_vars = dict(net.init_client(k_client))
  client_vars.setdefault('batch_stats', {})
  clients = ClientState(
      online=_stack(client_vars, n),
      momentum=_stack(client_vars, n),
      opt_state=_stack(tx.init(client_vars['params']), n),
      count=jnp.zeros((n,), jnp.int32),
      draws=jnp.zeros((n,), jnp.int32),
      lr_scale=jnp.ones((n,), jnp.float32),
  )

  server_vars = dict(net.init_server(k_server))
  server_vars.setdefault('batch_stats', {})
  if cfg.feature_sharing:
    q = queue_lib.init_queue(k_queue, cfg.queue_size, net.key_dim)
    ptr = jnp.zeros((), jnp.int32)
  else:
    q = queue_lib.init_client_queues(k_queue, n, cfg.client_queue_size, net.key_dim)
    ptr = jnp.zeros((n,), jnp.int32)
  server = ServerState(
      online=_copy(server_vars),
      momentum=_copy(server_vars),
      opt_state=_copy(tx.init(server_vars['params'])),
      queue=q,
      ptr=ptr,
      step=jnp.zeros((), jnp.int32),
      epoch=jnp.zeros((), jnp.int32),
  )
  return clients, server


_init_state = jax.jit(_init_body, static_argnums=(0, 1))
