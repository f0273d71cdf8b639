"""Test-time augmentation (docs/tta.md): multi-scale and horizontal-flip views of each image, the
candidates of every view mapped back to the model's input pixels and merged before one NMS.

As mmdetection's single-stage TTA (`MultiScaleFlipAug` + `merge_aug_bboxes`): every view's
candidates before NMS (`DetectionGenerator.candidates`: per-level top-k, decoded, clipped) are
mapped back (un-flipped, divided by the view's scale), concatenated, and one class-aware NMS (the
model's own `suppress`: its hard NMS or Soft-NMS, thresholds and `max_detections`) keeps the
detections. A duplicated object thus comes out once, at its best view's score.

Views: every scale of `TTAConfig.scales` times (no flip, flip) with `flip`. Our Keras models take
one fixed input size, so a view at scale s runs through a model of its own size sharing the
weights: the model's input (the evaluation preprocessing, `geometry.resize_and_pad`) is resized
by s to round(s * size), zero-padded at the bottom / right to the next multiple of 2^max_level
(the geometry's constraint), and fed to a `RetinaNet` of that size built from the same config,
its weights copied from the model (`sync_weights`; convolutions do not depend on the input size,
anchors / points are the scaled model's own). Scale 1 is the model itself. Resizing the
model's input, not the original image, keeps one preprocessing for evaluation, predict and the
records; upscaled views interpolate it. The flip mirrors each image's content (its first
round(orig_w * scale) columns, `image_info`), keeping the padding at the right as in training;
its boxes map back as x -> content_width - x.
"""
import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf

from nasfpn_tf.models.retinanet import RetinaNet

# Scales outside (0, MAX_SCALE] are refused: a larger model than this is a mistake, not a view.
MAX_SCALE = 4.0


@dataclasses.dataclass(frozen=True)
class TTAConfig:
  """The views: each of `scales` (factors of the model's input size), flipped too with `flip`."""
  scales: Tuple[float, ...] = (1.0,)
  flip: bool = False

  @property
  def views(self) -> List[Tuple[float, bool]]:
    """(scale, flipped) of every view, in order."""
    return [(scale, flipped) for scale in self.scales
            for flipped in ((False, True) if self.flip else (False,))]

  def describe(self) -> str:
    return f'scales {list(self.scales)}{", flip" if self.flip else ""}'


def from_flags(scales: Optional[str], flip: bool,
               flag: str = '--tta_scales') -> Optional[TTAConfig]:
  """The TTAConfig of `--tta_scales` (comma-separated factors, e.g. '1.0,1.25'; None: [1.0])
  and `--tta_flip`; None when neither is given (TTA off). Bad values raise ValueError naming
  `flag`."""
  if scales is None and not flip:
    return None
  if scales is None:
    return TTAConfig((1.0,), bool(flip))
  parsed = []
  for text in str(scales).split(','):
    try:
      value = float(text)
    except ValueError:
      value = None
    if value is None or not 0 < value <= MAX_SCALE:
      raise ValueError(f'{flag}={scales}: {text.strip()!r} is not a scale factor; give '
                       f'comma-separated numbers in (0, {MAX_SCALE:g}], e.g. 1.0,1.25.')
    if value in parsed:
      raise ValueError(f'{flag}={scales}: {value:g} is given twice.')
    parsed.append(value)
  return TTAConfig(tuple(parsed), bool(flip))


def scaled_sizes(image_size: Sequence[int], scale: float,
                 stride: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """((resized height, width), (padded height, width)) of a view: the model input resized by
  `scale` (at least 1 pixel), padded up to multiples of `stride`."""
  resized = tuple(max(1, int(round(scale * s))) for s in image_size)
  padded = tuple(int(math.ceil(s / stride)) * stride for s in resized)
  return resized, padded


def content_widths(image_info: tf.Tensor, width: int) -> tf.Tensor:
  """[B] int32 widths of the image content in the model input (the rest is padding): the
  original width times the x scale of `image_info` [B, 4, 2], at most `width`."""
  image_info = tf.cast(image_info, tf.float32)
  widths = tf.round(image_info[:, 0, 1] * image_info[:, 2, 1])
  return tf.cast(tf.clip_by_value(widths, 1.0, float(width)), tf.int32)


def flip_images(images: tf.Tensor, widths: tf.Tensor) -> tf.Tensor:
  """[B, H, W, C] images with each one's first `widths[b]` columns mirrored, the padding after
  them left in place."""
  return tf.reverse_sequence(images, tf.cast(widths, tf.int64), seq_axis=2, batch_axis=0)


def flip_boxes(boxes: tf.Tensor, widths: tf.Tensor) -> tf.Tensor:
  """Boxes [B, N, 4] (ymin, xmin, ymax, xmax) of a `flip_images` view -> the unflipped image's:
  x -> width - x, so xmin, xmax = width - xmax, width - xmin. Its own inverse."""
  width = tf.cast(widths, boxes.dtype)[:, None]
  ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
  return tf.stack([ymin, width - xmax, ymax, width - xmin], axis=-1)


def candidates(model: RetinaNet, images: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """The model's candidates before NMS on `images` (inference mode, last exit): boxes [B, N, 4]
  in its input pixels, scores [B, N], classes [B, N]."""
  outputs = model.exit_outputs(images)
  generator = model.detection_generator
  if model.detector == 'fcos':
    return generator.candidates(outputs['cls_outputs'], outputs['box_outputs'],
                                outputs['centerness_outputs'], model.points)
  return generator.candidates(outputs['cls_outputs'], outputs['box_outputs'],
                              model.anchor_boxes)


class TTADetector:
  """`model` with test-time augmentation: call with {'images': [B, H, W, 3] model inputs,
  'image_info': [B, 4, 2] their `resize_and_pad` infos}; returns `model.detect`'s detections (in
  its input pixels) over all the views of `config` (see the module docstring).

  Build it under the model's precision policy; call `sync_weights` after the model's weights
  change (a restore, training) and before detecting.
  """

  def __init__(self, model: RetinaNet, config: TTAConfig):
    self.model = model
    self.config = config
    self.image_size = tuple(model.image_size)
    stride = 2**model.geometry.max_level
    self._sizes = {}
    self._models = {}
    for scale in config.scales:
      resized, padded = scaled_sizes(self.image_size, scale, stride)
      self._sizes[scale] = (resized, padded)
      if padded != self.image_size and padded not in self._models:
        self._models[padded] = RetinaNet.from_config(
            dict(model.get_config(), image_size=list(padded), name=f'{model.name}_{padded[0]}x'
                 f'{padded[1]}'))
    self.sync_weights()

  def sync_weights(self) -> None:
    """Copies the model's weights into the models of the other view sizes."""
    weights = self.model.get_weights()
    for scaled in self._models.values():
      scaled.set_weights(weights)

  def view_candidates(self, images: tf.Tensor, widths: tf.Tensor, scale: float,
                      flipped: bool) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One view's candidates, boxes mapped back to the model's input pixels (clipped to it)."""
    (resized_h, resized_w), padded = self._sizes[scale]
    height, width = self.image_size
    if flipped:
      images = flip_images(images, widths)
    if padded != self.image_size or (resized_h, resized_w) != (height, width):
      images = tf.image.resize(images, [resized_h, resized_w])
      images = tf.pad(images, [[0, 0], [0, padded[0] - resized_h], [0, padded[1] - resized_w],
                               [0, 0]])
    view_model = self._models.get(padded, self.model)
    boxes, scores, classes = candidates(view_model, images)
    boxes = boxes / tf.constant([resized_h / height, resized_w / width] * 2, tf.float32)
    if flipped:
      boxes = flip_boxes(boxes, widths)
    boxes = tf.clip_by_value(boxes, 0.0, tf.constant([height, width] * 2, tf.float32))
    return boxes, scores, classes

  def merged_candidates(self, images: tf.Tensor,
                        image_info: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Every view's candidates, mapped back, concatenated: boxes [B, N, 4], scores, classes."""
    widths = content_widths(image_info, self.image_size[1])
    views = [self.view_candidates(images, widths, scale, flipped)
             for scale, flipped in self.config.views]
    return tuple(tf.concat(parts, axis=1) for parts in zip(*views))

  def detect(self, images: tf.Tensor, image_info: tf.Tensor) -> Dict[str, tf.Tensor]:
    """One NMS (the model's) over the merged candidates of all views."""
    return self.model.detection_generator.suppress(*self.merged_candidates(images, image_info))

  def __call__(self, inputs) -> Dict[str, tf.Tensor]:
    return self.detect(inputs['images'], inputs['image_info'])


def with_image_info(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """`build_eval_dataset`'s (images, labels) -> ({'images', 'image_info'}, labels): what a
  TTADetector takes, for `evaluate.evaluate_detector`."""
  return dataset.map(lambda images, labels: (
      {'images': images, 'image_info': labels['image_info']}, labels))
