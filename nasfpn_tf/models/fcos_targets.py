"""FCOS's points, per-level regression ranges and training targets (Tian et al., ICCV 2019).

Anchor-free: every feature pixel of every level is one point, at the input pixel
(i * stride + stride // 2, j * stride + stride // 2) as in the released FCOS code and
mmdetection. A point is positive for a box when (the released code's rules, FCOS v2):
  - it lies in the box's center region: the square of `center_sampling_radius` x stride around
    the box center, clipped to the box (radius 0: anywhere inside the box);
  - its largest distance to the box's sides, max(t, l, b, r), lies in its level's regression
    range [lower, upper]: (0, 64), (64, 128), (128, 256), (256, 512), (512, inf) for P3-P7, i.e.
    bounds of 8 x stride between the levels (`range_bounds` sets them).
A point positive for several boxes takes the smallest (by area); ties go to the first box.
Its targets: the box's class id, and (t, l, b, r) = the distances from the point to the box's
top, left, bottom and right sides divided by the level's stride (FCOS v2's `norm_reg_targets`);
its centerness target, sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)), follows from them
(`centerness`). The input pipeline makes them per image (`input_pipeline.train_example_parser`)
from the boxes after augmentation, as it makes RetinaNet's anchor labels.
"""
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from nasfpn_tf.models.geometry import ModelGeometry

# FCOS's regression range bound between two levels, in strides of the lower level (64 for P3).
RANGE_BOUND_STRIDES = 8
DEFAULT_CENTER_SAMPLING_RADIUS = 1.5


def default_range_bounds(min_level: int, max_level: int) -> Tuple[float, ...]:
  """FCOS's bounds between the regression ranges of consecutive levels: 8 x stride of the lower
  (64, 128, 256, 512 for P3-P7)."""
  return tuple(float(RANGE_BOUND_STRIDES * 2**level) for level in range(min_level, max_level))


def check_range_bounds(range_bounds: Optional[Sequence[float]], min_level: int,
                       max_level: int) -> Tuple[float, ...]:
  """`range_bounds` (None: FCOS's) as floats, or a ValueError naming the gin binding."""
  if range_bounds is None:
    return default_range_bounds(min_level, max_level)
  bounds = tuple(float(b) for b in range_bounds)
  if (len(bounds) != max_level - min_level or any(b <= 0 for b in bounds) or
      any(a >= b for a, b in zip(bounds, bounds[1:]))):
    raise ValueError(
        f'build_retinanet.fcos_range_bounds = {list(bounds)}: give {max_level - min_level} '
        f'increasing positive sizes in input pixels, the bounds between the regression ranges '
        f'of levels {min_level}..{max_level} (None: FCOS\'s '
        f'{list(default_range_bounds(min_level, max_level))}).')
  return bounds


def centerness(box_targets: tf.Tensor) -> tf.Tensor:
  """[..., 4] (t, l, b, r) distances -> [...] sqrt(min(l, r)/max(l, r) * min(t, b)/max(t, b));
  0 where a distance is not positive (negatives' zero targets)."""
  t, l, b, r = tf.unstack(tf.cast(box_targets, tf.float32), axis=-1)
  ratio = (tf.math.divide_no_nan(tf.minimum(l, r), tf.maximum(l, r)) *
           tf.math.divide_no_nan(tf.minimum(t, b), tf.maximum(t, b)))
  return tf.sqrt(tf.maximum(ratio, 0.0))


def distances_to_boxes(points: tf.Tensor, distances: tf.Tensor) -> tf.Tensor:
  """Points [..., 2] (y, x) and distances [..., 4] (t, l, b, r), both in input pixels ->
  boxes [..., 4] (ymin, xmin, ymax, xmax)."""
  y, x = tf.unstack(tf.cast(points, tf.float32), axis=-1)
  t, l, b, r = tf.unstack(tf.cast(distances, tf.float32), axis=-1)
  return tf.stack([y - t, x - l, y + b, x + r], axis=-1)


class FCOSTargets:
  """The points of a model geometry and the FCOS targets of one image's boxes on them.

  `FCOSTargets.from_config(model_config)` reads `RetinaNet.get_config()`'s geometry and its
  `fcos_range_bounds` and `fcos_center_sampling_radius` (defaults where absent).
  Call with boxes [G, 4] (ymin, xmin, ymax, xmax in model-input pixels) and classes [G] int;
  returns 'cls_targets' {level: [h, w, 1]} int32 (class id, -1 for background), 'box_targets'
  {level: [h, w, 4]} float32 (t, l, b, r in strides; 0 for background) and 'box_weights'
  [num_points] float32 (1 for positives): what `losses.FCOSLoss` reads, and the positives the
  trainer counts as it counts RetinaNet's.
  """

  def __init__(self, geometry: ModelGeometry, range_bounds: Optional[Sequence[float]] = None,
               center_sampling_radius: float = DEFAULT_CENTER_SAMPLING_RADIUS):
    if center_sampling_radius < 0:
      raise ValueError(f'build_retinanet.fcos_center_sampling_radius = {center_sampling_radius}'
                       ' must be >= 0 (0: no center sampling).')
    self.geometry = geometry
    self.range_bounds = check_range_bounds(range_bounds, geometry.min_level, geometry.max_level)
    self.center_sampling_radius = float(center_sampling_radius)
    lower = (0.0,) + self.range_bounds
    upper = self.range_bounds + (np.inf,)
    self.regress_ranges = dict(zip(geometry.levels, zip(lower, upper)))
    flat = {'points': [], 'strides': [], 'lower': [], 'upper': []}
    for level in geometry.levels:
      points = self.level_points(level).reshape(-1, 2)
      stride = geometry.strides[level]
      flat['points'].append(points)
      for name, value in (('strides', stride), ('lower', self.regress_ranges[level][0]),
                          ('upper', self.regress_ranges[level][1])):
        flat[name].append(np.full([len(points)], value, np.float32))
    self._flat = {name: np.concatenate(values).astype(np.float32)
                  for name, values in flat.items()}

  @classmethod
  def from_config(cls, model_config: Mapping[str, Any]) -> 'FCOSTargets':
    return cls(ModelGeometry.from_config(model_config), model_config.get('fcos_range_bounds'),
               model_config.get('fcos_center_sampling_radius', DEFAULT_CENTER_SAMPLING_RADIUS))

  def level_points(self, level: str) -> np.ndarray:
    """[h, w, 2] (y, x) input pixels of level `level`'s points."""
    stride = self.geometry.strides[level]
    height, width = self.geometry.feature_sizes[level]
    ys = np.arange(height, dtype=np.float32) * stride + stride // 2
    xs = np.arange(width, dtype=np.float32) * stride + stride // 2
    return np.stack(np.meshgrid(ys, xs, indexing='ij'), axis=-1)

  def points(self) -> Dict[str, tf.Tensor]:
    """{level: [h, w, 2]} the points, what the post-processing decodes boxes around."""
    return {level: tf.constant(self.level_points(level)) for level in self.geometry.levels}

  @property
  def num_points(self) -> int:
    return len(self._flat['points'])

  def __call__(self, boxes: tf.Tensor, classes: tf.Tensor) -> Dict[str, Any]:
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    classes = tf.reshape(tf.cast(classes, tf.int32), [-1])
    points = tf.constant(self._flat['points'])
    y, x = points[:, 0:1], points[:, 1:2]  # [P, 1]
    ymin, xmin, ymax, xmax = (boxes[None, :, i] for i in range(4))  # [1, G]
    distances = tf.stack([y - ymin, x - xmin, ymax - y, xmax - x], axis=-1)  # [P, G, 4]
    if self.center_sampling_radius > 0:
      radius = tf.constant(self._flat['strides'])[:, None] * self.center_sampling_radius
      center_y, center_x = (ymin + ymax) / 2, (xmin + xmax) / 2
      region = tf.stack([y - tf.maximum(center_y - radius, ymin),
                         x - tf.maximum(center_x - radius, xmin),
                         tf.minimum(center_y + radius, ymax) - y,
                         tf.minimum(center_x + radius, xmax) - x], axis=-1)
    else:
      region = distances
    inside = tf.reduce_min(region, axis=-1) > 0
    reach = tf.reduce_max(distances, axis=-1)
    in_range = ((reach >= tf.constant(self._flat['lower'])[:, None]) &
                (reach <= tf.constant(self._flat['upper'])[:, None]))
    areas = tf.broadcast_to((ymax - ymin) * (xmax - xmin), tf.shape(inside))
    areas = tf.where(inside & in_range, areas, np.inf)
    # A last column of infinite area: the argmin of an image without boxes is defined.
    areas = tf.concat([areas, tf.fill([tf.shape(areas)[0], 1], np.inf)], axis=1)
    best = tf.argmin(areas, axis=1, output_type=tf.int32)
    positive = tf.reduce_min(areas, axis=1) < np.inf
    cls_targets = tf.where(positive, tf.gather(tf.concat([classes, [-1]], 0), best), -1)
    distances = tf.concat([distances, tf.zeros([tf.shape(distances)[0], 1, 4])], axis=1)
    box_targets = tf.gather(distances, best, batch_dims=1)
    box_targets = tf.where(positive[:, None],
                           box_targets / tf.constant(self._flat['strides'])[:, None], 0.0)
    return {'cls_targets': self._per_level(cls_targets, 1),
            'box_targets': self._per_level(box_targets, 4),
            'box_weights': tf.cast(positive, tf.float32)}

  def _per_level(self, flat: tf.Tensor, depth: int) -> Dict[str, tf.Tensor]:
    sizes = [h * w for h, w in self.geometry.feature_sizes.values()]
    return {level: tf.reshape(part, list(self.geometry.feature_sizes[level]) + [depth])
            for level, part in zip(self.geometry.levels, tf.split(flat, sizes))}
