"""The NAS-FCOS pyramid: one generic builder that turns a NAS-FCOS cell spec into a Keras model."""
from typing import Any, Dict, Mapping

import tensorflow as tf
import tf_keras

from nasfpn_tf.decoders import nasfcos_specs as specs_lib
from nasfpn_tf.layers import common
from nasfpn_tf.layers.nasfcos_cell import NASFCOSCell, ResizeBilinearLike


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class NASFCOSFPN(tf_keras.Model):
  """A pyramid from the NAS-FCOS search space, as the authors' released `MicroDecoder_v2`.

  Takes the backbone's features {'2': C2, ..., '5': C5} (C2 only if a cell reads it) and returns
  {'3': P3, ..., str(max_level): P_max} with `num_filters` channels. Each backbone feature a
  cell reads is adapted by 1x1 conv (no bias) + BN + ReLU (the released code also adapts C2 when
  no cell reads it; here an unread feature gets no layer). The cells (`block_specs`: a name in
  `nasfcos_specs.SPECS` or rows) extend the pool; P3, P4, P5 are the last three unconsumed
  cells (last = P3), each plus the other unconsumed cells, resized bilinearly to the level's
  size (`nasfcos_specs.wiring`). P6 is a 3x3 stride-2 conv (with bias) of P5, P7 the same of
  ReLU(P6), as FCOS's `LastLevelP6P7` that the released code uses.
  """

  def __init__(self,
               input_specs: Mapping[str, Any],
               min_level: int = 3,
               max_level: int = 7,
               block_specs: specs_lib.SpecLike = 'nasfcos_fpn',
               num_filters: int = 256,
               use_sync_bn: bool = False,
               norm_momentum: float = 0.99,
               norm_epsilon: float = 1e-3,
               kernel_regularizer=None,
               bias_regularizer=None,
               **kwargs):
    specs = specs_lib.resolve(block_specs)
    wiring = specs_lib.wiring(specs)
    if min_level != specs_lib.CELL_OUTPUT_LEVELS[0] or not (
        specs_lib.CELL_OUTPUT_LEVELS[-1] <= max_level <= 7):
      raise ValueError(f'NASFCOSFPN gives levels 3..max_level with max_level in 5..7, got '
                       f'min_level={min_level}, max_level={max_level}.')
    input_specs = {str(k): tf.TensorShape(v) for k, v in input_specs.items()}
    # The levels it reads: those of the cells' pool inputs, and C3-C5 for the output sizes.
    needed = sorted({specs_lib.POOL_LEVELS[i] for i in wiring.read_pool_inputs}
                    | set(specs_lib.CELL_OUTPUT_LEVELS))
    missing = [level for level in needed if str(level) not in input_specs]
    if missing:
      raise ValueError(f'This NASFCOSFPN spec reads backbone levels {needed}; the backbone '
                       f'features {sorted(input_specs)} lack {missing}.')
    kernel_regularizer = tf_keras.regularizers.get(kernel_regularizer)
    bias_regularizer = tf_keras.regularizers.get(bias_regularizer)
    norm = dict(use_sync_bn=use_sync_bn, norm_momentum=norm_momentum, norm_epsilon=norm_epsilon)
    regularizers = dict(kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer)

    inputs = {str(level): tf_keras.Input(shape=input_specs[str(level)][1:], name=f'c{level}')
              for level in needed}
    pool = [None] * len(specs_lib.POOL_LEVELS)
    for index in wiring.read_pool_inputs:
      level = specs_lib.POOL_LEVELS[index]
      x = tf_keras.layers.Conv2D(num_filters, 1, use_bias=False, name=f'adapt_c{level}_conv',
                                 **common.conv_kwargs(False, **regularizers))(inputs[str(level)])
      x = common.norm_layer(**norm, name=f'adapt_c{level}_norm')(x)
      pool[index] = tf_keras.layers.ReLU(name=f'adapt_c{level}_relu')(x)
    for k, cell in enumerate(wiring.cells):
      pool.append(NASFCOSCell(
          cell.input_levels, cell.ops, cell.agg, num_filters, **norm, **regularizers,
          name=f'cell{k}_{cell.agg}_p{cell.level}')([pool[i] for i in cell.inputs]))

    outputs = {}
    for level, index in wiring.outputs.items():
      x = pool[index]
      for extra in wiring.extras:
        resized = ResizeBilinearLike(name=f'p{level}_extra{extra - len(specs_lib.POOL_LEVELS)}')(
            [pool[extra], x])
        x = tf_keras.layers.Add(name=f'p{level}_add_cell{extra - len(specs_lib.POOL_LEVELS)}')(
            [x, resized])
      # The size of level `level`: its backbone feature's, as the released code.
      outputs[str(level)] = ResizeBilinearLike(name=f'p{level}')([x, inputs[str(level)]])
    x = outputs[str(specs_lib.CELL_OUTPUT_LEVELS[-1])]
    for level in range(specs_lib.CELL_OUTPUT_LEVELS[-1] + 1, max_level + 1):
      if level > specs_lib.CELL_OUTPUT_LEVELS[-1] + 1:
        x = tf_keras.layers.ReLU(name=f'p{level}_relu')(x)
      x = tf_keras.layers.Conv2D(num_filters, 3, strides=2, padding='same', name=f'p{level}',
                                 **common.conv_kwargs(False, **regularizers))(x)
      outputs[str(level)] = x
    outputs = {str(level): outputs[str(level)] for level in range(min_level, max_level + 1)}
    super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    self._config = dict(
        input_specs={k: v.as_list() for k, v in input_specs.items()}, min_level=min_level,
        max_level=max_level, block_specs=specs_lib.to_config(specs), num_filters=num_filters,
        **norm, **common.serialize_regularizers(kernel_regularizer, bias_regularizer))
    self.block_specs = specs
    self._output_specs = {level: feat.shape for level, feat in outputs.items()}

  @property
  def output_specs(self) -> Dict[str, tf.TensorShape]:
    """{level: TensorShape} of the outputs."""
    return self._output_specs

  def get_config(self):
    return dict(self._config, name=self.name)

  @classmethod
  def from_config(cls, config, custom_objects=None):
    return cls(**config)
