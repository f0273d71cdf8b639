"""data.label_map: the label files round-trip, bad ones fail naming the file; utils.files writes
atomically."""
import json
import os

import pytest

from nasfpn_tf.data import label_map
from nasfpn_tf.utils import files

NAMES = {1: 'person', 3: 'car', 90: 'toothbrush'}


def test_label_map_round_trips(tmp_path):
  path = str(tmp_path / 'sub' / 'label_map.json')
  label_map.write_label_map(path, NAMES)
  assert label_map.read_label_map(path) == NAMES
  assert json.loads(open(path).read()) == {'1': 'person', '3': 'car', '90': 'toothbrush'}


@pytest.mark.parametrize('content, message', [
    ('{"1": "person",', 'cannot read it as JSON'),
    ('["person"]', r'expected a JSON object \{"category id": "name"\}'),
    ('{"person": "1"}', r'expected a JSON object \{"category id": "name"\}'),
    ('{"1": null}', r'expected a JSON object \{"category id": "name"\}'),
])
def test_a_bad_label_map_is_named(tmp_path, content, message):
  path = tmp_path / 'bad-label_map.json'
  path.write_text(content)
  with pytest.raises(ValueError, match=f'label map {path}: {message}'):
    label_map.read_label_map(str(path))


def test_a_missing_label_map_is_named(tmp_path):
  with pytest.raises(ValueError, match=f'label map {tmp_path}/none.json: cannot read'):
    label_map.read_label_map(str(tmp_path / 'none.json'))


def test_tflite_labels_round_trip(tmp_path):
  path = label_map.tflite_labels_path(str(tmp_path / 'model.tflite'))
  assert path == str(tmp_path / 'model.labels.json')
  labels = label_map.write_tflite_labels(path, 5, NAMES)  # op indices 0..3: ids 1..4
  assert labels == {'0': {'id': 1, 'name': 'person'}, '1': {'id': 2, 'name': None},
                    '2': {'id': 3, 'name': 'car'}, '3': {'id': 4, 'name': None}}
  assert json.loads(open(path).read()) == labels
  assert label_map.read_tflite_labels(path) == {1: 'person', 3: 'car'}


def test_bad_tflite_labels_are_named(tmp_path):
  path = tmp_path / 'model.labels.json'
  path.write_text('{"0": "person"}')
  with pytest.raises(ValueError, match=f'TFLite labels {path}: expected'):
    label_map.read_tflite_labels(str(path))


def test_the_label_map_beside_converter_records_is_found(tmp_path):
  prefix = str(tmp_path / 'train')
  for i in range(2):
    open(f'{prefix}-0000{i}-of-00002.tfrecord', 'w').close()
  assert label_map.find_records_label_map(f'{prefix}-*.tfrecord') is None
  label_map.write_label_map(label_map.records_label_map_path(prefix), NAMES)
  assert label_map.find_records_label_map(f'{prefix}-*.tfrecord') == f'{prefix}-label_map.json'


def test_atomic_write_leaves_no_temporary_file(tmp_path):
  path = tmp_path / 'a' / 'b.bin'
  files.atomic_write(str(path), b'\x00\x01')
  files.atomic_write(str(tmp_path / 'c.txt'), 'text')
  files.atomic_write(str(tmp_path / 'c.txt'), 'replaced')
  assert path.read_bytes() == b'\x00\x01'
  assert (tmp_path / 'c.txt').read_text() == 'replaced'
  assert sorted(os.listdir(tmp_path)) == ['a', 'c.txt'] and os.listdir(path.parent) == ['b.bin']


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
  target = tmp_path / 'export'
  with files.atomic_directory(str(target)) as staging:
    os.makedirs(staging)
    (tmp_path / os.path.basename(staging) / 'x').write_text('x')
    assert not target.exists()
  assert os.listdir(target) == ['x'] and os.listdir(tmp_path) == ['export']
  with pytest.raises(RuntimeError):
    with files.atomic_directory(str(tmp_path / 'failed')) as staging:
      os.makedirs(staging)
      raise RuntimeError('export failed')
  assert os.listdir(tmp_path) == ['export']


def test_atomic_directory_replaces_only_when_asked(tmp_path):
  target = tmp_path / 'export'
  target.mkdir()
  (target / 'old').write_text('old')
  with pytest.raises(ValueError, match='is not empty: it cannot be replaced'):
    with files.atomic_directory(str(target)) as staging:
      os.makedirs(staging)
  assert os.listdir(target) == ['old'] and os.listdir(tmp_path) == ['export']
  with files.atomic_directory(str(target), replace=True) as staging:
    os.makedirs(staging)
    (tmp_path / os.path.basename(staging) / 'new').write_text('new')
    assert os.listdir(target) == ['old']  # The old folder is whole until the swap.
  assert os.listdir(target) == ['new'] and os.listdir(tmp_path) == ['export']
  with pytest.raises(RuntimeError):
    with files.atomic_directory(str(target), replace=True) as staging:
      os.makedirs(staging)
      raise RuntimeError('export failed')
  assert os.listdir(target) == ['new'] and os.listdir(tmp_path) == ['export']
