"""The attacker's decoder: names, upsampling stages, output shape and range."""
import chex
import jax

import numpy as np
import pytest

from mocosfl_jax.privacy import decoder


def test_parse_name():
  assert decoder.parse_name('res_normN4C64') == (4, 64)
  assert decoder.parse_name('res_normN0C8') == (0, 8)
  for bad in ('custom', 'conv_normN4C64', 'res_normN4', 'res_normN4C0'):
    with pytest.raises(ValueError, match='res_normN<blocks>C<channels>'):
      decoder.parse_name(bad)


@pytest.mark.parametrize('image,smashed,u', [(32, 32, 0), (32, 16, 1), (32, 8, 2), (64, 8, 3),
                                             (16, 4, 2)])
def test_upsampling_stages(image, smashed, u):
  assert decoder.upsampling_stages(image, smashed) == u


@pytest.mark.parametrize('image,smashed', [(32, 12), (16, 32)])
def test_upsampling_refuses_non_power_of_two(image, smashed):
  with pytest.raises(ValueError, match='power of 2'):
    decoder.upsampling_stages(image, smashed)


@pytest.mark.parametrize('norm', decoder.NORMS)
@pytest.mark.parametrize('smashed_shape', [(8, 8, 4), (2, 2, 16)])
def test_decoder_maps_smashed_data_to_images(norm, smashed_shape):
  dec = decoder.build('res_normN1C8', 8, smashed_shape, norm)
  variables = decoder.init(dec, jax.random.key(0), smashed_shape)
  x = jax.random.normal(jax.random.key(1), (3,) + smashed_shape)
  y, new = dec.apply(variables, x, train=True, mutable=['batch_stats'])
  assert y.shape == (3, 8, 8, 3)
  assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
  y_eval = dec.apply(variables, x, train=False)
  assert y_eval.shape == (3, 8, 8, 3)
  if norm == 'bn':   # running statistics move in train mode
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(new['batch_stats']), jax.tree.leaves(variables['batch_stats'])))
  else:
    assert variables['batch_stats'] == {}


def test_decoder_name_sets_blocks_and_channels():
  small = decoder.build('res_normN1C8', 8, (8, 8, 4))
  big = decoder.build('res_normN4C64', 8, (8, 8, 4))
  count = lambda d: sum(x.size for x in jax.tree.leaves(
      decoder.init(d, jax.random.key(0), (8, 8, 4))['params']))
  assert count(big) > 10 * count(small)


def test_unknown_norm_refused():
  with pytest.raises(ValueError, match='norm'):
    decoder.build('res_normN4C64', 8, (8, 8, 4), norm='ln')



def test_conv_impl_changes_rounding_only(conv_impl='winograd'):   # matmul for the 1x1 convs
  """Same variables (names, shapes, initial values), the same images up to float rounding."""
  lax_dec = decoder.build('res_normN1C8', 16, (8, 8, 4))
  other = decoder.build('res_normN1C8', 16, (8, 8, 4), conv_impl=conv_impl)
  assert other.conv_impl == conv_impl and lax_dec.conv_impl == 'lax'
  v = decoder.init(lax_dec, jax.random.key(0), (8, 8, 4))
  chex.assert_trees_all_equal(v, decoder.init(other, jax.random.key(0), (8, 8, 4)))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  np.testing.assert_allclose(other.apply(v, x, train=False), lax_dec.apply(v, x, train=False),
                             atol=2e-5)
