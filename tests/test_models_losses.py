"""RetinaNet losses vs a numpy computation, on hand-made and AnchorLabeler targets, and the
fused focal loss (values and gradients) vs TFM's FocalLoss."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from official.vision.losses import focal_loss
from official.vision.ops import anchor

from nasfpn_tf.models.losses import RetinaNetLoss


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _numpy_losses(logits, deltas, cls_targets, box_targets, cls_weights, box_weights,
                  num_classes, alpha=0.25, gamma=1.5, delta=0.1, box_weight=50.0):
  """Flat [N, C] logits, [N, 4] deltas, [N] targets/weights: the paper's losses, term by term."""
  normalizer = box_weights.sum() + 1.0
  onehot = np.zeros_like(logits)
  for i, target in enumerate(cls_targets):
    if target >= 0:
      onehot[i, target] = 1.0
  p = _sigmoid(logits)
  cross_entropy = -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p))
  p_true = np.where(onehot == 1, p, 1 - p)
  focal = np.where(onehot == 1, alpha, 1 - alpha) * (1 - p_true)**gamma * cross_entropy
  cls_loss = (focal.sum(axis=1) * cls_weights).sum() / normalizer
  error = np.abs(box_targets - deltas)
  huber = np.where(error <= delta, 0.5 * error**2, delta * (error - 0.5 * delta))
  box_loss = (huber.mean(axis=1) * box_weights).sum() / normalizer
  return cls_loss, box_loss, cls_loss + box_weight * box_loss


def test_hand_made_targets_match_numpy():
  rng = np.random.default_rng(0)
  num_classes, anchors = 4, 2
  shapes = {'3': (2, 2), '4': (1, 1)}
  batch = 2
  outputs = {
      'cls_outputs': {l: rng.normal(size=(batch, h, w, anchors * num_classes)).astype(np.float32)
                      for l, (h, w) in shapes.items()},
      'box_outputs': {l: rng.normal(0, 0.1, size=(batch, h, w, anchors * 4)).astype(np.float32)
                      for l, (h, w) in shapes.items()}}
  num = sum(h * w for h, w in shapes.values()) * anchors  # anchors per image
  # Per anchor: positive (class id), negative (-1, weight 1) or ignored (weight 0; TFM's labeler
  # writes -1, other labelers -2: both must be harmless).
  cls_flat = rng.choice([-1, -1, -1, 1, 2, 3], size=(batch, num))
  ignored = (cls_flat == -1) & (rng.random((batch, num)) < 0.3)
  cls_flat[ignored & (rng.random((batch, num)) < 0.5)] = -2
  cls_weights = (~ignored).astype(np.float32)
  box_weights = (cls_flat > 0).astype(np.float32)
  box_flat = rng.normal(0, 0.2, size=(batch, num, 4)).astype(np.float32)
  box_flat[cls_flat <= 0] = 0.0

  def unflatten(flat, last):
    per_level, start = {}, 0
    for level, (h, w) in shapes.items():
      size = h * w * anchors
      per_level[level] = flat[:, start:start + size].reshape(batch, h, w, anchors * last)
      start += size
    return per_level

  labels = {'cls_targets': unflatten(cls_flat, 1), 'box_targets': unflatten(box_flat, 4),
            'cls_weights': cls_weights, 'box_weights': box_weights}
  losses = RetinaNetLoss(num_classes)(outputs, labels)

  flat_logits = np.concatenate([outputs['cls_outputs'][l].reshape(batch, -1, num_classes)
                                for l in shapes], axis=1).reshape(-1, num_classes)
  flat_deltas = np.concatenate([outputs['box_outputs'][l].reshape(batch, -1, 4)
                                for l in shapes], axis=1).reshape(-1, 4)
  expected = _numpy_losses(flat_logits, flat_deltas, cls_flat.reshape(-1),
                           box_flat.reshape(-1, 4), cls_weights.reshape(-1),
                           box_weights.reshape(-1), num_classes)
  np.testing.assert_allclose(
      [losses['cls_loss'], losses['box_loss'], losses['total_loss']], expected, rtol=1e-5)
  assert box_weights.sum() > 0 and ignored.sum() > 0


def test_anchor_labeler_targets_and_perfect_boxes():
  """TFM AnchorLabeler output, batched, goes in as is; exact box predictions cost nothing."""
  num_classes = 5
  anchor_gen = anchor.Anchor(3, 4, num_scales=1, aspect_ratios=[1.0], anchor_size=4,
                             image_size=[64, 64])
  labeler = anchor.AnchorLabeler(match_threshold=0.5, unmatched_threshold=0.4)
  per_image = []
  for boxes, classes in (([[8., 8., 40., 40.], [30., 20., 62., 50.]], [[1], [4]]),
                         ([[0., 0., 64., 64.]], [[3]])):
    cls_t, box_t, _, cls_w, box_w = labeler.label_anchors(
        anchor_gen.multilevel_boxes, tf.constant(boxes), tf.constant(classes))
    per_image.append({'cls_targets': cls_t, 'box_targets': box_t, 'cls_weights': cls_w,
                      'box_weights': box_w})
  labels = tf.nest.map_structure(lambda *t: tf.stack(t), *per_image)
  rng = np.random.default_rng(1)
  outputs = {
      'cls_outputs': {l: tf.constant(rng.normal(size=t.shape.as_list()[:3] + [num_classes]),
                                     tf.float32) for l, t in labels['cls_targets'].items()},
      'box_outputs': labels['box_targets']}
  losses = RetinaNetLoss(num_classes)(outputs, labels)
  assert float(losses['box_loss']) == 0.0

  flat = lambda d, last: np.concatenate(
      [np.reshape(d[l], (2, -1, last)) for l in ('3', '4')], axis=1).reshape(-1, last)
  cls_flat = flat(labels['cls_targets'], 1)[:, 0].astype(int)
  assert set(cls_flat) <= {-1, 1, 3, 4} and (cls_flat > 0).sum() >= 3
  expected = _numpy_losses(flat(outputs['cls_outputs'], num_classes),
                           flat(outputs['box_outputs'], 4), cls_flat,
                           flat(labels['box_targets'], 4),
                           labels['cls_weights'].numpy().reshape(-1),
                           labels['box_weights'].numpy().reshape(-1), num_classes)
  np.testing.assert_allclose(float(losses['cls_loss']), expected[0], rtol=1e-5)


def _tfm_focal_loss(logits, targets, weights, num_classes, alpha=0.25, gamma=1.5):
  """TFM's FocalLoss as TFM's RetinaNet task calls it: flattened, one-hot, SUM reduction."""
  loss = focal_loss.FocalLoss(alpha, gamma, reduction=tf_keras.losses.Reduction.SUM)
  return loss(tf.one_hot(targets, num_classes), tf.cast(logits, tf.float32),
              sample_weight=weights)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16'])
def test_fused_focal_loss_and_gradient_equal_tfm(dtype):
  """Per-level fused loss and its gradient vs TFM's op-by-op FocalLoss on the same inputs, for
  saturated logits too; float16 gradients scaled by a loss scale first stay finite and equal."""
  rng = np.random.default_rng(2)
  num_classes, anchors, batch = 7, 3, 2
  shapes = {'3': (4, 6), '4': (2, 3), '5': (1, 2)}
  logits = {l: tf.constant(np.concatenate([
      rng.normal(-3, 3, size=(batch, h, w, anchors * num_classes - 2)),
      np.full((batch, h, w, 2), [-40.0, 40.0])], -1), dtype)
            for l, (h, w) in shapes.items()}
  num = sum(h * w for h, w in shapes.values()) * anchors
  flat_targets = rng.choice([-2, -1, -1, -1, 0, 3, 6], size=(batch, num)).astype(np.int32)
  flat_weights = (rng.random((batch, num)) > 0.2).astype(np.float32) / 5
  start, targets = 0, {}
  for l, (h, w) in shapes.items():
    targets[l] = flat_targets[:, start:start + h * w * anchors].reshape(batch, h, w, anchors)
    start += h * w * anchors
  loss_scale = 1024.0 if dtype == 'float16' else 1.0
  loss_fn = RetinaNetLoss(num_classes)
  zero_boxes = {l: tf.zeros([batch, h, w, anchors * 4]) for l, (h, w) in shapes.items()}
  labels = {'cls_targets': targets, 'cls_weights': flat_weights, 'box_targets': zero_boxes,
            'box_weights': np.zeros((batch, num), np.float32)}

  with tf.GradientTape(persistent=True) as tape:
    tape.watch(logits)
    ours = loss_fn({'cls_outputs': logits, 'box_outputs': zero_boxes}, labels)['cls_loss']
    flat_logits = tf.concat([tf.reshape(logits[l], [batch, -1, num_classes]) for l in shapes], 1)
    theirs = _tfm_focal_loss(flat_logits, flat_targets, flat_weights, num_classes)
    scaled_ours, scaled_theirs = ours * loss_scale, theirs * loss_scale
  np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)
  ours_grad = tape.gradient(scaled_ours, logits)
  theirs_grad = tape.gradient(scaled_theirs, logits)
  for level in shapes:
    assert ours_grad[level].dtype == dtype
    ours_level = ours_grad[level].numpy().astype(np.float32)
    assert np.all(np.isfinite(ours_level)) and np.abs(ours_level).max() > 0
    tolerance = 1e-5 if dtype == 'float32' else 1e-2  # The gradient is cast to `dtype`.
    np.testing.assert_allclose(ours_level, theirs_grad[level].numpy().astype(np.float32),
                               rtol=tolerance, atol=tolerance * np.abs(ours_level).max())


def test_fused_focal_loss_on_flat_inputs_and_level_mismatch():
  rng = np.random.default_rng(3)
  logits = tf.constant(rng.normal(size=(2, 10, 4)), tf.float32)
  targets = rng.integers(-1, 4, size=(2, 10)).astype(np.int32)
  weights = np.ones((2, 10), np.float32)
  ours = RetinaNetLoss(4)({'cls_outputs': logits, 'box_outputs': tf.zeros([2, 10, 4])},
                          {'cls_targets': targets, 'cls_weights': weights,
                           'box_targets': tf.zeros([2, 10, 4]),
                           'box_weights': np.zeros((2, 10), np.float32)})
  np.testing.assert_allclose(float(ours['cls_loss']),
                             float(_tfm_focal_loss(logits, targets, weights, 4)), rtol=1e-5)
  with pytest.raises(ValueError, match="'cls_outputs' has 1 levels, labels 'cls_targets' 2"):
    RetinaNetLoss(4)({'cls_outputs': logits, 'box_outputs': tf.zeros([2, 10, 4])},
                     {'cls_targets': {'3': targets[:, :4], '4': targets[:, 4:]},
                      'cls_weights': weights, 'box_targets': tf.zeros([2, 10, 4]),
                      'box_weights': np.zeros((2, 10), np.float32)})
