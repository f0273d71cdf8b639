"""The demo's steps that run in one process where they used to run in several (issue 22: fewer
TensorFlow starts): the converter's several splits in one run, and main's --mode=export, both
exports from one restore. Each writes what the separate runs write."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from nasfpn_tf import predict
from nasfpn_tf.data import create_coco_tfrecord
from nasfpn_tf.data import synthetic
from training_helpers import REPO, SUBPROCESS_TIMEOUT, run_main, train_tiny_model


def _files(folder):
  """{name: bytes} of every file in `folder`."""
  return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _examples(path):
  return [tf.train.Example.FromString(record.numpy())
          for record in tf.data.TFRecordDataset(str(path))]


def test_one_converter_run_writes_each_split_as_its_own_run_does(tmp_path):
  raw = tmp_path / 'raw'
  synthetic.generate(raw, num_train=5, num_val=3, image_size=64, seed=0)
  splits = ('train', 'val')
  args = []
  for split in splits:
    args += [f'--annotations_file={raw / "annotations" / f"instances_{split}.json"}',
             f'--image_dir={raw / split}', f'--output_prefix={tmp_path / "together" / split}']
  result = subprocess.run(
      [sys.executable, '-m', 'nasfpn_tf.data.create_coco_tfrecord', *args, '--num_shards=2',
       '--num_threads=1'], capture_output=True, text=True, cwd=REPO, check=False,
      timeout=SUBPROCESS_TIMEOUT, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert result.returncode == 0, result.stderr
  summaries = [json.loads(line) for line in result.stdout.strip().splitlines()]
  alone = [create_coco_tfrecord.convert(
      str(raw / 'annotations' / f'instances_{split}.json'), str(raw / split),
      str(tmp_path / 'alone' / split), num_shards=2, num_threads=1) for split in splits]

  # One summary line per split, in the order given, saying what a run of its own says.
  assert [s['images_written'] for s in summaries] == [5, 3]
  assert [{k: v for k, v in s.items() if k not in ('shards', 'label_map')} for s in summaries] == [
      {k: v for k, v in s.items() if k not in ('shards', 'label_map')} for s in alone]
  # The same files: label maps byte for byte, shards example for example (a tf.train.Example's
  # feature map serializes in an order of the process's own, so not byte for byte).
  together, separate = _files(tmp_path / 'together'), _files(tmp_path / 'alone')
  assert sorted(together) == sorted(separate) == sorted(
      [f'{split}-{i:05d}-of-00002.tfrecord' for split in splits for i in range(2)] +
      ['train-label_map.json', 'val-label_map.json'])
  for name in together:
    if name.endswith('.json'):
      assert together[name] == separate[name], name
    else:
      examples = [_examples(tmp_path / folder / name) for folder in ('together', 'alone')]
      assert examples[0] == examples[1] and examples[0], name
  # Each split's label map after its shards, val's last of all (what `make demo` waits for).
  mtime = {name: os.stat(tmp_path / 'together' / name).st_mtime_ns for name in together}
  for split in splits:
    shards = [mtime[n] for n in mtime if n.startswith(split) and n.endswith('.tfrecord')]
    assert mtime[f'{split}-label_map.json'] >= max(shards)
  assert mtime['val-label_map.json'] == max(mtime.values())


def test_the_repeated_converter_flags_must_pair_up():
  assert create_coco_tfrecord.paired_conversions(['a.json', 'b.json'], ['a', 'b'],
                                                 ['out/a', 'out/b']) == [
      ('a.json', 'a', 'out/a'), ('b.json', 'b', 'out/b')]
  with pytest.raises(create_coco_tfrecord.CocoFormatError,
                     match='--annotations_file, --image_dir and --output_prefix pair up by '
                           'position, one of each per conversion: got 2, 1 and 2'):
    create_coco_tfrecord.paired_conversions(['a.json', 'b.json'], ['a'], ['out/a', 'out/b'])
  with pytest.raises(create_coco_tfrecord.CocoFormatError,
                     match='--output_prefix=out/./a is given twice'):
    create_coco_tfrecord.paired_conversions(['a.json', 'b.json'], ['a', 'b'],
                                            ['out/a', 'out/./a'])


@pytest.fixture(scope='module')
def model_dir(synthetic_records, tmp_path_factory):
  path = tmp_path_factory.mktemp('one_restore') / 'model'
  train_tiny_model(synthetic_records, path)
  return path


def _json_lines(printed):
  return [json.loads(line) for line in printed.splitlines() if line.startswith('{')]


def test_export_mode_writes_both_exports_as_the_two_modes_do(model_dir, synthetic_records,
                                                            tmp_path):
  both = _json_lines(run_main('--mode=export', f'--model_dir={model_dir}',
                              f'--export_dir={tmp_path / "both" / "saved_model"}',
                              f'--tflite_path={tmp_path / "both" / "model.tflite"}'))
  alone = (_json_lines(run_main('--mode=export_saved_model', f'--model_dir={model_dir}',
                                f'--export_dir={tmp_path / "alone" / "saved_model"}')) +
           _json_lines(run_main('--mode=export_tflite', f'--model_dir={model_dir}',
                                f'--tflite_path={tmp_path / "alone" / "model.tflite"}')))
  # Two summary lines, the SavedModel's first, as the two modes print them but for the paths
  # and the file's size: its tensor names carry the Keras layers' names, numbered by the models
  # this process built before (in a process of its own, as `make demo` runs it, the same).
  assert [list(s) for s in both] == [list(s) for s in alone]
  for together, separate in zip(both, alone):
    differ = ('export_dir', 'path', 'labels', 'size_bytes')
    assert {k: v for k, v in together.items() if k not in differ} == {
        k: v for k, v in separate.items() if k not in differ}
  assert both[0]['export_dir'] == str(tmp_path / 'both' / 'saved_model')
  assert both[1]['path'] == str(tmp_path / 'both' / 'model.tflite')
  assert sorted(os.listdir(tmp_path / 'both')) == sorted(os.listdir(tmp_path / 'alone')) == [
      'model.labels.json', 'model.tflite', 'saved_model']
  assert _files(tmp_path / 'both' / 'saved_model' / 'assets') == _files(
      tmp_path / 'alone' / 'saved_model' / 'assets')
  assert ((tmp_path / 'both' / 'model.labels.json').read_bytes() ==
          (tmp_path / 'alone' / 'model.labels.json').read_bytes())

  # Each export detects on a val image what the same export of its own mode detects.
  val_dir = pathlib.Path(synthetic_records['val_json']).parents[1] / 'val'
  with Image.open(sorted(val_dir.glob('*.jpg'))[0]) as opened:
    image = np.asarray(opened.convert('RGB'))
  for export in ('saved_model', 'model.tflite'):
    detect_both, _ = predict.load_detector(str(tmp_path / 'both' / export))
    detect_alone, _ = predict.load_detector(str(tmp_path / 'alone' / export))
    got, expected = detect_both(image), detect_alone(image)
    assert int(expected['num_detections'][0]) > 0, export
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], f'{export}: {key}')


def test_export_mode_needs_both_destinations(model_dir, tmp_path):
  with pytest.raises(SystemExit, match='--mode=export needs --tflite_path'):
    run_main('--mode=export', f'--model_dir={model_dir}', f'--export_dir={tmp_path / "sm"}')
  with pytest.raises(SystemExit, match='--mode=export needs --export_dir'):
    run_main('--mode=export', f'--model_dir={model_dir}', f'--tflite_path={tmp_path / "m.tflite"}')
  assert not os.listdir(tmp_path)
