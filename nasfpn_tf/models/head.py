"""The RetinaNet head, laid out exactly as TF Model Garden's so weights copy over one to one."""
from typing import Dict, Mapping, Tuple

import numpy as np
import tensorflow as tf
import tf_keras

from nasfpn_tf.layers import common

# Class-logit bias so every anchor starts at probability 0.01 (focal loss paper, §4.1).
CLASS_PRIOR = 0.01


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class RetinaNetHead(tf_keras.layers.Layer):
  """Class and box subnets applied to every pyramid level.

  Per branch: `num_convs` x (3x3 conv, `num_filters`) -> BN -> activation, then a 3x3 predictor
  (anchors*classes logits, or anchors*4 box deltas). Convs are shared across levels, BNs are
  per level. Layers are created in the order and with the names, shapes and initializers of
  `official.vision.modeling.heads.dense_prediction_heads.RetinaNetHead` (share_level_convs=True,
  no attribute heads), so `head.set_weights(tfm_head.get_weights())` reproduces TFM's outputs.

  Call on {level: features}; returns ({level: class logits}, {level: box deltas}).
  """

  def __init__(self, min_level: int, max_level: int, num_classes: int,
               num_anchors_per_location: int, num_convs: int = 4, num_filters: int = 256,
               use_separable_conv: bool = False, activation: str = 'relu',
               use_sync_bn: bool = False, norm_momentum: float = 0.99,
               norm_epsilon: float = 1e-3, kernel_regularizer=None, bias_regularizer=None,
               **kwargs):
    super().__init__(**kwargs)
    self.min_level = min_level
    self.max_level = max_level
    self._config = dict(
        min_level=min_level, max_level=max_level, num_classes=num_classes,
        num_anchors_per_location=num_anchors_per_location, num_convs=num_convs,
        num_filters=num_filters, use_separable_conv=use_separable_conv, activation=activation,
        use_sync_bn=use_sync_bn, norm_momentum=norm_momentum, norm_epsilon=norm_epsilon)
    self._kernel_regularizer = tf_keras.regularizers.get(kernel_regularizer)
    self._bias_regularizer = tf_keras.regularizers.get(bias_regularizer)
    self._activation = tf_keras.activations.get(activation)
    levels = range(min_level, max_level + 1)
    norm = dict(use_sync_bn=use_sync_bn, norm_momentum=norm_momentum, norm_epsilon=norm_epsilon)
    self.cls_convs, self.cls_norms, self.classifier = self._branch(
        'classnet', 'scores', num_anchors_per_location * num_classes,
        tf_keras.initializers.Constant(-np.log((1 - CLASS_PRIOR) / CLASS_PRIOR)), levels, norm)
    self.box_convs, self.box_norms, self.box_regressor = self._branch(
        'boxnet', 'boxes', num_anchors_per_location * 4, tf_keras.initializers.Zeros(), levels,
        norm)

  def _branch(self, prefix, predictor_name, predictor_filters, predictor_bias, levels, norm):
    """Shared convs, per-level norms, then the predictor: TFM's creation order and names."""
    separable = self._config['use_separable_conv']
    conv_class = tf_keras.layers.SeparableConv2D if separable else tf_keras.layers.Conv2D
    convs = [conv_class(self._config['num_filters'], 3, padding='same',
                        bias_initializer=tf_keras.initializers.Zeros(), name=f'{prefix}-conv_{i}',
                        **self._kernel_kwargs(separable, tower=True))
             for i in range(self._config['num_convs'])]
    norms = [[common.norm_layer(**norm, name=f'{prefix}-conv-norm_{level}_{i}')
              for i in range(self._config['num_convs'])] for level in levels]
    # Padded in bfloat16: an odd count (9 x 91) makes oneDNN's backward return NaN now and then.
    predictor_class = tf_keras.layers.SeparableConv2D if separable else common.PaddedOutputConv2D
    predictor = predictor_class(predictor_filters, 3, padding='same',
                                bias_initializer=predictor_bias, name=predictor_name,
                                **self._kernel_kwargs(separable, tower=False))
    return convs, norms, predictor

  def _kernel_kwargs(self, separable, tower):
    """TFM's kernel initializers, a fresh instance per layer (a shared one repeats values)."""
    kwargs = {'bias_regularizer': self._bias_regularizer}
    if separable:
      kwargs.update(depthwise_regularizer=self._kernel_regularizer,
                    pointwise_regularizer=self._kernel_regularizer)
      if not tower:  # TFM leaves the tower's separable kernels at Keras defaults.
        kwargs.update(depthwise_initializer=tf_keras.initializers.RandomNormal(stddev=0.03),
                      pointwise_initializer=tf_keras.initializers.RandomNormal(stddev=0.03))
    else:
      kwargs.update(kernel_regularizer=self._kernel_regularizer,
                    kernel_initializer=tf_keras.initializers.RandomNormal(
                        stddev=0.01 if tower else 1e-5))
    return kwargs

  def _tower(self, x, convs, norms, training):
    for conv, norm in zip(convs, norms):
      x = self._activation(norm(conv(x), training=training))
    return x

  def call(self, features: Mapping[str, tf.Tensor],
           training=None) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
    cls_outputs, box_outputs = {}, {}
    for i, level in enumerate(range(self.min_level, self.max_level + 1)):
      x = features[str(level)]
      cls_outputs[str(level)] = self.classifier(
          self._tower(x, self.cls_convs, self.cls_norms[i], training))
      box_outputs[str(level)] = self.box_regressor(
          self._tower(x, self.box_convs, self.box_norms[i], training))
    return cls_outputs, box_outputs

  def get_config(self):
    return {**super().get_config(), **self._config,
            **common.serialize_regularizers(self._kernel_regularizer, self._bias_regularizer)}
