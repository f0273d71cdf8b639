"""The COCO training recipes (gin_configs/recipe_*.gin): what they resolve to (--mode=show_config),
the batch-size scaling, and a two-step run through the paper's recipe on a tiny model."""
import json
import math

import gin
import pytest

from nasfpn_tf import config
from nasfpn_tf.models import factory
from nasfpn_tf.training import recipes
from training_helpers import TINY_MODEL, run_main, write_tfm_backbone_checkpoint

COCO_STEPS_PER_EPOCH = math.ceil(118287 / 64)  # 1849


def test_the_r50_recipe_is_the_papers_run():
  config.parse_gin(['nasfpn_r50_7x256_640.gin', 'recipe_coco_50ep.gin'])
  run = recipes.resolved_run(count_params=False)
  assert COCO_STEPS_PER_EPOCH == 1849
  assert run == {
      'train_steps': 50 * 1849, 'global_batch_size': 64, 'l2_weight_decay': 1e-4,
      'momentum': 0.9, 'mixed_precision': None,
      # Warm-up from 0.0067, 0.08, then x0.1 from epoch 30 and from epoch 40.
      'learning_rate': {0: 0.0067, 500: 0.08, 30 * 1849: 0.008, 40 * 1849: 0.0008},
      'image_size': [640, 640], 'init_checkpoint': None, 'init_checkpoint_modules': 'backbone'}
  assert run['train_steps'] == 92450
  assert gin.query_parameter('build_train_dataset.aug_scale_min') == 0.8
  assert gin.query_parameter('build_train_dataset.aug_scale_max') == 1.2


def test_one_binding_changes_the_batch_and_scales_the_learning_rate():
  config.parse_gin(['nasfpn_r50_7x256_640.gin', 'recipe_coco_50ep.gin'],
                   ['GLOBAL_BATCH_SIZE = 16'])
  run = recipes.resolved_run(count_params=False)
  steps_per_epoch = math.ceil(118287 / 16)
  assert run['global_batch_size'] == 16
  assert run['train_steps'] == 50 * steps_per_epoch
  assert run['learning_rate'] == {0: 0.001675, 500: 0.02, 30 * steps_per_epoch: 0.002,
                                  40 * steps_per_epoch: 0.0002}


def test_the_dropblock_recipe_runs_150_epochs_with_dropblock():
  config.parse_gin(['nasfpn_r50_7x256_640.gin', 'recipe_coco_150ep_dropblock.gin'])
  run = recipes.resolved_run(count_params=False)
  assert run['train_steps'] == 150 * 1849
  assert run['learning_rate'] == {0: 0.0067, 500: 0.08, 120 * 1849: 0.008, 140 * 1849: 0.0008}
  assert factory.model_argument('dropblock_keep_prob') == 0.9
  assert factory.model_argument('dropblock_size') == 3


def test_the_cosine_recipe_decays_to_zero_at_the_last_step():
  config.parse_gin(['nasfpn_r50_7x256_640.gin', 'recipe_coco_cosine.gin'])
  run = recipes.resolved_run(count_params=False)
  assert run['train_steps'] == 92450
  assert run['learning_rate'] == {0: 0.0067, 500: 0.08, 92450: 0.0}
  schedule = gin.get_bindings('RetinaNetTrainer')['learning_rate']
  middle = (500 + 92450) // 2
  assert float(schedule(middle)) == pytest.approx(0.04, rel=1e-3)


def test_a_run_without_a_learning_rate_is_named():
  config.parse_gin(['nasfpn_r50_7x256_640.gin'])
  with pytest.raises(ValueError, match='RetinaNetTrainer.learning_rate is required'):
    recipes.resolved_run(count_params=False)


def test_show_config_prints_the_run_as_one_json_line():
  bindings = TINY_MODEL + ['GLOBAL_BATCH_SIZE = 32']
  lines = run_main('--mode=show_config', '--gin_file=recipe_coco_50ep.gin',
                   *[f'--gin_bindings={b}' for b in bindings]).strip().splitlines()
  assert len(lines) == 1
  run = json.loads(lines[0])
  config.parse_gin(['recipe_coco_50ep.gin'], bindings)
  assert run['num_params'] == factory.build_retinanet().count_params()
  assert run['train_steps'] == 50 * math.ceil(118287 / 32)
  assert run['learning_rate']['500'] == pytest.approx(0.04)
  assert run['image_size'] == [128, 128]


def test_two_steps_through_the_papers_recipe_from_an_imagenet_backbone(synthetic_records, tmp_path):
  """The paper's recipe file as is, on a tiny model and data (2 steps = 1 epoch of 4 images at
  batch 2, the learning rate scaled to batch 2), its backbone from a TF Model Garden checkpoint;
  a restart resumes from its own checkpoint instead."""
  _, backbone_checkpoint = write_tfm_backbone_checkpoint('resnet10', tmp_path / 'imagenet' / 'ckpt')
  bindings = TINY_MODEL + [
      f"build_train_dataset.file_pattern = '{synthetic_records['train']}'",
      'GLOBAL_BATCH_SIZE = 2', 'NUM_TRAIN_IMAGES = 4', 'TRAIN_EPOCHS = 1',
      'RetinaNetTrainer.log_every_steps = 1',
      f"RetinaNetTrainer.init_checkpoint = '{tmp_path / 'imagenet'}'"]
  args = ['--mode=train', f'--model_dir={tmp_path / "run"}', '--gin_file=recipe_coco_50ep.gin',
          *[f'--gin_bindings={b}' for b in bindings]]
  printed = run_main(*args)
  assert f'Initialized the backbone from {backbone_checkpoint}.' in printed
  assert 'step 2/2 |' in printed
  schedule = gin.get_bindings('RetinaNetTrainer')['learning_rate']
  assert schedule.base_learning_rate == pytest.approx(0.08 * 2 / 64)
  assert schedule.boundaries == [60, 80]  # Epochs 30 and 40 of 2 steps.
  assert f'lr {float(schedule(2)):.6g} |' in printed
  with open(tmp_path / 'run' / 'model_config.json') as f:
    assert json.load(f)['l2_weight_decay'] == 1e-4

  # The model dir has its checkpoint: the backbone checkpoint is not read.
  printed = run_main(*args)
  assert f'Restored {tmp_path / "run" / "ckpt-2"} at step 2.' in printed
  assert 'Initialized' not in printed
