"""COCO box metrics (pycocotools COCOeval) for batched detections, TF Model Garden style.

Ground truth comes either from the original COCO annotation json or from the converter's
TFRecords (normalized [ymin, xmin, ymax, xmax] boxes, the dataset's own category ids).
Detections are the model's outputs: `detection_boxes` [B, K, 4] (ymin, xmin, ymax, xmax in
original image pixels), `detection_scores` [B, K], `detection_classes` [B, K] (dataset category
ids) and `num_detections` [B], which masks the padding.

Metrics keep pycocotools' conventions: 0-1 scale, and -1 where a metric is undefined because no
ground truth falls in that area range. COCO's small/medium/large split (APs, APm, APl) uses each
object's *segmentation* area, so record-built ground truth should carry `area`; box area is only
a fallback and can move objects between ranges.
"""
import contextlib
import io
import json

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100')
DETECTION_KEYS = ('detection_boxes', 'detection_scores', 'detection_classes', 'num_detections')


def _numpy(value):
  """Tensors and array-likes as numpy, so callers can pass either."""
  return np.asarray(value.numpy() if hasattr(value, 'numpy') else value)


def _image_id(source_id):
  """COCO image ids are ints; records store them as strings (possibly bytes)."""
  if isinstance(source_id, np.ndarray):
    source_id = source_id.item()
  if isinstance(source_id, bytes):
    source_id = source_id.decode()
  try:
    return int(source_id)
  except (TypeError, ValueError):
    raise ValueError(f'source_id {source_id!r} is not an integer COCO image id') from None


def yxyx_to_xywh(boxes):
  """[N, 4] (ymin, xmin, ymax, xmax) -> COCO [N, 4] (x, y, width, height), same units."""
  boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
  ymin, xmin, ymax, xmax = boxes.T
  return np.stack([xmin, ymin, xmax - xmin, ymax - ymin], axis=-1)


def coco_results(source_ids, detections):
  """Batched detections -> COCO results list of {image_id, category_id, bbox, score}.

  Only the first `num_detections[i]` entries of image i are kept; boxes stay in pixels.
  """
  missing = [key for key in DETECTION_KEYS if key not in detections]
  if missing:
    raise KeyError(f'detections lack {missing}; expected keys {list(DETECTION_KEYS)}')
  source_ids = _numpy(source_ids).reshape(-1)
  boxes, scores, classes, counts = (_numpy(detections[key]) for key in DETECTION_KEYS)
  batch, max_detections = len(source_ids), scores.shape[-1] if scores.ndim == 2 else None
  expected = {'detection_boxes': (batch, max_detections, 4),
              'detection_scores': (batch, max_detections),
              'detection_classes': (batch, max_detections), 'num_detections': (batch,)}
  for key, array in zip(DETECTION_KEYS, (boxes, scores, classes, counts)):
    if array.shape != expected[key]:
      raise ValueError(f'{key} has shape {array.shape}, expected {expected[key]} '
                       f'for {batch} source_ids')
  counts = counts.astype(np.int64)
  if np.any(counts < 0) or np.any(counts > max_detections):
    raise ValueError(f'num_detections {counts.tolist()} outside [0, {max_detections}]')
  results = []
  for source_id, image_boxes, image_scores, image_classes, count in zip(
      source_ids, boxes, scores, classes, counts):
    image_id = _image_id(source_id)
    for box, score, category in zip(yxyx_to_xywh(image_boxes[:count]), image_scores[:count],
                                    image_classes[:count]):
      results.append({'image_id': image_id, 'category_id': int(category),
                      'bbox': [float(v) for v in box], 'score': float(score)})
  return results


def results_to_coco_json(results, path):
  """Writes a COCO results list (see `coco_results`) to `path`, the format COCO's server reads."""
  with open(path, 'w') as f:
    json.dump(results, f)
  return path


def groundtruth_annotations(source_id, height, width, boxes, classes, is_crowd=None, area=None):
  """One image's ground truth as a COCO image entry and annotation list (without ids).

  `boxes` are normalized [ymin, xmin, ymax, xmax]; `area` (COCO's segmentation area, pixels) is
  used where given and positive, else the box area.
  """
  image_id = _image_id(source_id)
  height, width = int(_numpy(height)), int(_numpy(width))
  if height <= 0 or width <= 0:
    raise ValueError(f'image {image_id}: height and width must be positive, got {height}x{width}')
  pixel_boxes = yxyx_to_xywh(_numpy(boxes)) * [width, height, width, height]
  classes = _numpy(classes).reshape(-1)
  count = len(pixel_boxes)
  is_crowd = np.zeros(count, bool) if is_crowd is None else _numpy(is_crowd).reshape(-1)
  area = np.zeros(count) if area is None else _numpy(area).reshape(-1)
  for name, values in (('classes', classes), ('is_crowd', is_crowd), ('area', area)):
    if len(values) != count:
      raise ValueError(f'image {image_id}: {len(values)} {name} for {count} boxes')
  annotations = [{'image_id': image_id, 'category_id': int(category),
                  'bbox': [float(v) for v in box], 'iscrowd': int(bool(crowd)),
                  'area': float(object_area) if object_area > 0 else float(box[2] * box[3])}
                 for box, category, crowd, object_area in zip(pixel_boxes, classes, is_crowd, area)]
  return {'id': image_id, 'height': height, 'width': width}, annotations


def _categories(label_map, annotations):
  """COCO categories from a label map {id: name}, or named by id from the ground truth."""
  used = sorted({annotation['category_id'] for annotation in annotations})
  if label_map is None:
    return [{'id': category, 'name': str(category)} for category in used]
  label_map = {int(category): name for category, name in label_map.items()}
  unknown = sorted(set(used) - set(label_map))
  if unknown:
    raise ValueError(f'ground-truth classes {unknown} are not in the label map '
                     f'(ids {sorted(label_map)})')
  return [{'id': category, 'name': name} for category, name in sorted(label_map.items())]


def groundtruth_dataset(examples, label_map=None):
  """COCO ground-truth dataset dict from decoded examples (see `tfexample.decode_example`).

  Each example needs source_id, height, width, boxes, classes, and optionally is_crowd, area.
  """
  images, annotations = [], []
  for example in examples:
    image, image_annotations = groundtruth_annotations(
        example['source_id'], example['height'], example['width'], example['boxes'],
        example['classes'], example.get('is_crowd'), example.get('area'))
    images.append(image)
    annotations.extend(image_annotations)
  return _dataset(images, annotations, label_map)


def _dataset(images, annotations, label_map):
  """Assembles a COCO dataset dict; annotation ids are assigned here so sources can be mixed."""
  ids = [image['id'] for image in images]
  if len(set(ids)) < len(ids):
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    raise ValueError(f'ground truth has duplicate image ids {duplicates}')
  return {'images': images, 'categories': _categories(label_map, annotations),
          'annotations': [dict(annotation, id=index)
                          for index, annotation in enumerate(annotations, start=1)]}


def _coco(dataset):
  """A COCO api object from a dataset dict, without pycocotools' printing."""
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


class CocoEvaluator:
  """Accumulates batched detections and scores them with COCOeval (bbox) over all gt images.

  Ground truth: `annotation_file` (COCO json), `groundtruth` (a dataset dict, e.g. from
  `groundtruth_dataset`), or neither and `add_groundtruth` per image, with categories from
  `label_map` {id: name} or inferred from the ground-truth classes.
  """

  def __init__(self, annotation_file=None, groundtruth=None, label_map=None):
    if annotation_file is not None and groundtruth is not None:
      raise ValueError('pass annotation_file or groundtruth, not both')
    if annotation_file is not None:
      with contextlib.redirect_stdout(io.StringIO()):
        self._fixed_gt = COCO(annotation_file)
    else:
      self._fixed_gt = _coco(groundtruth) if groundtruth is not None else None
    self._label_map = label_map
    self._images, self._annotations, self._results = [], [], []
    self._eval, self._summary = None, None

  def add_groundtruth(self, source_id, height, width, boxes_normalized_yxyx, classes,
                      is_crowd=None, area=None):
    """Adds one image's ground truth from record fields (see `groundtruth_annotations`)."""
    if self._fixed_gt is not None:
      raise ValueError('ground truth was given at construction; add_groundtruth would mix sources')
    image, annotations = groundtruth_annotations(source_id, height, width, boxes_normalized_yxyx,
                                                 classes, is_crowd, area)
    self._images.append(image)
    self._annotations.extend(annotations)

  def update(self, source_ids, detections):
    """Adds a batch of detections (dict of `DETECTION_KEYS`, numpy or tensors)."""
    self._results.extend(coco_results(source_ids, detections))

  @property
  def results(self):
    """Detections so far in COCO results format (for `results_to_coco_json`)."""
    return self._results

  def reset(self):
    """Forgets detections and `add_groundtruth` images; keeps json/dict ground truth."""
    self._images, self._annotations, self._results = [], [], []
    self._eval, self._summary = None, None

  def groundtruth(self):
    """The ground truth as a pycocotools COCO object."""
    if self._fixed_gt is not None:
      return self._fixed_gt
    if not self._images:
      raise ValueError('no ground truth: pass annotation_file/groundtruth or call add_groundtruth')
    return _coco(_dataset(self._images, self._annotations, self._label_map))

  def evaluate(self, verbose=False):
    """Runs COCOeval; returns {name: value} for `METRIC_NAMES` (stats[0..8]).

    `verbose` lets pycocotools print its progress and summary table. As in COCO, detections of
    a category absent from the ground-truth categories are ignored.
    """
    gt = self.groundtruth()
    unknown = sorted({r['image_id'] for r in self._results} - set(gt.getImgIds()))
    if unknown:
      raise ValueError(f'detections for source ids {unknown[:10]} that have no ground truth '
                       f'({len(unknown)} unknown, {len(gt.getImgIds())} ground-truth images)')
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
      if self._results:
        # loadRes adds keys to each detection dict (id, area, segmentation) and replaces none of
        # their values in place: a copy of each dict keeps this evaluator's results as they were.
        detections = gt.loadRes([dict(result) for result in self._results])
      else:  # loadRes cannot take an empty list; an empty result set scores 0 recall.
        detections = _coco({'images': gt.dataset['images'], 'categories': gt.dataset['categories'],
                            'annotations': []})
      self._eval = COCOeval(gt, detections, 'bbox')
      self._eval.evaluate()
      self._eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
      self._eval.summarize()
    self._summary = summary.getvalue()
    if verbose:
      print(self._summary, end='')
    return {name: float(value) for name, value in zip(METRIC_NAMES, self._eval.stats)}

  def _last_eval(self):
    if self._eval is None:
      raise ValueError('call evaluate() first')
    return self._eval

  def summary_table(self):
    """pycocotools' familiar 12-line summary of the last `evaluate()`."""
    self._last_eval()
    return self._summary

  def per_category_ap(self):
    """{category_id: AP@[.5:.95]} of the last `evaluate()`; -1 for categories without gt."""
    evaluation = self._last_eval()
    # precision: [IoU thresholds, recall points, categories, area ranges, max detections].
    precision = evaluation.eval['precision'][:, :, :, 0, -1]
    per_category = {}
    for index, category in enumerate(evaluation.params.catIds):
      valid = precision[:, :, index][precision[:, :, index] > -1]
      per_category[category] = float(valid.mean()) if valid.size else -1.0
    return per_category


def format_metrics(metrics):
  """The 9 metrics as a compact markdown table (percent; '-' where undefined, i.e. -1)."""
  header = '| ' + ' | '.join(METRIC_NAMES) + ' |'
  rule = '|' + '---:|' * len(METRIC_NAMES)
  row = '| ' + ' | '.join(f'{100 * metrics[name]:.1f}' if metrics[name] >= 0 else '-'
                         for name in METRIC_NAMES) + ' |'
  return '\n'.join([header, rule, row])
