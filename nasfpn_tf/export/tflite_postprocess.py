"""The TFLite file's post-processing: `TFLite_Detection_PostProcess`, wired from the model config.

TensorFlow's `CombinedNonMaxSuppression` has no TFLite kernel. As in TF Model Garden
(`detection_generator._generate_detections_tflite`), the graph calls an empty `tf.function` whose
`experimental_implements` attribute names the op and its attributes, and the converter replaces
the call by the op: the custom op compiled into the stock TFLite runtime (no Flex / select-TF
ops). Its outputs are float32 whatever the quantization: it runs in float (its inputs are
dequantized in an int8 model).

The op and our `DetectionGenerator` (what `model.detect` and evaluation run) agree on:
  - box decoding: TFM `box_ops.decode_boxes` without weights, i.e. y/x/h/w scales 1.0 (the
    labeler's `AnchorLabeler` encodes with `box_coder_weights=None`); anchors are baked in as a
    constant [N, 4] (ycenter, xcenter, h, w) normalized by the input size;
  - scores: sigmoid of the logits, background column skipped (the op's label offset 1);
  - NMS (`use_regular_nms=True`, the default): per class, scores >= build_retinanet.
    pre_nms_score_threshold, IoU > nms_iou_threshold suppressed, up to max_detections per class,
    then the max_detections best overall: the class-aware NMS of `combined_non_max_suppression`.
Differences, all small on a trained model: `DetectionGenerator` keeps the pre_nms_top_k best
(anchor, class) pairs per level before NMS and clips boxes to the image before NMS (the op sees
unclipped boxes, so IoUs of boxes crossing the border differ); TFM clips the decoded log-size at
log(1000/16), the op does not. `use_regular_nms=False` is the op's fast NMS: one class per anchor
(its best), class-AGNOSTIC NMS; faster with many classes, but a box suppresses overlapping boxes
of other classes. Regular NMS is the default for that fidelity; docs/benchmark.md, "TFLite latency and the cost
of quantization", has what each costs in AP and time.
Soft-NMS (`build_retinanet.soft_nms_sigma` > 0) is not there: the op has hard NMS only, and the
file keeps the op (the stock runtime's, no Flex ops), so such a model's export fails, saying so.
"""
from typing import Any, Dict, Mapping

import numpy as np
import tensorflow as tf

from nasfpn_tf.models import fcos_postprocess
from nasfpn_tf.models.geometry import ModelGeometry
from nasfpn_tf.models.retinanet import RetinaNet

POSTPROCESS_OP = 'TFLite_Detection_PostProcess'


def anchors_center_size(geometry: ModelGeometry) -> np.ndarray:
  """The model's anchors, flattened in the order of its outputs (level, y, x, anchor), as the
  op reads them: [N, 4] float32 (ycenter, xcenter, height, width) divided by the input size."""
  height, width = geometry.image_size
  anchor_boxes = geometry.anchor_boxes()
  boxes = np.concatenate([np.asarray(anchor_boxes[level], np.float64).reshape(-1, 4)
                          for level in geometry.levels])
  ymin, xmin, ymax, xmax = boxes.T
  return np.stack([(ymin + ymax) / 2 / height, (xmin + xmax) / 2 / width,
                   (ymax - ymin) / height, (xmax - xmin) / width], axis=-1).astype(np.float32)


def postprocess_attributes(model: RetinaNet, use_regular_nms: bool = True) -> Dict[str, Any]:
  """The op's attributes from the model config (`build_retinanet` post-processing bindings).
  Raises ValueError for a Soft-NMS config, which the op cannot do."""
  config = model.get_config()
  if config.get('soft_nms_sigma'):
    raise ValueError(
        f'build_retinanet.soft_nms_sigma = {config["soft_nms_sigma"]}: the TFLite file keeps '
        f'TFLite\'s built-in {POSTPROCESS_OP} op, which has hard NMS only (no Soft-NMS). Export '
        "with --gin_bindings='build_retinanet.soft_nms_sigma = 0' for hard NMS in the .tflite, "
        'or serve the SavedModel (--mode=export_saved_model), which does Soft-NMS.')
  return {
      'max_detections': int(config['max_detections']),
      'max_classes_per_detection': 1,
      # Regular NMS: as many per class as overall, like combined_non_max_suppression here.
      'detections_per_class': int(config['max_detections']),
      'use_regular_nms': bool(use_regular_nms),
      'nms_score_threshold': _nms_score_threshold(config),
      'nms_iou_threshold': float(config['nms_iou_threshold']),
      # TFM box coder without weights (AnchorLabeler's box_coder_weights=None, decode_boxes).
      'y_scale': 1.0, 'x_scale': 1.0, 'h_scale': 1.0, 'w_scale': 1.0,
      'num_classes': int(config['num_classes']) - 1,  # foreground; the op skips column 0
  }


def _nms_score_threshold(config: Mapping[str, Any]) -> float:
  """RetinaNet: pre_nms_score_threshold. FCOS: its candidates are thresholded on the class
  probability before the op (`fcos_op_inputs`), the op drops only those (scored 0)."""
  if config.get('detector') == 'fcos':
    return fcos_postprocess.MIN_SCORE
  return float(config['pre_nms_score_threshold'])


def fcos_points_center_size(model: RetinaNet) -> np.ndarray:
  """An FCOS model's points as the op's anchors: [N, 4] (y, x, stride, stride) divided by the
  input size, in the order of the outputs (level, y, x)."""
  height, width = model.image_size
  rows = []
  for level, points in model.points.items():
    points = np.asarray(points, np.float64).reshape(-1, 2)
    stride = np.full([len(points)], 2.0**int(level))
    rows.append(np.stack([points[:, 0] / height, points[:, 1] / width, stride / height,
                          stride / width], axis=-1))
  return np.concatenate(rows).astype(np.float32)


def fcos_op_inputs(model: RetinaNet, outputs: Mapping[str, Any]):
  """An FCOS model's raw outputs -> the op's (box_encodings [1, N, 4], class_predictions
  [1, N, C]) for the anchors of `fcos_points_center_size`.

  With distances (t, l, b, r) in strides around a point, the anchor (y, x, stride, stride) and
  the op's decoding (center = ty * stride + y, size = exp(th) * stride, scales 1):
  ty = (b - t) / 2, tx = (r - l) / 2, th = log(t + b), tw = log(l + r): the box
  (y - t, x - l, y + b, x + r) strides, as `FCOSDetectionGenerator` decodes it. Scores:
  `fcos_postprocess.fcos_scores` (sqrt(class x centerness), 0 below the class threshold).
  """
  threshold = float(model.get_config()['pre_nms_score_threshold'])
  num_classes = model.get_config()['num_classes']
  encodings, scores = [], []
  for level in model.geometry.levels:
    t, l, b, r = tf.unstack(
        tf.reshape(tf.cast(outputs['box_outputs'][level], tf.float32), [1, -1, 4]), axis=-1)
    encodings.append(tf.stack([(b - t) / 2, (r - l) / 2, tf.math.log(tf.maximum(t + b, 1e-6)),
                               tf.math.log(tf.maximum(l + r, 1e-6))], axis=-1))
    scores.append(tf.reshape(fcos_postprocess.fcos_scores(
        outputs['cls_outputs'][level], outputs['centerness_outputs'][level], threshold),
                             [1, -1, num_classes]))
  return tf.concat(encodings, axis=1), tf.concat(scores, axis=1)


def _implements_signature(attributes: Mapping[str, Any]) -> str:
  """The `experimental_implements` NameAttrList text the converter legalizes into the op."""
  parts = [f'name: "{POSTPROCESS_OP}"']
  for key, value in attributes.items():
    if isinstance(value, bool):
      text = f'b: {str(value).lower()}'
    elif isinstance(value, int):
      text = f'i: {value}'
    else:
      text = f'f: {value!r}'
    parts.append(f'attr {{ key: "{key}" value {{ {text} }} }}')
  return ' '.join(parts)


def postprocess_op(attributes: Mapping[str, Any]):
  """A tf.function (box_encodings [1, N, 4], class_predictions [1, N, C], anchors [N, 4]) ->
  (boxes, classes, scores, num_detections) that the converter replaces by the op with these
  `attributes` (see `postprocess_attributes`). In TensorFlow it returns zeros: only the
  converted model computes."""
  @tf.function(experimental_implements=_implements_signature(attributes))
  def postprocess(box_encodings, class_predictions, anchors):  # pylint: disable=unused-argument
    dummy = tf.constant(0.0, tf.float32)
    return dummy, dummy, dummy, dummy
  return postprocess
