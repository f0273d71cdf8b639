"""Bringing a feature map to another pyramid level (paper §3.1)."""
import tensorflow as tf
import tf_keras
from official.vision.ops import spatial_transform_ops

from nasfpn_tf.layers import common


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class ResampleToLevel(tf_keras.layers.Layer):
  """Resamples a feature from `input_level` to `target_level`.

  Going up a level is max pooling (kernel = stride = 2^dl, 'same' padding), going down is nearest
  upsampling by 2^dl. A 1x1 conv + BN runs first, and only, when the channel count differs from
  `filters`, so inside a stacked pyramid (all features at F channels) this layer has no weights.
  The output is always in the compute dtype (mixed precision: features that pass through
  unchanged must not stay float32).
  """

  def __init__(self, input_level, target_level, filters=None, use_sync_bn=False,
               norm_momentum=0.99, norm_epsilon=1e-3, kernel_regularizer=None,
               bias_regularizer=None, **kwargs):
    super().__init__(**kwargs)
    self._config = dict(
        input_level=input_level, target_level=target_level, filters=filters,
        use_sync_bn=use_sync_bn, norm_momentum=norm_momentum, norm_epsilon=norm_epsilon)
    self._kernel_regularizer = tf_keras.regularizers.get(kernel_regularizer)
    self._bias_regularizer = tf_keras.regularizers.get(bias_regularizer)
    self.conv = None
    self.norm = None

  def build(self, input_shape):
    channels = input_shape[-1]
    filters = self._config['filters']
    if filters is not None and channels != filters:
      self.conv = tf_keras.layers.Conv2D(
          filters, 1, padding='same', name='conv',
          **common.conv_kwargs(False, self._kernel_regularizer, self._bias_regularizer))
      self.norm = common.norm_layer(self._config['use_sync_bn'], self._config['norm_momentum'],
                                    self._config['norm_epsilon'], name='norm')
    super().build(input_shape)

  def call(self, inputs, training=None):
    x = inputs
    if self.conv is not None:
      x = self.norm(self.conv(x), training=training)
    delta = self._config['target_level'] - self._config['input_level']
    if delta > 0:
      size = 2**delta
      x = tf.nn.max_pool2d(x, ksize=size, strides=size, padding='SAME')
    elif delta < 0:
      x = spatial_transform_ops.nearest_upsampling(x, scale=2**-delta)
    return tf.cast(x, self.compute_dtype)

  def compute_output_shape(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    delta = self._config['target_level'] - self._config['input_level']
    spatial = []
    for dim in input_shape[1:3]:
      if dim is None:
        spatial.append(None)
      elif delta >= 0:
        spatial.append(-(-dim // 2**delta))
      else:
        spatial.append(dim * 2**-delta)
    channels = self._config['filters'] or input_shape[-1]
    return tf.TensorShape([input_shape[0], *spatial, channels])

  def get_config(self):
    return {**super().get_config(), **self._config,
            **common.serialize_regularizers(self._kernel_regularizer, self._bias_regularizer)}
