"""The CPU proxy's cache: what every trial of a search shares, built once and then only read.

NAS-FCOS (seed 003) trains each sampled decoder on features of a frozen backbone computed once:
a trial then pays for the pyramid and the head, not for the backbone or the input pipeline. Here
one cache holds, for given settings (the `CpuProxyCache` bindings, the model's, the data and the
backbone checkpoint, hashed into its folder name):

  records/   the images, training images only, split by `search.heldout` into proxy_train and
             proxy_heldout records (the reward split is carved from training images): the
             embedded synthetic dataset (`data.synthetic`, what `make demo` trains on) by
             default, or the user's converter records `DATA_DIR/train-*.tfrecord` (`data_dir`);
  pretrain/  a model dir where the backbone was trained once (a RetinaNet with the
             `pretrain_block_specs` pyramid, `RetinaNetTrainer`), then frozen; none when
             `pretrain_steps` is 0 (a randomly initialised frozen backbone) or when the backbone
             comes from `backbone_checkpoint` (frozen as read, not trained);
  features/  train.npz: C3..C5 of every proxy_train image (float16) with its anchor labels
             (the train pipeline's step without augmentation); heldout.npz: C3..C5 of every
             held-out image with the eval pipeline's labels (ground truth, image_info);
             heldout_targets.npz: the held-out images' anchor labels, as train.npz's, for the
             held-out loss (added to a cache built before it existed, by `prepare`);
  head.npz   the pretraining model's head weights, a trial's optional starting point (none when
             the backbone comes from a checkpoint);
  cache.json the settings, sizes, timings and the held-out AP of the pretraining model.

The end-to-end proxy (`search.proxy`, proxy='e2e') builds the same cache for its own gin config
and trains on its records/ from its pretrain/ backbone (`pretrained_backbone`); it reads none of
the features.

The data and the checkpoint enter the key by content (`cache_inputs`: each file's name, size and
SHA-256), not by path: a copied data dir finds its cache, and edited records or another checkpoint
never do. The arrays' layout and dtypes are `feature_arrays`'.

The folder appears complete or not at all (`utils.files.atomic_directory`), files are added to it
only whole (`utils.files.atomic_write`), and one process builds it while the others wait on a lock
file beside it, so parallel trials of a search (Ray workers on one machine) share one build.
Paths are local (the lock is `fcntl.flock`). This module reads the parsed gin config but never
parses one: `search.proxy` does, once.
"""
import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import os
import shutil
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import gin
import numpy as np
import tensorflow as tf
import tf_keras

from nasfpn_tf.data import input_pipeline
from nasfpn_tf.data import synthetic
from nasfpn_tf.evaluation import evaluate
from nasfpn_tf.models import backbones
from nasfpn_tf.models import factory
from nasfpn_tf.search import cache_inputs
from nasfpn_tf.search import feature_arrays
from nasfpn_tf.search import heldout
from nasfpn_tf.training import distribute
from nasfpn_tf.training import init_checkpoint
from nasfpn_tf.training import precision
from nasfpn_tf.training import schedules
from nasfpn_tf.training import trainer as trainer_lib
from nasfpn_tf.utils import files

CACHE_FILE = 'cache.json'
# The pretraining model's head weights (Keras order), which trials may start from.
HEAD_FILE = 'head.npz'
HELDOUT_TARGETS_FILE = os.path.join('features', 'heldout_targets.npz')
CACHES_DIR = 'cpu_proxy_cache'
# The cache's folders of split records and of the backbone's pretraining.
RECORDS, PRETRAIN = 'records', 'pretrain'
# Fewest images either split may hold (held-out AP on fewer is not a reward).
MIN_SPLIT_IMAGES = 8


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CpuProxyCache:
  """What the cache holds (gin `CpuProxyCache.<field>`); every field is part of its key.

  num_images: synthetic training images generated at the model's image size (the demo's
    generator and seed convention); num_heldout of them, drawn with data_seed, are the reward
    split, the rest the proxy's training split. With the user's records (`data_dir`): the most
    images used (a draw with data_seed when there are more); from fewer, the held-out share
    stays num_heldout / num_images (`split_sizes`).
  pretrain_steps: steps of the one-off backbone training (0: the backbone stays at its random
    initialisation; unused with a backbone checkpoint); its model is the proxy's with
    `pretrain_block_specs` stacked once at `pretrain_filters` and a 4-conv head as wide
    (`pretrain_overrides`), trained with batch `pretrain_batch_size`, a cosine from
    `pretrain_learning_rate` after `pretrain_warmup_steps`, the gin's `build_train_dataset`
    augmentation, in `mixed_precision` (bfloat16 where the trainer trusts it).
  """
  num_images: int = 1200
  num_heldout: int = 400
  data_seed: int = 0
  pretrain_steps: int = 400
  pretrain_block_specs: str = 'fpn'
  pretrain_filters: int = 64
  pretrain_batch_size: int = 8
  pretrain_learning_rate: float = 0.04
  pretrain_warmup_steps: int = 100
  mixed_precision: Optional[str] = 'bfloat16'


def split_sizes(settings: CpuProxyCache, num_records: int) -> Tuple[int, int]:
  """(images used, images held out) of `num_records` user records: min(num_images, num_records)
  used, num_heldout of num_images held out, or from fewer images the same share (rounded).
  ValueError naming the bindings when either split would hold fewer than MIN_SPLIT_IMAGES."""
  used = min(settings.num_images, num_records)
  held = min(settings.num_heldout, round(settings.num_heldout * used / settings.num_images))
  if held < MIN_SPLIT_IMAGES or used - held < MIN_SPLIT_IMAGES:
    raise ValueError(
        f'{num_records} images are too few for the proxy\'s split: it holds out '
        f'{held} of {used} (CpuProxyCache.num_heldout = {settings.num_heldout} of '
        f'CpuProxyCache.num_images = {settings.num_images}) and each split needs at least '
        f'{MIN_SPLIT_IMAGES}; add images, or bind a larger num_heldout / num_images share.')
  return used, held


def pretrain_overrides(settings: CpuProxyCache) -> Dict[str, Any]:
  """The build_retinanet bindings of the pretraining model over the proxy's own: a fixed pyramid
  and the demo's head, so that the trial's pyramid and head settings share one cache."""
  return {'block_specs': settings.pretrain_block_specs, 'num_repeats': 1,
          'num_filters': settings.pretrain_filters, 'use_separable_conv': False,
          'head_num_convs': 4, 'head_num_filters': settings.pretrain_filters,
          'head_use_separable_conv': False, 'pyramids': None}


# The key and the folder.


def cache_key(settings: CpuProxyCache, data: Optional[Mapping[str, Any]] = None,
              backbone: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
  """Everything a cache depends on, from the parsed gin config: its settings and the model
  (image size, backbone, anchors, classes ...) its backbone and labels were made for; with the
  user's data or a backbone checkpoint, their fingerprints (`data_fingerprint`,
  `checkpoint_fingerprint`). The synthetic data's key holds neither, as before they existed."""
  model = {**factory.bound_model_arguments(), **pretrain_overrides(settings)}
  del model['pyramids']  # None (the pretraining stacks one pyramid), as before it existed
  # The precision the backbone trains in on this machine, not only the one asked for: a cache
  # copied between machines that decide differently is not taken for the other's.
  trained_in = precision.training_precision(settings.mixed_precision)[0]
  key = {'cache': dataclasses.asdict(settings), 'model': model,
         'trained_in': precision.POLICIES[trained_in]}
  if data is not None:
    key['data'] = dict(data)
  if backbone is not None:
    key['backbone_checkpoint'] = dict(backbone)
  return key


def cache_path(work_dir: str, key: Mapping[str, Any]) -> str:
  digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
  return os.path.join(work_dir, CACHES_DIR, digest[:16])


def prepare(work_dir: str, data_dir: Optional[str] = None,
            backbone_checkpoint: Optional[str] = None) -> Tuple[str, bool]:
  """(the cache folder for the parsed gin config and this data and backbone, whether this call
  built it). A build binds the pretraining's gin (the caller parses its config again); either
  way the folder ends with its held-out targets. ValueError naming the data, the binding or the
  checkpoint at fault, raised before anything trains on them."""
  settings = CpuProxyCache()
  memo_dir = os.path.join(work_dir, CACHES_DIR)
  tf.io.gfile.makedirs(memo_dir)
  data = cache_inputs.data_fingerprint(data_dir, memo_dir) if data_dir else None
  backbone = (cache_inputs.checkpoint_fingerprint(backbone_checkpoint, memo_dir)
              if backbone_checkpoint else None)
  key = cache_key(settings, data, backbone)
  path = cache_path(work_dir, key)
  model_config = {name: factory.model_argument(name) for name in factory.MODEL_ARGUMENTS}
  if data_dir:
    cache_inputs.check_label_map(data_dir, model_config['num_classes'])
  built = False
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not tf.io.gfile.exists(os.path.join(path, CACHE_FILE)):
      for stale in tf.io.gfile.glob(files.staging_path(path).rsplit('-', 1)[0] + '-*'):
        shutil.rmtree(stale, ignore_errors=True)  # Left by a killed builder.
      with files.atomic_directory(path) as staging:
        _build(staging, settings, key, data_dir, backbone_checkpoint)
      built = True
    if not tf.io.gfile.exists(os.path.join(path, HELDOUT_TARGETS_FILE)):
      _write_heldout_targets(path, model_config)
  return path, built


def pretrained_backbone(folder: str) -> Optional[str]:
  """The model dir in the cache `folder` whose backbone was pretrained on the proxy's images (for
  `RetinaNetTrainer.init_checkpoint`), or None when there is none (a backbone checkpoint's cache,
  or `pretrain_steps` 0)."""
  path = os.path.join(folder, PRETRAIN)
  return path if tf.train.latest_checkpoint(path) else None


def _say(message: str) -> None:
  print(f'[cpu proxy cache {time.strftime("%H:%M:%S")}] {message}', flush=True)


def _user_records(records: str, settings: CpuProxyCache, data_dir: str) -> Dict[str, int]:
  """The user's records split into `records` (proxy_train / proxy_heldout); {split: images}."""
  pattern = cache_inputs.data_pattern(data_dir)
  num_records = heldout.count_records(pattern, factory.model_argument('num_classes'))
  used, held = split_sizes(settings, num_records)
  _say(f'{num_records} images in {pattern}: {held} held out for the reward, '
       f'{used - held} to train on' + (f' ({num_records - used} left out).'
                                        if used < num_records else '.'))
  return heldout.split_records(pattern, records, held, settings.data_seed, num_used=used)


def _synthetic_records(records: str, settings: CpuProxyCache, folder: str) -> Dict[str, int]:
  """The embedded synthetic images, split into `records`; {split: images}."""
  raw = os.path.join(folder, 'raw')
  _say(f'Generating {settings.num_images} synthetic training images in {raw}.')
  synthetic.generate(raw, num_train=settings.num_images, num_val=0,
                     image_size=max(factory.model_argument('image_size')),
                     seed=settings.data_seed, num_processes=2)  # the same bytes as one
  summary = heldout.make_proxy_records(
      os.path.join(raw, 'annotations', 'instances_train.json'), os.path.join(raw, 'train'),
      records, settings.num_heldout, settings.data_seed, num_shards=1, num_threads=2)
  shutil.rmtree(raw)
  return {split: summary[split]['images_written'] for split in summary}


def _build(folder: str, settings: CpuProxyCache, key, data_dir: Optional[str],
           backbone_checkpoint: Optional[str]) -> None:
  """Writes every part of the cache into `folder` (see the module doc), for the parsed gin
  config (which it changes to pretrain)."""
  started = time.perf_counter()
  seconds = {}
  records = os.path.join(folder, RECORDS)
  if data_dir:
    converted = _user_records(records, settings, data_dir)
  else:
    converted = _synthetic_records(records, settings, folder)
  seconds['data'] = time.perf_counter() - started

  start = time.perf_counter()
  train_pattern = heldout.record_pattern(records, heldout.TRAIN_PREFIX)
  gin.bind_parameter('build_train_dataset.file_pattern', train_pattern)
  for name, value in pretrain_overrides(settings).items():
    gin.bind_parameter(f'build_retinanet.{name}', value)
  if backbone_checkpoint:
    model = _checkpoint_model(backbone_checkpoint)
  else:
    model = _pretrained_model(os.path.join(folder, PRETRAIN), settings)
  seconds['pretrain'] = time.perf_counter() - start

  start = time.perf_counter()
  model_config = model.get_config()
  normalize = backbones.ImageNormalization()

  @tf.function
  def extract(images):
    return model.backbone(normalize(images), training=False)

  heldout_pattern = heldout.record_pattern(records, heldout.HELDOUT_PREFIX)
  heldout_dataset = input_pipeline.build_eval_dataset(heldout_pattern, feature_arrays.BATCH,
                                                      model_config)
  pretrain_ap = None
  if not backbone_checkpoint:  # A checkpoint's backbone comes without a trained head.
    pretrain_ap = evaluate.evaluate_detector(tf.function(model.detect),
                                             heldout_dataset).metrics['AP']
  splits = {'train': feature_arrays.anchor_labeled(train_pattern, model_config),
            'heldout': heldout_dataset}
  sizes = {}
  tf.io.gfile.makedirs(os.path.join(folder, 'features'))
  for split, dataset in splits.items():
    arrays = feature_arrays.features_and_labels(extract, dataset, model_config['num_classes'])
    sizes[split] = len(next(iter(arrays.values())))
    np.savez(os.path.join(folder, 'features', f'{split}.npz'), **arrays)
  if not backbone_checkpoint:
    np.savez(os.path.join(folder, HEAD_FILE), *model.head.get_weights())
  seconds['features'] = time.perf_counter() - start
  seconds['total'] = time.perf_counter() - started
  files.atomic_write(os.path.join(folder, CACHE_FILE), json.dumps({
      'key': key, 'images': sizes, 'pretrain_heldout_ap': pretrain_ap,
      'data_dir': data_dir, 'backbone_checkpoint': backbone_checkpoint,
      'converted': converted, 'seconds': {k: round(v, 1) for k, v in seconds.items()}},
      indent=1, default=str))
  ap_note = (f'held-out AP of the pretraining model {pretrain_ap:.3f}' if pretrain_ap is not None
             else f'backbone from {backbone_checkpoint}')
  _say(f'Cache built in {seconds["total"]:.0f} s: {sizes}, {ap_note}.')


def _write_heldout_targets(path: str, model_config) -> None:
  """features/heldout_targets.npz: the held-out images' anchor labels, in heldout.npz's order
  (checked by source id), for the held-out loss."""
  pattern = heldout.record_pattern(os.path.join(path, RECORDS), heldout.HELDOUT_PREFIX)
  arrays = feature_arrays.anchor_targets(pattern, model_config)
  with np.load(os.path.join(path, 'features', 'heldout.npz')) as cached:
    cached_ids = [int(i) for i in cached['labels/source_id']]
  if heldout.records_image_ids(pattern) != tuple(cached_ids):
    raise RuntimeError(f'{path}: the held-out records and heldout.npz list other images; '
                       'delete the folder to rebuild the cache.')
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  files.atomic_write(os.path.join(path, HELDOUT_TARGETS_FILE), buffer.getvalue())


def _checkpoint_model(path: str):
  """The gin model (pretraining overrides bound) with its backbone read from `path`; ValueError
  naming --backbone_checkpoint when it holds no backbone that fits."""
  model = factory.build_retinanet()
  try:
    read = init_checkpoint.initialize(model, path, 'backbone')
  except init_checkpoint.InitCheckpointError as e:
    raise ValueError(f'--backbone_checkpoint={path} does not fit the proxy\'s backbone '
                     f'(build_retinanet.backbone = {factory.model_argument("backbone")!r}): '
                     f'{e}') from e
  _say(f'Backbone read from {read}, frozen as it is.')
  return model


def _pretrained_model(model_dir: str, settings: CpuProxyCache):
  """The gin model with its backbone trained `pretrain_steps` steps, or freshly initialised
  (seeded with data_seed) when pretrain_steps is 0."""
  tf_keras.utils.set_random_seed(settings.data_seed)
  if not settings.pretrain_steps:
    return factory.build_retinanet()
  trainer = trainer_lib.RetinaNetTrainer(
      model_dir, distribute.get_strategy('auto'), mode='train',
      learning_rate=schedules.CosineDecayWithWarmup(
          settings.pretrain_learning_rate, total_steps=settings.pretrain_steps,
          warmup_steps=min(settings.pretrain_warmup_steps, settings.pretrain_steps - 1),
          warmup_learning_rate=settings.pretrain_learning_rate / 6),
      train_steps=settings.pretrain_steps, global_batch_size=settings.pretrain_batch_size,
      mixed_precision=settings.mixed_precision, checkpoint_every_steps=settings.pretrain_steps,
      log_every_steps=max(1, settings.pretrain_steps // 5), eval_every_steps=None)
  trainer.train()
  return trainer.model


@functools.lru_cache(maxsize=1)
def load(path: str) -> Dict[str, Any]:
  """{'train': {'features': {level: tensor}, 'labels': {...}}, 'heldout': {'features', 'labels',
  'targets': the anchor labels}, 'info': the cache.json, 'head': the pretraining head's weights
  (arrays; None when the backbone came from a checkpoint)}, read once per process (trials in one
  process share it). The folder is `prepare`'s."""
  loaded = {}
  for split, name in (('train', 'train.npz'), ('heldout', 'heldout.npz'),
                      ('heldout', 'heldout_targets.npz')):
    with np.load(os.path.join(path, 'features', name)) as arrays:
      # Tensors made once: trials that copied the arrays anew each leaked them (~1 GB a trial).
      loaded.setdefault(split, {}).update(
          feature_arrays.unflatten({key: tf.constant(arrays[key]) for key in arrays.files}))
  with tf.io.gfile.GFile(os.path.join(path, CACHE_FILE)) as f:
    loaded['info'] = json.load(f)
  loaded['head'] = None
  if tf.io.gfile.exists(os.path.join(path, HEAD_FILE)):
    with np.load(os.path.join(path, HEAD_FILE)) as arrays:
      loaded['head'] = [arrays[f'arr_{i}'] for i in range(len(arrays.files))]
  return loaded
