"""The FCOS head: shared classification and regression towers with GroupNorm, a learned scale per
level on the box distances, and centerness (Tian et al., ICCV 2019; the released code's v2)."""
import math
from typing import Dict, Mapping, Tuple

import numpy as np
import tensorflow as tf
import tf_keras

from nasfpn_tf.layers import common
from nasfpn_tf.models.head import CLASS_PRIOR

# GroupNorm's groups in FCOS: 32 (fewer where the filters are not a multiple, see FCOSHead).
NORM_GROUPS = 32


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class Scale(tf_keras.layers.Layer):
  """x * s with one learned scalar s (init `initial_value`): FCOS's per-level box scale."""

  def __init__(self, initial_value: float = 1.0, **kwargs):
    super().__init__(**kwargs)
    self.initial_value = float(initial_value)

  def build(self, input_shape):
    self.scale = self.add_weight(
        'scale', shape=[], initializer=tf_keras.initializers.Constant(self.initial_value))
    super().build(input_shape)

  def call(self, inputs):
    return inputs * tf.cast(self.scale, inputs.dtype)

  def get_config(self):
    return {**super().get_config(), 'initial_value': self.initial_value}


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class FCOSHead(tf_keras.layers.Layer):
  """Class and box towers applied to every pyramid level, all their layers shared by the levels.

  Per tower: `num_convs` x (3x3 conv, `num_filters`) -> GroupNorm -> activation. Predictors
  (3x3): `num_classes` class logits (column 0 background, never a positive, as RetinaNet's);
  4 box distances (t, l, b, r) = relu(scale_level * conv), in strides of the level (FCOS v2's
  `norm_reg_targets`; the post-processing multiplies them by the stride); 1 centerness logit,
  on the box tower (`centerness_on_reg`, FCOS v2's default) or the class tower (FCOS v1 and
  NAS-FCOS's code). GroupNorm takes gcd(norm_groups, num_filters) groups: 32 for 256 or 64
  filters, 16 for 16. Initializers: the released code's (normal 0.01 kernels, zero biases, the
  class bias at the 0.01 prior). Call on {level: features}; returns ({level: class logits},
  {level: box distances}, {level: centerness logits}).
  """

  def __init__(self, min_level: int, max_level: int, num_classes: int, num_convs: int = 4,
               num_filters: int = 256, use_separable_conv: bool = False,
               activation: str = 'relu', norm_groups: int = NORM_GROUPS,
               centerness_on_reg: bool = True, kernel_regularizer=None, bias_regularizer=None,
               **kwargs):
    super().__init__(**kwargs)
    if norm_groups < 1:
      raise ValueError(f'build_retinanet.fcos_norm_groups = {norm_groups} must be >= 1.')
    self.min_level = min_level
    self.max_level = max_level
    self._config = dict(
        min_level=min_level, max_level=max_level, num_classes=num_classes, num_convs=num_convs,
        num_filters=num_filters, use_separable_conv=use_separable_conv, activation=activation,
        norm_groups=norm_groups, centerness_on_reg=centerness_on_reg)
    self._kernel_regularizer = tf_keras.regularizers.get(kernel_regularizer)
    self._bias_regularizer = tf_keras.regularizers.get(bias_regularizer)
    self._activation = tf_keras.activations.get(activation)
    self.groups = math.gcd(norm_groups, num_filters)
    self.cls_convs, self.cls_norms = self._tower_layers('classnet')
    self.box_convs, self.box_norms = self._tower_layers('boxnet')
    prior = tf_keras.initializers.Constant(-np.log((1 - CLASS_PRIOR) / CLASS_PRIOR))
    self.classifier = self._conv(num_classes, 'scores', prior)
    self.box_regressor = self._conv(4, 'boxes', 'zeros')
    self.centerness = self._conv(1, 'centerness', 'zeros')
    self.scales = [Scale(name=f'scale_{level}') for level in range(min_level, max_level + 1)]

  def _conv(self, filters, name, bias_initializer):
    separable = self._config['use_separable_conv']
    if separable:
      return tf_keras.layers.SeparableConv2D(
          filters, 3, padding='same', name=name, bias_initializer=bias_initializer,
          depthwise_initializer=tf_keras.initializers.RandomNormal(stddev=0.01),
          pointwise_initializer=tf_keras.initializers.RandomNormal(stddev=0.01),
          depthwise_regularizer=self._kernel_regularizer,
          pointwise_regularizer=self._kernel_regularizer, bias_regularizer=self._bias_regularizer)
    # Padded in bfloat16 (an odd class count makes oneDNN's backward return NaN now and then).
    return common.PaddedOutputConv2D(
        filters, 3, padding='same', name=name, bias_initializer=bias_initializer,
        kernel_initializer=tf_keras.initializers.RandomNormal(stddev=0.01),
        kernel_regularizer=self._kernel_regularizer, bias_regularizer=self._bias_regularizer)

  def _tower_layers(self, prefix):
    convs, norms = [], []
    for i in range(self._config['num_convs']):
      convs.append(self._conv(self._config['num_filters'], f'{prefix}-conv_{i}', 'zeros'))
      norms.append(tf_keras.layers.GroupNormalization(self.groups,
                                                      name=f'{prefix}-conv-norm_{i}'))
    return convs, norms

  def _tower(self, x, convs, norms):
    for conv, norm in zip(convs, norms):
      x = self._activation(norm(conv(x)))
    return x

  def call(self, features: Mapping[str, tf.Tensor], training=None
           ) -> Tuple[Dict[str, tf.Tensor], Dict[str, tf.Tensor], Dict[str, tf.Tensor]]:
    del training  # GroupNorm and convs act the same in training and inference.
    cls_outputs, box_outputs, centerness_outputs = {}, {}, {}
    for level, scale in zip(range(self.min_level, self.max_level + 1), self.scales):
      x = features[str(level)]
      cls_features = self._tower(x, self.cls_convs, self.cls_norms)
      box_features = self._tower(x, self.box_convs, self.box_norms)
      cls_outputs[str(level)] = self.classifier(cls_features)
      box_outputs[str(level)] = tf.nn.relu(scale(self.box_regressor(box_features)))
      centerness_outputs[str(level)] = self.centerness(
          box_features if self._config['centerness_on_reg'] else cls_features)
    return cls_outputs, box_outputs, centerness_outputs

  def get_config(self):
    return {**super().get_config(), **self._config,
            **common.serialize_regularizers(self._kernel_regularizer, self._bias_regularizer)}
