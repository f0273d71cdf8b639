"""COCO -> TFRecord conversion: counts on coco128 (which CI must have), and every kind of broken
input reported."""
import json
import os
import re
import subprocess
import sys

import numpy as np
from official.vision.dataloaders import tf_example_decoder
from PIL import Image
import pytest
import tensorflow as tf

from nasfpn_tf.data import create_coco_tfrecord
from nasfpn_tf.data import tfexample
from training_helpers import REPO, SUBPROCESS_TIMEOUT, coco128_dir_or_skip


def _read_all(summary):
  return [tfexample.decode_example(record) for record in tf.data.TFRecordDataset(summary['shards'])]


@pytest.fixture(scope='module')
def _converted():
  return {}


@pytest.fixture
def coco128(coco128_dir, tmp_path_factory, _converted):
  """(json dict, summary, decoded examples) of coco128 converted into 3 shards, once per module."""
  if not _converted:
    annotations_file = coco128_dir / 'annotations' / 'instances_train2017.json'
    summary = create_coco_tfrecord.convert(
        str(annotations_file), str(coco128_dir / 'train2017'),
        str(tmp_path_factory.mktemp('coco128') / 'train'), num_shards=3)
    _converted['value'] = json.loads(annotations_file.read_text()), summary, _read_all(summary)
  return _converted['value']


def _expected_box_count(data):
  """Boxes the converter must keep, by the documented rules, computed straight from the json."""
  images = {image['id']: image for image in data['images']}
  categories = {category['id'] for category in data['categories']}
  count = 0
  for ann in data['annotations']:
    image = images.get(ann['image_id'])
    x, y, w, h = ann['bbox']
    if (image is None or ann['category_id'] not in categories or w <= 0 or h <= 0 or
        x >= image['width'] or y >= image['height'] or x + w <= 0 or y + h <= 0):
      continue
    count += 1
  return count


def test_missing_coco128_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
  """Under CI=true the coco128 tests cannot pass by skipping; the message says where to put it."""
  missing = tmp_path / 'no_coco128'
  monkeypatch.setenv('NASFPN_COCO128', str(missing))
  monkeypatch.setenv('CI', 'true')
  where = re.escape(f'not found at {missing} (set $NASFPN_COCO128')
  with pytest.raises(pytest.fail.Exception, match=where):
    coco128_dir_or_skip()
  monkeypatch.delenv('CI')
  with pytest.raises(pytest.skip.Exception, match=where):
    coco128_dir_or_skip()
  (missing / 'annotations').mkdir(parents=True)
  (missing / 'annotations' / 'instances_train2017.json').write_text('{}')
  monkeypatch.setenv('CI', 'true')
  assert coco128_dir_or_skip() == missing


def test_coco128_counts(coco128):
  data, summary, examples = coco128
  assert summary['images_written'] == len(examples) == 128
  assert summary['boxes_written'] == _expected_box_count(data)
  assert sum(int(tf.size(e['classes'])) for e in examples) == summary['boxes_written']
  assert summary['crowd_boxes'] == 10 == sum(int(tf.reduce_sum(tf.cast(e['is_crowd'], tf.int32)))
                                               for e in examples)
  annotated = {ann['image_id'] for ann in data['annotations']}
  assert summary['negative_images'] == sum(image['id'] not in annotated for image in data['images'])
  assert summary['skipped_images'] == {} and summary['skipped_boxes'] == {}
  assert summary['categories'] == {str(c['id']): c['name'] for c in data['categories']}
  assert json.loads(open(summary['label_map']).read()) == summary['categories']
  # Round robin in json order: shard k holds images k, k + 3, ...
  first_shard = [tfexample.decode_example(r)['source_id'].numpy().decode()
                 for r in tf.data.TFRecordDataset(summary['shards'][0])]
  assert first_shard == [str(image['id']) for image in data['images'][::3]]


def test_coco128_grayscale_becomes_rgb(coco128, coco128_dir):
  data, summary, examples = coco128
  gray = [image for image in data['images']
          if Image.open(coco128_dir / 'train2017' / image['file_name']).mode == 'L']
  assert len(gray) == 1 and summary['converted_images'] == {'JPEG/L': 1}
  example = next(e for e in examples if e['source_id'].numpy().decode() == str(gray[0]['id']))
  assert example['image'].shape == (gray[0]['height'], gray[0]['width'], 3)
  pixels = example['image'].numpy().astype(int)
  assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 2  # Still gray, now in 3 channels.


def test_coco128_box_and_category_round_trip(coco128):
  data, _, examples = coco128
  ann = next(a for a in data['annotations'] if not a['iscrowd'] and a['category_id'] > 80)
  image = next(i for i in data['images'] if i['id'] == ann['image_id'])
  example = next(e for e in examples if e['source_id'].numpy().decode() == str(ann['image_id']))
  x, y, w, h = ann['bbox']
  expected = np.array([y / image['height'], x / image['width'],
                       (y + h) / image['height'], (x + w) / image['width']])
  rows = np.abs(example['boxes'].numpy() - expected).max(axis=1) < 1e-6
  assert rows.sum() == 1
  assert int(example['classes'][rows.argmax()]) == ann['category_id']  # COCO id, not remapped.
  name = next(c['name'] for c in data['categories'] if c['id'] == ann['category_id'])
  assert example['class_text'][rows.argmax()].numpy().decode() == name


def test_tfm_decoder_reads_our_records(coco128):
  _, summary, examples = coco128
  record = next(iter(tf.data.TFRecordDataset(summary['shards'][0])))
  decoded = tf_example_decoder.TfExampleDecoder().decode(record)
  ours = examples[0]
  np.testing.assert_allclose(decoded['groundtruth_boxes'], ours['boxes'])
  np.testing.assert_array_equal(decoded['groundtruth_classes'], ours['classes'])
  assert decoded['source_id'].numpy() == ours['source_id'].numpy()
  assert decoded['image'].shape == ours['image'].shape


RGB = (120, 30, 200)
CMYK = (0, 200, 50, 0)  # = RGB (255, 55, 205)


def _save(path, mode, size=(40, 30), fmt='JPEG', color=RGB):
  Image.new(mode, size, color=color).save(path, fmt)


@pytest.fixture
def broken_dataset(tmp_path):
  """A tiny dataset with one of every problem the converter must report."""
  image_dir = tmp_path / 'images'
  image_dir.mkdir()
  _save(image_dir / 'good.jpg', 'RGB')
  _save(image_dir / 'cmyk.jpg', 'CMYK', color=CMYK)
  _save(image_dir / 'picture.png', 'RGBA', fmt='PNG', color=RGB + (255,))
  _save(image_dir / 'negative.jpg', 'RGB')
  _save(image_dir / 'wrong_size.jpg', 'RGB', size=(50, 20))
  good = (image_dir / 'good.jpg').read_bytes()
  (image_dir / 'truncated.jpg').write_bytes(good[:len(good) // 2])
  (image_dir / 'garbage.jpg').write_bytes(b'this is not an image')
  names = ['good.jpg', 'cmyk.jpg', 'picture.png', 'negative.jpg', 'wrong_size.jpg',
           'truncated.jpg', 'garbage.jpg', 'missing.jpg']
  images = [{'id': i + 1, 'file_name': n, 'width': 40, 'height': 30} for i, n in enumerate(names)]

  def ann(image_id, bbox, category_id=1, iscrowd=0):
    return {'image_id': image_id, 'bbox': bbox, 'category_id': category_id, 'iscrowd': iscrowd,
            'area': 12.0}

  annotations = [
      ann(1, [10, 5, 20, 10]),                 # kept as is
      ann(1, [30, 20, 20, 20], category_id=7),  # partly outside: clipped to [30, 20, 40, 30]
      ann(1, [45, 5, 5, 5]),                   # fully outside
      ann(1, [10, 10, 0, 5]),                  # zero width
      ann(1, [0, 0, 40, 30], iscrowd=1),       # crowd region, kept
      ann(1, [1, 1, 2, 2], category_id=99),    # unknown category
      ann(77, [1, 1, 2, 2]),                   # unknown image
      ann(2, [0, 0, 10, 10]), ann(3, [0, 0, 10, 10]), ann(5, [0, 0, 10, 10]),
      ann(6, [0, 0, 10, 10]), ann(8, [0, 0, 10, 10]),  # boxes of images that will be skipped
  ]
  annotations_file = tmp_path / 'instances.json'
  annotations_file.write_text(json.dumps({
      'images': images, 'annotations': annotations,
      'categories': [{'id': 1, 'name': 'person'}, {'id': 7, 'name': 'train'}]}))
  return annotations_file, image_dir, tmp_path / 'out' / 'broken'


def test_broken_inputs_counted_with_reasons(broken_dataset):
  summary = create_coco_tfrecord.convert(*map(str, broken_dataset), num_shards=2)
  assert summary['images_written'] == 5
  assert summary['skipped_images'] == {'missing_file': 1, 'undecodable': 2}
  assert summary['skipped_image_files'] == {'missing_file': ['missing.jpg'],
                                            'undecodable': ['truncated.jpg', 'garbage.jpg']}
  assert summary['skipped_boxes'] == {'outside_image': 1, 'degenerate': 1, 'unknown_category_id': 1,
                                      'unknown_image_id': 1, 'image_skipped': 2}
  assert summary['boxes_written'] == 3 + 3  # good.jpg 3, cmyk, png, wrong_size 1 each.
  assert (summary['crowd_boxes'], summary['clipped_boxes'], summary['negative_images']) == (1, 1, 1)
  assert summary['converted_images'] == {'JPEG/CMYK': 1, 'PNG/RGBA': 1}
  assert summary['size_mismatches'] == [
      {'file': 'wrong_size.jpg', 'json_hw': [30, 40], 'actual_hw': [20, 50]}]

  examples = {e['filename'].numpy().decode(): e for e in _read_all(summary)}
  assert sorted(examples) == ['cmyk.jpg', 'good.jpg', 'negative.jpg', 'picture.png',
                              'wrong_size.jpg']
  good = examples['good.jpg']
  np.testing.assert_allclose(good['boxes'], [[5 / 30, 10 / 40, 15 / 30, 30 / 40],
                                             [20 / 30, 30 / 40, 1, 1], [0, 0, 1, 1]], atol=1e-6)
  assert good['classes'].numpy().tolist() == [1, 7, 1]
  assert good['is_crowd'].numpy().tolist() == [False, False, True]
  for name, rgb in (('cmyk.jpg', (255, 55, 205)), ('picture.png', RGB)):
    assert examples[name]['image'].shape == (30, 40, 3)
    np.testing.assert_allclose(examples[name]['image'].numpy().mean((0, 1)), rgb, atol=8)
  assert examples['negative.jpg']['boxes'].shape == (0, 4)
  wrong = examples['wrong_size.jpg']  # Normalized by the decoded size, not the json's.
  assert (int(wrong['height']), int(wrong['width'])) == (20, 50)
  np.testing.assert_allclose(wrong['boxes'], [[0, 0, 10 / 20, 10 / 50]], atol=1e-6)


def test_converted_images_are_rgb_jpeg(broken_dataset):
  summary = create_coco_tfrecord.convert(*map(str, broken_dataset))
  for record in tf.data.TFRecordDataset(summary['shards']):
    parsed = tf.io.parse_single_example(record, {
        tfexample.ENCODED: tf.io.FixedLenFeature((), tf.string),
        tfexample.FORMAT: tf.io.FixedLenFeature((), tf.string)})
    assert parsed[tfexample.FORMAT].numpy() == b'jpeg'
    assert tf.io.is_jpeg(parsed[tfexample.ENCODED])
    assert tf.io.decode_jpeg(parsed[tfexample.ENCODED]).shape[-1] == 3


def test_bad_json_names_the_file(tmp_path):
  bad = tmp_path / 'broken.json'
  bad.write_text('{"images": [')
  with pytest.raises(create_coco_tfrecord.CocoFormatError, match='broken.json: not valid JSON'):
    create_coco_tfrecord.convert(str(bad), str(tmp_path), str(tmp_path / 'out'))
  bad.write_text('[]')
  with pytest.raises(create_coco_tfrecord.CocoFormatError, match='broken.json: not COCO'):
    create_coco_tfrecord.convert(str(bad), str(tmp_path), str(tmp_path / 'out'))


def test_cli_prints_one_json_summary_line(broken_dataset):
  annotations_file, image_dir, prefix = broken_dataset
  result = subprocess.run(
      [sys.executable, '-m', 'nasfpn_tf.data.create_coco_tfrecord',
       f'--annotations_file={annotations_file}', f'--image_dir={image_dir}',
       f'--output_prefix={prefix}', '--num_shards=3'],
      capture_output=True, text=True, cwd=REPO, check=False, timeout=SUBPROCESS_TIMEOUT,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  summary = json.loads(lines[0])
  assert summary['images_written'] == 5 and summary['num_shards'] == 3
  assert all(os.path.exists(path) for path in summary['shards'])
  assert summary['shards'][0].endswith('broken-00000-of-00003.tfrecord')
  assert 'missing.jpg' in result.stderr  # Each skipped file is also logged by name.


def test_cli_exits_naming_the_bad_json(tmp_path):
  bad = tmp_path / 'bad.json'
  bad.write_text('not json')
  result = subprocess.run(
      [sys.executable, '-m', 'nasfpn_tf.data.create_coco_tfrecord', f'--annotations_file={bad}',
       f'--image_dir={tmp_path}', f'--output_prefix={tmp_path / "out"}'],
      capture_output=True, text=True, cwd=REPO, check=False, timeout=SUBPROCESS_TIMEOUT,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert result.returncode == 1
  assert f'create_coco_tfrecord: {bad}: not valid JSON' in result.stderr
  assert result.stdout == ''  # No summary for a failed run.


def test_the_library_defines_no_flags_of_its_own():
  """Importing the converter (as the search and the experiments do) leaves flag names such as
  --num_threads to the importer: tflite_latency.py once failed with a DuplicateFlagError."""
  code = ("from absl import flags; flags.DEFINE_integer('num_threads', 1, ''); "
          "from nasfpn_tf import config; config.register_configurables(); "
          "from nasfpn_tf.data import create_coco_tfrecord; print('ok')")
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                          check=False, timeout=SUBPROCESS_TIMEOUT,
                          env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert result.stdout.strip() == 'ok', result.stderr


def test_a_rerun_replaces_its_shards_and_a_failed_one_keeps_them(tmp_path, monkeypatch):
  """Rerunning with another --num_shards leaves only the new shards under the prefix (training
  globs `{prefix}-*.tfrecord`); a conversion that fails midway leaves the earlier shards whole
  and no staging file."""
  from nasfpn_tf.data import synthetic  # pylint: disable=g-import-not-at-top
  synthetic.generate(tmp_path / 'raw', num_train=5, num_val=1, image_size=64, seed=0)
  args = (str(tmp_path / 'raw' / 'annotations' / 'instances_train.json'),
          str(tmp_path / 'raw' / 'train'), str(tmp_path / 'records' / 'train'))
  first = create_coco_tfrecord.convert(*args, num_shards=3, num_threads=1)
  second = create_coco_tfrecord.convert(*args, num_shards=2, num_threads=1)
  assert second['removed_stale_shards'] == first['shards']
  assert sorted(tf.io.gfile.glob(str(tmp_path / 'records' / 'train-*.tfrecord'))) == (
      second['shards'])
  assert len(_read_all(second)) == 5
  contents = {path: open(path, 'rb').read() for path in second['shards']}

  def fail(*unused):
    raise RuntimeError('disk full')
  monkeypatch.setattr(tfexample, 'encode_example', fail)
  with pytest.raises(RuntimeError, match='disk full'):
    create_coco_tfrecord.convert(*args, num_shards=2, num_threads=1)
  assert sorted(os.listdir(tmp_path / 'records')) == sorted(
      [os.path.basename(p) for p in second['shards']] + ['train-label_map.json'])
  assert {path: open(path, 'rb').read() for path in second['shards']} == contents
