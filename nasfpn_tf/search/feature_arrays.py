"""The CPU proxy cache's arrays: backbone features and labels of record images as the flat
arrays its npz files hold ('<group>/<key>/...' names; features in float16, anchor labels narrowed)
and back to nests. `feature_cache` writes and reads the files.
"""
from typing import Any, Dict, Mapping

import numpy as np
import tensorflow as tf

from nasfpn_tf.data import input_pipeline
from nasfpn_tf.search import heldout

FEATURE_DTYPE = np.float16
# Labels kept narrow in memory; trials cast them back for the loss. Class ids take int8 up to
# 127 and int16 beyond (`narrow`).
_LABEL_DTYPES = {'cls_targets': np.int8, 'box_targets': np.float16, 'cls_weights': np.float16,
                 'box_weights': np.float16}
# Images a batch when features are extracted.
BATCH = 32


def anchor_labeled(file_pattern: str, model_config) -> tf.data.Dataset:
  """(image, anchor labels) batches of the records, in `heldout.record_files` order: the train
  pipeline's step without augmentation."""
  parse = input_pipeline.train_example_parser(model_config, aug_scale_min=1.0, aug_scale_max=1.0,
                                              flip_prob=0.0, source=file_pattern)
  return tf.data.TFRecordDataset(heldout.record_files(file_pattern)).map(parse).batch(BATCH)


def anchor_targets(file_pattern: str, model_config) -> Dict[str, np.ndarray]:
  """{'targets/<label>/...': [N, ...]}: the anchor labels of the records (`anchor_labeled`'s),
  narrowed, as train.npz holds them; image_info left out."""
  batches = [flatten({'targets': {k: v for k, v in labels.items() if k != 'image_info'}})
             for _, labels in anchor_labeled(file_pattern, model_config)]
  return narrow({key: np.concatenate([b[key] for b in batches]) for key in batches[0]},
                model_config['num_classes'])


def features_and_labels(extract, dataset: tf.data.Dataset,
                        num_classes: int) -> Dict[str, np.ndarray]:
  """{'features/<level>': [N, h, w, c] float16, 'labels/<key>/...': [N, ...]} over `dataset`."""
  batches = []
  for images, labels in dataset:
    features = {level: tf.cast(f, tf.float32).numpy() for level, f in extract(images).items()}
    batches.append(flatten({'features': features, 'labels': labels}))
  arrays = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
  for key, value in arrays.items():
    if key.startswith('features/'):
      if not np.all(np.isfinite(value.astype(FEATURE_DTYPE))):
        raise ValueError(f'backbone features {key} overflow float16: the cache cannot hold them.')
      arrays[key] = value.astype(FEATURE_DTYPE)
  return narrow(arrays, num_classes)


def narrow(arrays: Dict[str, np.ndarray], num_classes: int) -> Dict[str, np.ndarray]:
  """Anchor labels (keys '<group>/<label>/...') in `_LABEL_DTYPES`; class ids in int8, or int16
  beyond 127 classes."""
  for key, value in arrays.items():
    name = key.split('/')[1]
    if name in _LABEL_DTYPES:
      dtype = _LABEL_DTYPES[name]
      if name == 'cls_targets' and num_classes > np.iinfo(np.int8).max:
        dtype = np.int16
      arrays[key] = value.astype(dtype)
  return arrays


def flatten(nest, prefix: str = '') -> Dict[str, np.ndarray]:
  if isinstance(nest, Mapping):
    flat = {}
    for key, value in nest.items():
      flat.update(flatten(value, f'{prefix}{key}/'))
    return flat
  array = np.asarray(nest)
  # Strings (source ids) as fixed-width bytes: npz reads object arrays only through pickle.
  return {prefix[:-1]: array.astype(np.bytes_) if array.dtype == object else array}


def unflatten(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  nest = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = nest
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return nest
