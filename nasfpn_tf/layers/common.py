"""Settings shared by every conv + BN in the package, so pyramid, head and cells agree."""
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
