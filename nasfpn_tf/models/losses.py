"""RetinaNet losses on TFM AnchorLabeler targets: focal loss + weighted Huber box loss; FCOS's
on `fcos_targets` (focal loss + GIoU loss + centerness BCE, `FCOSLoss`).

The reductions are TFM's retinanet task (`official/vision/tasks/retinanet.py`): sums over anchors
(and classes), each divided by the number of positive anchors in the batch plus one. The values
are those of TFM's `FocalLoss` and Keras' `Huber`; the focal loss is computed level by level,
with its gradient, in one XLA-fused pass (`focal_loss_sum`).
"""
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import gin
import tensorflow as tf
import tf_keras
from official.vision.losses import loss_utils

from nasfpn_tf.models import fcos_targets

Targets = Union[tf.Tensor, Mapping[str, tf.Tensor]]


def _flatten(values: Targets, last_dim=None) -> tf.Tensor:
  """Per-level dicts (model outputs, labeler targets) to [batch, anchors(, last_dim)]."""
  if isinstance(values, Mapping):
    return loss_utils.multi_level_flatten(
        {k: values[k] for k in sorted(values, key=int)}, last_dim=last_dim)
  return values


def _per_level(values: Targets, last_dim: int, sizes: List[tf.Tensor]) -> List[tf.Tensor]:
  """Per-level dicts (in level order), or [batch, anchors(, last_dim)] tensors split into levels
  of `sizes` anchors (none or one: whole), as [batch, anchors of the level, last_dim] tensors."""
  if isinstance(values, Mapping):
    return [tf.reshape(values[k], [tf.shape(values[k])[0], -1, last_dim])
            for k in sorted(values, key=int)]
  values = tf.reshape(values, [tf.shape(values)[0], -1, last_dim])
  return tf.split(values, sizes, axis=1) if len(sizes) > 1 else [values]


def _softplus(x: tf.Tensor) -> tf.Tensor:
  return tf.math.log1p(tf.exp(-tf.abs(x))) + tf.nn.relu(x)


@tf.function(jit_compile=True)
def _focal_loss_and_gradient(logits, targets, weights, alpha, gamma):
  """The focal loss summed over `logits` [B, N, C] and its float32 gradient, fused by XLA into
  a pass or two over the logits instead of TFM's ~40 op-by-op passes (forward and backward).

  With s = +1 for the target class and -1 otherwise, z = s * logit, p_t = sigmoid(z):
  loss = a_t (1 - p_t)^gamma CE, CE = -log p_t = softplus(z) - z, 1 - p_t = exp(-softplus(z)),
  d loss / d logit = -s a_t (1 - p_t)^gamma (gamma p_t CE + 1 - p_t); a_t = alpha for the target
  class, 1 - alpha otherwise, times the anchor's weight.
  """
  positive = tf.equal(targets, tf.range(tf.shape(logits)[-1], dtype=targets.dtype))
  sign = tf.where(positive, 1.0, -1.0)
  z = sign * tf.cast(logits, tf.float32)
  softplus_z = _softplus(z)  # -log(1 - p_t)
  cross_entropy = softplus_z - z
  one_minus_p = tf.exp(-softplus_z)
  modulator = tf.exp(-gamma * softplus_z)
  scale = tf.where(positive, alpha, 1.0 - alpha) * weights * modulator
  loss = tf.reduce_sum(scale * cross_entropy)
  gradient = -sign * scale * (gamma * (1.0 - one_minus_p) * cross_entropy + one_minus_p)
  return loss, gradient


def focal_loss_sum(logits: tf.Tensor, targets: tf.Tensor, weights: tf.Tensor, alpha: float,
                   gamma: float) -> tf.Tensor:
  """sum over b, n, c of weights[b, n] * focal(logits[b, n, c], targets[b, n] == c): TFM's
  `FocalLoss` on one-hot targets with per-anchor sample weights and SUM reduction.

  logits [B, N, C] in any float dtype (the head's compute dtype; computed in float32),
  targets [B, N, 1] int class ids (negative: background), weights [B, N, 1] float32.
  The gradient is computed in the same fused pass as the loss and scaled in float32 before
  it is cast to the logits' dtype (float16 loss scaling keeps its range).
  """
  targets = tf.cast(targets, tf.int32)
  weights = tf.cast(weights, tf.float32)

  @tf.custom_gradient
  def loss_of(logits):
    loss, gradient = _focal_loss_and_gradient(logits, targets, weights, alpha, gamma)
    return loss, lambda upstream: tf.cast(gradient * upstream, logits.dtype)

  return loss_of(logits)


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
    self.focal_alpha = focal_alpha
    self.focal_gamma = focal_gamma
    self.box_loss_weight = box_loss_weight
    self._huber = tf_keras.losses.Huber(huber_delta, reduction=tf_keras.losses.Reduction.SUM)

  def __call__(self, outputs: Mapping[str, Targets],
               labels: Mapping[str, Targets]) -> Dict[str, tf.Tensor]:
    """Returns {'total_loss', 'cls_loss', 'box_loss'}; total = cls + box_loss_weight * box."""
    box_weights = tf.cast(_flatten(labels['box_weights']), tf.float32)
    num_positives = tf.reduce_sum(box_weights) + 1.0
    cls_logits = _per_level(outputs['cls_outputs'], self.num_classes, [])
    sizes = [tf.shape(logits)[1] for logits in cls_logits]
    cls_targets = _per_level(labels['cls_targets'], 1, sizes)
    cls_weights = _per_level(labels['cls_weights'], 1, sizes)
    if not len(cls_logits) == len(cls_targets) == len(cls_weights):
      raise ValueError(
          f"RetinaNetLoss: 'cls_outputs' has {len(cls_logits)} levels, labels 'cls_targets' "
          f"{len(cls_targets)} and 'cls_weights' {len(cls_weights)}: give per-level dicts of the "
          'same levels, or flattened [batch, anchors, ...] tensors.')
    cls_loss = tf.add_n([
        focal_loss_sum(logits, targets, weights, self.focal_alpha, self.focal_gamma)
        for logits, targets, weights in zip(cls_logits, cls_targets, cls_weights)
    ]) / num_positives
    box_loss = self._huber(
        tf.cast(_flatten(labels['box_targets'], 4), tf.float32),
        tf.cast(_flatten(outputs['box_outputs'], 4), tf.float32),
        sample_weight=box_weights / num_positives)
    return {'total_loss': cls_loss + self.box_loss_weight * box_loss,
            'cls_loss': cls_loss, 'box_loss': box_loss}

  def normalizers(self, labels: Mapping[str, Targets]) -> Dict[str, Tuple[tf.Tensor, float]]:
    """{term: (n, offset)}: `__call__` divides the term's sum over the batch by n + offset (here
    the positives + 1 for both), so that sums over batches can be divided once (the CPU proxy's
    held-out loss)."""
    positives = tf.reduce_sum(tf.cast(_flatten(labels['box_weights']), tf.float32))
    return {'cls_loss': (positives, 1.0), 'box_loss': (positives, 1.0)}

  def term_weights(self) -> Dict[str, float]:
    """{term: its weight in 'total_loss'}."""
    return {'cls_loss': 1.0, 'box_loss': self.box_loss_weight}


def giou_loss(predicted: tf.Tensor, targets: tf.Tensor, eps: float = 1e-6) -> tf.Tensor:
  """1 - GIoU of the boxes that distances [..., 4] (t, l, b, r) from the same point describe
  (Rezatofighi et al. 2019; mmdetection's eps): [...] in [0, 2]. Zero boxes stay finite."""
  predicted, targets = tf.cast(predicted, tf.float32), tf.cast(targets, tf.float32)
  pt, pl, pb, pr = tf.unstack(predicted, axis=-1)
  tt, tl, tb, tr = tf.unstack(targets, axis=-1)
  predicted_area = (pt + pb) * (pl + pr)
  target_area = (tt + tb) * (tl + tr)
  overlap = ((tf.minimum(pt, tt) + tf.minimum(pb, tb)) *
             (tf.minimum(pl, tl) + tf.minimum(pr, tr)))
  union = predicted_area + target_area - overlap + eps
  enclosing = (tf.maximum(pt, tt) + tf.maximum(pb, tb)) * (tf.maximum(pl, tl) +
                                                           tf.maximum(pr, tr)) + eps
  return 1.0 - (overlap / union - (enclosing - union) / enclosing)


@gin.configurable
class FCOSLoss:
  """FCOS's losses (the released code's, v2) on `fcos_targets.FCOSTargets` labels.

  cls_loss: focal loss (alpha 0.25, gamma 2) over every point and class, divided by the number
  of positives + 1 (the trainer's normalizer of RetinaNet; FCOS divides by max(positives, 1)).
  box_loss: 1 - GIoU on the positives, weighted by their centerness targets and divided by the
  sum of those weights (FCOS and mmdetection). centerness_loss: binary cross-entropy of the
  centerness logits against the centerness targets on the positives, divided by positives + 1.
  total = cls + box_loss_weight * box + centerness_loss_weight * centerness. Outputs are the
  model's {'cls_outputs', 'box_outputs' (distances in strides), 'centerness_outputs'}.
  Several replicas: the trainer rescales each replica's loss by its share of the global
  positives, exact for the class and centerness terms; the GIoU term keeps its replica's own
  centerness sum (FCOS averages that sum over the GPUs).
  """

  def __init__(self, num_classes: int, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
               box_loss_weight: float = 1.0, centerness_loss_weight: float = 1.0):
    self.num_classes = num_classes
    self.focal_alpha = focal_alpha
    self.focal_gamma = focal_gamma
    self.box_loss_weight = box_loss_weight
    self.centerness_loss_weight = centerness_loss_weight

  def __call__(self, outputs: Mapping[str, Targets],
               labels: Mapping[str, Targets]) -> Dict[str, tf.Tensor]:
    """Returns {'total_loss', 'cls_loss', 'box_loss', 'centerness_loss'}."""
    positives = tf.cast(_flatten(labels['box_weights']), tf.float32)  # [B, P]
    num_positives = tf.reduce_sum(positives) + 1.0
    cls_logits = _per_level(outputs['cls_outputs'], self.num_classes, [])
    sizes = [tf.shape(logits)[1] for logits in cls_logits]
    cls_targets = _per_level(labels['cls_targets'], 1, sizes)
    if len(cls_logits) != len(cls_targets):
      raise ValueError(f"FCOSLoss: 'cls_outputs' has {len(cls_logits)} levels, labels "
                       f"'cls_targets' {len(cls_targets)}.")
    cls_loss = tf.add_n([
        focal_loss_sum(logits, targets, tf.ones_like(targets, tf.float32), self.focal_alpha,
                       self.focal_gamma)
        for logits, targets in zip(cls_logits, cls_targets)]) / num_positives
    box_targets = tf.cast(_flatten(labels['box_targets'], 4), tf.float32)
    box_outputs = tf.cast(_flatten(outputs['box_outputs'], 4), tf.float32)
    centerness_targets = fcos_targets.centerness(box_targets) * positives
    box_loss = tf.math.divide_no_nan(
        tf.reduce_sum(giou_loss(box_outputs, box_targets) * centerness_targets),
        tf.reduce_sum(centerness_targets))
    centerness_logits = tf.cast(_flatten(outputs['centerness_outputs'], 1), tf.float32)[..., 0]
    centerness_loss = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=centerness_targets, logits=centerness_logits) * positives) / num_positives
    return {'total_loss': (cls_loss + self.box_loss_weight * box_loss +
                           self.centerness_loss_weight * centerness_loss),
            'cls_loss': cls_loss, 'box_loss': box_loss, 'centerness_loss': centerness_loss}

  def normalizers(self, labels: Mapping[str, Targets]) -> Dict[str, Tuple[tf.Tensor, float]]:
    """{term: (n, offset)} as `RetinaNetLoss.normalizers`: positives + 1 for the class and
    centerness terms, the sum of the positives' centerness targets for the box term."""
    positives = tf.cast(_flatten(labels['box_weights']), tf.float32)
    centerness_targets = fcos_targets.centerness(
        tf.cast(_flatten(labels['box_targets'], 4), tf.float32)) * positives
    num_positives = tf.reduce_sum(positives)
    return {'cls_loss': (num_positives, 1.0),
            'box_loss': (tf.reduce_sum(centerness_targets), 0.0),
            'centerness_loss': (num_positives, 1.0)}

  def term_weights(self) -> Dict[str, float]:
    """{term: its weight in 'total_loss'}."""
    return {'cls_loss': 1.0, 'box_loss': self.box_loss_weight,
            'centerness_loss': self.centerness_loss_weight}


def exit_loss_keys(num_exits: int) -> Tuple[str, ...]:
  """The keys of each exit's own loss in `AnytimeLoss`'s result."""
  return tuple(f'exit{k}_loss' for k in range(1, num_exits + 1))


class AnytimeLoss:
  """Deep supervision of an anytime RetinaNet: `loss_fn` (a RetinaNetLoss) on every exit's
  outputs (`outputs['exits']`), weighted by `weights` (exit 1 first) and summed.

  Returns RetinaNetLoss's keys as weighted sums over the exits, and each exit's own total loss,
  unweighted, under `exit_loss_keys`.
  """

  def __init__(self, loss_fn: RetinaNetLoss, weights: Sequence[float]):
    self.loss_fn = loss_fn
    self.weights = list(weights)

  def __call__(self, outputs: Mapping[str, Any],
               labels: Mapping[str, Targets]) -> Dict[str, tf.Tensor]:
    losses = {}
    for (k, weight), key in zip(enumerate(self.weights, start=1),
                                exit_loss_keys(len(self.weights))):
      exit_losses = self.loss_fn(outputs['exits'][str(k)], labels)
      for name, value in exit_losses.items():
        losses[name] = losses.get(name, 0.0) + weight * value
      losses[key] = exit_losses['total_loss']
    return losses
