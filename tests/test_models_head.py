"""The head mirrors TFM's RetinaNetHead: same params, and copied weights give the same outputs."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from official.vision.modeling.heads import dense_prediction_heads

from nasfpn_tf.layers import common
from nasfpn_tf.models.fcos_head import FCOSHead
from nasfpn_tf.models.head import RetinaNetHead


def _features(min_level, max_level, channels, batch=1, size=32):
  return {str(l): tf.random.normal([batch, size // 2**(l - min_level),
                                    size // 2**(l - min_level) * 2, channels])
          for l in range(min_level, max_level + 1)}


def test_params_equal_tfm_head_91_classes_9_anchors_256_filters():
  """The paper's head (P3-P7, 4 convs of 256 filters, 91 classes x 9 anchors) and TFM's, built
  with the same settings: the same weights, shape by shape, 6,732,375 parameters in all."""
  kwargs = dict(min_level=3, max_level=7, num_classes=91, num_anchors_per_location=9)
  ours = RetinaNetHead(**kwargs)
  tfm = dense_prediction_heads.RetinaNetHead(**kwargs, num_convs=4, num_filters=256)
  features = _features(3, 7, 256, size=16)
  ours(features)
  tfm(features)
  assert [w.shape for w in ours.weights] == [w.shape for w in tfm.weights]
  # Hand count: 2 branches x 4 shared 3x3 convs (+ bias) and a batch norm (4 values) per level,
  # then the 3x3 class (91 x 9) and box (4 x 9) convs with bias.
  convs = 2 * 4 * (9 * 256 * 256 + 256) + 2 * 4 * 5 * 4 * 256
  outputs = (9 * 256 + 1) * (91 * 9) + (9 * 256 + 1) * (4 * 9)
  assert ours.count_params() == tfm.count_params() == convs + outputs == 6_732_375


@pytest.mark.parametrize('separable', [False, True])
def test_tfm_weights_give_tfm_outputs(separable):
  kwargs = dict(min_level=3, max_level=5, num_classes=4, num_anchors_per_location=3,
                num_convs=2, num_filters=16, use_separable_conv=separable)
  tfm = dense_prediction_heads.RetinaNetHead(**kwargs)
  ours = RetinaNetHead(**kwargs)
  features = _features(3, 5, 16, batch=2)
  tfm_scores, tfm_boxes, _ = tfm(features)
  ours(features)
  assert [w.shape for w in ours.weights] == [w.shape for w in tfm.weights]
  ours.set_weights(tfm.get_weights())
  scores, boxes = ours(features, training=False)
  tfm_scores, tfm_boxes, _ = tfm(features, training=False)
  for level in ('3', '4', '5'):
    np.testing.assert_allclose(scores[level], tfm_scores[level], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(boxes[level], tfm_boxes[level], rtol=1e-5, atol=1e-6)
  assert scores['3'].shape == [2, 32, 64, 12] and boxes['5'].shape == [2, 8, 16, 12]


def test_class_prior_bias_and_per_level_norms():
  head = RetinaNetHead(3, 4, num_classes=2, num_anchors_per_location=1, num_convs=1,
                       num_filters=8)
  head(_features(3, 4, 8))
  np.testing.assert_allclose(head.classifier.bias.numpy(), np.log(0.01 / 0.99), rtol=1e-6)
  np.testing.assert_array_equal(head.box_regressor.bias.numpy(), 0.0)
  # One shared conv per branch, one BN per level.
  assert len(head.cls_convs) == 1 and len(head.cls_norms) == 2
  assert head.cls_norms[0][0] is not head.cls_norms[1][0]


def test_config_round_trip():
  head = RetinaNetHead(3, 5, num_classes=3, num_anchors_per_location=2, num_convs=1,
                       num_filters=8, use_separable_conv=True, kernel_regularizer='l2')
  clone = RetinaNetHead.from_config(head.get_config())
  assert clone.get_config() == head.get_config()


def test_predictors_pad_their_output_channels_in_bfloat16():
  """The class and box predictors are PaddedOutputConv2D (the separable head keeps TFM's
  SeparableConv2D, whose bfloat16 gradient did not show the fault); FCOS's too."""
  head = RetinaNetHead(3, 4, num_classes=91, num_anchors_per_location=9, num_convs=1,
                       num_filters=8)
  assert type(head.classifier) is type(head.box_regressor) is common.PaddedOutputConv2D
  assert type(head.cls_convs[0]) is tf_keras.layers.Conv2D
  separable = RetinaNetHead(3, 4, num_classes=91, num_anchors_per_location=9, num_convs=1,
                            num_filters=8, use_separable_conv=True)
  assert type(separable.classifier) is tf_keras.layers.SeparableConv2D
  fcos = FCOSHead(3, 4, num_classes=91, num_convs=1, num_filters=8)
  assert all(type(layer) is common.PaddedOutputConv2D
             for layer in (fcos.classifier, fcos.box_regressor, fcos.centerness))
