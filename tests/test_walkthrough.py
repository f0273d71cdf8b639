"""README, "Your own dataset": examples/own_dataset.sh runs as written on coco128, a tiny model and
a few steps set through its variables, and every step leaves what the README says it does."""
import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import tensorflow as tf

import training_helpers
from nasfpn_tf.data import label_map as label_map_lib

REPO = training_helpers.REPO
SCRIPT = REPO / 'examples' / 'own_dataset.sh'
README_SECTION = '## Your own dataset'


def readme_walkthrough() -> str:
  """The README's "Your own dataset" section, up to the next section."""
  text = (REPO / 'README.md').read_text()
  start = text.index(README_SECTION)
  end = text.find('\n## ', start + len(README_SECTION))
  return text[start:end if end >= 0 else len(text)]


def test_the_readme_shows_the_scripts_commands_verbatim():
  """Each code block of the walkthrough is a piece of the script, so the README cannot drift."""
  blocks = re.findall(r'```sh\n(.*?)```', readme_walkthrough(), re.S)
  script = SCRIPT.read_text()
  assert len(blocks) >= 6
  for block in blocks:
    if block.startswith('bash examples/own_dataset.sh'):
      continue
    assert block in script, f'README block not in {SCRIPT.name}:\n{block}'


def _json_lines(stdout: str):
  return [json.loads(line) for line in stdout.splitlines() if line.startswith('{')]


def test_the_walkthrough_runs_on_coco128(tmp_path, coco128_dir):
  work = tmp_path / 'work'
  model_gin = tmp_path / 'tiny_model.gin'
  # The suite's tiny network; the script binds num_classes (91 for COCO's ids).
  model_gin.write_text('\n'.join(
      b for b in training_helpers.TINY_MODEL if 'num_classes' not in b) + '\n')
  predict_image = sorted((coco128_dir / 'train2017').glob('*.jpg'))[0]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PY=sys.executable,
             NASFPN_COCO128=str(coco128_dir), WORK=str(work), NUM_VAL='4',
             MODEL_GIN=str(model_gin), NUM_TRAIN_IMAGES='4', BATCH='2', EPOCHS='1',
             NUM_CALIBRATION_IMAGES='2', PREDICT_INPUT=str(predict_image))
  done = subprocess.run(['bash', str(SCRIPT)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=training_helpers.SUBPROCESS_TIMEOUT, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
  lines = _json_lines(done.stdout)

  # 0-1. The split, and the records of each split with their label maps.
  converted = [line for line in lines if 'images_written' in line]
  assert [c['images_written'] for c in converted] == [124, 4]
  split = json.loads((work / 'split' / 'instances_proxy_heldout.json').read_text())
  assert len(split['images']) == 4
  for prefix in ('train', 'val'):
    assert list((work / 'records').glob(f'{prefix}-*.tfrecord'))
    names = label_map_lib.read_label_map(str(work / 'records' / f'{prefix}-label_map.json'))
    assert names[1] == 'person' and names[90] == 'toothbrush'
  assert sum(1 for _ in tf.data.TFRecordDataset(
      [str(p) for p in (work / 'records').glob('val-*.tfrecord')])) == 4

  # 2. show_config: the recipe counted in epochs of NUM_TRAIN_IMAGES at batch BATCH.
  shown = next(line for line in lines if 'train_steps' in line)
  assert (shown['train_steps'], shown['global_batch_size']) == (2, 2)

  # 3. Trained to the end, evaluated on the 4 val images against their json.
  metrics = json.loads((work / 'model' / 'eval_metrics.json').read_text())
  assert metrics['step'] == 2
  assert all(0.0 <= metrics[k] <= 1.0 or metrics[k] == -1.0 for k in ('AP', 'AP50', 'AR100'))
  model_config = json.loads((work / 'model' / 'model_config.json').read_text())
  assert model_config['num_classes'] == 91
  operative = (work / 'model' / 'operative_config.gin').read_text()
  assert str(work / 'split' / 'instances_proxy_heldout.json') in operative  # eval_annotation_file

  # 4. The SavedModel, with the dataset's names in its assets.
  saved_model_dir = work / 'export' / 'saved_model' / '1'
  assert tf.saved_model.contains_saved_model(str(saved_model_dir))
  assets = label_map_lib.read_label_map(str(saved_model_dir / 'assets' / 'label_map.json'))
  assert assets[1] == 'person'

  # 5. The int8 TFLite file (uint8 pixels in) with its labels beside it.
  tflite_path = work / 'export' / 'model.tflite'
  interpreter = tf.lite.Interpreter(model_path=str(tflite_path))
  assert interpreter.get_input_details()[0]['dtype'] == np.uint8
  labels = label_map_lib.read_tflite_labels(label_map_lib.tflite_labels_path(str(tflite_path)))
  assert labels[1] == 'person' and labels[90] == 'toothbrush'

  # 6. Each export's detections drawn on the image, and detections.json.
  for name in ('saved_model', 'tflite'):
    out = work / 'predictions' / name
    with Image.open(out / predict_image.name) as drawn, Image.open(predict_image) as original:
      assert drawn.size == original.size
    detections = json.loads((out / 'detections.json').read_text())
    assert all(d['file_name'] == str(predict_image) for d in detections)
