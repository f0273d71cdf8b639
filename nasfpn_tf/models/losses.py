"""RetinaNet losses on TFM AnchorLabeler targets: focal loss + weighted Huber box loss.

The reductions are TFM's retinanet task (`official/vision/tasks/retinanet.py`): sums over anchors
(and classes), each divided by the number of positive anchors in the batch plus one.
"""
from typing import Dict, Mapping, Union

import gin
import tensorflow as tf
import tf_keras
from official.vision.losses import focal_loss, loss_utils

Targets = Union[tf.Tensor, Mapping[str, tf.Tensor]]


def _flatten(values: Targets, last_dim=None) -> tf.Tensor:
  """Per-level dicts (model outputs, labeler targets) to [batch, anchors(, last_dim)]."""
  if isinstance(values, Mapping):
    return loss_utils.multi_level_flatten(
        {k: values[k] for k in sorted(values, key=int)}, last_dim=last_dim)
  return values


@gin.configurable
class RetinaNetLoss:
  """Focal loss + `box_loss_weight` * Huber loss, normalized by (number of positives + 1).

  `labels` are TFM AnchorLabeler's, batched: 'cls_targets' {level: [B, H, W, A]} int (class id
  for positives, -1 for negatives and ignored anchors), 'box_targets' {level: [B, H, W, A*4]}
  encoded (dy, dx, dh, dw), 'cls_weights' and 'box_weights' [B, num_anchors] (or per-level dicts):
  the class weight is 0 for ignored anchors, the box weight 1 only for positives. Class ids are
  one-hot over `num_classes` columns; a target of -1 is all zeros (pure background), so column 0
  (background) is never a positive. The Huber loss averages the 4 box coordinates of an anchor.
  """

  def __init__(self, num_classes: int, focal_alpha: float = 0.25, focal_gamma: float = 1.5,
               huber_delta: float = 0.1, box_loss_weight: float = 50.0):
    self.num_classes = num_classes
    self.box_loss_weight = box_loss_weight
    self._focal = focal_loss.FocalLoss(focal_alpha, focal_gamma,
                                       reduction=tf_keras.losses.Reduction.SUM)
    self._huber = tf_keras.losses.Huber(huber_delta, reduction=tf_keras.losses.Reduction.SUM)

  def __call__(self, outputs: Mapping[str, Mapping[str, tf.Tensor]],
               labels: Mapping[str, Targets]) -> Dict[str, tf.Tensor]:
    """Returns {'total_loss', 'cls_loss', 'box_loss'}; total = cls + box_loss_weight * box."""
    cls_weights = tf.cast(_flatten(labels['cls_weights']), tf.float32)
    box_weights = tf.cast(_flatten(labels['box_weights']), tf.float32)
    num_positives = tf.reduce_sum(box_weights) + 1.0
    cls_targets = tf.one_hot(tf.cast(_flatten(labels['cls_targets']), tf.int32),
                             self.num_classes)
    cls_loss = self._focal(
        cls_targets,
        tf.cast(_flatten(outputs['cls_outputs'], self.num_classes), tf.float32),
        sample_weight=cls_weights / num_positives)
    box_loss = self._huber(
        tf.cast(_flatten(labels['box_targets'], 4), tf.float32),
        tf.cast(_flatten(outputs['box_outputs'], 4), tf.float32),
        sample_weight=box_weights / num_positives)
    return {'total_loss': cls_loss + self.box_loss_weight * box_loss,
            'cls_loss': cls_loss, 'box_loss': box_loss}
