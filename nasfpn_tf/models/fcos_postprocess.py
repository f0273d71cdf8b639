"""FCOS post-processing: points + distances -> the detections RetinaNet's `DetectionGenerator`
returns (same keys, shapes and conventions), so evaluation, exports and predict take either.

As the released FCOS code (`fcos_core/modeling/rpn/fcos/inference.py`): a (point, class) is a
candidate when its class probability exceeds `pre_nms_score_threshold`; its score is
sqrt(class probability x centerness probability); per level the `pre_nms_top_k` best candidates
by that score are decoded, (ymin, xmin, ymax, xmax) = (y - t, x - l, y + b, x + r) with the
distances times the level's stride; then the class-aware NMS of `DetectionGenerator` (its
clipping, its hard NMS or Soft-NMS) keeps `max_detections`. mmdetection multiplies the two
probabilities without the square root; both keep the same order of candidates within an image.
"""
from typing import Dict, Mapping, Tuple

import tensorflow as tf
import tf_keras

from nasfpn_tf.models import fcos_targets
from nasfpn_tf.models.postprocess import DetectionGenerator

# Scores at or below this are no detections: the masked (point, class) pairs score exactly 0.
MIN_SCORE = 1e-6


def fcos_scores(cls_logits: tf.Tensor, centerness_logits: tf.Tensor,
                threshold: float) -> tf.Tensor:
  """[..., C] class logits, [..., 1] centerness logits -> [..., C] sqrt(p_class * p_center)
  where p_class > threshold, else 0: the released FCOS code's candidate scores."""
  probabilities = tf.sigmoid(tf.cast(cls_logits, tf.float32))
  combined = tf.sqrt(probabilities * tf.sigmoid(tf.cast(centerness_logits, tf.float32)))
  return tf.where(probabilities > threshold, combined, 0.0)


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class FCOSDetectionGenerator(DetectionGenerator):
  """Raw FCOS outputs + points -> detections in input-image pixels (see the module docstring).

  Call with ({level: [B, h, w, C] class logits}, {level: [B, h, w, 4] distances in strides},
  {level: [B, h, w, 1] centerness logits}, {level: [h, w, 2] points}); returns the outputs of
  `DetectionGenerator` ('detection_boxes', 'detection_scores', 'detection_classes',
  'num_detections'). `pre_nms_score_threshold` is the class-probability threshold of a
  candidate; detections keep any score above MIN_SCORE.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.candidate_threshold = self.pre_nms_score_threshold

  def _level_candidates(self, scores, distances, points):
    """The `pre_nms_top_k` best (point, class) pairs of one level by score: boxes [B, k, 4],
    scores [B, k], classes [B, k]; the two-step exact top-k of `DetectionGenerator`."""
    batch = tf.shape(scores)[0]
    height, width = scores.shape[1:3]
    num_points = height * width
    foreground = self.num_classes - 1
    scores = tf.reshape(scores, [batch, num_points, self.num_classes])[:, :, 1:]
    k = min(self.pre_nms_top_k, num_points)
    _, top_points = tf.math.top_k(tf.reduce_max(scores, axis=2), k=k, sorted=False)
    pair_scores = tf.reshape(tf.gather(scores, top_points, batch_dims=1), [batch, -1])
    top_scores, top_pairs = tf.math.top_k(pair_scores, k=k, sorted=False)
    point_indices = tf.gather(top_points, top_pairs // foreground, batch_dims=1)
    distances = tf.gather(tf.reshape(distances, [batch, num_points, 4]), point_indices,
                          batch_dims=1)
    points = tf.gather(tf.reshape(tf.cast(points, tf.float32), [-1, 2]), point_indices)
    boxes = fcos_targets.distances_to_boxes(points, distances)
    return boxes, top_scores, top_pairs % foreground + 1

  def call(self, cls_outputs: Mapping[str, tf.Tensor], box_outputs: Mapping[str, tf.Tensor],
           centerness_outputs: Mapping[str, tf.Tensor],
           points: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    return self.suppress(*self.candidates(cls_outputs, box_outputs, centerness_outputs, points))

  def candidates(self, cls_outputs: Mapping[str, tf.Tensor],  # pylint: disable=arguments-differ
                 box_outputs: Mapping[str, tf.Tensor], centerness_outputs: Mapping[str, tf.Tensor],
                 points: Mapping[str, tf.Tensor]) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The candidates before NMS (`DetectionGenerator.candidates`' outputs) of FCOS's outputs."""
    scores = {level: fcos_scores(cls_outputs[level], centerness_outputs[level],
                                 self.candidate_threshold) for level in cls_outputs}
    distances = {level: tf.cast(box_outputs[level], tf.float32) * float(2**int(level))
                 for level in box_outputs}
    return super().candidates(scores, distances, points)

  def suppress(self, boxes: tf.Tensor, scores: tf.Tensor,
               classes: tf.Tensor) -> Dict[str, tf.Tensor]:
    # The candidates are thresholded in `candidates`; the NMS drops only the masked ones.
    return self._suppress(boxes, scores, classes, MIN_SCORE)

  def get_config(self):
    return dict(super().get_config(), pre_nms_score_threshold=self.candidate_threshold)
