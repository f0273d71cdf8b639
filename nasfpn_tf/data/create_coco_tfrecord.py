r"""Converts a COCO instances json + image folder into sharded detection TFRecords.

  python -m nasfpn_tf.data.create_coco_tfrecord \
      --annotations_file=coco/annotations/instances_train2017.json \
      --image_dir=coco/train2017 --output_prefix=/data/coco/train --num_shards=32

Writes `{prefix}-00000-of-00032.tfrecord` ... and `{prefix}-label_map.json` (category id -> name),
then prints one JSON line on stdout saying what was written, converted, clipped and skipped (and
why), so a partly broken dataset never loses data silently. Examples use the TFM keys of
`nasfpn_tf.data.tfexample`; class labels are the json's own category ids.

Repeating the three flags converts several splits in one process (one TensorFlow start; what
`make demo` runs), paired by position and converted in that order, one JSON line each, as
separate runs would write them:

  python -m nasfpn_tf.data.create_coco_tfrecord --num_shards=2 \
      --annotations_file=data/annotations/instances_train.json --image_dir=data/train \
      --output_prefix=records/train \
      --annotations_file=data/annotations/instances_val.json --image_dir=data/val \
      --output_prefix=records/val
"""
import collections
import concurrent.futures
import io
import json
import math
import os
import sys

from absl import app
from absl import flags
from absl import logging
from PIL import Image
import tensorflow as tf

from nasfpn_tf.data import label_map
from nasfpn_tf.data import tfexample
from nasfpn_tf.utils import files

JPEG_QUALITY = 95
_CHUNK = 256  # Images decoded ahead of the writer; bounds memory on full COCO.


class CocoFormatError(ValueError):
  """The annotations file is unreadable or not COCO instances json (message names the file)."""


class _SkipImage(Exception):
  """An image that cannot go into the records: `reason` is its summary key."""

  def __init__(self, reason, detail):
    super().__init__(detail)
    self.reason = reason


def shard_paths(output_prefix, num_shards):
  """The shard file names, in shard order."""
  return [f'{output_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord' for i in range(num_shards)]


def load_coco(annotations_file):
  """Reads and checks the json; returns (images, categories {id: name}, annotations)."""
  try:
    with open(annotations_file, encoding='utf-8') as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise CocoFormatError(f'{annotations_file}: annotations file not found') from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CocoFormatError(f'{annotations_file}: not valid JSON ({e})') from e
  if not isinstance(data, dict) or not isinstance(data.get('images'), list) or not isinstance(
      data.get('categories'), list):
    raise CocoFormatError(f'{annotations_file}: not COCO instances json (needs "images" and '
                          '"categories" lists)')
  annotations = data.get('annotations', [])  # Absent in test-dev style files: all negatives.
  if not isinstance(annotations, list):
    raise CocoFormatError(f'{annotations_file}: "annotations" is not a list')

  categories = {}
  for i, category in enumerate(data['categories']):
    if not isinstance(category, dict) or not isinstance(category.get('id'), int) or not isinstance(
        category.get('name'), str):
      raise CocoFormatError(f'{annotations_file}: categories[{i}] needs an integer "id" and a '
                            f'"name", got {category!r}')
    if category['id'] in categories:
      raise CocoFormatError(f'{annotations_file}: category id {category["id"]} appears twice')
    categories[category['id']] = category['name']

  seen_ids = set()
  for i, image in enumerate(data['images']):
    if not isinstance(image, dict) or 'id' not in image or not isinstance(
        image.get('file_name'), str):
      raise CocoFormatError(f'{annotations_file}: images[{i}] needs "id" and "file_name", got '
                            f'{image!r}')
    if image['id'] in seen_ids:
      raise CocoFormatError(f'{annotations_file}: image id {image["id"]} appears twice')
    seen_ids.add(image['id'])
  return data['images'], categories, annotations


def convert_box(bbox, height, width):
  """COCO [x, y, w, h] pixels -> (skip reason or None, normalized yxyx box, whether clipped).

  Boxes partly outside the image are clipped to it; degenerate (w or h <= 0) and fully outside
  boxes are skipped with a reason.
  """
  if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or
      not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
    return 'malformed_bbox', None, False
  x, y, w, h = (float(v) for v in bbox)
  if w <= 0 or h <= 0:
    return 'degenerate', None, False
  x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
  if x1 <= x0 or y1 <= y0:
    return 'outside_image', None, False
  clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
  return None, [y0 / height, x0 / width, y1 / height, x1 / width], clipped


def read_image(path):
  """Returns (RGB JPEG bytes, height, width, conversion or None); raises _SkipImage.

  The file is fully decoded with PIL so corrupt or truncated images are caught here, not in
  training. Anything but an RGB JPEG (grayscale, CMYK, PNG, ...) is re-encoded as RGB JPEG and
  the conversion is returned as 'FORMAT/MODE'.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError as e:
    raise _SkipImage('missing_file', f'{path}: image file not found') from e
  except OSError as e:
    raise _SkipImage('unreadable_file', f'{path}: cannot read ({e})') from e
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      width, height = image.size
      if image.format == 'JPEG' and image.mode == 'RGB':
        return data, height, width, None
      conversion = f'{image.format}/{image.mode}'
      out = io.BytesIO()
      image.convert('RGB').save(out, format='JPEG', quality=JPEG_QUALITY)
      return out.getvalue(), height, width, conversion
  except Exception as e:  # pylint: disable=broad-except  # Any decoder failure means unusable.
    raise _SkipImage('undecodable', f'{path}: cannot decode image ({type(e).__name__}: {e})') from e


def _group_annotations(annotations, image_ids, categories, skipped_boxes):
  """{image id: [annotation]} for annotations whose image and category exist; counts the rest."""
  by_image = collections.defaultdict(list)
  for annotation in annotations:
    if not isinstance(annotation, dict):
      skipped_boxes['malformed_annotation'] += 1
    elif annotation.get('image_id') not in image_ids:
      skipped_boxes['unknown_image_id'] += 1
    elif annotation.get('category_id') not in categories:
      skipped_boxes['unknown_category_id'] += 1
    else:
      by_image[annotation['image_id']].append(annotation)
  return by_image


def convert(annotations_file, image_dir, output_prefix, num_shards=1, num_threads=8):
  """Writes the shards and the label map; returns the summary dict that the CLI prints."""
  if not os.path.isdir(image_dir):
    raise CocoFormatError(f'--image_dir {image_dir}: not a folder')
  images, categories, annotations = load_coco(annotations_file)
  skipped_boxes = collections.Counter()
  by_image = _group_annotations(annotations, {image['id'] for image in images}, categories,
                                skipped_boxes)

  counts = collections.Counter()
  skipped_image_files = collections.defaultdict(list)
  converted = collections.Counter()
  size_mismatches = []
  paths = shard_paths(output_prefix, num_shards)
  if os.path.dirname(output_prefix):
    tf.io.gfile.makedirs(os.path.dirname(output_prefix))
  # Shards are written under staging names and renamed into place at the end: a reader never
  # sees half a conversion, and a killed one leaves the earlier shards as they were.
  staged = [files.staging_path(path) for path in paths]
  writers = [tf.io.TFRecordWriter(path) for path in staged]

  def load(image):
    try:
      return read_image(os.path.join(image_dir, image['file_name']))
    except _SkipImage as skip:
      return skip

  try:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for start in range(0, len(images), _CHUNK):
        chunk = images[start:start + _CHUNK]
        for image, loaded in zip(chunk, pool.map(load, chunk)):
          image_annotations = by_image.get(image['id'], [])
          if isinstance(loaded, _SkipImage):
            logging.warning('Skipping image id %s: %s', image['id'], loaded)
            skipped_image_files[loaded.reason].append(image['file_name'])
            skipped_boxes['image_skipped'] += len(image_annotations)
            continue
          encoded, height, width, conversion = loaded
          if conversion:
            converted[conversion] += 1
          if (image.get('height'), image.get('width')) != (height, width):
            size_mismatches.append({'file': image['file_name'],
                                    'json_hw': [image.get('height'), image.get('width')],
                                    'actual_hw': [height, width]})
          boxes, classes, texts, crowd, areas = [], [], [], [], []
          for annotation in image_annotations:
            reason, box, clipped = convert_box(annotation.get('bbox'), height, width)
            if reason:
              skipped_boxes[reason] += 1
              continue
            counts['clipped_boxes'] += clipped
            is_crowd = int(bool(annotation.get('iscrowd', 0)))
            counts['crowd_boxes'] += is_crowd
            boxes.append(box)
            classes.append(annotation['category_id'])
            texts.append(categories[annotation['category_id']])
            crowd.append(is_crowd)
            area = annotation.get('area')
            areas.append(area if isinstance(area, (int, float)) and area > 0 else
                         (box[2] - box[0]) * height * (box[3] - box[1]) * width)
          example = tfexample.encode_example(encoded, height, width, image['id'],
                                             image['file_name'], boxes, classes, texts, crowd, areas)
          writers[counts['images_written'] % num_shards].write(example)
          counts['images_written'] += 1
          counts['boxes_written'] += len(boxes)
          counts['negative_images'] += not boxes
        logging.info('Processed %d / %d images', min(start + _CHUNK, len(images)), len(images))
    for writer in writers:
      writer.close()
    # A rerun with another --num_shards must not leave the earlier run's shards beside the new
    # ones: `{prefix}-*.tfrecord`, what training reads, would take both.
    stale = sorted(set(tf.io.gfile.glob(f'{output_prefix}-?????-of-?????.tfrecord')) - set(paths))
    for path in stale:
      tf.io.gfile.remove(path)
    for staging, path in zip(staged, paths):
      tf.io.gfile.rename(staging, path, overwrite=True)
  finally:
    for staging in staged:  # Left only by a failed conversion.
      if tf.io.gfile.exists(staging):
        tf.io.gfile.remove(staging)

  label_map.write_label_map(label_map.records_label_map_path(output_prefix), categories)
  return {
      'images_written': counts['images_written'],
      'boxes_written': counts['boxes_written'],
      'crowd_boxes': counts['crowd_boxes'],
      'clipped_boxes': counts['clipped_boxes'],
      'negative_images': counts['negative_images'],
      'converted_images': dict(sorted(converted.items())),
      'size_mismatches': size_mismatches,
      'skipped_images': {k: len(v) for k, v in sorted(skipped_image_files.items())},
      'skipped_image_files': dict(sorted(skipped_image_files.items())),
      'skipped_boxes': dict(sorted(skipped_boxes.items())),
      'num_shards': num_shards,
      'shards': paths,
      'removed_stale_shards': stale,
      'label_map': label_map.records_label_map_path(output_prefix),
      'categories': {str(k): v for k, v in sorted(categories.items())},
  }


def paired_conversions(annotations_files, image_dirs, output_prefixes):
  """The (annotations file, image dir, output prefix) of each conversion that the repeated flags
  name, paired by position; raises CocoFormatError naming the flags when their counts differ or
  two conversions would write the same prefix."""
  counts = [len(annotations_files), len(image_dirs), len(output_prefixes)]
  if len(set(counts)) > 1:
    raise CocoFormatError('--annotations_file, --image_dir and --output_prefix pair up by '
                          'position, one of each per conversion: got {}, {} and {}'.format(*counts))
  seen = set()
  for prefix in output_prefixes:
    if os.path.normpath(prefix) in seen:
      raise CocoFormatError(f'--output_prefix={prefix} is given twice: the second conversion '
                            'would overwrite the first')
    seen.add(os.path.normpath(prefix))
  return list(zip(annotations_files, image_dirs, output_prefixes))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  values = flags.FLAGS
  try:
    conversions = paired_conversions(values.annotations_file, values.image_dir,
                                     values.output_prefix)
    for annotations_file, image_dir, output_prefix in conversions:
      # One line per conversion as it finishes: a later failure keeps the earlier ones' lines.
      print(json.dumps(convert(annotations_file, image_dir, output_prefix, values.num_shards,
                               values.num_threads)), flush=True)
  except CocoFormatError as e:
    sys.exit(f'create_coco_tfrecord: {e}')


if __name__ == '__main__':
  # Defined only when run: the module is also a library (the search's held-out split, the
  # experiments), imported beside flags of the importer's own such as --num_threads.
  flags.DEFINE_multi_string('annotations_file', None,
                            'COCO instances json (e.g. annotations/instances_train2017.json). '
                            'Repeat the three flags to convert several splits in one process, '
                            'paired by position, in order.')
  flags.DEFINE_multi_string('image_dir', None,
                            "Folder that the json's image `file_name`s are relative to.")
  flags.DEFINE_multi_string('output_prefix', None,
                            'Output path prefix: shards go to {prefix}-SSSSS-of-NNNNN.tfrecord '
                            'and the category map to {prefix}-label_map.json, written after the '
                            'shards; missing folders are created.')
  flags.DEFINE_integer('num_shards', 1, 'Number of TFRecord shards (of each conversion); written '
                       'images go round robin in json order.', lower_bound=1)
  flags.DEFINE_integer('num_threads', 8, 'Threads reading, checking and re-encoding images.',
                       lower_bound=1)
  flags.mark_flags_as_required(['annotations_file', 'image_dir', 'output_prefix'])
  app.run(main)
