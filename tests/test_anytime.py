"""Anytime RetinaNet (build_retinanet.anytime): exits equal the plain model and the early-exit
models, early exits cost less, deep supervision sums the exits' losses, configs and .keras files
keep it, bad exits and bindings are named."""
import inspect
import json

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from nasfpn_tf import checkpointing
from nasfpn_tf.models import RetinaNet
from nasfpn_tf.models import retinanet
from nasfpn_tf.models.losses import AnytimeLoss, RetinaNetLoss, exit_loss_keys
from nasfpn_tf.utils import model_stats

TINY = dict(image_size=(128, 128), num_classes=4, backbone='resnet10', num_filters=16,
            num_repeats=2, head_num_convs=1, head_num_filters=16, anchor_num_scales=1,
            anchor_aspect_ratios=(1.0, 2.0), max_detections=20)


@pytest.fixture(scope='module')
def images():
  return tf.random.stateless_uniform([2, 128, 128, 3], seed=[3, 4], maxval=255.0)


@pytest.fixture(scope='module')
def separate_heads():
  """2 exits, a head each."""
  return RetinaNet(**TINY, anytime=True, anytime_shared_head=False,
                   anytime_loss_weights=(0.5, 2.0))


def _assert_close(expected, actual):
  tf.nest.map_structure(lambda e, a: np.testing.assert_allclose(e, a, atol=1e-5, rtol=1e-5),
                        expected, actual)


def test_last_exit_equals_the_plain_model_with_the_same_weights(images):
  plain = RetinaNet(**TINY)
  # anytime=False builds what it built before: the same layers, no extra head or output.
  assert [layer.name for layer in plain.layers] == [
      'images', 'normalize', plain.backbone.name, 'decoder', 'head', 'detection_generator']
  assert not set(plain.get_config()) & {'anytime', 'anytime_shared_head', 'anytime_loss_weights'}
  anytime = RetinaNet(**TINY, anytime=True)
  # A shared head: the same variables, in the same order, as the plain model.
  assert [w.shape for w in anytime.weights] == [w.shape for w in plain.weights]
  anytime.set_weights(plain.get_weights())
  expected = plain(images, training=False)
  assert sorted(expected) == ['box_outputs', 'cls_outputs']
  outputs = anytime(images, training=False)
  assert sorted(outputs) == ['box_outputs', 'cls_outputs', 'exits']
  assert sorted(outputs['exits']) == ['1', '2']
  tf.nest.map_structure(np.testing.assert_array_equal, expected,
                        {k: outputs[k] for k in expected})
  tf.nest.map_structure(np.testing.assert_array_equal, expected, outputs['exits']['2'])
  _assert_close(expected, anytime(images, training=False, num_repeats=2))
  tf.nest.map_structure(np.testing.assert_array_equal, plain.detect(images),
                        anytime.detect(images))


def test_early_exits_are_the_exits_of_the_whole_graph(separate_heads, images):
  outputs = separate_heads(images, training=False)
  for k in (1, 2):
    _assert_close(outputs['exits'][str(k)], separate_heads(images, training=False, num_repeats=k))
  # Each exit reads its own head: the exits differ.
  assert not np.allclose(outputs['exits']['1']['cls_outputs']['3'],
                         outputs['exits']['2']['cls_outputs']['3'])
  names = [layer.name for layer in separate_heads.layers]
  assert {'head', 'head_exit1'} <= set(names) and 'head_exit2' not in names


def test_an_early_exit_computes_less(separate_heads):
  """Exit 1's graph holds the first pyramid and one head only: fewer FLOPs and ops."""
  def stats(k):
    call = lambda x: separate_heads(x, training=False, num_repeats=k)  # noqa: E731
    graph = model_stats.frozen_inference_graph(call, (128, 128, 3))
    return model_stats.count_flops(call, (128, 128, 3)), len(graph.get_operations())
  (flops1, ops1), (flops2, ops2) = stats(1), stats(2)
  assert flops1 < flops2 and ops1 < ops2
  # The second pyramid is the difference: its cells' 3x3 convs of 16 filters at 16x16 (P3) down
  # to 1x1 (P7) pixels, about 2.2 MFLOPs, most at P3 and P4.
  assert 1.5e6 < flops2 - flops1 < 3e6


def _random_labels(model, batch, rng):
  """AnchorLabeler-shaped targets: per level class ids (-1 background) and box deltas, weights
  1 for classes, 1 for boxes of positives."""
  labels = {'cls_targets': {}, 'box_targets': {}, 'cls_weights': {}, 'box_weights': {}}
  for level, anchors in model.anchor_boxes.items():
    height, width, coordinates = anchors.shape
    classes = rng.integers(-1, 4, [batch, height, width, coordinates // 4])
    classes[rng.random(classes.shape) < 0.9] = -1
    labels['cls_targets'][level] = tf.constant(classes)
    labels['box_targets'][level] = tf.constant(
        rng.normal(size=[batch, height, width, coordinates]), tf.float32)
    labels['cls_weights'][level] = tf.ones(classes.shape)
    labels['box_weights'][level] = tf.constant(classes > 0, tf.float32)
  return labels


def test_anytime_loss_is_the_weighted_sum_of_the_exit_losses(separate_heads, images):
  labels = _random_labels(separate_heads, 2, np.random.default_rng(0))
  single = RetinaNetLoss(num_classes=4)
  assert separate_heads.exit_loss_weights == [0.5, 2.0]
  losses = AnytimeLoss(single, separate_heads.exit_loss_weights)(
      separate_heads(images, training=False), labels)
  assert set(losses) == {'total_loss', 'cls_loss', 'box_loss', *exit_loss_keys(2)}
  expected = {'total_loss': 0.0, 'cls_loss': 0.0, 'box_loss': 0.0}
  for k, weight in zip((1, 2), (0.5, 2.0)):
    alone = single(separate_heads(images, training=False, num_repeats=k), labels)
    np.testing.assert_allclose(losses[f'exit{k}_loss'], alone['total_loss'], rtol=1e-5)
    expected = {name: expected[name] + weight * alone[name] for name in expected}
  for name, value in expected.items():
    np.testing.assert_allclose(losses[name], value, rtol=1e-5)
  assert float(losses['exit1_loss']) != pytest.approx(float(losses['exit2_loss']))


def test_plain_configs_leave_out_the_anytime_arguments_at_their_defaults():
  """What checkpointing assumes of a config without them."""
  defaults = {name: inspect.signature(RetinaNet.__init__).parameters[name].default
              for name in retinanet.ANYTIME_ARGUMENTS}
  assert defaults == {name: checkpointing.OMITTED_DEFAULTS[name]
                      for name in retinanet.ANYTIME_ARGUMENTS}


def test_equal_weights_by_default():
  model = RetinaNet(**dict(TINY, num_repeats=1), anytime=True)
  assert model.exit_loss_weights == [1.0]
  assert model.get_config()['anytime_loss_weights'] is None


def test_config_and_keras_round_trips_keep_anytime(separate_heads, images, tmp_path):
  config = separate_heads.get_config()
  assert (config['anytime'], config['anytime_shared_head'], config['anytime_loss_weights']) == (
      True, False, [0.5, 2.0])
  separate_heads.detect(images, num_repeats=1)  # A built exit model is never saved.
  path = str(tmp_path / 'anytime.keras')
  separate_heads.save(path)
  reloaded = tf_keras.models.load_model(path)
  assert reloaded.get_config() == config
  assert RetinaNet.from_config(json.loads(json.dumps(config))).get_config() == config
  assert reloaded.count_params() == separate_heads.count_params()
  tf.nest.map_structure(np.testing.assert_array_equal, separate_heads(images, training=False),
                        reloaded(images, training=False))
  _assert_close(separate_heads(images, training=False, num_repeats=1),
                reloaded(images, training=False, num_repeats=1))


@pytest.mark.parametrize('exit_number', [0, 3, -1, 1.5, True])
def test_bad_exits_name_the_binding(separate_heads, images, exit_number):
  with pytest.raises(ValueError, match=rf'num_repeats={exit_number!r} .*1\.\.2.*'
                                       r'build_retinanet\.num_repeats = 2'):
    separate_heads.detect(images, num_repeats=exit_number)


@pytest.mark.parametrize('arguments, binding', [
    (dict(anytime_loss_weights=(1.0,)), r'build_retinanet\.anytime_loss_weights = \[1\.0\]'),
    (dict(anytime_loss_weights=(1.0, -1.0)), r'build_retinanet\.anytime_loss_weights'),
    (dict(anytime_loss_weights=(0.0, 0.0)), r'build_retinanet\.anytime_loss_weights'),
])
def test_bad_loss_weights_name_the_binding(arguments, binding):
  with pytest.raises(ValueError, match=binding):
    RetinaNet(**TINY, anytime=True, **arguments)


@pytest.mark.parametrize('arguments', [dict(anytime_loss_weights=(1.0, 1.0)),
                                       dict(anytime_shared_head=False)])
def test_anytime_settings_without_anytime_are_an_error(arguments):
  with pytest.raises(ValueError, match=r'build_retinanet\.anytime = True'):
    RetinaNet(**TINY, **arguments)
