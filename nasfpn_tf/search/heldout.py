r"""The search's reward split: images held out from the TRAINING set, never the evaluation set.

The paper (§4.2) reserves 7,392 randomly selected COCO train2017 images to compute rewards and
trains proxy tasks on the rest; val2017 stays untouched for the final comparison. Both proxies
carve their split here: the CPU proxy from the embedded synthetic dataset's training images, the
paper proxy from COCO, once, with this command:

  python -m nasfpn_tf.search.heldout \
      --annotations_file=coco/annotations/instances_train2017.json --image_dir=coco/train2017 \
      --data_dir=records/proxy --num_heldout=7392 --num_shards=64

which writes `{data_dir}/proxy_train-*.tfrecord` and `{data_dir}/proxy_heldout-*.tfrecord` (the
`data_dir` of `run_trial(proxy='paper')`) with the package's converter, and one JSON line.

Records that the converter already wrote (`{prefix}-SSSSS-of-NNNNN.tfrecord`, the user's own data
for the CPU proxy) are split the same way by `split_records`, record by record. Both draw the
held-out images with `draw`: one seeded numpy permutation, the first `num_heldout` held out.
"""
import json
import os
from typing import Dict, Optional, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from nasfpn_tf.data import create_coco_tfrecord
from nasfpn_tf.data import label_map
from nasfpn_tf.data import tfexample
from nasfpn_tf.utils import files

TRAIN_PREFIX = 'proxy_train'
HELDOUT_PREFIX = 'proxy_heldout'
SPLITS = (TRAIN_PREFIX, HELDOUT_PREFIX)
# The paper's held-out count (of COCO train2017's 118,287 images).
PAPER_NUM_HELDOUT = 7392


def record_pattern(data_dir: str, split: str) -> str:
  """The converter shards of `split` (TRAIN_PREFIX or HELDOUT_PREFIX) in `data_dir`."""
  return os.path.join(data_dir, f'{split}-*.tfrecord')


def draw(num_images: int, num_heldout: int, seed: int = 0,
         num_used: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
  """(held-out, training) indices into `num_images` images, each sorted: a numpy permutation
  drawn with `seed`, whose first `num_heldout` entries are held out and the next
  `num_used - num_heldout` (default: all the rest) trained on. ValueError unless both splits are
  non-empty."""
  num_used = num_images if num_used is None else num_used
  if not 0 < num_heldout < num_used <= num_images:
    raise ValueError(f'cannot hold out {num_heldout} of {num_used} images (of {num_images}): '
                     'hold out at least one and leave at least one to train on.')
  order = np.random.default_rng(seed).permutation(num_images)
  return np.sort(order[:num_heldout]), np.sort(order[num_heldout:num_used])


def carve(annotations_file: str, output_dir: str, num_heldout: int,
          seed: int = 0) -> Dict[str, str]:
  """Splits a COCO instances json into {TRAIN_PREFIX: json, HELDOUT_PREFIX: json} in
  `output_dir`: `num_heldout` images drawn at random (numpy, `seed`) and the rest, each with its
  own annotations. ValueError naming the file when it cannot leave both splits non-empty."""
  images, categories, annotations = create_coco_tfrecord.load_coco(annotations_file)
  if not 0 < num_heldout < len(images):
    raise ValueError(f'num_heldout={num_heldout}: {annotations_file} has {len(images)} images; '
                     'hold out at least one and leave at least one to train on.')
  heldout_ids = {images[i]['id'] for i in draw(len(images), num_heldout, seed)[0]}
  with open(annotations_file, encoding='utf-8') as f:
    info = {k: v for k, v in json.load(f).items() if k not in ('images', 'annotations')}
  info['categories'] = [{'id': k, 'name': v} for k, v in sorted(categories.items())]
  paths = {}
  for split, held in ((TRAIN_PREFIX, False), (HELDOUT_PREFIX, True)):
    kept = [image for image in images if (image['id'] in heldout_ids) == held]
    kept_ids = {image['id'] for image in kept}
    subset = dict(info, images=kept,
                  annotations=[a for a in annotations if a.get('image_id') in kept_ids])
    paths[split] = os.path.join(output_dir, f'instances_{split}.json')
    files.atomic_write(paths[split], json.dumps(subset, separators=(',', ':')))
  return paths


def make_proxy_records(annotations_file: str, image_dir: str, data_dir: str, num_heldout: int,
                       seed: int = 0, num_shards: int = 1,
                       num_threads: int = 8) -> Dict[str, Dict]:
  """Carves the held-out split and converts both splits into `data_dir` (see the module doc);
  returns {split: the converter's summary}."""
  jsons = carve(annotations_file, data_dir, num_heldout, seed)
  return {split: create_coco_tfrecord.convert(jsons[split], image_dir,
                                              os.path.join(data_dir, split), num_shards,
                                              num_threads)
          for split in SPLITS}


def record_files(file_pattern: str) -> Sequence[str]:
  """The files `file_pattern` matches, sorted: the record order every split and count uses."""
  return sorted(tf.io.gfile.glob(file_pattern))


def count_records(file_pattern: str, num_classes: Optional[int] = None) -> int:
  """Reads every record `file_pattern` matches as a detection tf.Example (`tfexample`, image
  decoded) and returns how many there are. ValueError naming the file and record that does not
  parse, or, with `num_classes`, the first whose class ids are not in [1, num_classes)."""
  paths = record_files(file_pattern)
  if not paths:
    raise ValueError(f'no records match {file_pattern}.')
  count = 0
  for path in paths:
    index = -1
    try:
      for index, record in enumerate(tf.data.TFRecordDataset(path)):
        example = tfexample.decode_example(record)
        classes = example['classes'].numpy()
        if num_classes is not None and classes.size and not (
            classes.min() >= 1 and classes.max() < num_classes):
          raise ValueError(
              f'record file {path}: image source_id {example["source_id"].numpy().decode()} has '
              f'class ids {sorted(set(classes.tolist()))}, not all in [1, num_classes = '
              f'{num_classes}) (build_retinanet.num_classes; the label map beside the records '
              'sets it unless a binding does).')
        count += 1
    except tf.errors.OpError as e:
      raise ValueError(f'record file {path} does not parse as detection TFRecords (record '
                       f'{index + 1}: {e.message.splitlines()[0]}); convert the data with '
                       'nasfpn_tf.data.create_coco_tfrecord.') from None
  return count


def split_records(file_pattern: str, data_dir: str, num_heldout: int, seed: int = 0,
                  num_used: Optional[int] = None) -> Dict[str, int]:
  """Splits converted records (`file_pattern`, in `record_files` order) as `draw` does into
  `{data_dir}/proxy_train-00000-of-00001.tfrecord` and `proxy_heldout-...`, the records copied
  byte for byte, with the label map found beside the source records copied beside each; returns
  {split: records written}. Check the records first with `count_records`."""
  paths = record_files(file_pattern)
  num_images = sum(1 for _ in tf.data.TFRecordDataset(paths))
  heldout_indices, train_indices = draw(num_images, num_heldout, seed, num_used)
  chosen = {HELDOUT_PREFIX: set(heldout_indices.tolist()),
            TRAIN_PREFIX: set(train_indices.tolist())}
  source_map = label_map.find_records_label_map(file_pattern)
  tf.io.gfile.makedirs(data_dir)
  written = {}
  for split, indices in chosen.items():
    prefix = os.path.join(data_dir, split)
    with tf.io.TFRecordWriter(create_coco_tfrecord.shard_paths(prefix, 1)[0]) as writer:
      for index, record in enumerate(tf.data.TFRecordDataset(paths)):
        if index in indices:
          writer.write(record.numpy())
    written[split] = len(indices)
    if source_map:
      tf.io.gfile.copy(source_map, label_map.records_label_map_path(prefix), overwrite=True)
  return written


def records_image_ids(file_pattern: str) -> Tuple[int, ...]:
  """The source ids (COCO image ids) of the records `file_pattern` matches, in record order."""
  records = tf.data.TFRecordDataset(record_files(file_pattern))
  return tuple(int(tfexample.decode_example(r)['source_id'].numpy()) for r in records)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  values = flags.FLAGS
  summary = make_proxy_records(values.annotations_file, values.image_dir, values.data_dir,
                               values.num_heldout, values.seed, values.num_shards,
                               values.num_threads)
  print(json.dumps({split: {k: s[k] for k in ('images_written', 'boxes_written', 'shards')}
                    for split, s in summary.items()}))


if __name__ == '__main__':
  flags.DEFINE_string('annotations_file', None, 'COCO instances json of the TRAINING images.')
  flags.DEFINE_string('image_dir', None, "Folder that the json's image file names are in.")
  flags.DEFINE_string('data_dir', None, 'Where the two jsons and the proxy_train-*/'
                      'proxy_heldout-* records go.')
  flags.DEFINE_integer('num_heldout', PAPER_NUM_HELDOUT, 'Images held out for the reward.',
                       lower_bound=1)
  flags.DEFINE_integer('seed', 0, 'Seed of the random draw of held-out images.')
  flags.DEFINE_integer('num_shards', 64, 'Shards of each split.', lower_bound=1)
  flags.DEFINE_integer('num_threads', 8, 'Converter threads.', lower_bound=1)
  flags.mark_flags_as_required(['annotations_file', 'image_dir', 'data_dir'])
  app.run(main)
