"""The numpy augmentation of edge clients (remote/edge_augment.py) makes the training pipeline's
views from the uniforms the server sends, and those uniforms are the ones `two_views` draws."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mocosfl_jax.data import augment
from mocosfl_jax.remote import edge_augment

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (2, 5, 12, 10, 3), dtype=np.uint8)   # [clients, batch, H, W, C]
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.mark.parametrize("pipeline,out_size,crop_scale", [
    ("mocov2", None, (0.08, 1.0)), ("mocov2", 16, (0.5, 1.0)), ("mocov1", None, (0.08, 1.0)),
    ("none", None, (0.08, 1.0))])
def test_views_from_sent_uniforms_equal_the_training_views(pipeline, out_size, crop_scale):
  key = jax.random.key(7)
  q, k = augment.two_views(key, jnp.asarray(IMAGES), jnp.asarray(MEAN), jnp.asarray(STD),
                           pipeline, out_size, crop_scale)
  uniforms = augment.view_uniforms(key, IMAGES.shape[:2])
  assert uniforms.shape == (2, 2, 5, augment.NUM_UNIFORMS)
  for c in range(2):
    # JAX from the uniforms: the same computation (compiled for another batch: float32 rounding).
    one = lambda u, img: augment.augment_from_uniforms(u, img, jnp.asarray(MEAN),
                                                       jnp.asarray(STD), pipeline, out_size,
                                                       crop_scale)
    jq = jax.jit(jax.vmap(one))(uniforms[0, c], IMAGES[c])
    np.testing.assert_allclose(np.asarray(jq), np.asarray(q[c]), atol=2e-6)
    # numpy from the uniforms: the same formulas in float32, up to rounding.
    nq, nk = edge_augment.two_views(np.asarray(uniforms[:, c]), IMAGES[c], MEAN, STD, pipeline,
                                    out_size, crop_scale)
    assert nq.dtype == np.float32 and nq.shape == q[c].shape
    np.testing.assert_allclose(nq, np.asarray(q[c]), atol=2e-5)
    np.testing.assert_allclose(nk, np.asarray(k[c]), atol=2e-5)


def test_every_op_is_exercised():
  """Over these draws each random op (flip, jitter, grey, blur) is both applied and skipped,
  so the comparison above covers all of them."""
  u = np.asarray(augment.view_uniforms(jax.random.key(7), IMAGES.shape[:2])).reshape(
      -1, augment.NUM_UNIFORMS)
  for index, p in ((edge_augment.U_FLIP, edge_augment.P_FLIP),
                   (edge_augment.U_P_JITTER, edge_augment.P_JITTER),
                   (edge_augment.U_GRAY, edge_augment.P_GRAY),
                   (edge_augment.U_BLUR, edge_augment.P_BLUR)):
    assert (u[:, index] < p).any() and (u[:, index] >= p).any()


def test_hue_and_layout_constants_follow_the_jax_pipeline():
  assert edge_augment.NUM_UNIFORMS == augment.NUM_UNIFORMS
  assert edge_augment.CROP_UNIFORMS == augment.CROP_UNIFORMS
  img = RNG.random((3, 6, 5), dtype=np.float32)
  for delta in (-0.1, 0.03, 0.1):
    ref = augment.adjust_hue(jnp.asarray(img), delta, channel_axis=0)
    np.testing.assert_allclose(edge_augment.adjust_hue(img, delta), np.asarray(ref), atol=2e-6)
