"""The merging cell of the NAS-FPN search space (paper §3.1, Fig. 4).

A cell resamples its inputs to its output level, merges the first two with a binary op, adds any
further (dangling) features, then applies activation -> 3x3 conv (or depthwise separable) -> BN
-> optional DropBlock. Subclasses differ only in the binary op, as in mmcv's merge cells.
"""
import tensorflow as tf
import tf_keras

from nasfpn_tf.layers import common
from nasfpn_tf.layers.dropblock import DropBlock
from nasfpn_tf.layers.resample import ResampleToLevel


def global_pooling(coarse, fine):
  """The paper's global pooling op: `coarse + fine * sigmoid(global max of coarse)`, per channel.

  `coarse` is the input that came from the higher (lower resolution) level; both are already at
  the output level. This is the authors' "attention" op (mmcv swaps the roles and uses average
  pooling; we follow the authors).
  """
  gate = tf.sigmoid(tf.reduce_max(coarse, axis=[1, 2], keepdims=True))
  return coarse + fine * gate


class MergingCell(tf_keras.layers.Layer):
  """Base merging cell; `merge(a, b)` is the binary op.

  Call it on a list of features: `[input0, input1, *dangling]`, whose levels are `input_levels`.
  Inputs are merged at `merge_filters` channels (default `filters`), each brought there by a
  1x1 conv + BN only if its channel count differs.
  """

  def __init__(self, input_levels, output_level, filters, merge_filters=None,
               use_separable_conv=False,
               activation='relu', use_sync_bn=False, norm_momentum=0.99, norm_epsilon=1e-3,
               dropblock_keep_prob=None, dropblock_size=3, dropblock_ramp_steps=0,
               kernel_regularizer=None, bias_regularizer=None, **kwargs):
    super().__init__(**kwargs)
    if len(input_levels) < 2:
      raise ValueError(f'A merging cell needs at least two input levels, got {input_levels}.')
    self.input_levels = list(input_levels)
    self.output_level = output_level
    self._config = dict(
        input_levels=self.input_levels, output_level=output_level, filters=filters,
        merge_filters=merge_filters, use_separable_conv=use_separable_conv, activation=activation,
        use_sync_bn=use_sync_bn,
        norm_momentum=norm_momentum, norm_epsilon=norm_epsilon,
        dropblock_keep_prob=dropblock_keep_prob, dropblock_size=dropblock_size,
        dropblock_ramp_steps=dropblock_ramp_steps)
    self._kernel_regularizer = tf_keras.regularizers.get(kernel_regularizer)
    self._bias_regularizer = tf_keras.regularizers.get(bias_regularizer)
    self._activation = tf_keras.activations.get(activation)
    norm = dict(use_sync_bn=use_sync_bn, norm_momentum=norm_momentum, norm_epsilon=norm_epsilon)
    self.resamplers = [
        ResampleToLevel(level, output_level, merge_filters or filters,
                        name=f'resample{i}_from_l{level}',
                        kernel_regularizer=self._kernel_regularizer,
                        bias_regularizer=self._bias_regularizer, **norm)
        for i, level in enumerate(self.input_levels)]
    conv_class = (tf_keras.layers.SeparableConv2D if use_separable_conv
                  else tf_keras.layers.Conv2D)
    self.conv = conv_class(filters, 3, padding='same', name='conv', **common.conv_kwargs(
        use_separable_conv, self._kernel_regularizer, self._bias_regularizer))
    self.norm = common.norm_layer(**norm, name='norm')
    self.dropblock = (DropBlock(dropblock_keep_prob, dropblock_size, dropblock_ramp_steps,
                                name='dropblock') if dropblock_keep_prob is not None else None)

  def merge(self, a, b):
    raise NotImplementedError

  def call(self, inputs, training=None):
    if len(inputs) != len(self.input_levels):
      raise ValueError(f'{self.name}: expected {len(self.input_levels)} features (levels '
                       f'{self.input_levels}), got {len(inputs)}.')
    features = [resample(x, training=training) for resample, x in zip(self.resamplers, inputs)]
    x = self.merge(features[0], features[1])
    for dangling in features[2:]:
      x += dangling
    x = self.norm(self.conv(self._activation(x)), training=training)
    if self.dropblock is not None:
      x = self.dropblock(x, training=training)
    return x

  def get_config(self):
    return {**super().get_config(), **self._config,
            **common.serialize_regularizers(self._kernel_regularizer, self._bias_regularizer)}


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class SumCell(MergingCell):
  """Merges by element-wise sum."""

  def merge(self, a, b):
    return a + b


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class GlobalPoolingCell(MergingCell):
  """Merges by `global_pooling`; the coarse input is the one from the higher level (first on ties)."""

  def merge(self, a, b):
    if self.input_levels[0] >= self.input_levels[1]:
      return global_pooling(coarse=a, fine=b)
    return global_pooling(coarse=b, fine=a)


MERGING_CELLS = {'sum': SumCell, 'global_pooling': GlobalPoolingCell}
