"""The NAS-FPN pyramid: one generic builder that turns a block spec into a Keras model."""
from typing import Any, Dict, Mapping

import tensorflow as tf
import tf_keras

from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.layers import common
from nasfpn_tf.layers.merging_cell import MERGING_CELLS
from nasfpn_tf.layers.resample import ResampleToLevel


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class NASFPN(tf_keras.Model):
  """A pyramid network from the NAS-FPN search space, stacked `num_repeats` times.

  Takes the backbone's features as a dict {'3': C3, '4': C4, ...} and returns
  {'3': P3, ..., str(max_level): P_max}, all with `num_filters` channels. Inputs are reduced to
  `num_filters` by 1x1 conv + BN where their channel count differs; levels above the backbone's
  are made by 2x2/2 max pooling of the level below. Each repeat has its own weights. The spec
  (`block_specs`: a name in `block_specs.SPECS` or rows) is the architecture: 'nasfpn' (the
  paper's 7 cells, P3-P7), 'fpn' (vanilla FPN, the baseline, any levels) or 'nasfpn_lite' (ours,
  P3-P6; with `use_separable_conv=True` as in the paper).

  `merge_filters` (default: `num_filters`, as the paper) is the width at which cells merge their
  inputs. TF Model Garden's NASFPN always merges at 256, whatever `num_filters`, with a 1x1
  conv + BN on each cell input when they differ; `compat.tfm_nasfpn.pyramid_from_tfm` sets 256 to
  reproduce it.

  `pyramids` (default None: every repeat builds `block_specs`) gives each repeat its own spec,
  e.g. ['fpn', 'nasfpn', 'nasfpn'] (NAS-FPN behind FPN); an entry None builds `block_specs`
  (`block_specs.resolve_pyramids`). Its length must be `num_repeats`.

  Anytime detection reads the pyramid of every repeat: `output_every_repeat=True` returns
  {'1': {level: P}, ..., str(num_repeats): {level: P}} (same layers and weights), and
  `first_repeats(k)` is a model sharing these layers that computes only the first k repeats.
  """

  def __init__(self,
               input_specs: Mapping[str, Any],
               min_level: int = 3,
               max_level: int = 7,
               block_specs: specs_lib.SpecLike = 'nasfpn',
               num_filters: int = 256,
               num_repeats: int = 7,
               merge_filters=None,
               use_separable_conv: bool = False,
               activation: str = 'relu',
               use_sync_bn: bool = False,
               norm_momentum: float = 0.99,
               norm_epsilon: float = 1e-3,
               dropblock_keep_prob=None,
               dropblock_size: int = 3,
               dropblock_ramp_steps: int = 0,
               kernel_regularizer=None,
               bias_regularizer=None,
               output_every_repeat: bool = False,
               pyramids=None,
               **kwargs):
    if num_repeats < 1:
      raise ValueError(f'num_repeats must be >= 1, got {num_repeats}.')
    if pyramids is None:
      specs = specs_lib.resolve(block_specs, min_level, max_level)
      repeat_specs = (specs,) * num_repeats
    else:
      repeat_specs = specs_lib.resolve_pyramids(pyramids, block_specs, num_repeats, min_level,
                                                max_level)
      # block_specs is resolved only where an entry uses it (it may not fit these levels).
      specs = specs_lib.resolve(block_specs, min_level, max_level) if None in pyramids else None
    repeat_wirings = [specs_lib.wiring(s, min_level, max_level) for s in repeat_specs]
    input_specs = {str(k): tf.TensorShape(v) for k, v in input_specs.items()}
    _check_inputs(input_specs, min_level, max_level)
    kernel_regularizer = tf_keras.regularizers.get(kernel_regularizer)
    bias_regularizer = tf_keras.regularizers.get(bias_regularizer)
    norm = dict(use_sync_bn=use_sync_bn, norm_momentum=norm_momentum, norm_epsilon=norm_epsilon)
    regularizers = dict(kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer)
    cell_kwargs = dict(filters=num_filters, merge_filters=merge_filters,
                       use_separable_conv=use_separable_conv,
                       activation=activation, dropblock_keep_prob=dropblock_keep_prob,
                       dropblock_size=dropblock_size, dropblock_ramp_steps=dropblock_ramp_steps,
                       **norm, **regularizers)

    inputs = {level: tf_keras.Input(shape=shape[1:], name=f'c{level}')
              for level, shape in input_specs.items()}
    feats = []
    for level in range(min_level, max_level + 1):
      if str(level) in inputs:
        feats.append(ResampleToLevel(level, level, num_filters, name=f'p{level}_lateral',
                                     **norm, **regularizers)(inputs[str(level)]))
      else:
        feats.append(ResampleToLevel(level - 1, level, num_filters,
                                     name=f'p{level}_from_p{level - 1}',
                                     **norm, **regularizers)(feats[-1]))
    repeat_outputs = []
    for repeat, wiring in enumerate(repeat_wirings):
      feats = _build_pyramid(feats, min_level, wiring, f'repeat{repeat}', cell_kwargs)
      repeat_outputs.append(
          {str(level): feat for level, feat in zip(range(min_level, max_level + 1), feats)})
    outputs = repeat_outputs[-1]
    if output_every_repeat:
      outputs = {str(k): pyramid for k, pyramid in enumerate(repeat_outputs, start=1)}
    super().__init__(inputs=inputs, outputs=outputs, **kwargs)
    # The graph's own tensors, for `first_repeats`; a plain holder, so tracking never sees them.
    self._graph = _Graph(inputs, repeat_outputs)

    self._config = dict(
        input_specs={k: v.as_list() for k, v in input_specs.items()}, min_level=min_level,
        max_level=max_level,
        block_specs=block_specs if specs is None else specs_lib.to_config(specs),
        num_filters=num_filters,
        num_repeats=num_repeats, merge_filters=merge_filters,
        use_separable_conv=use_separable_conv, activation=activation,
        **norm, dropblock_keep_prob=dropblock_keep_prob, dropblock_size=dropblock_size,
        dropblock_ramp_steps=dropblock_ramp_steps,
        **common.serialize_regularizers(kernel_regularizer, bias_regularizer),
        output_every_repeat=output_every_repeat)
    if pyramids is not None:  # In the config only when set, as before per-repeat specs.
      self._config['pyramids'] = specs_lib.pyramids_to_config(pyramids)
    self.block_specs = specs  # None when no entry of `pyramids` builds it
    self.repeat_specs = repeat_specs  # the spec of each repeat, first first
    self._output_specs = {level: feat.shape for level, feat in repeat_outputs[-1].items()}

  @property
  def output_specs(self) -> Dict[str, tf.TensorShape]:
    """{level: TensorShape} of the outputs (of each repeat's, with output_every_repeat)."""
    return self._output_specs

  def first_repeats(self, num_repeats: int) -> tf_keras.Model:
    """A model of the same input dict and these layers (weights shared) returning the pyramid
    {level: P} of repeat `num_repeats`: the repeats after it are not in its graph."""
    if not 1 <= num_repeats <= len(self._graph.repeat_outputs):
      raise ValueError(f'num_repeats={num_repeats} is outside 1..'
                       f'{len(self._graph.repeat_outputs)}, the repeats of pyramid {self.name}.')
    return tf_keras.Model(inputs=self._graph.inputs,
                          outputs=self._graph.repeat_outputs[num_repeats - 1],
                          name=f'{self.name}_first_{num_repeats}')

  def get_config(self):
    return dict(self._config, name=self.name)

  @classmethod
  def from_config(cls, config, custom_objects=None):
    return cls(**config)


class _Graph:
  """The input and per-repeat output tensors of a built pyramid."""

  def __init__(self, inputs, repeat_outputs):
    self.inputs = inputs
    self.repeat_outputs = repeat_outputs


def _check_inputs(input_specs, min_level, max_level):
  """Inputs must start at min_level and divide evenly down to max_level."""
  if str(min_level) not in input_specs:
    raise ValueError(f'The backbone features {sorted(input_specs)} lack level {min_level}, '
                     f'the pyramid min_level.')
  base = input_specs[str(min_level)]
  for level, shape in input_specs.items():
    if shape.rank != 4:
      raise ValueError(f'Input feature {level!r} must be NHWC, got shape {shape}.')
    for axis, size, base_size in ((1, shape[1], base[1]), (2, shape[2], base[2])):
      scale = 2.0**(int(level) - min_level)
      if None not in (size, base_size) and size != int(-(-base_size // scale)):
        raise ValueError(
            f'Input feature {level!r} has {"height" if axis == 1 else "width"} {size}, but '
            f'level {min_level} has {base_size}: each level must be half the size of the one '
            'below.')
    factor = 2**max(max_level - int(level), 0)
    for axis, size in (('height', shape[1]), ('width', shape[2])):
      if size is not None and size % factor:
        raise ValueError(
            f'Input feature {level!r} has {axis} {size}, which does not divide by '
            f'2^(max_level - {level}) = {factor}: pad images to a multiple of '
            f'2^max_level = {2**max_level}.')


def _build_pyramid(feats, min_level, wiring, prefix, cell_kwargs):
  """One pyramid network: cells read and extend the candidate list; returns outputs by level."""
  candidates = list(feats)
  for k, cell in enumerate(wiring.cells):
    layer = MERGING_CELLS[cell.op](
        input_levels=list(cell.source_levels), output_level=cell.level,
        name=f'{prefix}_cell{k}_{cell.op}_p{cell.level}', **cell_kwargs)
    candidates.append(layer([candidates[index] for index in cell.sources]))
  return [candidates[wiring.outputs[level]] for level in range(min_level, min_level + len(feats))]
