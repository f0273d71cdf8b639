"""COCO metrics on hand-computable cases, and json vs record-built ground truth on coco128."""
import contextlib
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from pycocotools.cocoeval import COCOeval

from nasfpn_tf.evaluation import (METRIC_NAMES, CocoEvaluator, format_metrics,
                                  groundtruth_dataset, results_to_coco_json)

LABEL_MAP = {'1': 'person', '7': 'train'}  # string keys, as read back from a label-map json.

# Hand-made ground truth: (source_id, height, width, [(x, y, w, h, class, is_crowd)]) in pixels.
# Areas: 1200 and 3000 are medium, 400 small; the crowd region is ignored, so no large objects.
IMAGES = [
    ('1', 100, 200, [(10, 20, 40, 30, 1, 0), (100, 10, 50, 60, 7, 0), (0, 50, 200, 50, 1, 1)]),
    ('2', 50, 50, [(5, 5, 20, 20, 7, 0)]),
    ('3', 80, 80, []),
]


def _normalized_yxyx(objects, height, width):
  return np.array([[y / height, x / width, (y + h) / height, (x + w) / width]
                   for x, y, w, h, *_ in objects], np.float32).reshape(-1, 4)


def _evaluator(images=IMAGES):
  evaluator = CocoEvaluator(label_map=LABEL_MAP)
  for source_id, height, width, objects in images:
    evaluator.add_groundtruth(source_id, height, width, _normalized_yxyx(objects, height, width),
                              [o[4] for o in objects], [o[5] for o in objects])
  return evaluator


def _detections(per_image, max_detections=4):
  """Padded batch from [[(x, y, w, h, class, score)] per image] in pixels."""
  batch = len(per_image)
  boxes = np.zeros([batch, max_detections, 4], np.float32)
  scores = np.zeros([batch, max_detections], np.float32)
  classes = np.zeros([batch, max_detections], np.int64)
  for i, detections in enumerate(per_image):
    for k, (x, y, w, h, category, score) in enumerate(detections):
      boxes[i, k], scores[i, k], classes[i, k] = [y, x, y + h, x + w], score, category
  return {'detection_boxes': boxes, 'detection_scores': scores, 'detection_classes': classes,
          'num_detections': np.array([len(d) for d in per_image], np.int32)}


def _perfect(objects):
  return [(x, y, w, h, category, 1.0) for x, y, w, h, category, crowd in objects if not crowd]


def test_perfect_detections_score_one_and_crowd_is_no_miss():
  evaluator = _evaluator()
  # A lower-scored box inside the crowd region matches the crowd and is no false positive.
  evaluator.update(['1', '2'], _detections([_perfect(IMAGES[0][3]) + [(60, 60, 20, 20, 1, 0.5)],
                                            _perfect(IMAGES[1][3])]))
  evaluator.update(tf.constant(['3']), _detections([[]]))
  metrics = evaluator.evaluate()
  assert list(metrics) == list(METRIC_NAMES)
  for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'AR1', 'AR10', 'AR100'):
    assert metrics[name] == pytest.approx(1.0), name
  assert metrics['APl'] == -1.0  # Only the (ignored) crowd region is large: undefined.
  assert evaluator.per_category_ap() == {1: pytest.approx(1.0), 7: pytest.approx(1.0)}


def test_images_without_detections_count_as_misses():
  evaluator = _evaluator()
  evaluator.update(['1'], _detections([_perfect(IMAGES[0][3])]))
  metrics = evaluator.evaluate()
  # Class 1 is fully found; class 7 finds 1 of 2 at precision 1: 51 of 101 recall points.
  assert metrics['AP'] == pytest.approx((1 + 51 / 101) / 2)
  assert metrics['AR100'] == pytest.approx((1 + 0.5) / 2)


def test_evaluate_leaves_the_results_as_they_were_and_can_run_again():
  """pycocotools' loadRes adds keys to the detections it takes: the evaluator hands it copies,
  so a second evaluation, after more detections came in, scores all of them by hand's count."""
  evaluator = _evaluator()
  evaluator.update(['1'], _detections([_perfect(IMAGES[0][3])]))
  kept = [dict(result) for result in evaluator._results]  # pylint: disable=protected-access
  assert evaluator.evaluate()['AP'] == pytest.approx((1 + 51 / 101) / 2)
  assert evaluator._results == kept  # pylint: disable=protected-access
  assert not {'id', 'area', 'iscrowd', 'segmentation'} & set(kept[0])
  evaluator.update(['2'], _detections([_perfect(IMAGES[1][3])]))
  assert evaluator.evaluate()['AP'] == pytest.approx(1.0)


def test_shifted_box_counts_for_ap50_not_ap75():
  evaluator = CocoEvaluator()
  evaluator.add_groundtruth(b'5', 100, 100, [[0, 0, 0.4, 0.4]], [3], [False])
  # Shifted 8 px right: IoU = 32*40 / (2*1600 - 32*40) = 2/3, a match at IoU .50 to .65 (4 of 10).
  evaluator.update(np.array([5]), _detections([[(8, 0, 40, 40, 3, 0.9)]]))
  metrics = evaluator.evaluate()
  assert metrics['AP50'] == pytest.approx(1.0)
  assert metrics['AP75'] == 0.0
  assert metrics['AP'] == pytest.approx(0.4)


def test_wrong_class_scores_zero():
  evaluator = _evaluator()
  wrong = [[(x, y, w, h, 8 - category, s) for x, y, w, h, category, s in _perfect(image[3])]
           for image in IMAGES]
  evaluator.update(['1', '2', '3'], _detections(wrong))
  metrics = evaluator.evaluate()
  assert metrics['AP'] == metrics['AP50'] == metrics['AR100'] == 0.0


def test_no_detections_give_zeros():
  evaluator = _evaluator()
  metrics = evaluator.evaluate()
  assert {name: metrics[name] for name in METRIC_NAMES if name != 'APl'} == {
      name: 0.0 for name in METRIC_NAMES if name != 'APl'}
  assert metrics['APl'] == -1.0
  assert len(evaluator.summary_table().splitlines()) == 12
  evaluator.update(['1', '2'], _detections([[], []]))  # All padding.
  assert evaluator.evaluate() == metrics


def test_bad_input_is_named():
  evaluator = _evaluator()
  evaluator.update(['9'], _detections([[(0, 0, 5, 5, 1, 0.9)]]))
  with pytest.raises(ValueError, match=r'source ids \[9\]'):
    evaluator.evaluate()
  with pytest.raises(ValueError, match='not an integer'):
    evaluator.update(['abc'], _detections([[]]))
  with pytest.raises(ValueError, match=r'detection_boxes has shape \(1, 4, 4\), expected \(2'):
    evaluator.update(['1', '2'], _detections([[]]))
  too_many = dict(_detections([[]]), num_detections=np.array([5]))
  with pytest.raises(ValueError, match=r'num_detections \[5\] outside \[0, 4\]'):
    evaluator.update(['1'], too_many)
  with pytest.raises(KeyError, match='detection_scores'):
    evaluator.update(['1'], {'detection_boxes': np.zeros([1, 1, 4])})
  with pytest.raises(ValueError, match=r'classes \[2\] are not in the label map'):
    _evaluator([('1', 10, 10, [(0, 0, 5, 5, 2, 0)])]).evaluate()
  with pytest.raises(ValueError, match='call evaluate'):
    CocoEvaluator().summary_table()


def test_results_json_round_trip(tmp_path):
  evaluator = _evaluator()
  evaluator.update(['1', '2'], _detections([_perfect(IMAGES[0][3]), [(7, 5, 20, 20, 7, 0.8)]]))
  metrics = evaluator.evaluate()
  path = results_to_coco_json(evaluator.results, str(tmp_path / 'results.json'))
  with open(path) as f:
    assert json.load(f)[-1] == {'image_id': 2, 'category_id': 7, 'bbox': [7.0, 5.0, 20.0, 20.0],
                                'score': pytest.approx(0.8)}
  gt = evaluator.groundtruth()
  with contextlib.redirect_stdout(io.StringIO()):
    coco_eval = COCOeval(gt, gt.loadRes(path), 'bbox')
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  assert list(coco_eval.stats[:9]) == pytest.approx([metrics[name] for name in METRIC_NAMES])
  table = format_metrics(metrics).splitlines()
  assert table[0] == '| ' + ' | '.join(METRIC_NAMES) + ' |' and len(table) == 3


def test_json_and_record_groundtruth_agree(coco128_dir):
  annotation_file = str(coco128_dir / 'annotations' / 'instances_train2017.json')
  with open(annotation_file) as f:
    coco = json.load(f)
  by_image = {image['id']: [] for image in coco['images']}
  for annotation in coco['annotations']:
    by_image[annotation['image_id']].append(annotation)

  # Emulate the converter's records: normalized yxyx boxes, dataset ids, crowd flags, areas.
  examples = []
  for image in coco['images']:
    height, width, annotations = image['height'], image['width'], by_image[image['id']]
    examples.append({
        'source_id': tf.constant(str(image['id'])), 'height': height, 'width': width,
        'boxes': _normalized_yxyx([a['bbox'] for a in annotations], height, width),
        'classes': [a['category_id'] for a in annotations],
        'is_crowd': [a['iscrowd'] for a in annotations],
        'area': [a['area'] for a in annotations]})
  label_map = {c['id']: c['name'] for c in coco['categories']}

  # Detections: the gt boxes jittered by up to 10%, random scores, padded to 100 per image.
  rng = np.random.default_rng(0)
  from_json = CocoEvaluator(annotation_file=annotation_file)
  from_records = CocoEvaluator(groundtruth=groundtruth_dataset(examples, label_map))
  ids = list(by_image)
  for start in range(0, len(ids), 16):
    batch = [[(*(np.array(a['bbox']) + rng.uniform(-0.1, 0.1, 4) * np.tile(a['bbox'][2:], 2)),
               a['category_id'], rng.uniform(0.1, 1.0)) for a in by_image[i]]
             for i in ids[start:start + 16]]
    detections = _detections(batch, max_detections=100)
    for evaluator in (from_json, from_records):
      evaluator.update([str(i) for i in ids[start:start + 16]], detections)

  json_metrics, record_metrics = from_json.evaluate(), from_records.evaluate()
  assert 0.2 < json_metrics['AP'] < 0.95 and json_metrics['AP50'] > 0.9
  assert record_metrics == pytest.approx(json_metrics, abs=1e-6)
  assert from_records.per_category_ap() == pytest.approx(from_json.per_category_ap(), abs=1e-6)
