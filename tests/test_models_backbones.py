"""Backbones: trimmed to C3-C5 (params), the BN training flag reaches TFM layers, normalization."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from official.vision.modeling.backbones import mobilenet

from nasfpn_tf.models import backbones
from nasfpn_tf.models import geometry


def test_mobilenetv2_trimmed_drops_unused_final_conv():
  trimmed = backbones.build_backbone('mobilenetv2', [64, 64, 3])
  full = mobilenet.MobileNet(model_id='MobileNetV2',
                             input_specs=tf_keras.layers.InputSpec(shape=[None, 64, 64, 3]))
  assert full.count_params() == 2_257_984
  assert trimmed.count_params() == 1_843_264
  assert sorted(trimmed.output_specs) == ['3', '4', '5']
  outputs = trimmed(tf.zeros([2, 64, 64, 3]))
  assert {k: v.shape.as_list() for k, v in outputs.items()} == {
      '3': [2, 8, 8, 32], '4': [2, 4, 4, 96], '5': [2, 2, 2, 320]}


@pytest.mark.parametrize('name,params,channels', [
    ('resnet50', 23_561_152, [512, 1024, 2048]),
    ('resnet10', 4_915_904, [128, 256, 512]),
])
def test_resnet_params_and_specs(name, params, channels):
  model = backbones.build_backbone(name, [64, 96, 3])
  assert model.count_params() == params
  assert {k: v.as_list() for k, v in model.output_specs.items()} == {
      '3': [None, 8, 12, channels[0]], '4': [None, 4, 6, channels[1]],
      '5': [None, 2, 3, channels[2]]}


def test_training_flag_reaches_batch_norm():
  model = backbones.build_backbone('resnet10', [32, 32, 3])
  images = tf.random.uniform([2, 32, 32, 3])
  moving = [w for w in model.non_trainable_weights if 'moving_mean' in w.name]
  before = [w.numpy() for w in moving]
  inference = model(images, training=False)
  assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, moving))
  training = model(images, training=True)
  assert not all(np.array_equal(b, w.numpy()) for b, w in zip(before, moving))
  # Batch statistics vs moving statistics give different features.
  assert not np.allclose(inference['5'], training['5'])


def test_unknown_backbone_names_gin_binding():
  with pytest.raises(ValueError, match='build_retinanet.backbone'):
    backbones.build_backbone('resnet11', [64, 64, 3])


def test_image_normalization_values_and_config():
  layer = backbones.ImageNormalization()
  pixels = np.array([[[[0.0, 128.0, 255.0]]]], np.float32)
  expected = (pixels - np.array(geometry.IMAGENET_MEAN_RGB)) / np.array(
      geometry.IMAGENET_STDDEV_RGB)
  np.testing.assert_allclose(layer(pixels), expected, rtol=1e-6)
  clone = backbones.ImageNormalization.from_config(layer.get_config())
  np.testing.assert_allclose(clone(pixels), expected, rtol=1e-6)
