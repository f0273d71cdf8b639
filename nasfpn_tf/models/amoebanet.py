"""AmoebaNet-D (Real et al. 2019, "Regularized Evolution for Image Classifier Architecture
Search") as a RetinaNet backbone returning {'3': C3, '4': C4, '5': C5}.

Written from the paper and the authors' TF1 code (tensorflow/tpu, models/official/amoeba_net:
the cell tables of model_specs.py, the cell builder of network_utils.py, the ImageNet stem and
cell schedule of model_builder.py), in tf_keras. A cell reads two hidden states, the output of the
previous cell (state 0, after a ReLU-1x1 conv-BN) and of the one before it (state 1, brought to
the same shape); each of its 5 steps applies one op to each of two earlier states and adds the
results; the cell's output concatenates the states no step read. The stem is a 3x3/2 conv
(unpadded, as the authors') and two reduction cells at 1/4 and 1/2 of the filters (stride 8);
then `num_cells` normal cells in three stacks at strides 8, 16, 32, a reduction cell opening the
second and third. C3, C4, C5 are the last normal cell of each stack: 4 * F, 8 * F and 16 * F
channels for F = `reduction_size`. Drop-path is left out: the authors' ImageNet flags default to
keep_prob 1.0, and it changes neither params nor inference FLOPs.
"""
from typing import NamedTuple, Sequence, Tuple

import tf_keras

from nasfpn_tf.layers.common import conv_kwargs, norm_layer

PYRAMID_LEVELS = ('3', '4', '5')


class CellSpec(NamedTuple):
  """A cell as the authors' model_specs.py writes it: step k applies operations[2k] to hidden
  state hiddenstate_indices[2k] and operations[2k + 1] to hiddenstate_indices[2k + 1]; states 0
  and 1 are the cell's inputs, step k adds state 2 + k; used_hiddenstates[i] is 1 when a step
  reads state i, and the cell outputs the concatenation of the others."""
  operations: Tuple[str, ...]
  hiddenstate_indices: Tuple[int, ...]
  used_hiddenstates: Tuple[int, ...]

  @property
  def num_outputs(self) -> int:
    return len(self.used_hiddenstates) - sum(self.used_hiddenstates)


# AmoebaNet-D ('evol_net_x' / 'amoeba_net_d' in the authors' model_specs.py).
NORMAL_CELL = CellSpec(
    operations=('1x1', 'max_pool_3x3', 'none', '1x7_7x1', '1x1', '1x7_7x1', 'max_pool_3x3',
                'none', 'avg_pool_3x3', '1x1'),
    hiddenstate_indices=(1, 1, 1, 0, 0, 0, 2, 2, 1, 5),
    used_hiddenstates=(0, 1, 1, 0, 0, 1, 0))
REDUCTION_CELL = CellSpec(
    operations=('max_pool_2x2', 'max_pool_3x3', 'none', '3x3', '1x7_7x1', 'max_pool_3x3',
                'none', 'max_pool_2x2', 'avg_pool_3x3', '1x1'),
    hiddenstate_indices=(0, 0, 2, 1, 2, 2, 3, 1, 2, 3),
    used_hiddenstates=(1, 1, 1, 1, 0, 0, 0))

# The authors' ImageNet stem: a 3x3/2 conv, then this many reduction cells.
NUM_STEM_CELLS = 2


def reduction_cell_indices(num_cells: int, num_reductions: int = 2) -> Tuple[int, ...]:
  """The normal cells a reduction cell precedes: evenly spaced, as the authors' code places them
  (12 cells: before cells 4 and 8)."""
  return tuple(int(k / (num_reductions + 1) * num_cells) for k in range(1, num_reductions + 1))


class _Builder:
  """Makes the named layers of one network (conv and BN settings shared)."""

  def __init__(self, norm, kernel_regularizer):
    self.norm = norm
    self.kernel_regularizer = kernel_regularizer

  def conv(self, x, filters, kernel, name, strides=1, padding='same'):
    return tf_keras.layers.Conv2D(
        filters, kernel, strides=strides, padding=padding, use_bias=False, name=name,
        **conv_kwargs(kernel_regularizer=self.kernel_regularizer))(x)

  def bn(self, x, name):
    return norm_layer(name=name, **self.norm)(x)

  def relu_conv_bn(self, x, filters, kernel, name, strides=1):
    x = tf_keras.layers.ReLU(name=f'{name}/relu')(x)
    return self.bn(self.conv(x, filters, kernel, f'{name}/conv', strides), f'{name}/bn')

  def factorized_reduction(self, x, filters, stride, name):
    """The authors' shape-matching path: a 1x1 conv at stride 1; at stride 2, two 1x1 convs of
    half the filters on the even and on the odd pixels, concatenated, so no pixel is skipped."""
    if stride == 1:
      return self.bn(self.conv(x, filters, 1, f'{name}/path_conv'), f'{name}/path_bn')
    even = tf_keras.layers.AveragePooling2D(1, 2, padding='valid', name=f'{name}/path1_pool')(x)
    shifted = tf_keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name=f'{name}/path2_pad')(x)
    shifted = tf_keras.layers.Cropping2D(((1, 0), (1, 0)), name=f'{name}/path2_crop')(shifted)
    odd = tf_keras.layers.AveragePooling2D(1, 2, padding='valid',
                                           name=f'{name}/path2_pool')(shifted)
    paths = [self.conv(even, filters // 2, 1, f'{name}/path1_conv'),
             self.conv(odd, filters // 2, 1, f'{name}/path2_conv')]
    merged = tf_keras.layers.Concatenate(name=f'{name}/concat')(paths)
    return self.bn(merged, f'{name}/final_path_bn')

  def operation(self, x, op, filters, stride, name):
    """One op of a cell step (network_utils.BaseCell._apply_operation)."""
    channels = x.shape[-1]
    if op in ('3x3', '1x7_7x1'):  # ReLU-conv-BN with a 1x1 bottleneck at filters / 4,
      bottleneck = filters // 4  # none where that rounds to 0 (as the authors' code).
      inner = bottleneck or filters
      if bottleneck:
        x = self.relu_conv_bn(x, bottleneck, 1, f'{name}/pre_1x1')
      x = tf_keras.layers.ReLU(name=f'{name}/relu')(x)
      if op == '3x3':
        x = self.conv(x, inner, 3, f'{name}/3x3', strides=stride)
      else:
        x = self.conv(x, inner, (1, 7), f'{name}/1x7', strides=(1, stride))
        x = self.bn(x, f'{name}/bn_1x7_7x1')
        x = tf_keras.layers.ReLU(name=f'{name}/relu_7x1')(x)
        x = self.conv(x, inner, (7, 1), f'{name}/7x1', strides=(stride, 1))
      x = self.bn(x, f'{name}/bn')
      return self.relu_conv_bn(x, filters, 1, f'{name}/post_1x1') if bottleneck else x
    if op in ('none', '1x1'):
      if op == '1x1' or stride > 1 or channels != filters:
        x = self.relu_conv_bn(x, filters, 1, f'{name}/1x1', strides=stride)
      return x
    pool_type, size = op.split('_pool_')
    pool = {'max': tf_keras.layers.MaxPooling2D, 'avg': tf_keras.layers.AveragePooling2D}
    if pool_type not in pool or size not in ('2x2', '3x3'):
      raise ValueError(f'Unknown AmoebaNet op {op!r} in cell {name}.')
    x = pool[pool_type](int(size[0]), stride, padding='same', name=f'{name}/{op}')(x)
    if channels != filters:
      x = self.bn(self.conv(x, filters, 1, f'{name}/1x1'), f'{name}/bn_1')
    return x

  def cell(self, x, previous, spec: CellSpec, filters: int, stride: int, name: str):
    """One cell (network_utils.BaseCell.__call__) on the last two cell outputs."""
    if previous is None:
      previous = x
    elif previous.shape[1:3] != x.shape[1:3]:
      previous = tf_keras.layers.ReLU(name=f'{name}/prev_relu')(previous)
      previous = self.factorized_reduction(previous, filters, 2, f'{name}/prev')
    elif previous.shape[-1] != filters:
      previous = self.relu_conv_bn(previous, filters, 1, f'{name}/prev_1x1')
    states = [self.relu_conv_bn(x, filters, 1, f'{name}/beginning'), previous]
    for step in range(len(spec.operations) // 2):
      merged = []
      for side, k in (('left', 2 * step), ('right', 2 * step + 1)):
        index = spec.hiddenstate_indices[k]
        op_stride = stride if index < 2 else 1  # Only the cell inputs are strided.
        merged.append(self.operation(states[index], spec.operations[k], filters, op_stride,
                                     f'{name}/comb_iter_{step}/{side}'))
      states.append(tf_keras.layers.Add(name=f'{name}/comb_iter_{step}/combine')(merged))
    final = states[-1]
    outputs = []
    for index, (state, used) in enumerate(zip(states, spec.used_hiddenstates)):
      if used:
        continue
      if state.shape[1:] != final.shape[1:]:
        reduce_stride = 2 if state.shape[1:3] != final.shape[1:3] else 1
        state = self.factorized_reduction(state, final.shape[-1], reduce_stride,
                                          f'{name}/reduction_{index}')
      outputs.append(state)
    return tf_keras.layers.Concatenate(name=f'{name}/cell_output')(outputs)


def build_amoebanet_d(input_shape: Sequence[int], num_cells: int = 12,
                      reduction_size: int = 256, stem_filters: int = 32,
                      use_sync_bn: bool = False, norm_momentum: float = 0.99,
                      norm_epsilon: float = 1e-3, kernel_regularizer=None,
                      name: str = 'amoebanet_d') -> tf_keras.Model:
  """AmoebaNet-D on `input_shape` ([height, width, 3] or with a leading batch dim), returning
  {'3': C3, '4': C4, '5': C5}; the model gets `output_specs` {level: TensorShape}.

  `num_cells` normal cells in three stacks (`reduction_cell_indices`), F = `reduction_size` filters
  at stride 8 doubling at each reduction; the defaults are the authors' ImageNet flags (12, 256,
  a 32-filter stem). Height and width must be multiples of 32.
  """
  shape = list(input_shape)[-3:]
  if num_cells < 3:
    raise ValueError(f'AmoebaNet-D num_cells={num_cells}: needs at least 3 (three stacks of '
                     'normal cells, one per pyramid level).')
  if any(size is not None and size % 32 for size in shape[:2]):
    raise ValueError(f'AmoebaNet-D input {shape}: height and width must be multiples of 32 '
                     '(build_retinanet.image_size).')
  builder = _Builder(dict(use_sync_bn=use_sync_bn, norm_momentum=norm_momentum,
                          norm_epsilon=norm_epsilon), kernel_regularizer)
  images = tf_keras.Input(shape=shape, name='images')
  net = builder.conv(images, stem_filters, 3, 'stem/conv0', strides=2, padding='valid')
  net = builder.bn(net, 'stem/conv0_bn')
  outputs = [None, net]
  for k in range(NUM_STEM_CELLS):
    filters = reduction_size // 2 ** (NUM_STEM_CELLS - k)
    net = builder.cell(net, outputs[-2], REDUCTION_CELL, filters, 2, f'cell_stem_{k}')
    outputs.append(net)
  reductions = reduction_cell_indices(num_cells)
  filters = reduction_size
  features = {}
  for k in range(num_cells):
    if k in reductions:
      filters *= 2
      features[PYRAMID_LEVELS[reductions.index(k)]] = net
      net = builder.cell(net, outputs[-2], REDUCTION_CELL, filters, 2,
                         f'reduction_cell_{reductions.index(k)}')
      outputs.append(net)
    net = builder.cell(net, outputs[-2], NORMAL_CELL, filters, 1, f'cell_{k}')
    outputs.append(net)
  features[PYRAMID_LEVELS[-1]] = net
  model = tf_keras.Model(images, features, name=name)
  model.output_specs = {level: tensor.shape for level, tensor in features.items()}
  return model
