"""Learning-rate schedules against hand-computed values, and the schedules of the recipes."""
import math

import gin
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from nasfpn_tf import config
from nasfpn_tf.training import CosineDecayWithWarmup, StepDecayWithWarmup, epochs_to_steps

def lr(schedule, step):
  return float(schedule(tf.constant(step, tf.int64)))


def warmup_value(step, warmup_steps=500, start=0.0067, end=0.08):
  return start + step / warmup_steps * (end - start)


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


# ------------------------------------------------------------------ step decay

@pytest.mark.parametrize('kwargs', [
    dict(boundary_epochs=[30, 40], steps_per_epoch=100),
    dict(boundary_steps=[3000, 4000]),
])
def test_step_decay_hand_values(kwargs):
  s = StepDecayWithWarmup(base_learning_rate=0.08, warmup_steps=500, warmup_learning_rate=0.0067,
                          **kwargs)
  expected = {
      0: 0.0067,                   # warm-up start
      250: 0.0067 + 0.5 * 0.0733,  # warm-up middle: 0.04335
      499: warmup_value(499),      # last warm-up step
      500: 0.08,                   # warm-up end
      2999: 0.08,                  # last step before the first boundary
      3000: 0.008,                 # first boundary: decayed from step 3000 on
      3999: 0.008,
      4000: 0.0008,                # second boundary
      10**6: 0.0008,
  }
  for step, value in expected.items():
    assert lr(s, step) == pytest.approx(value, rel=1e-5), step


def test_step_decay_without_warmup_and_other_rate():
  s = StepDecayWithWarmup(base_learning_rate=1.0, boundary_steps=[10, 20, 30], decay_rate=0.5,
                          warmup_steps=0)
  got = [lr(s, step) for step in (0, 9, 10, 19, 20, 29, 30, 100)]
  np.testing.assert_allclose(got, [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125], rtol=1e-6)


def test_step_decay_without_boundaries_is_constant_after_warmup():
  s = StepDecayWithWarmup(base_learning_rate=0.1, boundary_steps=[], warmup_steps=10,
                          warmup_learning_rate=0.0)
  np.testing.assert_allclose([lr(s, 0), lr(s, 5), lr(s, 10), lr(s, 1000)],
                             [0.0, 0.05, 0.1, 0.1], rtol=1e-6)


def test_fractional_epochs_round_to_steps():
  assert epochs_to_steps(0.5, 1849, 'x') == 924  # round(924.5) -> 924 (banker's), documented
  assert epochs_to_steps(30, 1849, 'x') == 55470
  s = StepDecayWithWarmup(boundary_epochs=[2.5], steps_per_epoch=10, warmup_steps=0)
  assert s.boundaries == [25]
  assert lr(s, 24) == pytest.approx(0.08) and lr(s, 25) == pytest.approx(0.008)


@pytest.mark.parametrize('kwargs,match', [
    (dict(), 'either in epochs or in steps'),
    (dict(boundary_epochs=[1], boundary_steps=[1]), 'either in epochs or in steps'),
    (dict(boundary_epochs=[30, 40]), 'steps_per_epoch must be a positive'),
    (dict(boundary_steps=[40, 30]), 'strictly increasing'),
    (dict(boundary_steps=[10], warmup_steps=-1), 'warmup_steps'),
])
def test_step_decay_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    StepDecayWithWarmup(**kwargs)


# ------------------------------------------------------------------ cosine

@pytest.mark.parametrize('kwargs', [dict(total_steps=5000),
                                    dict(total_epochs=50, steps_per_epoch=100)])
def test_cosine_hand_values(kwargs):
  s = CosineDecayWithWarmup(base_learning_rate=0.08, warmup_steps=500,
                            warmup_learning_rate=0.0067, **kwargs)
  assert lr(s, 0) == pytest.approx(0.0067, rel=1e-5)
  assert lr(s, 250) == pytest.approx(0.04335, rel=1e-5)
  assert lr(s, 500) == pytest.approx(0.08, rel=1e-5)              # cosine starts at the peak
  assert lr(s, 500 + 4500 // 4) == pytest.approx(0.04 * (1 + math.cos(math.pi / 4)), rel=1e-5)
  assert lr(s, 2750) == pytest.approx(0.04, rel=1e-5)             # midpoint of the cosine
  assert lr(s, 5000) == pytest.approx(0.0, abs=1e-9)              # end
  assert lr(s, 9000) == pytest.approx(0.0, abs=1e-9)              # and stays there


def test_cosine_alpha_floor():
  s = CosineDecayWithWarmup(base_learning_rate=1.0, total_steps=100, alpha=0.1, warmup_steps=0)
  assert lr(s, 0) == pytest.approx(1.0)
  assert lr(s, 50) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
  assert lr(s, 100) == pytest.approx(0.1, rel=1e-5)
  assert lr(s, 1000) == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize('kwargs,match', [
    (dict(), 'either in epochs or in steps'),
    (dict(total_epochs=10), 'steps_per_epoch must be a positive'),
    (dict(total_steps=500, warmup_steps=500), 'not more than its 500 warm-up steps'),
    (dict(total_steps=5000, alpha=2.0), 'alpha'),
])
def test_cosine_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    CosineDecayWithWarmup(**kwargs)


# ------------------------------------------------------------------ Keras integration

@pytest.mark.parametrize('schedule', [
    StepDecayWithWarmup(boundary_epochs=[30, 40], steps_per_epoch=100),
    CosineDecayWithWarmup(total_steps=5000, alpha=0.05),
])
def test_serialization_round_trip(schedule):
  config = tf_keras.optimizers.schedules.serialize(schedule)
  clone = tf_keras.optimizers.schedules.deserialize(config)
  assert type(clone) is type(schedule)
  assert clone.get_config() == schedule.get_config()
  for step in (0, 250, 500, 2750, 3000, 4000, 5000):
    assert lr(clone, step) == lr(schedule, step)


def test_in_tf_function_and_optimizer():
  s = StepDecayWithWarmup(boundary_steps=[3], warmup_steps=2, warmup_learning_rate=0.0,
                          base_learning_rate=1.0)
  f = tf.function(s)
  np.testing.assert_allclose([float(f(tf.constant(i, tf.int64))) for i in range(5)],
                             [0.0, 0.5, 1.0, 0.1, 0.1], rtol=1e-6)
  var = tf.Variable(0.0)
  opt = tf_keras.optimizers.SGD(learning_rate=s)
  for _ in range(5):
    opt.apply_gradients([(tf.constant(1.0), var)])
  # updates use lr(0..4) = 0, 0.5, 1, 0.1, 0.1
  assert float(var) == pytest.approx(-1.7, rel=1e-6)
  config = tf_keras.optimizers.serialize(opt)
  assert config['config']['learning_rate']['class_name'] == 'StepDecayWithWarmup'
  restored = tf_keras.optimizers.deserialize(config)
  assert isinstance(restored._learning_rate, StepDecayWithWarmup)
  assert restored._learning_rate.get_config() == s.get_config()


# ------------------------------------------------------------------ the recipes' schedules
# (what the recipes resolve to as a whole: tests/test_recipes.py)

def recipe_schedule(*names, bindings=()):
  config.parse_gin(names, bindings)
  return gin.get_bindings('RetinaNetTrainer')['learning_rate']


def test_the_50ep_recipe_schedule_between_its_milestones(clean_gin):
  s = recipe_schedule('recipe_coco_50ep.gin')
  spe = 1849
  assert s.boundaries == [30 * spe, 40 * spe]
  assert lr(s, 250) == pytest.approx(warmup_value(250), rel=1e-5)
  assert lr(s, 10 * spe) == pytest.approx(0.08, rel=1e-5)
  assert lr(s, 30 * spe - 1) == pytest.approx(0.08, rel=1e-5)
  assert lr(s, 35 * spe) == pytest.approx(0.008, rel=1e-5)     # epoch 35
  assert lr(s, 45 * spe) == pytest.approx(0.0008, rel=1e-5)    # epoch 45


def test_the_cosine_recipe_schedule(clean_gin):
  s = recipe_schedule('recipe_coco_cosine.gin', bindings=['NUM_TRAIN_IMAGES = 6400'])
  assert s.total == 5000  # 50 epochs of 100 steps
  assert lr(s, 250) == pytest.approx(0.04335, rel=1e-5)
  assert lr(s, 2750) == pytest.approx(0.04, rel=1e-5)
  assert lr(s, 5000) == pytest.approx(0.0, abs=1e-9)


def test_gin_dropblock_binds_the_model_builder(clean_gin):
  from nasfpn_tf.layers import DropBlock
  from nasfpn_tf.models import build_retinanet
  config.parse_gin(['recipe_coco_150ep_dropblock.gin'])
  assert gin.query_parameter('build_retinanet.dropblock_keep_prob') == 0.9
  assert gin.query_parameter('build_retinanet.dropblock_size') == 3
  model = build_retinanet(image_size=(128, 128), num_classes=3, backbone='resnet10',
                          num_filters=16, num_repeats=1, head_num_convs=1, head_num_filters=16)
  dropblocks = [m for m in model.submodules if isinstance(m, DropBlock)]
  # One DropBlock after every merging cell of the 7-cell pyramid, keep 0.9, 3x3 blocks.
  assert len(dropblocks) == 7
  assert {(d.keep_prob, d.block_size, d.ramp_steps) for d in dropblocks} == {(0.9, 3, 0)}
