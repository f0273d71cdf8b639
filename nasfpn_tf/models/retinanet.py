"""RetinaNet with a NAS-FPN (or FPN) pyramid: backbone -> pyramid -> head, + anchors and NMS."""
import numbers
from typing import Dict, List, Optional, Sequence

import tensorflow as tf
import tf_keras

from nasfpn_tf.decoders import NASFPN
from nasfpn_tf.decoders import block_specs as block_specs_lib
from nasfpn_tf.decoders import nasfcos_specs
from nasfpn_tf.decoders.nasfcos_fpn import NASFCOSFPN
from nasfpn_tf.models import backbones
from nasfpn_tf.models import fcos_targets
from nasfpn_tf.models.fcos_head import FCOSHead
from nasfpn_tf.models.fcos_postprocess import FCOSDetectionGenerator
from nasfpn_tf.models.geometry import ModelGeometry
from nasfpn_tf.models.head import RetinaNetHead
from nasfpn_tf.models.nasfcos_head import NASFCOSHead
from nasfpn_tf.models.postprocess import check_soft_nms_sigma
from nasfpn_tf.models.postprocess import DetectionGenerator


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class RetinaNet(tf_keras.Model):
  """A functional RetinaNet built from plain arguments (the gin bindings of `build_retinanet`).

  Input: [B, H, W, 3] RGB pixels in [0, 255], float, with (H, W) = `image_size` fixed at build
  time (a multiple of 2^max_level, so every level divides evenly); the model normalizes them
  (`backbones.ImageNormalization`). `model(images, training=...)` returns the raw outputs
  {'cls_outputs': {level: [B, h, w, A*num_classes] logits}, 'box_outputs': {level: [B, h, w,
  A*4] deltas}}, the network measured as "backbone + pyramid + head". `detect(images)` adds the
  post-processing. `geometry` is its `ModelGeometry` (input size, levels, anchors);
  `anchor_boxes` {level: [h, w, A*4]} are its TFM `Anchor` boxes in input pixels, what the
  training labeler needs. `num_classes` counts background (class 0, never predicted).
  `soft_nms_sigma` > 0 post-processes with Gaussian Soft-NMS instead of NMS (`postprocess`).
  `activation` is the pyramid's and head's (TFM backbones keep their own). `l2_weight_decay`
  adds TFM's L2 kernel regularizer (weight_decay / 2 * sum w^2) to backbone, pyramid and head.
  `merge_filters` is the pyramid's (`NASFPN`): None merges at `num_filters` as the paper; TF
  Model Garden merges at 256 whatever `num_filters` (`compat.tfm.retinanet_from_tfm` sets it).

  Anytime detection (`anytime=True`): a class and box head after every repeat of the pyramid
  (exits 1..num_repeats), one head shared by all exits unless `anytime_shared_head=False` (then
  exit k < num_repeats has its own, `head_exit<k>`; the last exit's is `head`).
  `model(images)` then also returns 'exits': {'1': {'cls_outputs', 'box_outputs'}, ...,
  str(num_repeats): ...} (the top-level outputs are the last exit's), what deep supervision
  trains on with `anytime_loss_weights` (None: 1/num_repeats each; see `exit_loss_weights`).
  Any model stops early: `model(images, num_repeats=k)` and `detect(images, num_repeats=k)`
  compute the backbone, the first k pyramids and one head (exit k's), nothing after them.

  FCOS (`detector='fcos'`, docs/fcos.md): the same backbone and pyramid with an anchor-free
  `FCOSHead` (towers of `head_num_convs` x `head_num_filters`, GroupNorm of `fcos_norm_groups`,
  centerness on the box tower unless `fcos_centerness_on_reg=False`); the raw outputs add
  'centerness_outputs' {level: [B, h, w, 1]}, 'box_outputs' are distances (t, l, b, r) in
  strides, 'cls_outputs' are [B, h, w, num_classes]; `points` {level: [h, w, 2]} replace the
  anchors (the anchor arguments are unused), and `detect` returns the same detections through
  `FCOSDetectionGenerator`. Targets: `fcos_targets` with `fcos_range_bounds` (None: FCOS's 64,
  128, ...) and `fcos_center_sampling_radius`.

  NAS-FCOS (docs/nasfcos.md): `decoder='nasfcos_fpn'` builds the pyramid with `NASFCOSFPN`
  (`block_specs` then names a spec of `nasfcos_specs.SPECS` or gives its rows; the default
  'nasfpn' means 'nasfcos_fpn'; `num_repeats`, `merge_filters`, `use_separable_conv` and
  DropBlock do not apply), and with FCOS `fcos_head_spec` (a name in `nasfcos_specs.HEAD_SPECS`
  or (ops, unshared)) builds the head with `NASFCOSHead`.

  Per-repeat pyramids (docs/pyramids.md): `pyramids` gives each of the `num_repeats` pyramid
  networks its own spec, e.g. ['fpn', 'nasfpn', 'nasfpn'] (NAS-FPN behind FPN, each repeat with
  its own weights); an entry is a name in `block_specs.SPECS`, rows, or None for `block_specs`
  (what the search samples behind a fixed FPN). None (default): every repeat is `block_specs`.
  """

  def __init__(self,
               image_size: Sequence[int] = (640, 640),
               num_classes: int = 91,
               backbone: str = 'resnet50',
               min_level: int = 3,
               max_level: int = 7,
               block_specs='nasfpn',
               num_filters: int = 256,
               num_repeats: int = 7,
               merge_filters: Optional[int] = None,
               use_separable_conv: bool = False,
               dropblock_keep_prob: Optional[float] = None,
               dropblock_size: int = 3,
               dropblock_ramp_steps: int = 0,
               head_num_convs: int = 4,
               head_num_filters: int = 256,
               head_use_separable_conv: bool = False,
               anchor_num_scales: int = 3,
               anchor_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
               anchor_size: float = 4.0,
               pre_nms_top_k: int = 1000,
               pre_nms_score_threshold: float = 0.05,
               nms_iou_threshold: float = 0.5,
               max_detections: int = 100,
               soft_nms_sigma: float = 0.0,
               activation: str = 'relu',
               use_sync_bn: bool = False,
               norm_momentum: float = 0.99,
               norm_epsilon: float = 1e-3,
               l2_weight_decay: float = 0.0,
               anytime: bool = False,
               anytime_shared_head: bool = True,
               anytime_loss_weights: Optional[Sequence[float]] = None,
               detector: str = 'retinanet',
               fcos_range_bounds: Optional[Sequence[float]] = None,
               fcos_center_sampling_radius: float = fcos_targets.DEFAULT_CENTER_SAMPLING_RADIUS,
               fcos_norm_groups: int = 32,
               fcos_centerness_on_reg: bool = True,
               decoder: str = 'nasfpn',
               fcos_head_spec=None,
               pyramids=None,
               **kwargs):
    _check_anytime(anytime, anytime_shared_head, anytime_loss_weights, num_repeats)
    _check_detector(detector, locals())
    check_soft_nms_sigma(soft_nms_sigma)
    geometry = ModelGeometry(image_size, min_level, max_level, anchor_num_scales,
                             anchor_aspect_ratios, anchor_size)
    config = {k: v for k, v in locals().items()
              if k not in ('self', 'kwargs', '__class__', 'geometry')}
    config.update(geometry.to_config())
    fcos = detector == 'fcos'
    if fcos:
      targets = fcos_targets.FCOSTargets(geometry, fcos_range_bounds, fcos_center_sampling_radius)
      config['fcos_range_bounds'] = list(targets.range_bounds)
    image_size = config['image_size']
    if anytime_loss_weights is not None:
      config['anytime_loss_weights'] = [float(w) for w in anytime_loss_weights]
    block_specs = _check_nasfcos(decoder, block_specs, fcos_head_spec, detector, anytime)
    config['block_specs'] = block_specs
    if pyramids is not None:
      _check_pyramids(pyramids, block_specs, decoder, num_repeats, min_level, max_level)
      pyramids = block_specs_lib.pyramids_to_config(pyramids)
      config['pyramids'] = pyramids
    if fcos_head_spec is not None and not isinstance(fcos_head_spec, str):
      spec = nasfcos_specs.resolve_head(fcos_head_spec)
      config['fcos_head_spec'] = [list(spec.ops), spec.unshared]
    if decoder == 'nasfcos_fpn':
      if not isinstance(block_specs, str):
        config['block_specs'] = nasfcos_specs.to_config(nasfcos_specs.resolve(block_specs))
    elif not isinstance(block_specs, str) and (pyramids is None or None in pyramids):
      # rows or BlockSpecs -> JSON-friendly rows (as they are when no repeat builds them)
      config['block_specs'] = block_specs_lib.to_config(
          block_specs_lib.resolve(block_specs, min_level, max_level))
    norm = dict(use_sync_bn=use_sync_bn, norm_momentum=norm_momentum, norm_epsilon=norm_epsilon)
    regularizer = tf_keras.regularizers.l2(l2_weight_decay / 2.0) if l2_weight_decay else None

    images = tf_keras.Input(shape=image_size + [3], name='images')
    backbone_model = backbones.build_backbone(backbone, image_size + [3],
                                              kernel_regularizer=regularizer, **norm)
    if decoder == 'nasfcos_fpn':
      decoder = NASFCOSFPN(
          backbone_model.output_specs, min_level=min_level, max_level=max_level,
          block_specs=block_specs, num_filters=num_filters, kernel_regularizer=regularizer,
          name='decoder', **norm)
    else:
      decoder = NASFPN(
          backbone_model.output_specs, min_level=min_level, max_level=max_level,
          block_specs=block_specs, num_filters=num_filters, num_repeats=num_repeats,
          merge_filters=merge_filters, use_separable_conv=use_separable_conv, activation=activation,
          dropblock_keep_prob=dropblock_keep_prob, dropblock_size=dropblock_size,
          dropblock_ramp_steps=dropblock_ramp_steps, kernel_regularizer=regularizer,
          output_every_repeat=anytime, pyramids=pyramids, name='decoder', **norm)
    make_head = lambda name: RetinaNetHead(  # noqa: E731
        min_level, max_level, num_classes, geometry.num_anchors_per_location,
        num_convs=head_num_convs, num_filters=head_num_filters,
        use_separable_conv=head_use_separable_conv, activation=activation,
        kernel_regularizer=regularizer, name=name, **norm)
    if fcos:
      make_head = lambda name: FCOSHead(  # noqa: E731
          min_level, max_level, num_classes, num_convs=head_num_convs,
          num_filters=head_num_filters, use_separable_conv=head_use_separable_conv,
          activation=activation, norm_groups=fcos_norm_groups,
          centerness_on_reg=fcos_centerness_on_reg, kernel_regularizer=regularizer, name=name)
    if fcos and fcos_head_spec is not None:
      make_head = lambda name: NASFCOSHead(  # noqa: E731
          min_level, max_level, num_classes, head_spec=fcos_head_spec,
          num_filters=head_num_filters, norm_groups=fcos_norm_groups,
          centerness_on_reg=fcos_centerness_on_reg, kernel_regularizer=regularizer, name=name)
    head = make_head('head')
    pyramids = decoder(backbone_model(backbones.ImageNormalization(name='normalize')(images)))
    if anytime:
      exits = {}
      for k in range(1, num_repeats + 1):
        exit_head = (head if anytime_shared_head or k == num_repeats
                     else make_head(_exit_head_name(k)))
        exits[str(k)] = _raw_outputs(*exit_head(pyramids[str(k)]))
      outputs = dict(exits[str(num_repeats)], exits=exits)
    else:
      outputs = _raw_outputs(*head(pyramids))
    kwargs.setdefault('name', 'retinanet')
    super().__init__(inputs=images, outputs=outputs, **kwargs)

    self._config = config
    self.backbone = backbone_model
    self.decoder = decoder
    self.head = head
    self.detection_generator = DetectionGenerator(
        image_size, num_classes, pre_nms_top_k=pre_nms_top_k,
        pre_nms_score_threshold=pre_nms_score_threshold, nms_iou_threshold=nms_iou_threshold,
        max_detections=max_detections, soft_nms_sigma=soft_nms_sigma,
        name='detection_generator')
    self.geometry = geometry
    self.anchor_boxes = geometry.anchor_boxes()
    if fcos:  # Points instead of anchors, and FCOS's scores and box decoding.
      self.detection_generator = FCOSDetectionGenerator(
          **self.detection_generator.get_config())
      self.points = targets.points()
    # Early-exit models by exit, built on first use; a plain holder, so that checkpoints and
    # .keras files never see them (they own no weights).
    self._exit_models = _ExitModels()

  @property
  def image_size(self):
    return list(self._config['image_size'])

  @property
  def detector(self) -> str:
    return self._config['detector']

  @property
  def anytime(self) -> bool:
    return bool(self._config['anytime'])

  @property
  def num_repeats(self) -> int:
    return self._config['num_repeats']

  @property
  def exit_loss_weights(self) -> List[float]:
    """The weight of each exit's loss, exit 1 first: `anytime_loss_weights`, else 1/N each."""
    weights = self._config['anytime_loss_weights']
    return list(weights) if weights else [1.0 / self.num_repeats] * self.num_repeats

  def call(self, inputs, training=None, mask=None, num_repeats=None):
    """The functional graph, or with `num_repeats=k` only the first k pyramids and a head."""
    if num_repeats is None:
      return super().call(inputs, training=training, mask=mask)
    return self.exit_model(num_repeats)(inputs, training=training)

  def check_exit(self, num_repeats: int) -> None:
    """ValueError naming build_retinanet.num_repeats unless `num_repeats` is one of the exits
    1..num_repeats; builds nothing."""
    if (isinstance(num_repeats, bool) or not isinstance(num_repeats, numbers.Integral) or
        not 1 <= num_repeats <= self.num_repeats):
      raise ValueError(f'num_repeats={num_repeats!r} is not an exit of this model: give 1..'
                       f'{self.num_repeats} (build_retinanet.num_repeats = {self.num_repeats}).')

  def exit_model(self, num_repeats: int) -> tf_keras.Model:
    """Exit `num_repeats` as a model of its own sharing these layers and weights: images ->
    backbone -> the first `num_repeats` pyramids -> that exit's head -> raw outputs."""
    self.check_exit(num_repeats)
    models = self._exit_models.by_exit
    if num_repeats not in models:
      with tf.init_scope():  # Built once, outside whatever function first asks for it.
        images = tf_keras.Input(shape=self.image_size + [3], name='images')
        features = self.backbone(self.get_layer('normalize')(images))
        pyramid = self.decoder.first_repeats(num_repeats)(features)
        head = (self.head if num_repeats == self.num_repeats or
                self._config['anytime_shared_head'] or not self.anytime
                else self.get_layer(_exit_head_name(num_repeats)))
        models[num_repeats] = tf_keras.Model(images, _raw_outputs(*head(pyramid)),
                                             name=f'{self.name}_exit_{num_repeats}')
    return models[num_repeats]

  def exit_outputs(self, images: tf.Tensor, num_repeats: Optional[int] = None):
    """The raw outputs of exit `num_repeats` (None: the last; of an anytime model, its head
    alone, not every exit's) in inference mode: what `detect` and the exports run."""
    if num_repeats is None and self.anytime:
      num_repeats = self.num_repeats
    return self(images, training=False, num_repeats=num_repeats)

  def detect(self, images: tf.Tensor, num_repeats: Optional[int] = None) -> Dict[str, tf.Tensor]:
    """Network + post-processing: detections in input pixels (see `DetectionGenerator`), of
    exit `num_repeats` (None: the last; see `call`).

    Wrap in `tf.function` for speed; it runs in inference mode.
    """
    outputs = self.exit_outputs(images, num_repeats)
    if self.detector == 'fcos':
      return self.detection_generator(outputs['cls_outputs'], outputs['box_outputs'],
                                      outputs['centerness_outputs'], self.points)
    return self.detection_generator(outputs['cls_outputs'], outputs['box_outputs'],
                                    self.anchor_boxes)

  def get_config(self):
    config = dict(self._config, name=self.name)
    if not self.anytime:  # A plain model's config is what it was before anytime models.
      for name in ANYTIME_ARGUMENTS:
        del config[name]
    if self.detector == 'retinanet':  # Nor is a RetinaNet's (FCOS came later).
      for name in FCOS_ARGUMENTS:
        del config[name]
    if not config['soft_nms_sigma']:  # Nor is a hard-NMS model's (Soft-NMS came later).
      del config['soft_nms_sigma']
    for name, default in NASFCOS_DEFAULTS.items():  # Nor are NAS-FCOS's, left at defaults.
      if config.get(name, default) == default:
        config.pop(name, None)
    if config.get('pyramids') is None:  # Nor are per-repeat pyramids, unset.
      config.pop('pyramids', None)
    return config

  @classmethod
  def from_config(cls, config, custom_objects=None):
    return cls(**config)


# The arguments of anytime detection, in the config of anytime models only.
ANYTIME_ARGUMENTS = ('anytime', 'anytime_shared_head', 'anytime_loss_weights')
DETECTORS = ('retinanet', 'fcos')
# The detector and FCOS's arguments, in the config of FCOS models only.
FCOS_ARGUMENTS = ('detector', 'fcos_range_bounds', 'fcos_center_sampling_radius',
                  'fcos_norm_groups', 'fcos_centerness_on_reg')
# Their defaults: a RetinaNet must leave FCOS's arguments at them.
FCOS_DEFAULTS = {'detector': 'retinanet', 'fcos_range_bounds': None,
                 'fcos_center_sampling_radius': fcos_targets.DEFAULT_CENTER_SAMPLING_RADIUS,
                 'fcos_norm_groups': 32, 'fcos_centerness_on_reg': True}


# NAS-FCOS's arguments and their defaults, in a config only when changed.
NASFCOS_DEFAULTS = {'decoder': 'nasfpn', 'fcos_head_spec': None}
DECODERS = ('nasfpn', 'nasfcos_fpn')


def _check_nasfcos(decoder, block_specs, fcos_head_spec, detector, anytime):
  """The NAS-FCOS bindings must fit the rest; returns the block specs the decoder builds."""
  if decoder not in DECODERS:
    raise ValueError(f'build_retinanet.decoder = {decoder!r} is not one of {list(DECODERS)}.')
  if fcos_head_spec is not None and detector != 'fcos':
    raise ValueError("build_retinanet.fcos_head_spec only applies with build_retinanet.detector "
                     "= 'fcos'.")
  if decoder != 'nasfcos_fpn':
    return block_specs
  if anytime:
    raise ValueError("build_retinanet.anytime needs build_retinanet.decoder = 'nasfpn' (the "
                     'NAS-FCOS pyramid is not stacked).')
  return 'nasfcos_fpn' if block_specs == 'nasfpn' else block_specs


def _check_pyramids(pyramids, block_specs, decoder, num_repeats, min_level, max_level) -> None:
  """`build_retinanet.pyramids` must fit the decoder, the repeats and the levels."""
  if decoder != 'nasfpn':
    raise ValueError(f"build_retinanet.pyramids needs build_retinanet.decoder = 'nasfpn', not "
                     f'{decoder!r} (the NAS-FCOS pyramid is not stacked).')
  block_specs_lib.resolve_pyramids(pyramids, block_specs, num_repeats, min_level, max_level,
                                   where='build_retinanet.pyramids')
  if None not in pyramids and block_specs != 'nasfpn':
    raise ValueError(f'build_retinanet.block_specs = {block_specs!r} is unused: no entry of '
                     f'build_retinanet.pyramids = {list(pyramids)!r} is None (None builds '
                     'block_specs).')


class _ExitModels:
  """{exit: model} of `RetinaNet.exit_model`."""

  def __init__(self):
    self.by_exit = {}


def _exit_head_name(exit_number: int) -> str:
  return f'head_exit{exit_number}'


def _raw_outputs(cls_outputs, box_outputs, centerness_outputs=None):
  outputs = {'cls_outputs': cls_outputs, 'box_outputs': box_outputs}
  if centerness_outputs is not None:  # FCOS
    outputs['centerness_outputs'] = centerness_outputs
  return outputs


def _check_detector(detector, arguments) -> None:
  """A known detector, and FCOS's arguments left at their defaults by a RetinaNet."""
  if detector not in DETECTORS:
    raise ValueError(f'build_retinanet.detector = {detector!r} is not one of {list(DETECTORS)}.')
  changed = [name for name in FCOS_ARGUMENTS[1:] if arguments[name] != FCOS_DEFAULTS[name]]
  if detector == 'retinanet' and changed:
    raise ValueError(f"build_retinanet.{changed[0]} only applies with build_retinanet.detector "
                     "= 'fcos'.")


def _check_anytime(anytime, shared_head, loss_weights, num_repeats) -> None:
  """The anytime bindings must fit each other and the repeats."""
  if not anytime:
    if loss_weights is not None or not shared_head:
      raise ValueError('build_retinanet.anytime_loss_weights and .anytime_shared_head only '
                       'apply with build_retinanet.anytime = True.')
    return
  if loss_weights is None:
    return
  weights = list(loss_weights)
  if (len(weights) != num_repeats or any(w < 0 for w in weights) or not sum(weights) > 0):
    raise ValueError(f'build_retinanet.anytime_loss_weights = {weights}: give '
                     f'build_retinanet.num_repeats = {num_repeats} weights, one per exit, '
                     'none negative, not all 0.')
