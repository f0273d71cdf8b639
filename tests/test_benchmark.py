"""The benchmark's train-step profile: TF profiler op time attributed to the right categories."""
import pytest
import tensorflow as tf

from training_helpers import load_experiment

benchmark = load_experiment('benchmark')


@pytest.mark.parametrize('op_type,category', [
    ('_MklNativeConv2D', 'conv'), ('_MklNativeFusedConv2D', 'conv'),
    ('_MklNativeConv2DBackpropInput', 'conv'), ('_MklNativeConv2DBackpropFilterWithBias', 'conv'),
    ('Conv2DBackpropFilter', 'conv'), ('DepthwiseConv2dNative', 'rest'),
    ('_MklNativeFusedBatchNormV3', 'norm_relu_pool'), ('_MklNativeFusedBatchNormEx', 'norm_relu_pool'),
    ('_MklNativeFusedBatchNormGradV3', 'norm_relu_pool'), ('ReluGrad', 'norm_relu_pool'),
    ('_MklNativeMaxPoolGrad', 'norm_relu_pool'), ('Cast', 'rest'), ('AddN', 'rest'),
    ('ResourceApplyKerasMomentum', 'rest')])
def test_op_categories(op_type, category):
  assert benchmark._op_category(op_type) == category  # pylint: disable=protected-access


def test_profile_attributes_op_time():
  """A big convolution, a batch norm and ReLU, and a cheap reduction: the profile finds each in
  its category, the convolution dominating; a function without convolutions has none."""
  images = tf.random.stateless_normal([2, 96, 96, 64], seed=[1, 2])
  kernel = tf.random.stateless_normal([3, 3, 64, 64], seed=[3, 4])
  scale, offset = tf.ones([64]), tf.zeros([64])

  @tf.function
  def conv_norm_relu():
    x = tf.nn.conv2d(images, kernel, 1, 'SAME')
    x, _, _ = tf.compat.v1.nn.fused_batch_norm(x, scale, offset, is_training=True)
    return tf.reduce_sum(tf.nn.relu(x))

  @tf.function
  def no_conv():
    return tf.reduce_sum(tf.square(images))

  profile = benchmark.profile_train_steps({'conv_norm_relu': conv_norm_relu, 'no_conv': no_conv},
                                          repeats=3)
  with_conv = profile['conv_norm_relu']
  assert set(with_conv) == set(benchmark.PROFILE_CATEGORIES)
  assert with_conv['conv'] > 0 and with_conv['norm_relu_pool'] > 0 and with_conv['rest'] > 0
  assert with_conv['conv'] > with_conv['rest']
  assert profile['no_conv']['conv'] == 0 and profile['no_conv']['norm_relu_pool'] == 0
  assert profile['no_conv']['rest'] > 0
