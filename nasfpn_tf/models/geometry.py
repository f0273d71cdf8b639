"""The model's geometry: input size, pyramid levels and anchors, and the pixel conventions around
them, defined once for the model, the input pipeline, the exports, predict and the experiments.

`ModelGeometry` is what the model config (`RetinaNet.get_config()`, the `build_retinanet` gin
bindings) says about where the model looks: level strides and feature sizes, the anchors (TFM
`Anchor`, what the training labeler and the post-processing read). The functions below depend on
the input size at most, so a .tflite file, which records only its input size, uses them too:
the evaluation preprocessing of one image (`resize_and_pad`), its inverse for boxes
(`to_original_image`) and the pixel normalization (`normalize_pixels`), which the model applies
itself (`backbones.ImageNormalization`) and TF Model Garden's models expect done outside.
"""
import dataclasses
from typing import Any, Dict, Mapping, Sequence, Tuple

import tensorflow as tf
from official.vision.ops import anchor, preprocess_ops

# ImageNet statistics on the [0, 255] scale, the values TFM's input pipelines use.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class ModelGeometry:
  """Input size, pyramid levels and anchor settings: the `RetinaNet` arguments of those names.

  `image_size` [height, width] is the model's fixed (padded) input, each a multiple of
  2^max_level so that every level divides evenly; construction checks it. Levels are keyed by
  their number as a string ('3'..'7'), as the model's outputs are.
  """
  image_size: Tuple[int, int]
  min_level: int = 3
  max_level: int = 7
  anchor_num_scales: int = 3
  anchor_aspect_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
  anchor_size: float = 4.0

  def __post_init__(self):
    image_size = tuple(int(s) for s in self.image_size)
    if len(image_size) != 2:
      raise ValueError(f'image_size (gin: build_retinanet.image_size) is [height, width], got '
                       f'{list(image_size)}.')
    stride = 2**int(self.max_level)
    if any(size <= 0 or size % stride for size in image_size):
      raise ValueError(
          f'image_size {list(image_size)} (gin: build_retinanet.image_size) must be a multiple '
          f'of 2^max_level = {stride} (build_retinanet.max_level = {self.max_level}): pad '
          f'images, or use e.g. {[max(stride, -(-s // stride) * stride) for s in image_size]}.')
    normalized = dict(image_size=image_size, min_level=int(self.min_level),
                      max_level=int(self.max_level), anchor_num_scales=int(self.anchor_num_scales),
                      anchor_aspect_ratios=tuple(float(r) for r in self.anchor_aspect_ratios),
                      anchor_size=float(self.anchor_size))
    for name, value in normalized.items():
      object.__setattr__(self, name, value)

  @classmethod
  def from_config(cls, model_config: Mapping[str, Any]) -> 'ModelGeometry':
    """The geometry of a model config (`RetinaNet.get_config()`; other entries are ignored)."""
    names = [field.name for field in dataclasses.fields(cls)]
    missing = [name for name in names if name not in model_config]
    if missing:
      raise ValueError(f'model_config lacks {missing}; pass RetinaNet.get_config() (needs '
                       f'{names}).')
    return cls(**{name: model_config[name] for name in names})

  def to_config(self) -> Dict[str, Any]:
    """The `RetinaNet` arguments of this geometry, JSON-friendly (lists, not tuples)."""
    return dict(dataclasses.asdict(self), image_size=list(self.image_size),
                anchor_aspect_ratios=list(self.anchor_aspect_ratios))

  @property
  def levels(self) -> Tuple[str, ...]:
    return tuple(str(level) for level in range(self.min_level, self.max_level + 1))

  @property
  def strides(self) -> Dict[str, int]:
    """{level: input pixels per feature pixel}: 2^level."""
    return {level: 2**int(level) for level in self.levels}

  @property
  def feature_sizes(self) -> Dict[str, Tuple[int, int]]:
    """{level: (height, width)} of the level's feature map."""
    height, width = self.image_size
    return {level: (height // stride, width // stride) for level, stride in self.strides.items()}

  @property
  def num_anchors_per_location(self) -> int:
    return self.anchor_num_scales * len(self.anchor_aspect_ratios)

  @property
  def num_anchors(self) -> int:
    """Anchors over all levels: the rows of the flattened outputs."""
    return self.num_anchors_per_location * sum(h * w for h, w in self.feature_sizes.values())

  def anchor_boxes(self) -> Dict[str, tf.Tensor]:
    """{level: [h, w, A*4]} TFM `Anchor` boxes (ymin, xmin, ymax, xmax) in input pixels."""
    return anchor.Anchor(self.min_level, self.max_level, self.anchor_num_scales,
                         list(self.anchor_aspect_ratios), self.anchor_size,
                         list(self.image_size)).multilevel_boxes


def resize_and_pad(image: tf.Tensor, image_size: Sequence[int]) -> Tuple[tf.Tensor, tf.Tensor]:
  """Evaluation's preprocessing of one image [H, W, 3]: resized keeping its aspect ratio to fit
  `image_size`, zero-padded at the bottom / right.

  Returns (model input float32 [height, width, 3] in [0, 255], image_info [4, 2]): TFM's
  [[orig_h, orig_w], [out_h, out_w], [y_scale, x_scale], [offset_y, offset_x]], what
  `to_original_image` needs (out is `image_size`, as TFM 2.20 fills it; the image content is
  round(orig * scale)).
  """
  image_size = [int(s) for s in image_size]
  image, image_info = preprocess_ops.resize_and_crop_image(image, image_size,
                                                           padded_size=image_size)
  return tf.ensure_shape(image, image_size + [3]), image_info


def to_original_image(boxes: tf.Tensor, image_info: tf.Tensor) -> tf.Tensor:
  """Boxes in model-input pixels -> original image pixels, clipped to the original image.

  boxes [B, K, 4] (ymin, xmin, ymax, xmax) and image_info [B, 4, 2] (`resize_and_pad`'s, batched):
  undoes the crop offset, then the scale (input = original * scale - offset).
  """
  image_info = tf.cast(image_info, tf.float32)
  original_size, scale, offset = image_info[:, 0:1], image_info[:, 2:3], image_info[:, 3:4]
  boxes = (tf.cast(boxes, tf.float32) + tf.tile(offset, [1, 1, 2])) / tf.tile(scale, [1, 1, 2])
  return tf.clip_by_value(boxes, 0.0, tf.tile(original_size, [1, 1, 2]))


def normalize_pixels(images: tf.Tensor, mean: Sequence[float] = IMAGENET_MEAN_RGB,
                     stddev: Sequence[float] = IMAGENET_STDDEV_RGB) -> tf.Tensor:
  """(pixels - mean) / stddev per channel, in float32: [0, 255] RGB to the backbone's input."""
  images = tf.cast(images, tf.float32)
  return (images - tf.constant(mean, tf.float32)) / tf.constant(stddev, tf.float32)
