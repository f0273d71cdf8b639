"""RetinaNet with a NAS-FPN (or FPN) pyramid: backbone -> pyramid -> head, + anchors and NMS."""
from typing import Dict, Optional, Sequence

import tensorflow as tf
import tf_keras

from nasfpn_tf.decoders import NASFPN
from nasfpn_tf.decoders import block_specs as block_specs_lib
from nasfpn_tf.models import backbones
from nasfpn_tf.models.geometry import ModelGeometry
from nasfpn_tf.models.head import RetinaNetHead
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
  `activation` is the pyramid's and head's (TFM backbones keep their own). `l2_weight_decay`
  adds TFM's L2 kernel regularizer (weight_decay / 2 * sum w^2) to backbone, pyramid and head.
  `merge_filters` is the pyramid's (`NASFPN`): None merges at `num_filters` as the paper; TF
  Model Garden merges at 256 whatever `num_filters` (`compat.tfm.retinanet_from_tfm` sets it).
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
               activation: str = 'relu',
               use_sync_bn: bool = False,
               norm_momentum: float = 0.99,
               norm_epsilon: float = 1e-3,
               l2_weight_decay: float = 0.0,
               **kwargs):
    geometry = ModelGeometry(image_size, min_level, max_level, anchor_num_scales,
                             anchor_aspect_ratios, anchor_size)
    config = {k: v for k, v in locals().items()
              if k not in ('self', 'kwargs', '__class__', 'geometry')}
    config.update(geometry.to_config())
    image_size = config['image_size']
    if not isinstance(block_specs, str):  # rows or BlockSpecs -> JSON-friendly rows
      config['block_specs'] = block_specs_lib.to_config(
          block_specs_lib.resolve(block_specs, min_level, max_level))
    norm = dict(use_sync_bn=use_sync_bn, norm_momentum=norm_momentum, norm_epsilon=norm_epsilon)
    regularizer = tf_keras.regularizers.l2(l2_weight_decay / 2.0) if l2_weight_decay else None

    images = tf_keras.Input(shape=image_size + [3], name='images')
    backbone_model = backbones.build_backbone(backbone, image_size + [3],
                                              kernel_regularizer=regularizer, **norm)
    decoder = NASFPN(
        backbone_model.output_specs, min_level=min_level, max_level=max_level,
        block_specs=block_specs, num_filters=num_filters, num_repeats=num_repeats,
        merge_filters=merge_filters, use_separable_conv=use_separable_conv, activation=activation,
        dropblock_keep_prob=dropblock_keep_prob, dropblock_size=dropblock_size,
        dropblock_ramp_steps=dropblock_ramp_steps, kernel_regularizer=regularizer,
        name='decoder', **norm)
    head = RetinaNetHead(
        min_level, max_level, num_classes, geometry.num_anchors_per_location,
        num_convs=head_num_convs, num_filters=head_num_filters,
        use_separable_conv=head_use_separable_conv, activation=activation,
        kernel_regularizer=regularizer, name='head', **norm)
    features = decoder(backbone_model(backbones.ImageNormalization(name='normalize')(images)))
    cls_outputs, box_outputs = head(features)
    kwargs.setdefault('name', 'retinanet')
    super().__init__(inputs=images,
                     outputs={'cls_outputs': cls_outputs, 'box_outputs': box_outputs}, **kwargs)

    self._config = config
    self.backbone = backbone_model
    self.decoder = decoder
    self.head = head
    self.detection_generator = DetectionGenerator(
        image_size, num_classes, pre_nms_top_k=pre_nms_top_k,
        pre_nms_score_threshold=pre_nms_score_threshold, nms_iou_threshold=nms_iou_threshold,
        max_detections=max_detections, name='detection_generator')
    self.geometry = geometry
    self.anchor_boxes = geometry.anchor_boxes()

  @property
  def image_size(self):
    return list(self._config['image_size'])

  def detect(self, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Network + post-processing: detections in input pixels (see `DetectionGenerator`).

    Wrap in `tf.function` for speed; it runs in inference mode.
    """
    outputs = self(images, training=False)
    return self.detection_generator(outputs['cls_outputs'], outputs['box_outputs'],
                                    self.anchor_boxes)

  def get_config(self):
    return dict(self._config, name=self.name)

  @classmethod
  def from_config(cls, config, custom_objects=None):
    return cls(**config)
