"""training.init_checkpoint: TF Model Garden backbone checkpoints (written here by TFM's own
backbone classes) and our model dirs load weight for weight; what does not fit is named and
nothing is loaded. The trainer's use of it: tests/test_recipes.py.

'backbone' reads `model.backbone` only: those tests give it our backbone alone (what
`RetinaNet.backbone` is, `backbones.build_backbone`), a fifth of a RetinaNet's build time."""
import types

import numpy as np
import pytest
import tensorflow as tf

from nasfpn_tf.models import backbones
from nasfpn_tf.models import factory
from nasfpn_tf.training import init_checkpoint
from training_helpers import write_tfm_backbone_checkpoint

TINY = dict(image_size=(128, 128), num_classes=3, num_filters=8, num_repeats=1,
            head_num_convs=1, head_num_filters=8)


def tiny_model(backbone='resnet10', **overrides):
  return factory.build_retinanet(backbone=backbone, **{**TINY, **overrides})


def backbone_only(name='resnet10'):
  """What 'backbone' reads of a RetinaNet: its `backbone`."""
  return types.SimpleNamespace(backbone=backbones.build_backbone(name, [128, 128, 3]))


@pytest.fixture(scope='module')
def tfm_checkpoints(tmp_path_factory):
  """{name: (TFM backbone, checkpoint path)} for resnet10, resnet18 and mobilenetv2."""
  root = tmp_path_factory.mktemp('tfm_backbones')
  return {name: write_tfm_backbone_checkpoint(name, root / name / 'ckpt')
          for name in ('resnet10', 'resnet18', 'mobilenetv2')}


def _values(variables):
  return [v.numpy() for v in variables]


@pytest.mark.parametrize('name', ['resnet10', 'mobilenetv2'])
def test_a_tfm_backbone_checkpoint_loads_into_our_trimmed_backbone(tfm_checkpoints, name):
  tfm_backbone, path = tfm_checkpoints[name]
  model = backbone_only(name)
  assert init_checkpoint.initialize(model, path) == path
  # Every weight ours has is the one TFM saved (MobileNetV2's trimmed last conv stays unread) ...
  assert len(tfm_backbone.weights) >= len(model.backbone.weights)
  for ours, theirs in zip(model.backbone.weights, tfm_backbone.weights):
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
  # ... and the backbone computes TFM's features, batch-norm statistics included.
  images = tf.random.uniform([1, 128, 128, 3], seed=1)
  expected, actual = tfm_backbone(images, training=False), model.backbone(images, training=False)
  for level in actual:
    np.testing.assert_allclose(actual[level], expected[level], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_of_another_backbone_names_the_mismatches_and_loads_nothing(
    tfm_checkpoints):
  model = backbone_only('resnet10')
  before = _values(model.backbone.weights)
  with pytest.raises(init_checkpoint.InitCheckpointError) as error:
    init_checkpoint.initialize(model, tfm_checkpoints['resnet18'][1])
  message = str(error.value)
  assert 'does not fit the model\'s backbone' in message and 'nothing was loaded' in message
  # ResNet-18's 2nd block of 64 filters meets ResNet-10's first block of 128.
  assert ('backbone/layer_with_weights-3/_conv1/kernel (' in message and
          'shape [3, 3, 64, 64] in the checkpoint, [3, 3, 64, 128] in the model' in message)
  for old, new in zip(before, _values(model.backbone.weights)):
    np.testing.assert_array_equal(old, new)


def test_a_missing_checkpoint_is_named(tmp_path):
  model = backbone_only()
  with pytest.raises(init_checkpoint.InitCheckpointError,
                     match=r'RetinaNetTrainer.init_checkpoint: no checkpoint .*no_such/ckpt-1'):
    init_checkpoint.initialize(model, str(tmp_path / 'no_such' / 'ckpt-1'))
  with pytest.raises(init_checkpoint.InitCheckpointError, match='0 checkpoints'):
    init_checkpoint.initialize(model, str(tmp_path))
  with pytest.raises(ValueError, match='init_checkpoint_modules must be one of'):
    init_checkpoint.initialize(model, str(tmp_path), 'decoder')


def test_all_reads_a_model_dir_and_names_the_variables_it_lacks(tfm_checkpoints, tmp_path):
  model = tiny_model()
  saved = _values(model.weights)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(tmp_path), 1)
  path = manager.save()
  for variable in model.weights:
    variable.assign(tf.zeros_like(variable))
  assert init_checkpoint.initialize(model, str(tmp_path), 'all') == path  # the folder's latest
  for old, new in zip(saved, _values(model.weights)):
    np.testing.assert_array_equal(old, new)
  # 'backbone' from a model dir: the RetinaNet's backbone in our layout.
  backbone = backbone_only()
  init_checkpoint.initialize(backbone, path, 'backbone')
  for old, new in zip(_values(model.backbone.weights), _values(backbone.backbone.weights)):
    np.testing.assert_array_equal(old, new)

  deeper_head = tiny_model(head_num_convs=2)
  with pytest.raises(init_checkpoint.InitCheckpointError) as error:
    init_checkpoint.initialize(deeper_head, path, 'all')
  assert "does not fit the model (init_checkpoint_modules = 'all')" in str(error.value)
  assert '/cls_convs/1/kernel (head/classnet-conv_1/kernel:0): not in the checkpoint' in str(
      error.value)
  with pytest.raises(init_checkpoint.InitCheckpointError,
                     match="not a nasfpn_tf checkpoint.*init_checkpoint_modules = 'backbone'"):
    init_checkpoint.initialize(deeper_head, tfm_checkpoints['resnet10'][1], 'all')
