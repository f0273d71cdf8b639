"""Settings shared by every conv + BN in the package, so pyramid, head and cells agree."""
import tensorflow as tf
import tf_keras


def conv_kwargs(use_separable_conv=False, kernel_regularizer=None, bias_regularizer=None):
  """Initializers as in the authors' code and TF Model Garden (He init, fan-out)."""
  init = lambda: tf_keras.initializers.VarianceScaling(
      scale=2.0, mode='fan_out', distribution='untruncated_normal')
  kwargs = {'bias_initializer': 'zeros', 'bias_regularizer': bias_regularizer}
  if use_separable_conv:
    kwargs.update(depthwise_initializer=init(), pointwise_initializer=init(),
                  depthwise_regularizer=kernel_regularizer,
                  pointwise_regularizer=kernel_regularizer)
  else:
    kwargs.update(kernel_initializer=init(), kernel_regularizer=kernel_regularizer)
  return kwargs


def norm_layer(use_sync_bn=False, norm_momentum=0.99, norm_epsilon=1e-3, name=None):
  return tf_keras.layers.BatchNormalization(
      axis=-1, momentum=norm_momentum, epsilon=norm_epsilon, synchronized=use_sync_bn, name=name)


def serialize_regularizers(kernel_regularizer, bias_regularizer):
  """The regularizer entries of a layer config, JSON-serializable for `.keras` files."""
  return {'kernel_regularizer': tf_keras.regularizers.serialize(kernel_regularizer),
          'bias_regularizer': tf_keras.regularizers.serialize(bias_regularizer)}


# Output channels a bfloat16 convolution is padded to (`PaddedOutputConv2D`).
BFLOAT16_CHANNEL_MULTIPLE = 32


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class PaddedOutputConv2D(tf_keras.layers.Conv2D):
  """`Conv2D` that, computing in bfloat16, convolves with its kernel's output channels padded with
  zeros to a multiple of 32 and slices the extra outputs off: the same outputs and gradients.

  For predictors (RetinaNet's 9 x 91 = 819 class logits). On CPUs, oneDNN's bfloat16 backward of
  such a convolution (the gradient to its input, reduced over the output channels) reads past
  an odd channel count and now and then returns NaN for a whole image (oneDNN issue 5717 is the
  same fault on AMX for counts not a multiple of 32): one such call stops training with a NaN in
  every variable below the head. How often, and what padding changed: docs/precision.md and
  experiments/bfloat16_conv_nan.py. Same variables, names and config as `Conv2D`, so
  checkpoints and `set_weights` are unchanged.
  """

  def convolution_op(self, inputs, kernel):
    pad = -self.filters % BFLOAT16_CHANNEL_MULTIPLE
    if kernel.dtype != tf.bfloat16 or not pad or self.data_format != 'channels_last':
      return super().convolution_op(inputs, kernel)
    kernel = tf.pad(kernel, [[0, 0]] * (kernel.shape.rank - 1) + [[0, pad]])
    return super().convolution_op(inputs, kernel)[..., :self.filters]
