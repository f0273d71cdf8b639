"""The CPU proxy's cache: what every trial of a search shares, built once and then only read.

NAS-FCOS (seed 003) trains each sampled decoder on features of a frozen backbone computed once:
a trial then pays for the pyramid and the head, not for the backbone or the input pipeline. Here
one cache holds, for given settings (the `CpuProxyCache` bindings and the model's, hashed into
its folder name):

  records/   the embedded synthetic dataset (`data.synthetic`, what `make demo` trains on),
             training images only, split by `search.heldout` into proxy_train and proxy_heldout
             records (the reward split is carved from training images);
  pretrain/  a model dir where the backbone was trained once (a RetinaNet with the
             `pretrain_block_specs` pyramid, `RetinaNetTrainer`), then frozen; none when
             `pretrain_steps` is 0 (a randomly initialised frozen backbone);
  features/  train.npz: C3..C5 of every proxy_train image (float16) with its anchor labels
             (the train pipeline's step without augmentation); heldout.npz: C3..C5 of every
             held-out image with the eval pipeline's labels (ground truth, image_info);
  head.npz   the pretraining model's head weights, a trial's optional starting point;
  cache.json the settings, sizes, timings and the held-out AP of the pretraining model.

The folder appears complete or not at all (`utils.files.atomic_directory`), and one process
builds it while the others wait on a lock file beside it, so parallel trials of a search (Ray
workers on one machine) share one build. Paths are local (the lock is `fcntl.flock`).
"""
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
from typing import Any, Dict, Mapping, Optional

import gin
import numpy as np
import tensorflow as tf
import tf_keras

from nasfpn_tf import config
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.data import synthetic
from nasfpn_tf.evaluation import evaluate
from nasfpn_tf.models import backbones
from nasfpn_tf.models import factory
from nasfpn_tf.search import heldout
from nasfpn_tf.training import distribute
from nasfpn_tf.training import precision
from nasfpn_tf.training import schedules
from nasfpn_tf.training import trainer as trainer_lib
from nasfpn_tf.utils import files

CACHE_FILE = 'cache.json'
# The pretraining model's head weights (Keras order), which trials may start from.
HEAD_FILE = 'head.npz'
FEATURE_DTYPE = np.float16
# Labels kept narrow in memory; trials cast them back for the loss.
_LABEL_DTYPES = {'cls_targets': np.int8, 'box_targets': np.float16, 'cls_weights': np.float16,
                 'box_weights': np.float16}
_BATCH = 32


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CpuProxyCache:
  """What the cache holds (gin `CpuProxyCache.<field>`); every field is part of its key.

  num_images: synthetic training images generated at the model's image size (the demo's
    generator and seed convention); num_heldout of them, drawn with data_seed, are the reward
    split, the rest the proxy's training split.
  pretrain_steps: steps of the one-off backbone training (0: the backbone stays at its random
    initialisation); its model is the proxy's with `pretrain_block_specs` stacked once at
    `pretrain_filters` and a 4-conv head as wide (`pretrain_overrides`), trained with batch
    `pretrain_batch_size`, a cosine from `pretrain_learning_rate` after
    `pretrain_warmup_steps`, the gin's `build_train_dataset` augmentation, in `mixed_precision`
    (bfloat16 where the trainer trusts it).
  """
  num_images: int = 2000
  num_heldout: int = 400
  data_seed: int = 0
  pretrain_steps: int = 1000
  pretrain_block_specs: str = 'fpn'
  pretrain_filters: int = 64
  pretrain_batch_size: int = 8
  pretrain_learning_rate: float = 0.04
  pretrain_warmup_steps: int = 100
  mixed_precision: Optional[str] = 'bfloat16'


def pretrain_overrides(settings: CpuProxyCache) -> Dict[str, Any]:
  """The build_retinanet bindings of the pretraining model over the proxy's own: a fixed pyramid
  and the demo's head, so that the trial's pyramid and head settings share one cache."""
  return {'block_specs': settings.pretrain_block_specs, 'num_repeats': 1,
          'num_filters': settings.pretrain_filters, 'use_separable_conv': False,
          'head_num_convs': 4, 'head_num_filters': settings.pretrain_filters,
          'head_use_separable_conv': False}


def cache_key(settings: CpuProxyCache) -> Dict[str, Any]:
  """Everything a cache depends on, from the parsed gin config: its settings and the model
  (image size, backbone, anchors, classes ...) its backbone and labels were made for."""
  model = {**factory.bound_model_arguments(), **pretrain_overrides(settings)}
  # The precision the backbone trains in on this machine, not only the one asked for: a cache
  # copied between machines that decide differently is not taken for the other's.
  trained_in = precision.training_precision(settings.mixed_precision)[0]
  return {'cache': dataclasses.asdict(settings), 'model': model,
          'trained_in': precision.POLICIES[trained_in]}


def cache_path(work_dir: str, key: Mapping[str, Any]) -> str:
  digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
  return os.path.join(work_dir, 'cpu_proxy_cache', digest[:16])


def prepare(work_dir: str, gin_files, gin_bindings) -> str:
  """The cache folder for the proxy gin config (`gin_files` + `gin_bindings`, parsed now),
  built first if missing; returns its path. Leaves that gin config parsed."""
  config.parse_gin(gin_files, gin_bindings)
  settings = CpuProxyCache()
  key = cache_key(settings)
  path = cache_path(work_dir, key)
  if tf.io.gfile.exists(os.path.join(path, CACHE_FILE)):
    return path
  tf.io.gfile.makedirs(os.path.dirname(path))
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not tf.io.gfile.exists(os.path.join(path, CACHE_FILE)):
      for stale in tf.io.gfile.glob(files.staging_path(path).rsplit('-', 1)[0] + '-*'):
        shutil.rmtree(stale, ignore_errors=True)  # Left by a killed builder.
      with files.atomic_directory(path) as staging:
        _build(staging, settings, key)
  config.parse_gin(gin_files, gin_bindings)
  return path


def _say(message: str) -> None:
  print(f'[cpu proxy cache {time.strftime("%H:%M:%S")}] {message}', flush=True)


def _build(folder: str, settings: CpuProxyCache, key) -> None:
  """Writes every part of the cache into `folder` (see the module doc), for the parsed gin
  config (which it changes to pretrain)."""
  started = time.perf_counter()
  seconds = {}
  model_image_size = factory.model_argument('image_size')
  raw = os.path.join(folder, 'raw')
  _say(f'Generating {settings.num_images} synthetic training images in {raw}.')
  synthetic.generate(raw, num_train=settings.num_images, num_val=0,
                     image_size=max(model_image_size), seed=settings.data_seed)
  records = os.path.join(folder, 'records')
  summary = heldout.make_proxy_records(
      os.path.join(raw, 'annotations', 'instances_train.json'), os.path.join(raw, 'train'),
      records, settings.num_heldout, settings.data_seed, num_shards=1, num_threads=2)
  shutil.rmtree(raw)
  seconds['data'] = time.perf_counter() - started

  start = time.perf_counter()
  train_pattern = heldout.record_pattern(records, heldout.TRAIN_PREFIX)
  gin.bind_parameter('build_train_dataset.file_pattern', train_pattern)
  for name, value in pretrain_overrides(settings).items():
    gin.bind_parameter(f'build_retinanet.{name}', value)
  model = _pretrained_model(os.path.join(folder, 'pretrain'), settings)
  seconds['pretrain'] = time.perf_counter() - start

  start = time.perf_counter()
  model_config = model.get_config()
  normalize = backbones.ImageNormalization()

  @tf.function
  def extract(images):
    return model.backbone(normalize(images), training=False)

  heldout_pattern = heldout.record_pattern(records, heldout.HELDOUT_PREFIX)
  pretrain_ap = evaluate.evaluate_detector(
      tf.function(model.detect),
      input_pipeline.build_eval_dataset(heldout_pattern, _BATCH, model_config)).metrics['AP']
  parse = input_pipeline.train_example_parser(model_config, aug_scale_min=1.0, aug_scale_max=1.0,
                                              flip_prob=0.0)
  splits = {
      'train': tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(train_pattern))).map(parse).batch(
          _BATCH),
      'heldout': input_pipeline.build_eval_dataset(heldout_pattern, _BATCH, model_config),
  }
  sizes = {}
  tf.io.gfile.makedirs(os.path.join(folder, 'features'))
  for split, dataset in splits.items():
    arrays = _features_and_labels(extract, dataset)
    sizes[split] = len(next(iter(arrays.values())))
    np.savez(os.path.join(folder, 'features', f'{split}.npz'), **arrays)
  np.savez(os.path.join(folder, HEAD_FILE), *model.head.get_weights())
  seconds['features'] = time.perf_counter() - start
  seconds['total'] = time.perf_counter() - started
  files.atomic_write(os.path.join(folder, CACHE_FILE), json.dumps({
      'key': key, 'images': sizes, 'pretrain_heldout_ap': pretrain_ap,
      'converted': {s: summary[s]['images_written'] for s in summary},
      'seconds': {k: round(v, 1) for k, v in seconds.items()}}, indent=1, default=str))
  _say(f'Cache built in {seconds["total"]:.0f} s: {sizes}, held-out AP of the pretraining '
       f'model {pretrain_ap:.3f}.')


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


def _features_and_labels(extract, dataset: tf.data.Dataset) -> Dict[str, np.ndarray]:
  """{'features/<level>': [N, h, w, c] float16, 'labels/<key>/...': [N, ...]} over `dataset`."""
  batches = []
  for images, labels in dataset:
    features = {level: tf.cast(f, tf.float32).numpy() for level, f in extract(images).items()}
    batches.append(_flatten({'features': features, 'labels': labels}))
  arrays = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
  for key, value in arrays.items():
    if key.startswith('features/'):
      if not np.all(np.isfinite(value.astype(FEATURE_DTYPE))):
        raise ValueError(f'backbone features {key} overflow float16: the cache cannot hold them.')
      arrays[key] = value.astype(FEATURE_DTYPE)
    elif key.split('/')[1] in _LABEL_DTYPES:
      arrays[key] = value.astype(_LABEL_DTYPES[key.split('/')[1]])
  return arrays


def _flatten(nest, prefix: str = '') -> Dict[str, np.ndarray]:
  if isinstance(nest, Mapping):
    flat = {}
    for key, value in nest.items():
      flat.update(_flatten(value, f'{prefix}{key}/'))
    return flat
  array = np.asarray(nest)
  # Strings (source ids) as fixed-width bytes: npz reads object arrays only through pickle.
  return {prefix[:-1]: array.astype(np.bytes_) if array.dtype == object else array}


def _unflatten(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  nest = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = nest
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return nest


@functools.lru_cache(maxsize=1)
def load(path: str) -> Dict[str, Any]:
  """{'train': {'features': {level: tensor}, 'labels': {...}}, 'heldout': {...}, 'info': the
  cache.json, 'head': the pretraining head's weights (arrays)}, read once per process (trials in
  one process share it)."""
  loaded = {}
  for split in ('train', 'heldout'):
    with np.load(os.path.join(path, 'features', f'{split}.npz')) as arrays:
      # Tensors made once: trials that copied the arrays anew each leaked them (~1 GB a trial).
      loaded[split] = _unflatten({key: tf.constant(arrays[key]) for key in arrays.files})
  with tf.io.gfile.GFile(os.path.join(path, CACHE_FILE)) as f:
    loaded['info'] = json.load(f)
  with np.load(os.path.join(path, HEAD_FILE)) as arrays:
    loaded['head'] = [arrays[f'arr_{i}'] for i in range(len(arrays.files))]
  return loaded
