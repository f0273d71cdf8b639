"""The basic block of the NAS-FCOS search space (paper §3.2, Fig. 1), as the released code has it.

A cell applies one unary op to each of its two inputs, brings the coarser result up to the finer
one's size (bilinear, half-pixel centres as PyTorch's `align_corners=False`) and aggregates:

- `sep_conv_3x3`, `sep_conv_3x3_dil3`, `sep_conv_5x5_dil6`: depthwise conv (dilated, no bias) ->
  pointwise 1x1 (no bias) -> BN -> ReLU (the released `SepConv`);
- `skip`: identity;
- `deform_conv_3x3`: modulated deformable 3x3 conv with 2 deformable groups and bias -> BN -> ReLU
  (`DefConv`, DCNv2 from `DeformableConv2D`);
- `weighted_sum`: a * x + b * y with learned per-channel a, b starting at 1 (`ParamSum`);
- `concat`: concat [x, y] -> BN -> ReLU -> 1x1 conv 2C -> C with C groups, no bias
  (`ConcatReduce`; the paper says "concatenation followed by a 1x1 convolution", the released
  code's 1x1 is grouped: output channel g reads concatenated channels 2g and 2g + 1).
"""
import tensorflow as tf
import tf_keras

from nasfpn_tf.layers import common
from nasfpn_tf.layers.deformable_conv import DeformableConv2D

# op name -> (kernel size, dilation) of the separable convolutions.
SEPARABLE = {'sep_conv_3x3': (3, 1), 'sep_conv_3x3_dil3': (3, 3), 'sep_conv_5x5_dil6': (5, 6)}
DEFORMABLE_GROUPS = 2  # the released `DefConv`


def resize_bilinear_to(x, like):
  """`x` resized bilinearly (half-pixel centres) to the height and width of `like`; `x` itself
  when they already agree."""
  size = [like.shape[1], like.shape[2]]
  if None in size:
    size = tf.shape(like)[1:3]
  elif x.shape[1:3] == like.shape[1:3]:
    return x
  return tf.cast(tf.image.resize(x, size, method='bilinear'), x.dtype)


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class ResizeBilinearLike(tf_keras.layers.Layer):
  """Called on [x, like]: `resize_bilinear_to(x, like)`."""

  def call(self, inputs):
    x, like = inputs
    return resize_bilinear_to(x, like)


class _UnaryOp(tf_keras.layers.Layer):
  """One of `nasfcos_specs.OPS` at `filters` channels."""

  def __init__(self, op, filters, norm, regularizers, **kwargs):
    super().__init__(**kwargs)
    self.op = op
    self.conv = None
    if op in SEPARABLE:
      kernel, dilation = SEPARABLE[op]
      self.conv = tf_keras.layers.SeparableConv2D(
          filters, kernel, padding='same', dilation_rate=dilation, use_bias=False, name='conv',
          **common.conv_kwargs(True, **regularizers))
    elif op == 'deform_conv_3x3':
      kwargs = common.conv_kwargs(False, **regularizers)
      self.conv = DeformableConv2D(
          filters, 3, deformable_groups=DEFORMABLE_GROUPS, name='conv',
          kernel_initializer=kwargs['kernel_initializer'],
          kernel_regularizer=regularizers['kernel_regularizer'],
          bias_regularizer=regularizers['bias_regularizer'])
    elif op != 'skip':
      raise ValueError(f'{self.name}: unknown op {op!r}.')
    self.norm = common.norm_layer(**norm, name='norm') if self.conv is not None else None

  def call(self, x, training=None):
    if self.conv is None:
      return x
    return tf.nn.relu(self.norm(self.conv(x), training=training))


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class NASFCOSCell(tf_keras.layers.Layer):
  """A NAS-FCOS basic block: call it on [x0, x1] at `input_levels`; the output is at the finer.

  Both inputs must have `filters` channels (the pyramid's adapt convs see to it).
  """

  def __init__(self, input_levels, ops, agg, filters, use_sync_bn=False, norm_momentum=0.99,
               norm_epsilon=1e-3, kernel_regularizer=None, bias_regularizer=None, **kwargs):
    super().__init__(**kwargs)
    if len(input_levels) != 2 or len(ops) != 2:
      raise ValueError(f'{self.name}: a cell takes two inputs and two ops, got input_levels='
                       f'{input_levels}, ops={ops}.')
    if agg not in ('weighted_sum', 'concat'):
      raise ValueError(f'{self.name}: unknown aggregation {agg!r}.')
    self.input_levels = [int(level) for level in input_levels]
    self.output_level = min(self.input_levels)
    norm = dict(use_sync_bn=use_sync_bn, norm_momentum=norm_momentum, norm_epsilon=norm_epsilon)
    self._kernel_regularizer = tf_keras.regularizers.get(kernel_regularizer)
    self._bias_regularizer = tf_keras.regularizers.get(bias_regularizer)
    regularizers = dict(kernel_regularizer=self._kernel_regularizer,
                        bias_regularizer=self._bias_regularizer)
    self._config = dict(input_levels=self.input_levels, ops=list(ops), agg=agg, filters=filters,
                        **norm)
    self.ops = [_UnaryOp(op, filters, norm, regularizers, name=f'op{i}_{op}')
                for i, op in enumerate(ops)]
    self.agg = agg
    self.filters = filters
    if agg == 'concat':
      self.agg_norm = common.norm_layer(**norm, name='agg_norm')

  def build(self, input_shape):
    for i, shape in enumerate(input_shape):
      if shape[-1] != self.filters:
        raise ValueError(f'{self.name}: input {i} has {shape[-1]} channels, the cell works at '
                         f'filters={self.filters}.')
    if self.agg == 'weighted_sum':
      self.weight_a = self.add_weight('weight_a', shape=[self.filters], initializer='ones',
                                      regularizer=None)
      self.weight_b = self.add_weight('weight_b', shape=[self.filters], initializer='ones',
                                      regularizer=None)
    else:
      # The grouped 1x1 conv's kernel: [C groups, 2 inputs each]; fan-out He init as common's.
      self.agg_kernel = self.add_weight(
          'agg_kernel', shape=[self.filters, 2], regularizer=self._kernel_regularizer,
          initializer=tf_keras.initializers.VarianceScaling(
              scale=2.0, mode='fan_out', distribution='untruncated_normal'))
    super().build(input_shape)

  def call(self, inputs, training=None):
    if len(inputs) != 2:
      raise ValueError(f'{self.name}: expected 2 features, got {len(inputs)}.')
    x, y = (op(feature, training=training) for op, feature in zip(self.ops, inputs))
    if self.input_levels[0] > self.input_levels[1]:
      x = resize_bilinear_to(x, y)
    elif self.input_levels[1] > self.input_levels[0]:
      y = resize_bilinear_to(y, x)
    dtype = x.dtype
    if self.agg == 'weighted_sum':
      return tf.cast(self.weight_a, dtype) * x + tf.cast(self.weight_b, dtype) * y
    z = tf.nn.relu(self.agg_norm(tf.concat([x, y], axis=-1), training=training))
    shape = tf.shape(z)
    z = tf.reshape(z, tf.concat([shape[:3], [self.filters, 2]], axis=0))
    out = tf.reduce_sum(z * tf.cast(self.agg_kernel, dtype), axis=-1)
    return tf.ensure_shape(out, [*x.shape[:3], self.filters])

  def compute_output_shape(self, input_shape):
    finer = input_shape[0] if self.input_levels[0] <= self.input_levels[1] else input_shape[1]
    return tf.TensorShape([*finer[:3], self.filters])

  def get_config(self):
    return {**super().get_config(), **self._config,
            **common.serialize_regularizers(self._kernel_regularizer, self._bias_regularizer)}
