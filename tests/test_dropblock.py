"""DropBlock: dropped fraction, block shape, rescaling, identity cases, ramp, dtypes, config."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from nasfpn_tf.layers import DropBlock, set_dropblock_step
from training_helpers import global_policy


def dropped_mask(out):
  return np.asarray(out) == 0


def union_of_fitting_squares(mask, block):
  """For each (n, c), the union of all block x block squares lying inside the map and fully in
  `mask` (a morphological opening). It equals `mask` iff `mask` is a union of such squares."""
  n, h, w, c = mask.shape
  union = np.zeros_like(mask)
  for i in range(h - block + 1):
    for j in range(w - block + 1):
      full = mask[:, i:i + block, j:j + block, :].all(axis=(1, 2))  # (n, c)
      union[:, i:i + block, j:j + block, :] |= full[:, None, None, :]
  return union


def run_train(layer, x):
  return layer(tf.constant(x), training=True).numpy()


def test_dropped_fraction_near_one_minus_keep_prob():
  x = np.ones((1, 64, 96, 32), np.float32)
  out = run_train(DropBlock(keep_prob=0.9, block_size=3), x)
  fraction = dropped_mask(out).mean()
  assert abs(fraction - 0.1) < 0.02, fraction


def test_dropped_regions_are_block_squares_and_kept_values_rescaled():
  x = np.ones((2, 24, 24, 8), np.float32)
  out = run_train(DropBlock(keep_prob=0.97, block_size=3), x)
  mask = dropped_mask(out)
  assert mask.any(), 'nothing dropped: the test would be vacuous'
  assert (~mask).any()
  np.testing.assert_array_equal(union_of_fitting_squares(mask, 3), mask)
  # Not a union of 4x4 squares (blocks are 3x3, not larger).
  assert not np.array_equal(union_of_fitting_squares(mask, 4), mask)
  # Kept activations are scaled by size / kept, the same factor everywhere.
  scale = mask.size / (~mask).sum()
  np.testing.assert_allclose(out[~mask], scale, rtol=1e-5)


def test_kept_values_keep_their_sign_and_ratio():
  x = np.random.default_rng(0).standard_normal((1, 16, 16, 4)).astype(np.float32) + 5.0
  out = run_train(DropBlock(keep_prob=0.8, block_size=3), x)
  kept = out != 0
  ratio = out[kept] / x[kept]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
  np.testing.assert_allclose(ratio[0], kept.size / kept.sum(), rtol=1e-5)


@pytest.mark.parametrize('kwargs', [dict(keep_prob=0.9), dict(keep_prob=None),
                                    dict(keep_prob=1.0)])
def test_identity_at_inference_and_without_drop(kwargs):
  x = np.random.default_rng(1).standard_normal((1, 16, 16, 4)).astype(np.float32)
  layer = DropBlock(**kwargs)
  np.testing.assert_array_equal(layer(tf.constant(x), training=False).numpy(), x)
  np.testing.assert_array_equal(layer(tf.constant(x)).numpy(), x)  # training=None
  if kwargs['keep_prob'] != 0.9:
    np.testing.assert_array_equal(layer(tf.constant(x), training=True).numpy(), x)


def test_non_square_maps():
  x = np.ones((1, 16, 96, 64), np.float32)
  out = run_train(DropBlock(keep_prob=0.9, block_size=3), x)
  assert out.shape == x.shape
  mask = dropped_mask(out)
  assert abs(mask.mean() - 0.1) < 0.03, mask.mean()
  np.testing.assert_array_equal(union_of_fitting_squares(mask, 3), mask)
  # Seeds are drawn in both axes over their own ranges: drops reach both far ends of the width.
  assert mask[:, :, :3].any() and mask[:, :, -3:].any()


def test_map_smaller_than_block_shrinks_block():
  x = np.ones((1, 2, 5, 32), np.float32)
  out = run_train(DropBlock(keep_prob=0.5, block_size=3), x)
  assert np.isfinite(out).all()
  mask = dropped_mask(out)
  assert mask.any() and (~mask).any()
  # The block shrinks to min(h, w) = 2: dropped regions are 2x2 squares covering both rows.
  np.testing.assert_array_equal(union_of_fitting_squares(mask, 2), mask)
  np.testing.assert_array_equal(mask[:, 0], mask[:, 1])


def test_one_pixel_map():
  x = np.ones((4, 1, 1, 64), np.float32)
  out = run_train(DropBlock(keep_prob=0.5, block_size=3), x)
  assert np.isfinite(out).all() and dropped_mask(out).any()


def test_keep_prob_linear_ramp_with_set_dropblock_step():
  layer = DropBlock(keep_prob=0.9, block_size=3, ramp_steps=100)
  model = tf_keras.Sequential([tf_keras.Input((None, None, 32)), layer])
  expected = {0: 1.0, 50: 0.95, 100: 0.9, 200: 0.9, 25: 0.975}
  for step, keep in expected.items():
    set_dropblock_step(model, step)
    assert int(layer.step.numpy()) == step
    np.testing.assert_allclose(layer.current_keep_prob().numpy(), keep, rtol=1e-6)
  # At step 0 the ramp keeps everything even in training; at the end it drops.
  x = np.ones((1, 32, 32, 32), np.float32)
  set_dropblock_step(model, 0)
  np.testing.assert_array_equal(model(x, training=True).numpy(), x)
  set_dropblock_step(model, 100)
  assert dropped_mask(model(x, training=True)).any()


def test_no_ramp_is_constant_keep_prob():
  layer = DropBlock(keep_prob=0.8)
  tf_keras.Sequential([tf_keras.Input((8, 8, 4)), layer])
  np.testing.assert_allclose(layer.current_keep_prob().numpy(), 0.8, rtol=1e-6)


def test_mixed_float16():
  with global_policy('mixed_float16'):
    layer = DropBlock(keep_prob=0.9, block_size=3)
    out = layer(tf.ones((1, 32, 32, 16), tf.float32), training=True)
  assert out.dtype == tf.float16
  mask = dropped_mask(out.numpy())
  assert mask.any()
  scale = mask.size / (~mask).sum()
  np.testing.assert_allclose(out.numpy()[~mask].astype(np.float32), scale, rtol=1e-3)


def test_config_round_trip():
  layer = DropBlock(keep_prob=0.85, block_size=5, ramp_steps=1000, seed=3, name='db')
  config = layer.get_config()
  clone = tf_keras.layers.deserialize(tf_keras.layers.serialize(layer))
  assert isinstance(clone, DropBlock)
  assert clone.get_config() == config
  assert (clone.keep_prob, clone.block_size, clone.ramp_steps, clone.seed) == (0.85, 5, 1000, 3)


@pytest.mark.parametrize('kwargs, message', [
    (dict(keep_prob=0.0), r'DropBlock keep_prob must be in \(0, 1\], got 0\.0\.'),
    (dict(keep_prob=1.5), r'DropBlock keep_prob must be in \(0, 1\], got 1\.5\.'),
    (dict(block_size=0), r'DropBlock block_size must be >= 1, got 0\.')])
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    DropBlock(**kwargs)


def test_inside_tf_function_follows_the_step_variable():
  layer = DropBlock(keep_prob=0.9, block_size=3, ramp_steps=10)
  model = tf_keras.Sequential([tf_keras.Input((32, 32, 32)), layer])
  x = tf.ones((1, 32, 32, 32))

  @tf.function
  def train_step(inputs, step):
    set_dropblock_step(model, step)
    return model(inputs, training=True)

  np.testing.assert_array_equal(train_step(x, tf.constant(0)).numpy(), x.numpy())
  out = train_step(x, tf.constant(10)).numpy()  # same trace, new step
  assert train_step.experimental_get_tracing_count() == 1
  fraction = dropped_mask(out).mean()
  assert 0.05 < fraction < 0.15, fraction
  assert int(layer.step.numpy()) == 10
