"""calibrate_batch_norm: moving statistics become those of each BN's input; nothing else moves."""
import numpy as np
import tensorflow as tf
import tf_keras

from nasfpn_tf.utils.batch_norm import calibrate_batch_norm


def _model():
  inputs = tf_keras.Input([8, 8, 3])
  x = tf_keras.layers.Conv2D(4, 3, padding='same', name='conv1')(inputs)
  x = tf_keras.layers.BatchNormalization(momentum=0.99, name='bn1')(x)
  x = tf_keras.layers.ReLU()(x)
  x = tf_keras.layers.Conv2D(5, 3, padding='same', name='conv2')(x)
  outputs = tf_keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name='bn2')(x)
  return tf_keras.Model(inputs, outputs)


def test_each_batch_norm_gets_its_inputs_statistics():
  model = _model()
  images = tf.random.stateless_normal([3, 8, 8, 3], seed=[1, 2], stddev=50.0)
  kernels = [w.numpy() for w in model.trainable_weights]
  calibrate_batch_norm(model, images)

  # By hand, layer by layer, with the calibrated first BN in inference mode feeding the second.
  first = model.get_layer('conv1')(images).numpy()
  bn1 = model.get_layer('bn1')
  np.testing.assert_allclose(bn1.moving_mean.numpy(), first.mean(axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-3)
  # Keras BN keeps the unbiased variance (n / (n - 1)) as its moving variance.
  count = first.size // first.shape[-1]
  np.testing.assert_allclose(bn1.moving_variance.numpy(),
                             first.var(axis=(0, 1, 2)) * count / (count - 1), rtol=1e-3)
  hidden = np.maximum(bn1(first, training=False).numpy(), 0.0)
  second = model.get_layer('conv2')(hidden).numpy()
  bn2 = model.get_layer('bn2')
  # (bn2 saw bn1's training-mode output, normalized by the biased variance: within 1%.)
  np.testing.assert_allclose(bn2.moving_mean.numpy(), second.mean(axis=(0, 1, 2)), rtol=1e-2,
                             atol=1e-2)

  # Normalized outputs in inference mode; momentums and every trainable weight unchanged.
  outputs = model(images, training=False).numpy()
  np.testing.assert_allclose(outputs.mean(axis=(0, 1, 2)), 0.0, atol=1e-2)
  np.testing.assert_allclose(outputs.std(axis=(0, 1, 2)), 1.0, atol=0.02)
  assert (bn1.momentum, bn2.momentum) == (0.99, 0.9)
  for before, after in zip(kernels, model.trainable_weights):
    np.testing.assert_array_equal(before, after.numpy())
