r"""Overfits a small NAS-FPN RetinaNet on coco128: real COCO images, ids and evaluation end to end.

  .venv/bin/python experiments/overfit_coco128.py                      # ../shared/data/coco128
  .venv/bin/python experiments/overfit_coco128.py --data_dir=/data/coco128 --work_dir=/tmp/o

Takes any folder laid out like coco128 (`train2017/*.jpg` and
`annotations/instances_train2017.json`; default `$NASFPN_COCO128`, else `../shared/data/coco128`
beside the repository). It

1. converts the images with the package's converter (`create_coco_tfrecord.convert`) into
   `<work_dir>/records/train-*.tfrecord`;
2. builds `RetinaNetTrainer` from gin_configs/overfit_coco128.gin (a small model, 91 classes:
   COCO's own category ids, no remapping), with train and eval sets both those records and
   `eval_annotation_file` the original json, so the metrics are COCOeval against COCO's own
   annotations;
3. evaluates the untrained model, trains (`RetinaNetTrainer.train`, progress lines as in
   `nasfpn_tf.main`), evaluates again.

The last line on stdout is one JSON object with AP_before, AP50_before, AP_after, AP50_after and
train_seconds (plus train_steps, global_batch_size, precision: the Keras policy it trained in,
image_size and num_images). The model dir
`<work_dir>/model` is emptied first, so "before" is always the untrained model.
"""
import json
import os
import pathlib
import shutil
import sys
import time

from absl import app
from absl import flags
import tensorflow as tf

from nasfpn_tf import config
from nasfpn_tf.data import create_coco_tfrecord
from nasfpn_tf.training import distribute
from nasfpn_tf.training import precision
from nasfpn_tf.training import trainer as trainer_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / 'shared' / 'data' / 'coco128'
ANNOTATIONS = pathlib.Path('annotations') / 'instances_train2017.json'
IMAGES = pathlib.Path('train2017')

_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'coco128-like folder (train2017/, annotations/instances_train2017.json); '
    f'default $NASFPN_COCO128, else {DEFAULT_DATA_DIR}.')
_WORK_DIR = flags.DEFINE_string(
    'work_dir', 'runs/overfit_coco128', 'Where records/ and model/ go (model/ is emptied first).')
_GIN_FILE = flags.DEFINE_multi_string(
    'gin_file', ['overfit_coco128.gin'], 'Gin files (paths or names in gin_configs/).')
_GIN_BINDINGS = flags.DEFINE_multi_string(
    'gin_bindings', [], "Extra gin bindings, e.g. 'RetinaNetTrainer.train_steps = 100'.")


def _say(message):
  print(f'[overfit_coco128 {time.strftime("%H:%M:%S")}] {message}', flush=True)


def data_paths(data_dir=None):
  """(image folder, annotations json) of a coco128-like folder (None: $NASFPN_COCO128, else
  the shared sample); ValueError naming what is missing."""
  data_dir = pathlib.Path(data_dir or os.environ.get('NASFPN_COCO128') or DEFAULT_DATA_DIR)
  if not data_dir.is_dir():
    raise ValueError(f'{data_dir}: no such folder (pass --data_dir or set $NASFPN_COCO128 to a '
                     f'folder holding {IMAGES}/ and {ANNOTATIONS})')
  image_dir, annotations = data_dir / IMAGES, data_dir / ANNOTATIONS
  missing = [str(p) for p in (image_dir, annotations)
             if not (p.is_dir() if p == image_dir else p.is_file())]
  if missing:
    raise ValueError(f'{data_dir} is not laid out like coco128: missing {" and ".join(missing)}')
  return image_dir, annotations


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.get_logger().setLevel('WARNING')
  try:
    image_dir, annotations = data_paths(_DATA_DIR.value)
  except ValueError as e:
    sys.exit(f'overfit_coco128: error: {e}')
  work_dir = pathlib.Path(_WORK_DIR.value)
  records_prefix = str(work_dir / 'records' / 'train')
  model_dir = work_dir / 'model'

  started = time.perf_counter()
  _say(f'Converting {image_dir} with {annotations} -> {records_prefix}-*.tfrecord')
  try:
    summary = create_coco_tfrecord.convert(str(annotations), str(image_dir), records_prefix,
                                           num_shards=1, num_threads=4)
  except create_coco_tfrecord.CocoFormatError as e:
    sys.exit(f'overfit_coco128: error: {e}')
  if not summary['images_written']:
    sys.exit(f'overfit_coco128: error: no image of {annotations} could be read from {image_dir} '
             f"(skipped: {summary['skipped_images']})")
  _say(f"Converted {summary['images_written']} images, {summary['boxes_written']} boxes "
       f"({summary['crowd_boxes']} crowd), {len(summary['categories'])} categories, skipped "
       f"images {summary['skipped_images']}, boxes {summary['skipped_boxes']} "
       f'({time.perf_counter() - started:.1f} s).')

  pattern = records_prefix + '-*.tfrecord'
  bindings = [f'build_train_dataset.file_pattern = {pattern!r}',
              f'build_eval_dataset.file_pattern = {pattern!r}',
              f'RetinaNetTrainer.eval_annotation_file = {str(annotations)!r}'] + _GIN_BINDINGS.value
  try:
    config.parse_gin(_GIN_FILE.value, bindings)
  except ValueError as e:
    sys.exit(f'overfit_coco128: error: {e}')
  shutil.rmtree(model_dir, ignore_errors=True)
  start = time.perf_counter()
  trainer = trainer_lib.RetinaNetTrainer(str(model_dir), distribute.get_strategy('auto'),
                                         mode='train_and_eval')
  model_config = trainer.model.get_config()
  specs = model_config['block_specs']
  _say(f"Built the model ({trainer.model.count_params():,} params, {model_config['backbone']}, "
       f"{specs if isinstance(specs, str) else 'custom pyramid'} {model_config['num_repeats']}@"
       f"{model_config['num_filters']}, {'x'.join(str(s) for s in model_config['image_size'])} "
       f"px, {model_config['num_classes']} classes) in {time.perf_counter() - start:.1f} s.")

  _say('Evaluating the untrained model on the training images.')
  before = trainer.evaluate()
  _say(f'Training {trainer.train_steps} steps of {trainer.global_batch_size} images.')
  start = time.perf_counter()
  trainer.train()
  train_seconds = time.perf_counter() - start
  _say(f'Trained in {train_seconds:.1f} s. Evaluating the trained model on the same images.')
  after = trainer.evaluate()
  _say(f'Done in {time.perf_counter() - started:.1f} s; model in {model_dir}.')
  print(json.dumps({
      'AP_before': round(before['AP'], 4), 'AP50_before': round(before['AP50'], 4),
      'AP_after': round(after['AP'], 4), 'AP50_after': round(after['AP50'], 4),
      'train_seconds': round(train_seconds, 1), 'train_steps': trainer.train_steps,
      'global_batch_size': trainer.global_batch_size,
      'precision': precision.POLICIES[trainer.mixed_precision],
      'image_size': list(model_config['image_size']),
      'num_images': summary['images_written']}), flush=True)


if __name__ == '__main__':
  app.run(main)
