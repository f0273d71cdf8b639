"""experiments/overfit_coco128.py: any coco128-like folder in, the JSON summary line out."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'experiments' / 'overfit_coco128.py'
NUM_IMAGES = 6


def _run(*args, timeout=600):
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))


@pytest.fixture
def small_coco128(coco128_dir, tmp_path):
  """The first images of coco128 with their annotations, laid out like coco128 elsewhere."""
  data = json.loads((coco128_dir / 'annotations' / 'instances_train2017.json').read_text())
  images = [i for i in data['images'] if (coco128_dir / 'train2017' / i['file_name']).exists()]
  images = images[:NUM_IMAGES]
  ids = {i['id'] for i in images}
  root = tmp_path / 'my_coco'
  (root / 'train2017').mkdir(parents=True)
  (root / 'annotations').mkdir()
  for image in images:
    shutil.copy(coco128_dir / 'train2017' / image['file_name'], root / 'train2017')
  data = dict(data, images=images,
              annotations=[a for a in data['annotations'] if a['image_id'] in ids])
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
  result = _run(f'--data_dir={tmp_path}', timeout=120)
  assert result.returncode != 0
  assert f'{tmp_path} is not laid out like coco128' in result.stderr
  assert 'instances_train2017.json' in result.stderr
