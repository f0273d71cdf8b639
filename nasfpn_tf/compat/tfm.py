"""TF Model Garden (`official.vision`) NAS-FPN decoders as `nasfpn_tf.decoders.NASFPN`, and
TFM RetinaNet models as `nasfpn_tf.models.RetinaNet`.

Lets checkpoints trained with TFM be used here: build the TFM decoder, restore its checkpoint,
then `pyramid_from_tfm(decoder)` returns our pyramid computing the same function. For a whole
TFM RetinaNet (ResNet, `nasfpn` decoder, RetinaNet head), `retinanet_from_tfm(model)` returns our
RetinaNet with the same raw outputs, and `load_tfm_retinanet_weights(ours, model)` copies the
weights into an existing one.

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
from typing import Dict, List, Sequence, Tuple

import tensorflow as tf
import tf_keras

from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.decoders.nasfpn import NASFPN
from nasfpn_tf.layers.merging_cell import MERGING_CELLS, GlobalPoolingCell, MergingCell
from nasfpn_tf.models.retinanet import RetinaNet

_CONVS = (tf_keras.layers.Conv2D, tf_keras.layers.SeparableConv2D)
_BN = tf_keras.layers.BatchNormalization
_OPS = {'attention': 'global_pooling', 'sum': 'sum'}
# TFM's `_resample_feature_map` brings every cell input to its default `target_num_filters`, 256,
# so any other width adds a 1x1 conv + BN per cell input: our `merge_filters`.
_TFM_MERGE_FILTERS = 256


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
      merge_filters=(None if config['num_filters'] == _TFM_MERGE_FILTERS
                     else _TFM_MERGE_FILTERS),
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
      tfm_x = tfm_of[id(_input_of(ours)[0])]
      # The lateral projection outputs num_filters channels. Other 1x1 convs reading the input
      # (when it has num_filters channels already, so TFM has no lateral projection) are the
      # projections of the cells reading it, to 256 (TFM only has those when num_filters != 256).
      tfm_convs = [layer for layer in _consumers(tfm_x) if isinstance(layer, _CONVS)
                   and layer.filters == config['num_filters']]
      if (ours.conv is None) != (not tfm_convs):
        raise ValueError(f'{ours.name}: projection (1x1 conv + BN) in the pyramid: '
                         f'{ours.conv is not None}, in the TFM decoder: {bool(tfm_convs)}.')
      if tfm_convs:
        if len(tfm_convs) != 1:
          raise ValueError(f'{ours.name}: {len(tfm_convs)} TFM convs project C{level} to '
                           f"{config['num_filters']} channels (expected one).")
        tfm_conv, tfm_bn = _projection(tfm_convs[0], ours.name)
        assignments += _conv_pairs(tfm_conv, ours.conv, ours.name)
        assignments += _bn_pairs(tfm_bn, ours.norm, ours.name)
        copied.update((tfm_bn, tfm_conv))
        tfm_x = _output_of(tfm_bn)
    else:
      # Levels above the backbone's: TFM max-pools the level below right after making it, so
      # its first max pooling consumer (creation order) is this level's input. (Cells max-pool
      # a feature directly only when they do not project it first.)
      ours = pyramid.get_layer(f'p{level}_from_p{level - 1}')
      pools = [layer for layer in _consumers(tfm_of[id(_input_of(ours)[0])])
               if isinstance(layer, tf_keras.layers.MaxPool2D)]
      if not pools or pools[0].pool_size != (2, 2):
        raise ValueError(f'{ours.name}: the TFM decoder does not max-pool P{level - 1} by 2.')
      tfm_x = _output_of(pools[0])
    tfm_of[id(_output_of(ours))] = tfm_x

  tfm_cells = _tfm_cells(tfm_decoder, copied, list(tfm_of.values()))
  op_of = {cls: op for op, cls in MERGING_CELLS.items()}
  # Functional models list layers in topological order: a cell's inputs are matched before it.
  for layer in (layer for layer in pyramid.layers if isinstance(layer, MergingCell)):
    inputs = list(zip((tfm_of[id(x)] for x in _input_of(layer)), layer.resamplers))
    if isinstance(layer, GlobalPoolingCell) and layer.input_levels[0] < layer.input_levels[1]:
      inputs[0], inputs[1] = inputs[1], inputs[0]  # TFM reads the coarse input first.
    inputs = _unique_unprojected(inputs, projected=lambda resampler: resampler.conv is not None)
    key = (op_of[type(layer)], tuple(id(x) for x, _ in inputs))
    shape = _output_of(layer).shape[1:3]
    matches = [cell for cell in tfm_cells.get(key, [])
               if cell[1] not in copied and _output_of(cell[1]).shape[1:3] == shape]
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
            f'merges at {_TFM_MERGE_FILTERS} channels: build the pyramid with merge_filters='
            f'{_TFM_MERGE_FILTERS} when num_filters differs).')
      if projection is not None:
        assignments += _conv_pairs(projection[0], resampler.conv, name)
        assignments += _bn_pairs(projection[1], resampler.norm, name)
        copied.update(projection)
    assignments += _conv_pairs(tfm_conv, layer.conv, layer.name)
    assignments += _bn_pairs(tfm_bn, layer.norm, layer.name)
    copied.update((tfm_conv, tfm_bn))
    tfm_of[id(_output_of(layer))] = _output_of(tfm_bn)

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
    if isinstance(bn, _BN) and bn not in laterals:
      conv = _producer(_input_of(bn)[0])
      if not isinstance(conv, _CONVS):
        raise ValueError(f'TFM layer {bn.name} does not follow a conv.')
      pairs.append((conv, bn))
  projections, cells = {}, []
  for conv, bn in pairs:
    x = _input_of(conv)[0]
    if id(x) in feature_ids or isinstance(_producer(x), _BN):
      if conv.kernel_size != (1, 1):
        raise ValueError(f'TFM {conv.name} reads a feature directly but is no 1x1 projection.')
      projections[id(_output_of(bn))] = (conv, bn)
    else:
      cells.append((conv, bn))
  readable = feature_ids | {id(_output_of(bn)) for _, bn in cells}
  stops = readable | set(projections)
  tfm_cells = {}
  for conv, bn in cells:
    sources, ops = _walk_back(_input_of(conv)[0], stops)
    op = 'global_pooling' if 'math.reduce_max' in ops else 'sum'
    read, cell_projections = [], []
    for x in sources:
      projection = projections.get(id(x))
      if projection is not None:
        x = _input_of(projection[0])[0]  # See through to the projected feature.
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
  bns = _consumers(_output_of(conv))
  if len(bns) != 1 or not isinstance(bns[0], _BN):
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


def _walk_back(tensor, stops):
  """The stop tensors `tensor` is computed from, in order of first use, and the ops on the way."""
  sources, ops, seen = [], set(), set()

  def visit(x):
    if id(x) in seen:
      return
    seen.add(id(x))
    if id(x) in stops:
      sources.append(x)
      return
    layer = _producer(x)
    if layer.weights:
      raise ValueError(f'TFM layer {layer.name} with weights lies inside a cell; the pyramid '
                       'has no such layer.')
    ops.add(getattr(layer, 'symbol', type(layer).__name__))
    node = layer.inbound_nodes[x._keras_history.node_index]  # pylint: disable=protected-access
    for parent in node.keras_inputs:
      visit(parent)

  visit(tensor)
  return sources, ops


def _conv_pairs(src, dst, name):
  """(our variable, TFM value) for kernels and bias; a TFM 1x1 separable projection is folded
  into our 1x1 conv."""
  if isinstance(src, tf_keras.layers.SeparableConv2D):
    if isinstance(dst, tf_keras.layers.SeparableConv2D):
      pairs = [(dst.depthwise_kernel, src.depthwise_kernel),
               (dst.pointwise_kernel, src.pointwise_kernel)]
    elif src.kernel_size == (1, 1) and src.depth_multiplier == 1:
      # depthwise (1, 1, C, 1) scales each input channel before pointwise (1, 1, C, F).
      pairs = [(dst.kernel, src.depthwise_kernel * src.pointwise_kernel)]
    else:
      raise ValueError(f'{name}: TFM {src.name} is separable, {dst.name} is not.')
  elif isinstance(dst, tf_keras.layers.SeparableConv2D):
    raise ValueError(f'{name}: {dst.name} is separable, TFM {src.name} is not.')
  else:
    pairs = [(dst.kernel, src.kernel)]
  return _checked(pairs + [(dst.bias, src.bias)], name, src.name)


def _bn_pairs(src, dst, name):
  return _checked([(dst.gamma, src.gamma), (dst.beta, src.beta), (dst.moving_mean, src.moving_mean),
           (dst.moving_variance, src.moving_variance)], name, src.name)


def _checked(pairs, name, src_name):
  for dst, src in pairs:
    if dst.shape != src.shape:
      raise ValueError(f'{name}: {dst.name} has shape {dst.shape}, but TFM {src_name} '
                       f'gives {src.shape}.')
  return pairs


def _producer(tensor):
  return tensor._keras_history.layer  # pylint: disable=protected-access


def _input_of(layer) -> list:
  """The symbolic inputs of a layer's first call (the call that built the functional model)."""
  return layer.inbound_nodes[0].keras_inputs


def _output_of(layer):
  return tf.nest.flatten(layer.inbound_nodes[0].outputs)[0]


def _consumers(tensor) -> list:
  """Layers called on `tensor`, in call order."""
  return [node.layer for node in _producer(tensor).outbound_nodes
          if any(x is tensor for x in node.keras_inputs)]


# Full RetinaNet models.

# TFM ResNet settings our `backbones.build_backbone` (TFM's ResNet at its defaults) reproduces.
_TFM_RESNET_DEFAULTS = {'depth_multiplier': 1.0, 'stem_type': 'v0', 'resnetd_shortcut': False,
                        'replace_stem_max_pool': False, 'se_ratio': 0.0,
                        'init_stochastic_depth_rate': 0.0, 'scale_stem': True,
                        'bn_trainable': True}


def retinanet_from_tfm(tfm_model, **overrides):
  """Our `RetinaNet` with the architecture of a built TFM `RetinaNetModel`, and its weights.

  `tfm_model` is what `official.vision.modeling.factory.build_retinanet` returns for a
  ResNet backbone (TFM defaults otherwise), a `nasfpn` decoder and the RetinaNet head without
  attribute heads; its input size must be static. Both then compute the same raw outputs, each
  from its own input convention: ours takes [0, 255] RGB pixels and normalizes them itself,
  TFM's takes pixels already normalized by its input pipeline (ImageNet mean / stddev).

  The detection settings (score threshold, IoU threshold, max detections) are TFM's detection
  generator's; `pre_nms_top_k` keeps ours (per level, where TFM's is per class over all
  levels). `overrides` replace any `RetinaNet` argument (e.g. `pre_nms_top_k`).
  """
  model_config = tfm_model.get_config()
  backbone_config = tfm_model.backbone.get_config()
  if 'model_id' not in backbone_config or 'stem_type' not in backbone_config:
    raise ValueError(f'TFM backbone {type(tfm_model.backbone).__name__}: only ResNet backbones '
                     'convert.')
  unsupported = {k: backbone_config.get(k) for k, v in _TFM_RESNET_DEFAULTS.items()
                 if (backbone_config.get(k, v) or v) != v}  # se_ratio None or 0: no SE.
  if unsupported:
    raise ValueError(f'TFM ResNet settings {unsupported} differ from the defaults '
                     f'{ {k: _TFM_RESNET_DEFAULTS[k] for k in unsupported} } that nasfpn_tf '
                     'backbones use.')
  decoder_config = tfm_model.decoder.get_config()
  if 'num_repeats' not in decoder_config:
    raise ValueError(f'TFM decoder {type(tfm_model.decoder).__name__}: only NASFPN decoders '
                     'convert.')
  head_config = tfm_model.head.get_config()
  if head_config.get('attribute_heads') or not head_config.get('share_level_convs', True):
    raise ValueError('TFM head: attribute heads or per-level convs have no nasfpn_tf '
                     'equivalent.')
  generator_config = tfm_model.detection_generator.get_config()
  image_size = overrides.get('image_size', list(tfm_model.backbone.inputs[0].shape[1:3]))
  if None in image_size:
    raise ValueError(f'The TFM model takes images of size {image_size}: pass image_size=[h, w].')
  regularizer = backbone_config['kernel_regularizer']
  l2 = getattr(regularizer, 'l2', None)
  if regularizer is not None and l2 is None:
    raise ValueError(f'TFM kernel regularizer {regularizer}: only L2 converts.')
  # TFM's get_config() omits the block specs.
  pyramid_specs = block_specs_from_tfm(
      tfm_model.decoder._block_specs)  # pylint: disable=protected-access
  min_level, max_level = model_config['min_level'], model_config['max_level']
  named = [name for name in specs_lib.SPECS
           if specs_lib.resolve(name, min_level, max_level) == pyramid_specs]
  arguments = dict(
      image_size=image_size,
      num_classes=head_config['num_classes'],
      backbone=f"resnet{backbone_config['model_id']}",
      min_level=min_level,
      max_level=max_level,
      block_specs=named[0] if named else specs_lib.to_config(pyramid_specs),
      num_filters=decoder_config['num_filters'],
      num_repeats=decoder_config['num_repeats'],
      merge_filters=(None if decoder_config['num_filters'] == _TFM_MERGE_FILTERS
                     else _TFM_MERGE_FILTERS),
      use_separable_conv=decoder_config['use_separable_conv'],
      head_num_convs=head_config['num_convs'],
      head_num_filters=head_config['num_filters'],
      head_use_separable_conv=head_config['use_separable_conv'],
      anchor_num_scales=model_config['num_scales'],
      anchor_aspect_ratios=list(model_config['aspect_ratios']),
      anchor_size=model_config['anchor_size'],
      pre_nms_score_threshold=generator_config['pre_nms_score_threshold'],
      nms_iou_threshold=generator_config['nms_iou_threshold'],
      max_detections=generator_config['max_num_detections'],
      activation=decoder_config['activation'],
      use_sync_bn=decoder_config['use_sync_bn'],
      norm_momentum=decoder_config['norm_momentum'],
      norm_epsilon=decoder_config['norm_epsilon'],
      # TFM's l2 regularizer holds weight_decay / 2.
      l2_weight_decay=2.0 * float(l2) if l2 else 0.0,
  )
  model = RetinaNet(**{**arguments, **overrides})
  load_tfm_retinanet_weights(model, tfm_model)
  return model


def load_tfm_retinanet_weights(retinanet, tfm_model) -> None:
  """Copies every weight of a TFM `RetinaNetModel` into `retinanet` (our `RetinaNet`) of the
  same architecture: backbone, NASFPN decoder (`load_tfm_weights`) and head.

  Backbone layers are matched by walking both graphs from the input in call order (both are
  TFM's own backbone code), head weights one to one (our head mirrors TFM's layout). Raises
  ValueError naming the first mismatch; then nothing is copied.
  """
  assignments = _backbone_pairs(retinanet.backbone, tfm_model.backbone)
  assignments += _weight_pairs(retinanet.head.weights, tfm_model.head.weights, 'head')
  # Checks everything before it copies.
  load_tfm_weights(retinanet.decoder, _decoder_reading(tfm_model.decoder,
                                                       retinanet.decoder.input))
  for variable, value in assignments:
    variable.assign(value)


def _decoder_reading(tfm_decoder, levels):
  """The TFM decoder re-wrapped on the input `levels` only (the same layers): TFM passes it every
  backbone level, C2 included, which the pyramid never reads."""
  inputs = tfm_decoder.input
  if sorted(inputs) == sorted(levels) or not set(levels) <= set(inputs):
    return tfm_decoder
  return tf_keras.Model({level: inputs[level] for level in levels}, tfm_decoder.output)


def _weight_pairs(ours, theirs, name):
  """(our variable, TFM variable) of two weight lists laid out alike, checked by shape and kind."""
  if len(ours) != len(theirs):
    raise ValueError(f'{name}: {len(ours)} weights here, {len(theirs)} in the TFM model.')
  kind = lambda variable: variable.name.split('/')[-1]  # e.g. 'kernel:0', 'moving_mean:0'
  for dst, src in zip(ours, theirs):
    if dst.shape != src.shape or kind(dst) != kind(src):
      raise ValueError(f'{name}: {dst.name} {dst.shape} has no counterpart in TFM '
                       f'{src.name} {src.shape}.')
  return list(zip(ours, theirs))


def _backbone_pairs(backbone, tfm_backbone):
  """(our variable, TFM variable) for every backbone layer, matched by walking both graphs from
  the input: each tensor's consumers, in call order, pair up by position."""
  pairs, seen = [], set()
  queue = [(backbone.inputs[0], tfm_backbone.inputs[0])]
  matched = {}
  while queue:
    ours, theirs = queue.pop(0)
    if id(ours) in seen:
      continue
    seen.add(id(ours))
    our_nodes, their_nodes = _consumer_nodes(ours), _consumer_nodes(theirs)
    if len(our_nodes) != len(their_nodes):
      raise ValueError(f'backbone: {len(our_nodes)} layers read {ours.name} here, '
                       f'{len(their_nodes)} read TFM {theirs.name}.')
    for our_node, their_node in zip(our_nodes, their_nodes):
      layer, tfm_layer = our_node.layer, their_node.layer
      if type(layer) is not type(tfm_layer):
        raise ValueError(f'backbone: {layer.name} ({type(layer).__name__}) meets TFM '
                         f'{tfm_layer.name} ({type(tfm_layer).__name__}).')
      if layer not in matched:
        matched[layer] = tfm_layer
        pairs += _weight_pairs(layer.weights, tfm_layer.weights, f'backbone/{layer.name}')
      elif matched[layer] is not tfm_layer:
        raise ValueError(f'backbone: {layer.name} meets two TFM layers.')
      queue += list(zip(tf.nest.flatten(our_node.outputs), tf.nest.flatten(their_node.outputs)))
  left = [layer.name for layer in backbone.layers if layer.weights and layer not in matched]
  if left:
    raise ValueError(f'backbone layers without a TFM counterpart: {left}.')
  return pairs


def _consumer_nodes(tensor) -> list:
  """The nodes (layer calls) reading `tensor`, in call order."""
  return [node for node in _producer(tensor).outbound_nodes
          if any(x is tensor for x in tf.nest.flatten(node.keras_inputs))]
