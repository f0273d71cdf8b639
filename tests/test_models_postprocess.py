"""Post-processing vs a numpy pipeline: per-level top-k, decode, clip, per-class greedy NMS."""
import numpy as np
import pytest
import tensorflow as tf
from official.vision.ops import anchor, box_ops

from nasfpn_tf.models.postprocess import DetectionGenerator
from training_helpers import pairwise_iou


def _decode(deltas, anchors):
  dy, dx, dh, dw = deltas.T
  dh, dw = np.minimum(dh, box_ops.BBOX_XFORM_CLIP), np.minimum(dw, box_ops.BBOX_XFORM_CLIP)
  ha, wa = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  yc, xc = anchors[:, 0] + 0.5 * ha + dy * ha, anchors[:, 1] + 0.5 * wa + dx * wa
  h, w = np.exp(dh) * ha, np.exp(dw) * wa
  return np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], axis=1)


def _numpy_detect(cls_outputs, box_outputs, anchor_boxes, image_size, num_classes, top_k,
                  threshold, iou_threshold, max_detections):
  results = []
  for b in range(next(iter(cls_outputs.values())).shape[0]):
    boxes, scores, classes = [], [], []
    for level in cls_outputs:
      logits = cls_outputs[level][b].reshape(-1, num_classes)[:, 1:].reshape(-1)
      keep = np.argsort(-logits)[:top_k]
      anchor_index, class_index = keep // (num_classes - 1), keep % (num_classes - 1) + 1
      decoded = _decode(box_outputs[level][b].reshape(-1, 4)[anchor_index],
                        anchor_boxes[level].reshape(-1, 4)[anchor_index])
      boxes.append(np.clip(decoded, 0, [image_size[0], image_size[1]] * 2))
      scores.append(1 / (1 + np.exp(-logits[keep])))
      classes.append(class_index)
    boxes, scores, classes = map(np.concatenate, (boxes, scores, classes))
    kept = []
    for c in np.unique(classes):
      order = [i for i in np.argsort(-scores) if classes[i] == c and scores[i] > threshold]
      chosen = []
      for i in order:
        if not chosen or np.all(pairwise_iou(boxes[[i]], boxes[chosen]) <= iou_threshold):
          chosen.append(i)
      kept += chosen
    kept = sorted(kept, key=lambda i: -scores[i])[:max_detections]
    results.append((boxes[kept], scores[kept], classes[kept]))
  return results


@pytest.mark.parametrize('top_k,max_detections', [(40, 100), (1000, 30)])
def test_matches_numpy_reference(top_k, max_detections):
  rng = np.random.default_rng(0)
  image_size, num_classes, levels = (64, 128), 5, ('3', '4', '5')
  anchor_boxes = anchor.Anchor(3, 5, 2, [0.5, 1.0, 2.0], 4, image_size).multilevel_boxes
  anchors_per_location = 6
  shape = lambda l: [2, image_size[0] // 2**int(l), image_size[1] // 2**int(l)]
  cls_outputs = {l: rng.normal(-2.5, 1.5, shape(l) + [anchors_per_location * num_classes])
                 .astype(np.float32) for l in levels}
  box_outputs = {l: rng.normal(0, 0.3, shape(l) + [anchors_per_location * 4]).astype(np.float32)
                 for l in levels}
  generator = DetectionGenerator(image_size, num_classes, pre_nms_top_k=top_k,
                                 pre_nms_score_threshold=0.05, nms_iou_threshold=0.5,
                                 max_detections=max_detections)
  detections = generator(cls_outputs, box_outputs, anchor_boxes)
  expected = _numpy_detect(cls_outputs, box_outputs,
                           {k: v.numpy() for k, v in anchor_boxes.items()}, image_size,
                           num_classes, top_k, 0.05, 0.5, max_detections)
  assert detections['detection_boxes'].shape == [2, max_detections, 4]
  assert detections['detection_classes'].dtype == tf.int32
  assert detections['num_detections'].dtype == tf.int32
  for b, (boxes, scores, classes) in enumerate(expected):
    n = int(detections['num_detections'][b])
    assert n == len(scores) > 10
    np.testing.assert_allclose(detections['detection_scores'][b, :n], scores, rtol=1e-5)
    np.testing.assert_allclose(detections['detection_boxes'][b, :n], boxes, atol=1e-3)
    np.testing.assert_array_equal(detections['detection_classes'][b, :n], classes)
    np.testing.assert_array_equal(detections['detection_scores'][b, n:], 0.0)
    np.testing.assert_array_equal(detections['detection_classes'][b, n:], 0)


def test_background_is_never_detected_and_config_round_trips():
  image_size, num_classes = (32, 32), 3
  anchor_boxes = anchor.Anchor(3, 3, 1, [1.0], 4, image_size).multilevel_boxes
  logits = np.full([1, 4, 4, num_classes], -10.0, np.float32)
  logits[..., 0] = 10.0  # confident background everywhere
  logits[0, 1, 2, 2] = 3.0  # one foreground anchor, class 2
  generator = DetectionGenerator(image_size, num_classes)
  detections = generator({'3': logits}, {'3': np.zeros([1, 4, 4, 4], np.float32)}, anchor_boxes)
  assert int(detections['num_detections'][0]) == 1
  assert int(detections['detection_classes'][0, 0]) == 2
  # The anchor at row 1, col 2 of stride 8, size 32, clipped to the 32x32 image.
  np.testing.assert_allclose(detections['detection_boxes'][0, 0], [0, 4, 28, 32], atol=1e-5)
  clone = DetectionGenerator.from_config(generator.get_config())
  assert clone.get_config() == generator.get_config()
