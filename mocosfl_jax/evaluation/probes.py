"""Linear and semi-supervised probes on frozen, precomputed features.

Arrays in, accuracy (percent) out. Each probe has two recipes:

* 'reference' reproduces the reference scripts, quirks included (docs/reference.md, 'Linear
  probe' and 'Semi-supervised probe'): data in the given order every epoch (no shuffling),
  Adam 1e-3, LR schedule stepped per *iteration*:
  - linear: cosine with T_max = epochs // 4 iterations (25 for 100 epochs), so the LR oscillates
    between lr and 0 with a period of 2 * T_max iterations;
  - semi: MultiStep at iterations [int(0.6 E), int(0.8 E)] (60, 80), gamma 0.1, so the LR drops in
    the first epochs.
* 'clean' shuffles every epoch and uses a cosine schedule over epochs (T_max = epochs, constant
  within an epoch), for both probes.
* 'flmoco' is the reference's FL-MoCo baseline (its run_flmoco.py): the linear probe trains with
  SGD (lr 3.0, momentum 0.9, weight decay 1e-4) and a cosine schedule with T_max = epochs
  stepped per iteration, data unshuffled; its semi-supervised probe is the 'reference' one.

Both recipes evaluate on the test set after every epoch and return the final-epoch accuracy and
the best over epochs (the reference reports only the latter, which selects on the test set).
Models: linear = Linear(F, C), xavier-uniform weights, zero bias; semi = Linear(F, H) -
BatchNorm1d(H) - ReLU - Linear(H, C) with the same init (reference `init_weights`) and PyTorch BN
conventions (momentum 0.1, eps 1e-5, unbiased running variance). Differences on purpose: the semi
probe takes F from the features (the reference hard-codes 512 * expansion, breaking MobileNetV2);
the last partial batch is masked instead of being a smaller tensor (same maths; a 1-sample batch,
which crashes PyTorch's BN, is allowed).

The whole run (all epochs, all batches, per-epoch test evaluation) is one jitted `lax.scan`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mocosfl_jax.algorithm import losses
from mocosfl_jax.algorithm import optim

RECIPES = ("reference", "clean", "flmoco")
FLMOCO_LINEAR_LR = 3.0
PROBES = ("linear", "semi")
_BN_EPS = 1e-5
_BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch.


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """Probe outcome. Accuracies in percent; `best_epoch` is 0-based; `lrs` [epochs, steps] holds
  the learning rate applied at every iteration."""
  final_accuracy: float
  best_accuracy: float
  best_epoch: int
  accuracies: tuple
  num_train: int
  recipe: str
  lrs: np.ndarray = dataclasses.field(repr=False, compare=False)


def probe_lr_schedule(probe: str, recipe: str, *, lr: float, epochs: int, steps_per_epoch: int):
  """LR as a function of the global iteration count (0 = first update)."""
  _check_choice("probe", probe, PROBES)
  _check_choice("recipe", recipe, RECIPES)
  if recipe == "clean":
    def clean(count):
      epoch = jnp.asarray(count) // steps_per_epoch
      return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
    return clean
  if probe == "linear":
    t_max = epochs if recipe == "flmoco" else max(1, epochs // 4)

    def cosine_per_iteration(count):
      # Closed form of torch CosineAnnealingLR (eta_min 0) past T_max: it bounces, period 2*T_max.
      return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.asarray(count) / t_max))
    return cosine_per_iteration
  milestones = (int(0.6 * epochs), int(0.8 * epochs))

  def multistep_per_iteration(count):
    drops = sum((jnp.asarray(count) >= m).astype(jnp.int32) for m in milestones)
    return lr * 0.1 ** drops
  return multistep_per_iteration


def _check_choice(name, value, valid):
  if value not in valid:
    raise ValueError(f"{name}={value!r}: valid values are {valid}")


# ----------------------------------------------------------------------------------------------
# Models as pure functions: init(key, F, C, H) -> (params, state); apply(..., train) -> logits.

_xavier = jax.nn.initializers.xavier_uniform()


def _init(probe: str, key, in_dim: int, num_classes: int, hidden: int):
  if probe == "linear":
    return {"w": _xavier(key, (in_dim, num_classes)), "b": jnp.zeros((num_classes,))}, {}
  k1, k2 = jax.random.split(key)
  params = {"w1": _xavier(k1, (in_dim, hidden)), "b1": jnp.zeros((hidden,)),
            "scale": jnp.ones((hidden,)), "bias": jnp.zeros((hidden,)),
            "w2": _xavier(k2, (hidden, num_classes)), "b2": jnp.zeros((num_classes,))}
  return params, {"mean": jnp.zeros((hidden,)), "var": jnp.ones((hidden,))}


def _apply(probe: str, params, state, x, mask, train: bool):
  """Returns (logits, new_state). `mask` [B] marks real rows (BN statistics ignore padding)."""
  if probe == "linear":
    return x @ params["w"] + params["b"], state
  h = x @ params["w1"] + params["b1"]
  if train:
    m = mask.astype(h.dtype)[:, None]
    n = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(h * m, axis=0) / n
    var = jnp.sum(jnp.square(h - mean) * m, axis=0) / n
    unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
    state = {"mean": (1 - _BN_MOMENTUM) * state["mean"] + _BN_MOMENTUM * mean,
             "var": (1 - _BN_MOMENTUM) * state["var"] + _BN_MOMENTUM * unbiased}
  else:
    mean, var = state["mean"], state["var"]
  h = (h - mean) * jax.lax.rsqrt(var + _BN_EPS) * params["scale"] + params["bias"]
  h = jax.nn.relu(h)
  return h @ params["w2"] + params["b2"], state


def _num_correct(probe, params, state, x, y):
  logits, _ = _apply(probe, params, state, x, None, train=False)
  return jnp.sum(jnp.argmax(logits, axis=-1) == y)


@functools.partial(jax.jit, static_argnames=("probe", "recipe", "epochs", "batch_size",
                                              "num_classes", "hidden"))
def _run(key, lr, train_x, train_y, test_x, test_y, *, probe, recipe, epochs, batch_size,
         num_classes, hidden):
  n = train_x.shape[0]
  steps = -(-n // batch_size)
  schedule = probe_lr_schedule(probe, recipe, lr=lr, epochs=epochs, steps_per_epoch=steps)
  init_key, shuffle_key = jax.random.split(key)
  params, bn_state = _init(probe, init_key, train_x.shape[1], num_classes, hidden)
  if recipe == "flmoco" and probe == "linear":   # torch.optim.SGD(momentum 0.9, wd 1e-4)
    opt = optim.make_sgd(momentum=0.9, weight_decay=1e-4)
  else:
    opt = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)  # torch.optim.Adam defaults.
  opt_state = opt.init(params)
  mask = (jnp.arange(steps * batch_size) < n).reshape(steps, batch_size)

  def loss_fn(params, bn_state, x, y, m):
    logits, bn_state = _apply(probe, params, bn_state, x, m, train=True)
    ce = losses.cross_entropy(logits, y)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1), bn_state

  def train_step(carry, inputs):
    params, bn_state, opt_state = carry
    idx, m, count = inputs
    x, y = train_x[idx], train_y[idx]
    (_, bn_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, bn_state, x, y, m)
    updates, opt_state = opt.update(grads, opt_state, params)
    step_lr = schedule(count)
    params = jax.tree.map(lambda p, u: p - step_lr * u, params, updates)
    return (params, bn_state, opt_state), step_lr

  def epoch(carry, epoch_idx):
    params, bn_state, opt_state = carry
    order = jnp.arange(n)
    if recipe == "clean":
      order = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch_idx), n)
    order = jnp.pad(order, (0, steps * batch_size - n)).reshape(steps, batch_size)
    counts = epoch_idx * steps + jnp.arange(steps)
    (params, bn_state, opt_state), lrs = jax.lax.scan(
        train_step, (params, bn_state, opt_state), (order, mask, counts))
    correct = _num_correct(probe, params, bn_state, test_x, test_y)
    return (params, bn_state, opt_state), (correct, lrs)

  _, (correct, lrs) = jax.lax.scan(epoch, (params, bn_state, opt_state), jnp.arange(epochs))
  return correct, lrs


def _validate(train_x, train_y, test_x, test_y, num_classes, recipe, epochs, batch_size):
  _check_choice("recipe", recipe, RECIPES)
  for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
    if np.ndim(x) != 2:
      raise ValueError(f"{name}_x must be 2-D [N, F]; got shape {np.shape(x)}")
    if np.shape(y) != (np.shape(x)[0],):
      raise ValueError(f"{name}_y shape {np.shape(y)} must be ({np.shape(x)[0]},)")
    if np.shape(x)[0] == 0:
      raise ValueError(f"{name}_x is empty")
    y = np.asarray(y)
    if y.min() < 0 or y.max() >= num_classes:
      raise ValueError(f"{name}_y must lie in [0, {num_classes}); got [{y.min()}, {y.max()}]")
  if np.shape(train_x)[1] != np.shape(test_x)[1]:
    raise ValueError(f"feature dims differ: train {np.shape(train_x)[1]}, test {np.shape(test_x)[1]}")
  if epochs < 1:
    raise ValueError(f"epochs={epochs}: must be >= 1")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: must be >= 1")


def _probe(probe, key, train_x, train_y, test_x, test_y, num_classes, recipe, epochs,
           batch_size, lr, hidden) -> ProbeResult:
  _validate(train_x, train_y, test_x, test_y, num_classes, recipe, epochs, batch_size)
  if not lr > 0:
    raise ValueError(f"lr={lr}: must be > 0")
  batch_size = min(int(batch_size), int(np.shape(train_x)[0]))  # one padded step is enough
  correct, lrs = _run(key, jnp.float32(lr), jnp.asarray(train_x, jnp.float32),
                   jnp.asarray(train_y, jnp.int32), jnp.asarray(test_x, jnp.float32),
                   jnp.asarray(test_y, jnp.int32), probe=probe, recipe=recipe, epochs=int(epochs),
                   batch_size=int(batch_size), num_classes=int(num_classes), hidden=int(hidden))
  accs = 100.0 * np.asarray(correct, np.float64) / np.shape(test_x)[0]
  best = int(np.argmax(accs))
  return ProbeResult(final_accuracy=float(accs[-1]), best_accuracy=float(accs[best]),
                     best_epoch=best, accuracies=tuple(float(a) for a in accs),
                     num_train=int(np.shape(train_x)[0]), recipe=recipe, lrs=np.asarray(lrs))


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, *, key,
                 recipe: str = "reference", epochs: int = 100, batch_size: int = 128,
                 lr: float = 1e-3) -> ProbeResult:
  """Linear probe on frozen features [N, F]; `key` drives init and shuffling.

  For the 'reference' recipe pass the train features in loader order (the reference's memory
  loader: one fixed random permutation), since that order is used unchanged every epoch.
  """
  return _probe("linear", key, train_x, train_y, test_x, test_y, num_classes, recipe, epochs,
                batch_size, lr, hidden=0)


def linear_lr(recipe: str) -> float:
  """The linear probe's base learning rate under `recipe` (Adam 1e-3; FL-MoCo's SGD 3.0)."""
  return FLMOCO_LINEAR_LR if recipe == "flmoco" else 1e-3


def label_subset(key, num_examples: int, fraction: float) -> np.ndarray:
  """Indices of a random, not class-balanced `fraction` of the examples, in random order
  (the reference's random 10% / 1% subsets: int(fraction * N) examples)."""
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction={fraction}: must be in (0, 1]")
  size = int(fraction * num_examples)
  if size < 1:
    raise ValueError(f"fraction={fraction} of {num_examples} examples selects none")
  return np.asarray(jax.random.permutation(key, num_examples)[:size])


def semi_supervised_probe(train_x, train_y, test_x, test_y, num_classes: int, *, key,
                          fraction: float = 0.1, recipe: str = "reference", epochs: int = 100,
                          batch_size: int = 128, lr: float = 1e-3,
                          hidden: int = 512) -> ProbeResult:
  """MLP probe trained on a random `fraction` of the labelled train features."""
  subset_key, run_key = jax.random.split(key)
  idx = label_subset(subset_key, int(np.shape(train_x)[0]), fraction)
  if hidden < 1:
    raise ValueError(f"hidden={hidden}: must be >= 1")
  return _probe("semi", run_key, train_x[idx], train_y[idx], test_x, test_y, num_classes, recipe,
                epochs, batch_size, lr, hidden)


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """Iterations per epoch including the last partial batch (reference drop_last=False)."""
  return math.ceil(num_train / batch_size)
