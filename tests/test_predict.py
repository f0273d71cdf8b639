"""nasfpn_tf.predict on a folder: COCO-format detections.json and drawn images, from a SavedModel
(through the command line) and from a model dir; unreadable images skipped and counted."""
import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image, ImageColor
import pytest
from pycocotools.coco import COCO
import tensorflow as tf

from nasfpn_tf import config
from nasfpn_tf import predict
from nasfpn_tf.export import saved_model
from nasfpn_tf.training import trainer as trainer_lib
from training_helpers import REPO, SUBPROCESS_TIMEOUT, spread_scores
from training_helpers import tiny_bindings


@pytest.fixture(scope='module')
def models(synthetic_records, tmp_path_factory):
  """(model dir, SavedModel dir) of a tiny untrained model: the trainer's model-dir layout
  (operative config, a checkpoint), its scores spread; drawing needs detections, not good ones."""
  root = tmp_path_factory.mktemp('predict')
  config.parse_gin([], tiny_bindings(synthetic_records) + [
      'build_retinanet.pre_nms_score_threshold = 0.0', 'build_retinanet.max_detections = 20'])
  trainer = trainer_lib.RetinaNetTrainer(str(root / 'model'), tf.distribute.get_strategy())
  spread_scores(trainer.model)
  trainer.checkpointer.save(0)
  saved_model.export_saved_model(str(root / 'model'), str(root / 'export'))
  return root / 'model', root / 'export'


@pytest.fixture(scope='module')
def image_dir(synthetic_records, tmp_path_factory):
  """Two val JPEGs, a grayscale PNG, a truncated JPEG and a text file, named as COCO does."""
  val_images = pathlib.Path(synthetic_records['val_json']).parents[1] / 'val'
  path = tmp_path_factory.mktemp('images')
  for name in ('000000000001.jpg', '000000000002.jpg'):
    shutil.copy(val_images / name, path / name)
  Image.open(val_images / '000000000003.jpg').convert('L').save(path / '000000000003.png')
  (path / '000000000004.jpg').write_bytes((val_images / '000000000004.jpg').read_bytes()[:300])
  (path / 'notes.txt').write_text('not an image')
  return path


def test_cli_on_a_saved_model_writes_coco_json_and_drawn_images(models, image_dir, tmp_path,
                                                                synthetic_records):
  output_dir = tmp_path / 'out'
  checked = ('000000000001.jpg', '000000000003.png')  # Their best boxes' drawing is checked.
  # Draws about half the boxes (the median score of the model dir's detections: same model),
  # and the best box of each checked image, though all of an image's scores may be below the
  # median (the SavedModel's scores may differ by 1e-4: hence the margin).
  with contextlib.redirect_stdout(io.StringIO()):
    reference = predict.predict(str(models[0]), [str(image_dir)], str(tmp_path / 'reference'))
  by_model_dir = json.loads(pathlib.Path(reference['results']).read_text())
  min_score = min([float(np.median([r['score'] for r in by_model_dir]))] + [
      max(r['score'] for r in by_model_dir if pathlib.Path(r['file_name']).name == name) - 1e-3
      for name in checked])
  result = subprocess.run(
      [sys.executable, '-m', 'nasfpn_tf.predict', f'--model={models[1]}', f'--input={image_dir}',
       f'--output_dir={output_dir}', f'--min_score={min_score}'],
      cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 0, result.stderr[-3000:]
  broken = image_dir / '000000000004.jpg'
  assert f'Skipping {broken}: cannot read it as an image' in result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary['images'] == 3 and summary['skipped'] == 1
  assert summary['skipped_files'] == [str(broken)]

  results = json.loads((output_dir / 'detections.json').read_text())
  assert summary['detections'] == len(results) == 3 * 20
  assert {r['image_id'] for r in results} == {1, 2, 3}  # the file names' numbers
  assert {pathlib.Path(r['file_name']).name for r in results} == {
      '000000000001.jpg', '000000000002.jpg', '000000000003.png'}
  for r in results:
    assert set(r) == {'image_id', 'category_id', 'bbox', 'score', 'file_name'}
    assert len(r['bbox']) == 4 and r['bbox'][2] >= 0 and r['bbox'][3] >= 0
    assert 1 <= r['category_id'] <= 9
  assert summary['drawn'] == sum(r['score'] >= min_score for r in results)
  assert 0 < summary['drawn'] < len(results)
  COCO(synthetic_records['val_json']).loadRes(results)  # pycocotools reads it

  # The SavedModel and the model dir detect the same (PIL-decoded) images alike.
  for ours, theirs in zip(results, by_model_dir):
    assert ours['category_id'] == theirs['category_id']
    np.testing.assert_allclose(ours['bbox'], theirs['bbox'], atol=0.01)
    assert ours['score'] == pytest.approx(theirs['score'], abs=1e-4)

  assert sorted(p.name for p in output_dir.iterdir()) == [
      '000000000001.jpg', '000000000002.jpg', '000000000003.png', 'detections.json']
  for name in checked:
    source = np.asarray(Image.open(image_dir / name).convert('RGB'), np.float32)
    drawn = np.asarray(Image.open(output_dir / name), np.float32)
    assert drawn.shape == source.shape
    best = max((r for r in results if pathlib.Path(r['file_name']).name == name),
               key=lambda r: r['score'])
    # The best box is drawn last: its left edge (2 px wide from round(x) or the pixel before)
    # has the class's palette color, which may be close to the source's, so compare to it.
    x, y, width, height = (int(round(v)) for v in best['bbox'])
    color = np.array(ImageColor.getrgb(
        predict._PALETTE[best['category_id'] % len(predict._PALETTE)]), np.float32)
    left_edge = drawn[y + 1:y + height - 1, x]
    close = np.abs(left_edge - color).max(axis=-1) <= 40
    assert close.mean() >= 0.9, (name, color, left_edge[~close][:5])


def test_a_saved_model_carries_the_records_label_map(models, synthetic_records):
  names = json.loads(pathlib.Path(
      synthetic_records['train'].replace('-*.tfrecord', '-label_map.json')).read_text())
  _, label_map = predict.load_detector(str(models[1]))
  assert label_map == {int(k): v for k, v in names.items()}


def test_image_ids_are_the_file_numbers_only_when_all_are_numbers():
  assert predict.image_ids(['a/000000000139.jpg', 'b/7.png']) == [139, 7]
  assert predict.image_ids(['a/000000000139.jpg', 'b/cat.png']) == [1, 2]
  assert predict.image_ids(['a/1.jpg', 'b/01.jpg']) == [1, 2]  # not distinct


@pytest.mark.parametrize('inputs, message', [
    (['{tmp}/nowhere.jpg'], r'--input=.*nowhere.jpg: no such file or folder'),
    (['{tmp}/empty'], r'--input=.*empty: the folder has no .jpg/.jpeg/.png'),
    (['{images}/000000000004.jpg'], r'none of the 1 --input images could be read'),
])
def test_bad_inputs_fail_naming_the_flag(models, image_dir, tmp_path, inputs, message):
  (tmp_path / 'empty').mkdir()
  inputs = [i.format(tmp=tmp_path, images=image_dir) for i in inputs]
  with pytest.raises(ValueError, match=message), contextlib.redirect_stderr(io.StringIO()):
    predict.predict(str(models[1]), inputs, str(tmp_path / 'out'))


def test_output_dir_holding_the_inputs_is_refused(models, image_dir):
  with pytest.raises(ValueError, match='holds input images'):
    predict.predict(str(models[1]), [str(image_dir)], str(image_dir))


def test_a_model_path_of_no_known_kind_is_named(tmp_path):
  with pytest.raises(ValueError, match=r'--model=.*missing.tflite: no such file'):
    predict.load_detector(str(tmp_path / 'missing.tflite'))
  with pytest.raises(ValueError, match=r'--model=.*nothing: not a SavedModel folder'):
    predict.load_detector(str(tmp_path / 'nothing'))
