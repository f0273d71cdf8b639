"""TF Model Garden (`official.vision`) RetinaNet models as `nasfpn_tf.models.RetinaNet`.

For a whole TFM RetinaNet (ResNet, `nasfpn` decoder, RetinaNet head), `retinanet_from_tfm(model)`
returns our RetinaNet with the same raw outputs, `load_tfm_retinanet_weights(ours, model)`
copies the weights into an existing one, and `geometry_from_tfm(model)` is its input size, levels
and anchors as a `ModelGeometry`. The decoder is matched cell by cell (`tfm_nasfpn`), the
backbone by walking both graphs, the head one weight to one.
"""
import tensorflow as tf
import tf_keras

from nasfpn_tf.compat import tfm_graph as graph
from nasfpn_tf.compat import tfm_nasfpn
from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.models.geometry import ModelGeometry
from nasfpn_tf.models.retinanet import RetinaNet

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
  regularizer = backbone_config['kernel_regularizer']
  l2 = getattr(regularizer, 'l2', None)
  if regularizer is not None and l2 is None:
    raise ValueError(f'TFM kernel regularizer {regularizer}: only L2 converts.')
  # TFM's get_config() omits the block specs.
  pyramid_specs = tfm_nasfpn.block_specs_from_tfm(
      tfm_model.decoder._block_specs)  # pylint: disable=protected-access
  geometry = geometry_from_tfm(tfm_model, overrides.get('image_size'))
  named = [name for name in specs_lib.SPECS
           if specs_lib.resolve(name, geometry.min_level, geometry.max_level) == pyramid_specs]
  arguments = dict(
      **geometry.to_config(),
      num_classes=head_config['num_classes'],
      backbone=f"resnet{backbone_config['model_id']}",
      block_specs=named[0] if named else specs_lib.to_config(pyramid_specs),
      num_filters=decoder_config['num_filters'],
      num_repeats=decoder_config['num_repeats'],
      merge_filters=tfm_nasfpn.tfm_merge_filters(decoder_config['num_filters']),
      use_separable_conv=decoder_config['use_separable_conv'],
      head_num_convs=head_config['num_convs'],
      head_num_filters=head_config['num_filters'],
      head_use_separable_conv=head_config['use_separable_conv'],
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


def geometry_from_tfm(tfm_model, image_size=None) -> ModelGeometry:
  """The input size (its static one, else `image_size` [h, w]), levels and anchors of a built TFM
  `RetinaNetModel`: what its input pipeline labels and its detection generator decodes."""
  config = tfm_model.get_config()
  if image_size is None:
    image_size = list(tfm_model.backbone.inputs[0].shape[1:3])
  if None in image_size:
    raise ValueError(f'The TFM model takes images of size {image_size}: pass image_size=[h, w].')
  return ModelGeometry(image_size, config['min_level'], config['max_level'], config['num_scales'],
                       config['aspect_ratios'], config['anchor_size'])


def load_tfm_retinanet_weights(retinanet, tfm_model) -> None:
  """Copies every weight of a TFM `RetinaNetModel` into `retinanet` (our `RetinaNet`) of the
  same architecture: backbone, NASFPN decoder (`tfm_nasfpn.load_tfm_weights`) and head.

  Backbone layers are matched by walking both graphs from the input in call order (both are
  TFM's own backbone code), head weights one to one (our head mirrors TFM's layout). Raises
  ValueError naming the first mismatch; then nothing is copied.
  """
  assignments = _backbone_pairs(retinanet.backbone, tfm_model.backbone)
  assignments += graph.weight_pairs(retinanet.head.weights, tfm_model.head.weights, 'head')
  # Checks everything before it copies.
  tfm_nasfpn.load_tfm_weights(retinanet.decoder,
                              _decoder_reading(tfm_model.decoder, retinanet.decoder.input))
  for variable, value in assignments:
    variable.assign(value)


def _decoder_reading(tfm_decoder, levels):
  """The TFM decoder re-wrapped on the input `levels` only (the same layers): TFM passes it every
  backbone level, C2 included, which the pyramid never reads."""
  inputs = tfm_decoder.input
  if sorted(inputs) == sorted(levels) or not set(levels) <= set(inputs):
    return tfm_decoder
  return tf_keras.Model({level: inputs[level] for level in levels}, tfm_decoder.output)


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
    our_nodes, their_nodes = graph.consumer_nodes(ours), graph.consumer_nodes(theirs)
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
        pairs += graph.weight_pairs(layer.weights, tfm_layer.weights, f'backbone/{layer.name}')
      elif matched[layer] is not tfm_layer:
        raise ValueError(f'backbone: {layer.name} meets two TFM layers.')
      queue += list(zip(tf.nest.flatten(our_node.outputs), tf.nest.flatten(their_node.outputs)))
  left = [layer.name for layer in backbone.layers if layer.weights and layer not in matched]
  if left:
    raise ValueError(f'backbone layers without a TFM counterpart: {left}.')
  return pairs
