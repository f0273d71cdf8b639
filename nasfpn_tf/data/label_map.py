"""The label files: where they lie, how they are written and read. No other module parses them.

Two formats:
  label map      {"category id": "name"}, the dataset's ids. The converter writes it beside the
                 records as `{prefix}-label_map.json`; the SavedModel export ships it as
                 `assets/label_map.json`; exports, `predict` and `main` read it.
  TFLite labels  {"op index": {"id": category id, "name": name or null}}: the post-processing
                 op's 0-based foreground index i is category id i + 1. The TFLite export writes
                 it as `<stem>.labels.json` beside `<stem>.tflite`; `predict` reads it.
Both are written atomically (`utils.files.atomic_write`); reading a bad file raises ValueError
naming it.
"""
import json
import pathlib
import re
from typing import Any, Dict, Mapping, Optional

import tensorflow as tf

from nasfpn_tf.utils import files

# The SavedModel asset's name.
ASSET_FILE = 'label_map.json'
# create_coco_tfrecord's shard names ({prefix}-SSSSS-of-NNNNN.tfrecord, `shard_paths`).
_SHARD_SUFFIX = re.compile(r'-\d{5}-of-\d{5}\.tfrecord$')


def records_label_map_path(output_prefix: str) -> str:
  """The label map beside the records `{output_prefix}-SSSSS-of-NNNNN.tfrecord`."""
  return f'{output_prefix}-label_map.json'


def find_records_label_map(file_pattern: str) -> Optional[str]:
  """The label map beside the first converter shard that `file_pattern` matches, or None."""
  for shard in sorted(tf.io.gfile.glob(file_pattern)):
    prefix = _SHARD_SUFFIX.sub('', shard)
    if prefix != shard and tf.io.gfile.exists(records_label_map_path(prefix)):
      return records_label_map_path(prefix)
  return None


def tflite_labels_path(tflite_path: str) -> str:
  """`<dir>/<stem>.labels.json` beside `<dir>/<stem>.tflite`."""
  path = pathlib.Path(tflite_path)
  return str(path.with_name(path.stem + '.labels.json'))


def write_label_map(path: str, label_map: Mapping[int, str]) -> None:
  """Writes {category id: name} as the JSON object {"id": "name"}, by id."""
  files.atomic_write(path, json.dumps({str(k): v for k, v in sorted(label_map.items())},
                                      indent=1))


def _read_json(path: str, what: str) -> Any:
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except (tf.errors.NotFoundError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{what} {path}: cannot read it as JSON ({e})') from e


def read_label_map(path: str) -> Dict[int, str]:
  """{category id: name} from a label map file {"id": "name"}."""
  data = _read_json(path, 'label map')
  try:
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
      raise TypeError
    return {int(key): name for key, name in data.items()}
  except (TypeError, ValueError):
    raise ValueError(f'label map {path}: expected a JSON object {{"category id": "name"}}, got '
                     f'{str(data)[:200]}') from None


def write_tflite_labels(path: str, num_classes: int,
                        label_map: Mapping[int, str]) -> Dict[str, Any]:
  """Writes and returns the TFLite labels of every foreground index 0..num_classes-2 (class id =
  index + 1; name null where `label_map` has no such category)."""
  labels = {str(index): {'id': index + 1, 'name': label_map.get(index + 1)}
            for index in range(num_classes - 1)}
  files.atomic_write(path, json.dumps(labels, indent=1))
  return labels


def read_tflite_labels(path: str) -> Dict[int, str]:
  """{category id: name} of a TFLite labels file, the categories without a name left out."""
  data = _read_json(path, 'TFLite labels')
  try:
    if not isinstance(data, dict):
      raise TypeError
    return {int(entry['id']): str(entry['name']) for entry in data.values() if entry['name']}
  except (TypeError, ValueError, KeyError):
    raise ValueError(f'TFLite labels {path}: expected a JSON object {{"op index": {{"id": '
                     f'category id, "name": name or null}}}}, got {str(data)[:200]}') from None
