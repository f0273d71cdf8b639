"""RetinaNet training and evaluation input pipelines over detection TFRecords (TFM style).

The image size, anchors (`ModelGeometry`) and num_classes come from the model's config
(`RetinaNet.get_config()`, i.e. the `build_retinanet` gin bindings), so labels are always made
for the anchors the model predicts on. Images are RGB float32 pixels in [0, 255]: the model
normalizes them itself. Class ids are the dataset's own ids, kept raw (0 is background), so
every id must lie in [1, num_classes).
"""
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import gin
import tensorflow as tf
from official.vision.ops import anchor, box_ops, preprocess_ops

from nasfpn_tf.data import sampling as sampling_lib
from nasfpn_tf.data import tfexample
from nasfpn_tf.models import fcos_targets
from nasfpn_tf.models import geometry as geometry_lib
from nasfpn_tf.models.geometry import ModelGeometry

AUTOTUNE = tf.data.AUTOTUNE


def _model_settings(model_config: Mapping[str, Any]) -> Tuple[ModelGeometry, int]:
  """(geometry, num_classes) of the model config, validated before any data is read."""
  if 'num_classes' not in model_config:
    raise ValueError('model_config lacks num_classes; pass RetinaNet.get_config().')
  return ModelGeometry.from_config(model_config), int(model_config['num_classes'])


def _list_files(file_pattern: str) -> Sequence[str]:
  """Files matching `file_pattern`; fails early when none match or they hold no record."""
  files = sorted(tf.io.gfile.glob(file_pattern))
  if not files:
    raise ValueError(f'no files match the file pattern {file_pattern!r}')
  # Reads one record at most (unless leading files are empty): cheap even on remote storage.
  if not any(True for _ in tf.data.TFRecordDataset(files).take(1)):
    raise ValueError(f'empty dataset: the {len(files)} file(s) matching {file_pattern!r} hold '
                     'no records')
  return files


def _records(file_pattern: str, input_context: Optional[tf.distribute.InputContext],
             training: bool, cycle_length: int) -> tf.data.Dataset:
  """Serialized examples of this input pipeline's shard, files shuffled when training."""
  files = _list_files(file_pattern)
  num_pipelines = input_context.num_input_pipelines if input_context else 1
  pipeline_id = input_context.input_pipeline_id if input_context else 0
  dataset = tf.data.Dataset.from_tensor_slices(files)
  # Sharding files saves every pipeline reading all the data; too few files: shard records.
  shard_files = len(files) >= num_pipelines
  if num_pipelines > 1 and shard_files:
    dataset = dataset.shard(num_pipelines, pipeline_id)
  if training:
    dataset = dataset.shuffle(len(files), reshuffle_each_iteration=True)
  dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)),
                               num_parallel_calls=AUTOTUNE, deterministic=not training)
  if num_pipelines > 1 and not shard_files:
    dataset = dataset.shard(num_pipelines, pipeline_id)
  return dataset


def _checked_classes(data: Dict[str, tf.Tensor], num_classes: int,
                     file_pattern: str) -> tf.Tensor:
  """Class ids, asserted in [1, num_classes): one out of range would corrupt the one-hot targets."""
  classes = tf.cast(data['classes'], tf.int32)
  where = [f'in {file_pattern!r}, image source_id', data['source_id'], 'has classes', classes]
  with tf.control_dependencies([
      tf.debugging.Assert(
          tf.reduce_all(classes < num_classes),
          [f'class id >= num_classes = {num_classes} (raise build_retinanet.num_classes to the '
           'largest dataset id + 1):'] + where),
      tf.debugging.Assert(
          tf.reduce_all(classes > 0),
          ['class id 0 is background; dataset ids must be >= 1:'] + where),
  ]):
    return tf.identity(classes)


def _per_replica_batch(global_batch_size: int,
                       input_context: Optional[tf.distribute.InputContext]) -> int:
  if input_context:
    return input_context.get_per_replica_batch_size(global_batch_size)
  return global_batch_size


def train_example_parser(model_config: Mapping[str, Any],
                         aug_scale_min: float = 0.8,
                         aug_scale_max: float = 1.2,
                         flip_prob: float = 0.5,
                         match_threshold: float = 0.5,
                         unmatched_threshold: float = 0.5,
                         source: str = 'the training records'):
  """The per-record step of `build_train_dataset`: a serialized tf.Example -> (image, labels) of
  one image, augmented and anchor-labeled as documented there (`source` names the records in
  errors). Public for one ordered pass over records without shuffling or repetition: the
  architecture search caches each training image's backbone features and labels once.
  """
  geometry, num_classes = _model_settings(model_config)
  image_size = list(geometry.image_size)
  anchors = geometry.anchor_boxes()
  labeler = anchor.AnchorLabeler(match_threshold, unmatched_threshold)
  # FCOS (build_retinanet.detector = 'fcos'): point targets instead of anchor labels.
  fcos = (fcos_targets.FCOSTargets.from_config(model_config)
          if model_config.get('detector') == 'fcos' else None)

  def parse(serialized):
    data = tfexample.decode_example(serialized)
    classes = _checked_classes(data, num_classes, source)
    not_crowd = tf.logical_not(data['is_crowd'])
    boxes = tf.boolean_mask(data['boxes'], not_crowd)
    classes = tf.boolean_mask(classes, not_crowd)

    image, boxes, _ = preprocess_ops.random_horizontal_flip(data['image'], boxes,
                                                            prob=flip_prob)
    boxes = box_ops.denormalize_boxes(boxes, tf.shape(image)[:2])
    image, image_info = preprocess_ops.resize_and_crop_image(
        image, image_size, padded_size=image_size, aug_scale_min=aug_scale_min,
        aug_scale_max=aug_scale_max)
    # Clipped to the crop window: boxes of a jittered-up image can leave it.
    boxes = preprocess_ops.resize_and_crop_boxes(boxes, image_info[2], image_info[1],
                                                 image_info[3])
    kept = box_ops.get_non_empty_box_indices(boxes)
    boxes, classes = tf.gather(boxes, kept), tf.gather(classes, kept)

    if fcos is not None:
      return tf.ensure_shape(image, image_size + [3]), dict(fcos(boxes, classes),
                                                            image_info=image_info)
    cls_targets, box_targets, _, cls_weights, box_weights = labeler.label_anchors(
        anchors, boxes, classes[:, None])
    labels = {
        'cls_targets': {level: tf.cast(t, tf.int32) for level, t in cls_targets.items()},
        'box_targets': box_targets,
        'cls_weights': cls_weights,
        'box_weights': box_weights,
        'image_info': image_info,
    }
    return tf.ensure_shape(image, image_size + [3]), labels

  return parse


@gin.configurable(denylist=['model_config', 'input_context'])
def build_train_dataset(file_pattern: str,
                        global_batch_size: int,
                        model_config: Mapping[str, Any],
                        input_context: Optional[tf.distribute.InputContext] = None,
                        aug_scale_min: float = 0.8,
                        aug_scale_max: float = 1.2,
                        flip_prob: float = 0.5,
                        match_threshold: float = 0.5,
                        unmatched_threshold: float = 0.5,
                        shuffle_buffer_size: int = 1000,
                        cycle_length: int = 16,
                        sampling: str = 'uniform',
                        repeat_threshold: Optional[float] = None,
                        sampling_seed: int = 0) -> tf.data.Dataset:
  """Endless, shuffled, augmented (images, labels) batches for RetinaNet training.

  Images: every one once per pass with `sampling` 'uniform'; 'class_balanced' or
  'repeat_factor' (with `repeat_threshold`, LVIS's t, default 0.001) draw rare classes' images
  more often, each pass's draw fixed by `sampling_seed` (`nasfpn_tf.data.sampling`).

  Per image (the paper's recipe, TFM's retinanet parser): random horizontal flip with
  `flip_prob`; multiscale jitter: the image is resized to fit `image_size` scaled by a random
  factor in [aug_scale_min, aug_scale_max], then randomly cropped / zero-padded to `image_size`;
  boxes follow, are clipped to the visible image and dropped once empty. Crowd boxes are left
  out, as TFM does (`skip_crowd_during_training`): giving them zero weight in the labeler would
  also zero every negative anchor whose best match is a crowd box. Anchors are labeled with TFM's
  `AnchorLabeler(match_threshold, unmatched_threshold)`.

  Returns batches of `input_context.get_per_replica_batch_size(global_batch_size)` (the whole
  global batch without a context): images float32 [B, H, W, 3], and labels: 'cls_targets'
  {level: [B, h, w, A]} int32 (class id, -1 for negative or ignored), 'box_targets'
  {level: [B, h, w, A*4]}, 'cls_weights' and 'box_weights' [B, num_anchors], 'image_info'
  [B, 4, 2] (see `build_eval_dataset`), what `RetinaNetLoss` consumes. An FCOS model's
  (`detector` 'fcos' in its config) are `fcos_targets.FCOSTargets`' instead, batched, with
  'image_info': what `FCOSLoss` consumes. `match_threshold` and `unmatched_threshold` are then
  unused.
  """
  parse = train_example_parser(model_config, aug_scale_min, aug_scale_max, flip_prob,
                               match_threshold, unmatched_threshold, source=file_pattern)
  sampling_lib.check_sampling(sampling, repeat_threshold, sampling_seed)
  if sampling == 'uniform':
    dataset = _records(file_pattern, input_context, training=True, cycle_length=cycle_length)
    dataset = dataset.shuffle(shuffle_buffer_size).repeat()
  else:  # Endless already: pass after pass of sampled records.
    dataset = sampling_lib.sampled_records(_list_files(file_pattern), sampling, input_context,
                                           sampling_seed, repeat_threshold, cycle_length)
    dataset = dataset.shuffle(shuffle_buffer_size)
  dataset = dataset.map(parse, num_parallel_calls=AUTOTUNE, deterministic=False)
  dataset = dataset.batch(_per_replica_batch(global_batch_size, input_context),
                          drop_remainder=True)
  return dataset.prefetch(AUTOTUNE)


@gin.configurable(denylist=['model_config', 'input_context'])
def build_eval_dataset(file_pattern: str,
                       global_batch_size: int,
                       model_config: Mapping[str, Any],
                       input_context: Optional[tf.distribute.InputContext] = None,
                       max_num_instances: int = 100,
                       cycle_length: int = 16) -> tf.data.Dataset:
  """One deterministic pass of (images, labels) batches for evaluation.

  Each image goes through `geometry.resize_and_pad` (resized to fit `image_size`, aspect ratio
  kept, no jitter, zero-padded at the bottom / right). Labels: 'image_info' [B, 4, 2] (TFM's,
  from `resize_and_pad`: what `geometry.to_original_image` needs), 'source_id' [B] string, and
  'groundtruths': 'boxes' [B, max_num_instances, 4] (ymin, xmin, ymax, xmax in original pixels;
  padding -1), 'classes' (dataset ids; padding -1), 'is_crowd' (padding False), 'area' (padding
  -1), 'num_instances' [B], 'height', 'width' [B]. An image with more than `max_num_instances`
  objects keeps the first ones, with a warning on stderr. The last batch may be smaller.
  """
  geometry, num_classes = _model_settings(model_config)

  def parse(serialized):
    data = tfexample.decode_example(serialized)
    classes = _checked_classes(data, num_classes, file_pattern)
    image, image_info = geometry_lib.resize_and_pad(data['image'], geometry.image_size)
    num_instances = tf.shape(classes)[0]
    if num_instances > max_num_instances:
      tf.print('WARNING: image', data['source_id'], 'in', file_pattern, 'has', num_instances,
               'ground-truth objects; evaluation keeps the first', max_num_instances,
               '(build_eval_dataset.max_num_instances)', output_stream=sys.stderr)
    boxes = box_ops.denormalize_boxes(data['boxes'], tf.shape(data['image'])[:2])

    def pad(values, value):
      return preprocess_ops.clip_or_pad_to_fixed_size(values, max_num_instances, value)

    groundtruths = {
        'boxes': pad(boxes, -1.0),
        'classes': pad(classes, -1),
        'is_crowd': tf.cast(pad(tf.cast(data['is_crowd'], tf.int32), 0), tf.bool),
        'area': pad(data['area'], -1.0),
        'num_instances': tf.minimum(num_instances, max_num_instances),
        'height': data['height'],
        'width': data['width'],
    }
    labels = {'image_info': image_info, 'source_id': data['source_id'],
              'groundtruths': groundtruths}
    return image, labels

  dataset = _records(file_pattern, input_context, training=False, cycle_length=cycle_length)
  dataset = dataset.map(parse, num_parallel_calls=AUTOTUNE)
  dataset = dataset.batch(_per_replica_batch(global_batch_size, input_context))
  return dataset.prefetch(AUTOTUNE)
