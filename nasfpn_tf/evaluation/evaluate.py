"""The one COCO evaluation loop: a detector over an eval dataset, boxes back in original pixels.

The trainer, the experiments and the architecture search evaluate through `evaluate_detector`, so
every AP this package reports is computed the same way.
"""
import dataclasses
import time
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import tensorflow as tf

from nasfpn_tf.evaluation.coco_metrics import CocoEvaluator
from nasfpn_tf.models import geometry

DetectFn = Callable[[tf.Tensor], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Evaluation:
  metrics: Dict[str, float]  # coco_metrics.METRIC_NAMES, 0-1 (-1 where undefined)
  num_images: int
  seconds: float


def add_groundtruth(evaluator: CocoEvaluator, labels: Mapping[str, Any]) -> None:
  """A `build_eval_dataset` batch's record ground truth, its pixel boxes normalized as
  CocoEvaluator takes them."""
  truth = {k: np.asarray(v) for k, v in labels['groundtruths'].items()}
  for i, source_id in enumerate(np.asarray(labels['source_id'])):
    count = int(truth['num_instances'][i])
    height, width = int(truth['height'][i]), int(truth['width'][i])
    evaluator.add_groundtruth(
        source_id, height, width, truth['boxes'][i, :count] / [height, width, height, width],
        truth['classes'][i, :count], truth['is_crowd'][i, :count], truth['area'][i, :count])


def evaluate_detector(detect_fn: DetectFn, dataset: tf.data.Dataset,
                      annotation_file: Optional[str] = None,
                      max_batches: Optional[int] = None) -> Evaluation:
  """COCO box metrics of `detect_fn` on `dataset`.

  `detect_fn(images)` returns detections in input pixels (`RetinaNet.detect`, a SavedModel's or a
  TFLite detector's), tensors or arrays; `dataset` yields `build_eval_dataset`'s (images, labels),
  where `images` may also be any nest of batch-first tensors that `detect_fn` takes (the search
  feeds cached backbone features).
  Ground truth: the COCO json `annotation_file`, else the records' own. The dataset's category
  ids are the class indices, so detections need no mapping back.
  """
  evaluator = CocoEvaluator(annotation_file=annotation_file)
  if max_batches:
    dataset = dataset.take(max_batches)
  start, num_images = time.perf_counter(), 0
  for images, labels in dataset:
    detections = dict(detect_fn(images))
    detections['detection_boxes'] = geometry.to_original_image(
        detections['detection_boxes'], labels['image_info'])
    evaluator.update(labels['source_id'], detections)
    if annotation_file is None:
      add_groundtruth(evaluator, labels)
    num_images += int(tf.nest.flatten(images)[0].shape[0])
  if not num_images:
    raise ValueError('the eval dataset (build_eval_dataset.file_pattern) yielded no images.')
  return Evaluation(evaluator.evaluate(), num_images, time.perf_counter() - start)
