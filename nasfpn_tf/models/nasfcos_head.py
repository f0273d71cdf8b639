"""The NAS-FCOS head: FCOS's predictors on towers of searched ops, partly shared across levels.

As the released `MicroHead_v2`: each tower (class and box) is the spec's sequence of ops at
`num_filters` channels, every op but `skip` followed by GroupNorm and ReLU:

- `conv_1x1`, `conv_3x3`: plain convs without bias;
- `sep_conv_3x3`, `sep_conv_3x3_dil3`: depthwise (dilation 1 or 3) + pointwise, no bias;
- `deform_conv_3x3`: modulated deformable 3x3 conv, 2 deformable groups, with bias;
- `skip`: identity.

The first `unshared` layers have one copy per level; the rest are shared by every level. The
predictors, the per-level scales and the outputs are `FCOSHead`'s (ours: box distances
relu(scale * conv) and centerness on the box tower by default, FCOS v2; the released NAS-FCOS
head uses exp(scale * conv) and centerness on the class tower, `centerness_on_reg=False`), so it
trains and post-processes as FCOS does.
"""
import tensorflow as tf
import tf_keras

from nasfpn_tf.decoders import nasfcos_specs as specs_lib
from nasfpn_tf.layers.deformable_conv import DeformableConv2D
from nasfpn_tf.models.fcos_head import FCOSHead

_SEPARABLE_DILATION = {'sep_conv_3x3': 1, 'sep_conv_3x3_dil3': 3}


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class HeadOp(tf_keras.layers.Layer):
  """One of `nasfcos_specs.HEAD_OPS` -> GroupNorm(groups) -> ReLU (`skip`: identity)."""

  def __init__(self, op, filters, groups, kernel_regularizer=None, **kwargs):
    super().__init__(**kwargs)
    if op not in specs_lib.HEAD_OPS:
      raise ValueError(f'{self.name}: unknown head op {op!r}; head ops are '
                       f'{list(specs_lib.HEAD_OPS)}.')
    self.op, self.filters, self.groups = op, filters, groups
    self._kernel_regularizer = tf_keras.regularizers.get(kernel_regularizer)
    init = lambda: tf_keras.initializers.RandomNormal(stddev=0.01)  # noqa: E731 FCOS's
    if op in ('conv_1x1', 'conv_3x3'):
      self.conv = tf_keras.layers.Conv2D(
          filters, 1 if op == 'conv_1x1' else 3, padding='same', use_bias=False, name='conv',
          kernel_initializer=init(), kernel_regularizer=self._kernel_regularizer)
    elif op in _SEPARABLE_DILATION:
      self.conv = tf_keras.layers.SeparableConv2D(
          filters, 3, padding='same', dilation_rate=_SEPARABLE_DILATION[op], use_bias=False,
          name='conv', depthwise_initializer=init(), pointwise_initializer=init(),
          depthwise_regularizer=self._kernel_regularizer,
          pointwise_regularizer=self._kernel_regularizer)
    elif op == 'deform_conv_3x3':
      self.conv = DeformableConv2D(filters, 3, deformable_groups=2, name='conv',
                                   kernel_initializer=init(),
                                   kernel_regularizer=self._kernel_regularizer)
    else:
      self.conv = None
    self.norm = (tf_keras.layers.GroupNormalization(groups, name='norm')
                 if self.conv is not None else None)

  def call(self, x):
    if self.conv is None:
      return x
    return tf.nn.relu(self.norm(self.conv(x)))

  def get_config(self):
    return {**super().get_config(), 'op': self.op, 'filters': self.filters,
            'groups': self.groups,
            'kernel_regularizer': tf_keras.regularizers.serialize(self._kernel_regularizer)}


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class NASFCOSHead(FCOSHead):
  """`FCOSHead` whose towers follow a NAS-FCOS head spec (`head_spec`: a name in
  `nasfcos_specs.HEAD_SPECS` or (ops, unshared)). Inputs must have `num_filters` channels."""

  def __init__(self, min_level, max_level, num_classes, head_spec='nasfcos_head',
               num_filters=256, **kwargs):
    spec = specs_lib.resolve_head(head_spec)
    specs_lib.validate_head(spec)
    kwargs.pop('num_convs', None)  # the spec sets the towers
    super().__init__(min_level, max_level, num_classes, num_convs=0, num_filters=num_filters,
                     **kwargs)
    self.head_spec = spec
    self._config['head_spec'] = [list(spec.ops), spec.unshared]
    del self._config['num_convs']
    levels = range(min_level, max_level + 1)
    self.towers = {}
    for tower in ('classnet', 'boxnet'):
      shared = [self._op(op, f'{tower}-{i}_{op}') for i, op in enumerate(spec.ops)
                if i >= spec.unshared]
      self.towers[tower] = {
          str(level): [self._op(op, f'{tower}-p{level}-{i}_{op}')
                       for i, op in enumerate(spec.ops[:spec.unshared])] + shared
          for level in levels}
    # Tracked as attributes so their weights belong to the layer.
    self.tower_layers = [op for tower in self.towers.values() for level_ops in tower.values()
                         for op in level_ops]

  def _op(self, op, name):
    return HeadOp(op, self._config['num_filters'], self.groups,
                  kernel_regularizer=self._kernel_regularizer, name=name)

  def call(self, features, training=None):
    del training
    cls_outputs, box_outputs, centerness_outputs = {}, {}, {}
    for level, scale in zip(range(self.min_level, self.max_level + 1), self.scales):
      x = features[str(level)]
      towers = {}
      for tower, level_ops in self.towers.items():
        y = x
        for op in level_ops[str(level)]:
          y = op(y)
        towers[tower] = y
      cls_outputs[str(level)] = self.classifier(towers['classnet'])
      box_outputs[str(level)] = tf.nn.relu(scale(self.box_regressor(towers['boxnet'])))
      centerness_outputs[str(level)] = self.centerness(
          towers['boxnet' if self._config['centerness_on_reg'] else 'classnet'])
    return cls_outputs, box_outputs, centerness_outputs

  @classmethod
  def from_config(cls, config):
    return cls(**config)

