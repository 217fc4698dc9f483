"""TAResSFL's simulated attacker: one inversion decoder per client, trained inside the step, and
the regulariser it drives (target-aware ResSFL, the expert pretraining of MocoSFL's Table 4).

Every client holds a decoder (privacy/decoder.py) and its Adam state, stacked on the client axis
like the rest of its state (`state.AttackedClientState`), so they follow the pool's gather and
scatter, are checkpointed and resumed with the run, and are never averaged by FedAvg. In each
step, for each pool client, right after its online forward A_q = f(x_q):

  1. attacker update: one Adam step on -SSIM(decoder(stop_gradient(A_q)), image), the decoder in
     train mode (BatchNorm normalises with the batch and updates its running statistics);
  2. regulariser: s = SSIM(decoder(A_q), image), the mean over the client's rows, with the
     just-updated decoder in eval mode and held constant; while s > target_ssim (always when
     target_ssim is 0) the client's loss gains alpha * (s - target_ssim), whose gradient w.r.t.
     A_q adds to the gradient the server sends.

`image` is the client's input x_q turned back into [0, 1] (x * std + mean, clipped), SSIM the
reference's (privacy/similarity.py). The step adds every pool client's penalty to the server
loss inside its one value_and_grad: a penalty depends on its own client's A_q only, so its
gradient reaches that client's parameters and nothing else (the decoder is a constant there,
the server gets nothing from it). This is the reference script's order: attacker update, the
regulariser with the updated decoder, the server's step, then the client's backward of the
server's gradient plus the regulariser's.

The attacker's Adam (PyTorch's defaults: betas 0.9, 0.999, eps 1e-8, no weight decay) has
learning rate 1e-3, multiplied by 0.2 at epochs 60, 120 and 160 (divided by the client sampling
ratio when clients are sampled, as the reference), stepped per epoch. docs/reference.md,
'TAResSFL', says what we reproduce and where we differ.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax

from mocosfl_jax import precision
from mocosfl_jax.algorithm import schedules
from mocosfl_jax.algorithm.plan import RessflConfig
from mocosfl_jax.privacy import decoder as decoder_lib
from mocosfl_jax.privacy import similarity

PyTree = Any
MILESTONES = (60, 120, 160)
GN_BELOW_BATCH = 20       # the reference's decoder uses GroupNorm + WS below this client batch
METRIC_KEYS = ('attacker_ssim', 'regulariser_ssim', 'regulariser_active', 'regulariser_penalty')


@flax.struct.dataclass
class AttackerState:
  """A client's simulated attacker (stacked over clients like ClientState).

  Attributes:
    variables: decoder variables {'params', 'batch_stats'}.
    opt_state: Adam state of the decoder's params.
  """
  variables: PyTree
  opt_state: PyTree


def milestones(sample_ratio: float = 1.0) -> tuple:
  """The attacker's MultiStep epochs: (60, 120, 160), times 1 / r under client sampling (int)."""
  if sample_ratio < 1.0:
    return tuple(int(m * (1.0 / sample_ratio)) for m in MILESTONES)
  return MILESTONES


def decoder_norm(batch_size: int) -> str:
  """The reference's choice: GroupNorm + weight-standardised convs for client batches under 20
  images (batch statistics of a few rows are too noisy), BatchNorm otherwise."""
  return 'gn' if batch_size < GN_BELOW_BATCH else 'bn'


def adam() -> optax.GradientTransformation:
  """PyTorch's Adam without its learning rate (applied outside, as a traced value)."""
  return optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


def build_decoder(cfg: RessflConfig, image_size: int, smashed_shape) -> decoder_lib.Decoder:
  return decoder_lib.build(cfg.decoder, image_size, tuple(smashed_shape), cfg.norm)


def init(net, cfg: RessflConfig, key: jax.Array, num_clients: int) -> AttackerState:
  """Every client's attacker, each decoder initialised with its own key (as the reference builds
  one decoder per client), Adam state at zero. Leaves stacked on a leading client axis."""
  dec = build_decoder(cfg, net.input_shape[0], net.smashed_shape)
  keys = jax.random.split(key, num_clients)
  variables = jax.vmap(lambda k: decoder_lib.init(dec, k, net.smashed_shape))(keys)
  return AttackerState(variables, jax.vmap(adam().init)(variables['params']))


def learning_rate(cfg: RessflConfig, epoch) -> jax.Array:
  """The attacker's learning rate during 0-based `epoch` (its scheduler stepped once per epoch)."""
  return schedules.multistep(cfg.lr, epoch, cfg.milestones, cfg.gamma)


def images_of(cfg: RessflConfig, x: jax.Array) -> jax.Array:
  """The [0, 1] images the attacker reconstructs from a client's normalised input x."""
  mean = jnp.asarray(cfg.mean, x.dtype)
  std = jnp.asarray(cfg.std, x.dtype)
  return jnp.clip(x * std + mean, 0.0, 1.0)


def _decode(dec, variables: dict, smashed: jax.Array, train: bool):
  """(images, variables with the running statistics a train-mode pass leaves)."""
  if not train:
    return dec.apply(variables, smashed, train=False), variables
  out, updates = dec.apply(variables, smashed, train=True, mutable=['batch_stats'])
  return out, dict(variables, batch_stats=dict(updates).get('batch_stats',
                                                            variables['batch_stats']))


def attacker_update(dec, attacker: AttackerState, smashed: jax.Array, images: jax.Array, lr):
  """One Adam step of one client's decoder on -SSIM(decoder(smashed), images), train mode.

  `smashed` is treated as a constant. Returns (attacker, its SSIM on this batch before the step).
  """
  smashed = lax.stop_gradient(smashed)
  params = attacker.variables['params']

  def neg_ssim(params):
    out, new = _decode(dec, dict(attacker.variables, params=params), smashed, True)
    s = jnp.mean(similarity.ssim(out, images))
    return -s, (new['batch_stats'], s)

  (_, (stats, s)), grads = jax.value_and_grad(neg_ssim, has_aux=True)(params)
  updates, opt_state = adam().update(grads, attacker.opt_state, params)
  lr = jnp.asarray(lr)
  params = jax.tree.map(lambda p, u: p - lr.astype(p.dtype) * u.astype(p.dtype), params, updates)
  return AttackerState({'params': params, 'batch_stats': stats}, opt_state), s


def regulariser(cfg: RessflConfig, dec, variables: dict, smashed: jax.Array, images: jax.Array):
  """alpha * (s - target_ssim) while s > target_ssim, else 0; s the decoder's (eval mode, held
  constant) mean SSIM on this client's rows. Differentiable w.r.t. `smashed` only.

  Returns (penalty, s, active).
  """
  out, _ = _decode(dec, lax.stop_gradient(variables), smashed, False)
  s = jnp.mean(similarity.ssim(out, images))
  active = s > cfg.target_ssim
  if cfg.target_ssim <= 0:       # the reference: no threshold, the penalty always applies
    active = jnp.ones_like(active)
  penalty = jnp.where(active, cfg.alpha * (s - cfg.target_ssim), jnp.zeros_like(s))
  return penalty, s, active


def client_forward(forward, cfg: RessflConfig, online_vars: dict, attacker: AttackerState,
                   x: jax.Array, lr):
  """One client's online forward with its simulated attacker (per client: map it over the pool).

  Args:
    forward: (online_vars, x) -> (smashed, online_vars), the client's train-mode forward
      (parties.client_forward with its net).
    cfg, online_vars, attacker, x: this client's. lr: the attacker's learning rate.

  Returns (smashed data, online vars with new running stats, attacker after its update,
  metrics {attacker_ssim, regulariser_ssim, regulariser_active, regulariser_penalty}); the
  penalty is differentiable w.r.t. the client's params through the smashed data.
  """
  smashed, online = forward(online_vars, x)
  dec = build_decoder(cfg, x.shape[-2], smashed.shape[1:])
  images = images_of(cfg, x)
  attacker, attack_ssim = attacker_update(dec, attacker, smashed, images, lr)
  penalty, s, active = regulariser(cfg, dec, attacker.variables, smashed, images)
  metrics = dict(attacker_ssim=attack_ssim, regulariser_ssim=s,
                 regulariser_active=active.astype(precision.float_dtype()),
                 regulariser_penalty=penalty)
  return smashed, online, attacker, metrics


def pool_means(metrics: dict, pool_size: int) -> dict:
  """Means over the real pool clients (the first `pool_size` rows) of per-client metrics."""
  return {k: jnp.mean(metrics[k][:pool_size]).astype(precision.float_dtype())
          for k in METRIC_KEYS}

