"""TF Model Garden (`official.vision`) NAS-FPN decoders as `nasfpn_tf.decoders.NASFPN`.

Lets checkpoints trained with TFM be used here: build the TFM decoder, restore its checkpoint,
then `pyramid_from_tfm(decoder)` returns our pyramid computing the same function;
`load_tfm_weights(pyramid, decoder)` copies the weights into an existing one. (Whole TFM
RetinaNet models: `compat.tfm`.)

Weights are matched by graph structure, not by layer order: TFM's functional model lists its
layers by graph depth, not by creation, and its layers are unnamed. Every TFM cell is identified
by its merge op and the features it reads (in order), found by walking its graph back from the
cell's conv; our cells are walked the same way, so each of our cells finds the one TFM cell
computing the same thing from the same features.

TFM merges cell inputs at 256 channels whatever `num_filters`: with another width, every cell
input (input0, input1, then the dangling ones) is first projected by its own 1x1 conv + BN, which
become our cells' `resamplers[i].conv` / `.norm` (`merge_filters=256`). The cell walk stops at
these projections and sees through each to the feature it projects.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
import tf_keras

from nasfpn_tf.compat import tfm_graph as graph
from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.decoders.nasfpn import NASFPN
from nasfpn_tf.layers.merging_cell import MERGING_CELLS, GlobalPoolingCell, MergingCell

# TFM's combine_fn -> our cell op.
_OPS = {'attention': 'global_pooling', 'sum': 'sum'}
# TFM's `_resample_feature_map` brings every cell input to its default `target_num_filters`, 256,
# so any other width adds a 1x1 conv + BN per cell input: our `merge_filters`.
TFM_MERGE_FILTERS = 256


def tfm_merge_filters(num_filters: int) -> Optional[int]:
  """Our `merge_filters` for a TFM pyramid of `num_filters`: None (merge at num_filters) when
  that is TFM's merge width already."""
  return None if num_filters == TFM_MERGE_FILTERS else TFM_MERGE_FILTERS


def block_specs_from_tfm(tfm_block_specs: Sequence) -> Tuple[specs_lib.BlockSpec, ...]:
  """Our block specs from TFM's `BlockSpec` objects ('attention' is our 'global_pooling')."""
  specs = []
  for k, spec in enumerate(tfm_block_specs):
    if spec.combine_fn not in _OPS:
      raise ValueError(f'TFM cell {k}: unknown combine_fn {spec.combine_fn!r}; '
                       f'known: {sorted(_OPS)}.')
    specs.append(specs_lib.BlockSpec(int(spec.level), _OPS[spec.combine_fn],
                                     tuple(int(i) for i in spec.input_offsets),
                                     bool(spec.is_output)))
  return tuple(specs)


def pyramid_from_tfm(tfm_decoder) -> NASFPN:
  """Our NASFPN with the architecture of a built TFM NASFPN decoder and copies of its weights.

  It takes the same dict of backbone features and returns the same dict of levels.
  """
  config = tfm_decoder.get_config()
  min_level, max_level = config['min_level'], config['max_level']
  # TFM's get_config() omits the block specs.
  specs = block_specs_from_tfm(tfm_decoder._block_specs)  # pylint: disable=protected-access
  # TFM outputs the last num_levels cells; ours the is_output cells. They must coincide.
  num_levels = max_level - min_level + 1
  output_cells = [k for k, spec in enumerate(specs) if spec.is_output]
  last_cells = list(range(len(specs) - num_levels, len(specs)))
  if output_cells != last_cells:
    raise ValueError(
        f'The TFM block specs mark cells {output_cells} as outputs, but TFM outputs the last '
        f'{num_levels} cells {last_cells}; such a spec has no nasfpn_tf equivalent.')
  pyramid = NASFPN(
      input_specs={level: tf.TensorShape(shape) for level, shape in
                   config['input_specs'].items()},
      min_level=min_level, max_level=max_level, block_specs=specs,
      num_filters=config['num_filters'], num_repeats=config['num_repeats'],
      merge_filters=tfm_merge_filters(config['num_filters']),
      use_separable_conv=config['use_separable_conv'], activation=config['activation'],
      use_sync_bn=config['use_sync_bn'], norm_momentum=config['norm_momentum'],
      norm_epsilon=config['norm_epsilon'], kernel_regularizer=config['kernel_regularizer'],
      bias_regularizer=config['bias_regularizer'])
  load_tfm_weights(pyramid, tfm_decoder)
  return pyramid


def load_tfm_weights(pyramid: NASFPN, tfm_decoder) -> None:
  """Copies the weights of a TFM NASFPN decoder into `pyramid`, of the same architecture.

  Raises ValueError, naming the layer, when a layer has no counterpart or shapes differ; then
  nothing is copied.
  """
  tfm_inputs, tfm_outputs = tfm_decoder.input, tfm_decoder.output
  config = pyramid.get_config()
  min_level, max_level = config['min_level'], config['max_level']
  if sorted(tfm_inputs) != sorted(pyramid.input) or sorted(tfm_outputs) != sorted(pyramid.output):
    raise ValueError(f'The TFM decoder maps levels {sorted(tfm_inputs)} to '
                     f'{sorted(tfm_outputs)}, the pyramid {sorted(pyramid.input)} to '
                     f'{sorted(pyramid.output)}.')
  # Our symbolic tensors -> TFM's, grown as layers are matched.
  tfm_of = {id(ours): tfm_inputs[level] for level, ours in pyramid.input.items()}
  copied = set()
  assignments = []  # (our variable, TFM value), assigned once everything matched.

  for level in range(min_level, max_level + 1):
    if str(level) in tfm_inputs:
      ours = pyramid.get_layer(f'p{level}_lateral')
      tfm_x = tfm_of[id(graph.input_of(ours)[0])]
      # The lateral projection outputs num_filters channels. Other 1x1 convs reading the input
      # (when it has num_filters channels already, so TFM has no lateral projection) are the
      # projections of the cells reading it, to 256 (TFM only has those when num_filters != 256).
      tfm_convs = [layer for layer in graph.consumers(tfm_x) if isinstance(layer, graph.CONVS)
                   and layer.filters == config['num_filters']]
      if (ours.conv is None) != (not tfm_convs):
        raise ValueError(f'{ours.name}: projection (1x1 conv + BN) in the pyramid: '
                         f'{ours.conv is not None}, in the TFM decoder: {bool(tfm_convs)}.')
      if tfm_convs:
        if len(tfm_convs) != 1:
          raise ValueError(f'{ours.name}: {len(tfm_convs)} TFM convs project C{level} to '
                           f"{config['num_filters']} channels (expected one).")
        tfm_conv, tfm_bn = _projection(tfm_convs[0], ours.name)
        assignments += graph.conv_pairs(tfm_conv, ours.conv, ours.name)
        assignments += graph.bn_pairs(tfm_bn, ours.norm, ours.name)
        copied.update((tfm_bn, tfm_conv))
        tfm_x = graph.output_of(tfm_bn)
    else:
      # Levels above the backbone's: TFM max-pools the level below right after making it, so
      # its first max pooling consumer (creation order) is this level's input. (Cells max-pool
      # a feature directly only when they do not project it first.)
      ours = pyramid.get_layer(f'p{level}_from_p{level - 1}')
      pools = [layer for layer in graph.consumers(tfm_of[id(graph.input_of(ours)[0])])
               if isinstance(layer, tf_keras.layers.MaxPool2D)]
      if not pools or pools[0].pool_size != (2, 2):
        raise ValueError(f'{ours.name}: the TFM decoder does not max-pool P{level - 1} by 2.')
      tfm_x = graph.output_of(pools[0])
    tfm_of[id(graph.output_of(ours))] = tfm_x

  tfm_cells = _tfm_cells(tfm_decoder, copied, list(tfm_of.values()))
  op_of = {cls: op for op, cls in MERGING_CELLS.items()}
  # Functional models list layers in topological order: a cell's inputs are matched before it.
  for layer in (layer for layer in pyramid.layers if isinstance(layer, MergingCell)):
    inputs = list(zip((tfm_of[id(x)] for x in graph.input_of(layer)), layer.resamplers))
    if isinstance(layer, GlobalPoolingCell) and layer.input_levels[0] < layer.input_levels[1]:
      inputs[0], inputs[1] = inputs[1], inputs[0]  # TFM reads the coarse input first.
    inputs = _unique_unprojected(inputs, projected=lambda resampler: resampler.conv is not None)
    key = (op_of[type(layer)], tuple(id(x) for x, _ in inputs))
    shape = graph.output_of(layer).shape[1:3]
    matches = [cell for cell in tfm_cells.get(key, [])
               if cell[1] not in copied and graph.output_of(cell[1]).shape[1:3] == shape]
    if len(matches) != 1:
      raise ValueError(f'{layer.name}: {len(matches)} TFM cells read the same features with '
                       f'the same op at the same size (expected exactly one).')
    tfm_conv, tfm_bn, tfm_projections = matches[0]
    for (_, resampler), projection in zip(inputs, tfm_projections):
      name = f'{layer.name}/{resampler.name}'
      if (resampler.conv is None) != (projection is None):
        raise ValueError(
            f'{name}: projection to the merge width (1x1 conv + BN) in the pyramid: '
            f'{resampler.conv is not None}, in the TFM decoder: {projection is not None} (TFM '
            f'merges at {TFM_MERGE_FILTERS} channels: build the pyramid with merge_filters='
            f'{TFM_MERGE_FILTERS} when num_filters differs).')
      if projection is not None:
        assignments += graph.conv_pairs(projection[0], resampler.conv, name)
        assignments += graph.bn_pairs(projection[1], resampler.norm, name)
        copied.update(projection)
    assignments += graph.conv_pairs(tfm_conv, layer.conv, layer.name)
    assignments += graph.bn_pairs(tfm_bn, layer.norm, layer.name)
    copied.update((tfm_conv, tfm_bn))
    tfm_of[id(graph.output_of(layer))] = graph.output_of(tfm_bn)

  left = [layer.name for layer in tfm_decoder.layers if layer.weights and layer not in copied]
  if left:
    raise ValueError(f'TFM layers without a counterpart in the pyramid: {left}.')
  for level, ours in pyramid.output.items():
    if tfm_of[id(ours)] is not tfm_outputs[level]:
      raise ValueError(f'Output level {level} of the pyramid and of the TFM decoder come '
                       'from different cells.')
  for variable, value in assignments:
    variable.assign(value)


def _tfm_cells(tfm_decoder, laterals, features) -> Dict[tuple, List[tuple]]:
  """{(op, ids of the features read, coarse first): [(conv, bn, projections), ...]} of TFM's cells.

  `features` are the pyramid inputs (after the `laterals` projections); every cell output is a
  feature too. `projections` has, per feature read (in the key's order), the (conv, bn)
  projecting that input to the merge width, or None.

  A TFM conv + BN is a cell input's projection when the conv reads a feature (a pyramid input or
  the output of a BN) directly; a cell's conv reads the activation of its merge.
  """
  feature_ids = {id(x) for x in features}
  pairs = []
  for bn in tfm_decoder.layers:
    if isinstance(bn, graph.BN) and bn not in laterals:
      conv = graph.producer(graph.input_of(bn)[0])
      if not isinstance(conv, graph.CONVS):
        raise ValueError(f'TFM layer {bn.name} does not follow a conv.')
      pairs.append((conv, bn))
  projections, cells = {}, []
  for conv, bn in pairs:
    x = graph.input_of(conv)[0]
    if id(x) in feature_ids or isinstance(graph.producer(x), graph.BN):
      if conv.kernel_size != (1, 1):
        raise ValueError(f'TFM {conv.name} reads a feature directly but is no 1x1 projection.')
      projections[id(graph.output_of(bn))] = (conv, bn)
    else:
      cells.append((conv, bn))
  readable = feature_ids | {id(graph.output_of(bn)) for _, bn in cells}
  stops = readable | set(projections)
  tfm_cells = {}
  for conv, bn in cells:
    sources, ops = graph.walk_back(graph.input_of(conv)[0], stops)
    op = 'global_pooling' if 'math.reduce_max' in ops else 'sum'
    read, cell_projections = [], []
    for x in sources:
      projection = projections.get(id(x))
      if projection is not None:
        x = graph.input_of(projection[0])[0]  # See through to the projected feature.
        if id(x) not in readable:
          raise ValueError(f'TFM projection {projection[0].name} (read by the cell of '
                           f'{conv.name}) reads no pyramid feature.')
      read.append(x)
      cell_projections.append(projection)
    tfm_cells.setdefault((op, tuple(id(x) for x in read)), []).append(
        (conv, bn, tuple(cell_projections)))
  return tfm_cells


def _projection(conv, name):
  """(conv, bn) of a TFM 1x1 projection: the conv and the BN it feeds."""
  bns = graph.consumers(graph.output_of(conv))
  if len(bns) != 1 or not isinstance(bns[0], graph.BN):
    raise ValueError(f'{name}: TFM {conv.name} is not followed by a BN (only).')
  return conv, bns[0]


def _unique_unprojected(entries, projected):
  """`entries` ((tensor, extra) pairs) without repeats of a tensor read unprojected: walking the
  graph back reaches a tensor once, but each projection of it separately."""
  out = []
  for x, extra in entries:
    if projected(extra) or not any(y is x and not projected(e) for y, e in out):
      out.append((x, extra))
  return out
