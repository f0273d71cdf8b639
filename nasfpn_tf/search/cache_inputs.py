"""What a CPU proxy cache is made from besides its settings: the user's records and a backbone
checkpoint, checked, turned into the gin bindings they imply, and fingerprinted for the cache key.

The data and the checkpoint enter the key by content (each file's name, size and SHA-256), not by
path: a copied data dir finds its cache, and edited records or another checkpoint never do.
Digests are remembered per (path, size, mtime) in `DIGESTS_FILE` in the folder the caller names
(the caches' folder), so a trial does not hash the data again. `feature_cache` builds the cache.
"""
import hashlib
import json
import os
from typing import Any, Dict, List, Optional

import tensorflow as tf

from nasfpn_tf.data import label_map
from nasfpn_tf.search import heldout
from nasfpn_tf.training import init_checkpoint
from nasfpn_tf.utils import files

DIGESTS_FILE = 'digests.json'
# The user's converter records in --data_dir: the training split only (never the evaluation one).
DATA_RECORDS = 'train-*.tfrecord'


def data_pattern(data_dir: str) -> str:
  """The converter records of `data_dir` that the proxy reads (its training split)."""
  return os.path.join(data_dir, DATA_RECORDS)


def _data_files(data_dir: str) -> List[str]:
  paths = heldout.record_files(data_pattern(data_dir))
  if not paths:
    raise ValueError(
        f'--data_dir={data_dir}: no records {data_pattern(data_dir)} there; convert your COCO '
        'json and images with `python -m nasfpn_tf.data.create_coco_tfrecord '
        f'--output_prefix={os.path.join(data_dir, "train")} ...` (the proxy holds out part of '
        'these training images; it never reads an evaluation split).')
  return paths


def data_bindings(data_dir: Optional[str]) -> List[str]:
  """The gin bindings the user's data implies, to parse before the user's own (which win):
  `build_retinanet.num_classes` = the label map's largest category id + 1 (ids are kept raw, 0
  is background). None without data_dir, or without a label map beside the records (then the
  records' ids are checked against the bound num_classes when the cache is built)."""
  if data_dir is None:
    return []
  _data_files(data_dir)
  path = label_map.find_records_label_map(data_pattern(data_dir))
  if path is None:
    return []
  ids = label_map.read_label_map(path)
  if not ids or min(ids) < 1:
    raise ValueError(f'label map {path}: category ids must be >= 1 (0 is background), got '
                     f'{sorted(ids)[:10]}.')
  return [f'build_retinanet.num_classes = {max(ids) + 1}']


def _digest(path: str, memo_dir: str) -> str:
  """SHA-256 of the file at `path`, remembered in `memo_dir`/DIGESTS_FILE per (path, size,
  mtime): a file rewritten in place gets a new mtime, and so a new digest."""
  stat = os.stat(path)
  memo_key = f'{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}'
  memo_path = os.path.join(memo_dir, DIGESTS_FILE)
  memo = {}
  if os.path.exists(memo_path):
    try:
      with open(memo_path, encoding='utf-8') as f:
        memo = json.load(f)
    except (OSError, ValueError):
      memo = {}  # Unreadable: hashed again and rewritten.
  if memo_key not in memo:
    sha = hashlib.sha256()
    with open(path, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 22), b''):
        sha.update(chunk)
    memo[memo_key] = sha.hexdigest()
    files.atomic_write(memo_path, json.dumps(memo, indent=0, sort_keys=True))
  return memo[memo_key]


def _fingerprint(paths, memo_dir: str) -> List[List[Any]]:
  return [[os.path.basename(p), os.path.getsize(p), _digest(p, memo_dir)] for p in sorted(paths)]


def data_fingerprint(data_dir: str, memo_dir: str) -> Dict[str, Any]:
  """What the cache key holds of the user's data: name, size and SHA-256 of every record file
  the proxy reads and of the label map beside them."""
  fingerprint = {'records': _fingerprint(_data_files(data_dir), memo_dir)}
  path = label_map.find_records_label_map(data_pattern(data_dir))
  fingerprint['label_map'] = _fingerprint([path], memo_dir)[0] if path else None
  return fingerprint


def resolve_checkpoint(path: str) -> str:
  """The checkpoint prefix `path` (a prefix, a TF Model Garden checkpoint folder or a nasfpn_tf
  model dir) names; ValueError naming --backbone_checkpoint when there is none."""
  try:
    return init_checkpoint.resolve(path)
  except init_checkpoint.InitCheckpointError as e:
    raise ValueError(f'--backbone_checkpoint={path}: {e}') from e


def checkpoint_fingerprint(path: str, memo_dir: str) -> Dict[str, Any]:
  """What the cache key holds of a backbone checkpoint: its files' names, sizes and SHA-256."""
  prefix = resolve_checkpoint(path)
  return {'files': _fingerprint(tf.io.gfile.glob(prefix + '.*'), memo_dir)}


def check_label_map(data_dir: str, num_classes: int) -> None:
  """ValueError naming the binding when the label map beside the records has a category id that
  `num_classes` cannot hold; nothing without a label map."""
  path = label_map.find_records_label_map(data_pattern(data_dir))
  if path is None:
    return
  largest = max(label_map.read_label_map(path))
  if largest >= num_classes:
    raise ValueError(f'build_retinanet.num_classes = {num_classes} is bound, but the label map '
                     f'{path} has category id {largest}: bind at least {largest + 1}, or leave '
                     'it unbound (the label map then sets it).')
