"""FLOP and parameter counts against hand counts on models small enough to count by hand."""
import gin
import pytest
import tensorflow as tf
import tf_keras

from nasfpn_tf.config import GIN_CONFIGS_DIR, parse_gin
from nasfpn_tf.models import build_retinanet
from nasfpn_tf.utils import count_flops, count_params


def _conv_model(use_bias):
  inputs = tf_keras.Input([8, 8, 3])
  outputs = tf_keras.layers.Conv2D(8, 3, padding='same', use_bias=use_bias)(inputs)
  return tf_keras.Model(inputs, outputs)


def test_conv_flops_are_two_per_multiply_add():
  # 8x8 outputs x 8 channels, each a 3x3x3 dot product; 'same' padding is counted as full windows.
  assert count_flops(_conv_model(use_bias=False), (8, 8, 3)) == 2 * (3 * 3 * 3) * 8 * (8 * 8)


def test_conv_bias_adds_one_flop_per_output():
  assert count_flops(_conv_model(use_bias=True), (8, 8, 3)) == (2 * 27 + 1) * 8 * 64


def test_depthwise_conv_flops_are_two_per_multiply_add():
  inputs = tf_keras.Input([8, 8, 4])
  outputs = tf_keras.layers.DepthwiseConv2D(3, padding='same', use_bias=False)(inputs)
  assert count_flops(tf_keras.Model(inputs, outputs), (8, 8, 4)) == 2 * (3 * 3) * 4 * (8 * 8)


def test_dense_flops_and_params():
  inputs = tf_keras.Input([16])
  model = tf_keras.Model(inputs, tf_keras.layers.Dense(4)(inputs))
  assert count_flops(model, (16,)) == 2 * 16 * 4 + 4
  assert count_params(model) == 16 * 4 + 4


def test_callable_is_profiled_as_given():
  dense = tf_keras.layers.Dense(4, use_bias=False)
  assert count_flops(lambda x: dense(dense(x)), (4,)) == 2 * (2 * 4 * 4)


def test_params_include_bn_statistics_and_count_shared_weights_once():
  inputs = tf_keras.Input([8, 8, 3])
  conv = tf_keras.layers.Conv2D(3, 1, use_bias=False)
  x = tf_keras.layers.BatchNormalization()(conv(conv(inputs)))
  model = tf_keras.Model(inputs, x)
  assert count_params(model) == 3 * 3 + 4 * 3


def test_incomplete_shapes_are_an_error():
  # With a fixed input signature only a data-dependent shape can be unknown.
  def positives_doubled(x):
    positives = tf.boolean_mask(x, x > 0)
    return positives + positives

  with pytest.raises(ValueError, match='incomplete static shapes'):
    count_flops(positives_doubled, (4,))


def test_nasfpn_r50_640_matches_paper_table1():
  """Paper Table 1, NAS-FPN R-50 (7@256) at 640: 281.3B FLOPs (±1%), 60.3M params (±0.5%)."""
  parse_gin([str(GIN_CONFIGS_DIR / 'nasfpn_r50_7x256_640.gin')])
  model = build_retinanet()
  gin.clear_config()  # Later tests in this process build from their own bindings.
  assert count_params(model) == pytest.approx(60.3e6, rel=0.005)
  assert count_flops(model, model.image_size + [3]) == pytest.approx(281.3e9, rel=0.01)


def test_dropblock_step_counter_is_not_a_parameter():
  from nasfpn_tf.layers import DropBlock
  inputs = tf_keras.Input([8, 8, 4])
  model = tf_keras.Model(inputs, DropBlock(0.9)(tf_keras.layers.Conv2D(2, 1)(inputs)))
  assert model.count_params() == 4 * 2 + 2 + 1  # Keras counts the int64 step
  assert count_params(model) == 4 * 2 + 2
