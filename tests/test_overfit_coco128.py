"""Real COCO images train: a short run must learn in float32 and in bfloat16 (issue 10: bfloat16
stopped learning on AMD Zen 4 and went NaN; session 27: oneDNN's gradient of the class predictor,
now padded), and experiments/overfit_coco128.py takes any
coco128-like folder and prints its JSON summary line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from nasfpn_tf import config
from nasfpn_tf.data import create_coco_tfrecord
from nasfpn_tf.training import precision
from nasfpn_tf.training import trainer as trainer_lib
import training_helpers
from training_helpers import REPO, SUBPROCESS_TIMEOUT, read_scalars

SCRIPT = REPO / 'experiments' / 'overfit_coco128.py'
NUM_IMAGES = 6
# The learning check: gin_configs/overfit_coco128.gin's model on 16 images, 60 steps.
LEARN_IMAGES, LEARN_STEPS = 16, 60


def _run(*args):
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=SUBPROCESS_TIMEOUT,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))


def _first_images(coco128_dir, count):
  """coco128's json cut to its first `count` images (those present) and their annotations."""
  data = json.loads((coco128_dir / 'annotations' / 'instances_train2017.json').read_text())
  images = [i for i in data['images'] if (coco128_dir / 'train2017' / i['file_name']).exists()]
  images = images[:count]
  ids = {i['id'] for i in images}
  return dict(data, images=images,
              annotations=[a for a in data['annotations'] if a['image_id'] in ids])


@pytest.mark.parametrize('mixed_precision', [None, 'bfloat16'])
def test_a_short_run_on_real_images_learns(coco128_dir, tmp_path, mixed_precision):
  """The loss must fall clearly and every variable stay finite (the trainer checks them at each
  log, here every step). 'bfloat16' trains in what `training.precision` picks for this CPU, as
  users get it; where that is float32 (no bfloat16 hardware) it would repeat the [None] run."""
  if mixed_precision and precision.training_precision(mixed_precision)[0] is None:
    pytest.skip('this CPU trains a requested bfloat16 in float32 (training.precision): the same '
                'run as [None]')
  annotations = tmp_path / 'instances.json'
  annotations.write_text(json.dumps(_first_images(coco128_dir, LEARN_IMAGES)))
  create_coco_tfrecord.convert(str(annotations), str(coco128_dir / 'train2017'),
                               str(tmp_path / 'train'), num_threads=2)
  config.parse_gin(['overfit_coco128.gin'], [
      f"build_train_dataset.file_pattern = '{tmp_path / 'train'}-*.tfrecord'",
      f'build_train_dataset.shuffle_buffer_size = {LEARN_IMAGES}',
      f'TRAIN_STEPS = {LEARN_STEPS}', 'RetinaNetTrainer.log_every_steps = 1',
      f'RetinaNetTrainer.checkpoint_every_steps = {LEARN_STEPS}',
      f'RetinaNetTrainer.mixed_precision = {mixed_precision!r}',
      'CosineDecayWithWarmup.base_learning_rate = 0.02',
      'CosineDecayWithWarmup.warmup_steps = 10',
      'CosineDecayWithWarmup.warmup_learning_rate = 0.001'])
  model_dir = tmp_path / 'model'
  trainer = trainer_lib.RetinaNetTrainer(str(model_dir), tf.distribute.get_strategy())
  assert trainer.train() == LEARN_STEPS
  losses = read_scalars(model_dir / 'train')['loss/total_loss']
  assert sorted(losses) == list(range(1, LEARN_STEPS + 1))
  curve = [losses[step] for step in sorted(losses)]
  # Means of 10 single-batch losses; a run that stops learning (issue 10) stays near its start.
  assert np.mean(curve[-10:]) < 0.8 * np.mean(curve[:10]), (trainer.mixed_precision, curve)


@pytest.fixture
def small_coco128(coco128_dir, tmp_path):
  """The first images of coco128 with their annotations, laid out like coco128 elsewhere."""
  data = _first_images(coco128_dir, NUM_IMAGES)
  images = data['images']
  root = tmp_path / 'my_coco'
  (root / 'train2017').mkdir(parents=True)
  (root / 'annotations').mkdir()
  for image in images:
    shutil.copy(coco128_dir / 'train2017' / image['file_name'], root / 'train2017')
  (root / 'annotations' / 'instances_train2017.json').write_text(json.dumps(data))
  return root, data


def test_trains_and_evaluates_a_coco128_like_folder(small_coco128, tmp_path):
  root, data = small_coco128
  result = _run(f'--data_dir={root}', f'--work_dir={tmp_path / "work"}',
                '--gin_bindings=TRAIN_STEPS = 3',
                '--gin_bindings=CosineDecayWithWarmup.warmup_steps = 1',
                '--gin_bindings=RetinaNetTrainer.eval_batch_size = 4')
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(summary) >= {'AP_before', 'AP50_before', 'AP_after', 'AP50_after', 'train_seconds'}
  for key in ('AP_before', 'AP50_before', 'AP_after', 'AP50_after'):
    assert 0.0 <= summary[key] <= 1.0, key
  assert summary['train_steps'] == 3 and summary['train_seconds'] > 0
  assert summary['num_images'] == len(data['images']) == NUM_IMAGES
  # COCOeval against the folder's own json: ground truth carried COCO's category ids.
  assert 'Evaluating the trained model' in result.stdout
  assert (tmp_path / 'work' / 'model' / 'eval_metrics.json').exists()


def test_a_folder_not_laid_out_like_coco128_is_named(tmp_path):
  (tmp_path / 'train2017').mkdir()
  result = _run(f'--data_dir={tmp_path}')
  assert result.returncode != 0
  assert f'{tmp_path} is not laid out like coco128' in result.stderr
  assert 'instances_train2017.json' in result.stderr


@training_helpers.HALF_PRECISION_HELD_BACK
def test_bfloat16_numerics_compares_gradients_and_trains(small_coco128, tmp_path):
  root, _ = small_coco128
  script = REPO / 'experiments' / 'bfloat16_numerics.py'
  result = subprocess.run(
      [sys.executable, str(script), f'--data_dir={root}', f'--work_dir={tmp_path}',
       '--train_steps=2'], cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(summary['gradient_cosines']) == {'backbone', 'pyramid', 'class head', 'box head'}
  for part in summary['gradient_cosines'].values():
    assert -1.0 <= part['min'] <= part['median'] <= 1.0
  assert len(summary['least_agreeing']) == 5
  assert summary['bfloat16_training'] == {'steps': 2, 'diverged': None}
  assert 'step 2/2' in result.stdout  # every step logged, so every step's variables checked
