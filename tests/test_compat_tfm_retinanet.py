"""Whole TFM RetinaNet models converted by `retinanet_from_tfm` compute what TFM computes."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from official.core import exp_factory
from official.vision import registry_imports  # noqa: F401  pylint: disable=unused-import
from official.vision.modeling import factory
from official.vision.ops import anchor

from nasfpn_tf.compat.tfm import load_tfm_retinanet_weights, retinanet_from_tfm
from nasfpn_tf.models import RetinaNet
from nasfpn_tf.models.geometry import normalize_pixels
from nasfpn_tf.models.postprocess import sorted_detection_rows

SIZE = 128
NUM_CLASSES = 5
# Class prior that puts many candidates above the 0.05 score threshold.
LIFTED_PRIOR = 0.2


def build_tfm(decoder='nasfpn', weight_decay=1e-4):
  """TFM's COCO RetinaNet experiment shrunk: ResNet-10, 1 repeat of 32 filters, a 1-conv head."""
  model_config = exp_factory.get_exp_config('retinanet_resnetfpn_coco').task.model
  model_config.num_classes = NUM_CLASSES
  model_config.input_size = [SIZE, SIZE, 3]
  model_config.backbone.resnet.model_id = 10
  model_config.decoder.type = decoder
  if decoder == 'nasfpn':
    model_config.decoder.nasfpn.num_filters = 32
    model_config.decoder.nasfpn.num_repeats = 1
  model_config.head.num_convs = 1
  model_config.head.num_filters = 32
  return factory.build_retinanet(tf_keras.layers.InputSpec(shape=[None, SIZE, SIZE, 3]),
                                 model_config,
                                 l2_regularizer=tf_keras.regularizers.l2(weight_decay / 2))


def randomize(model):
  """Random biases and BN parameters / statistics everywhere, so that a BN or bias copied to the
  wrong layer shows; class logits lifted and spread so that many detections exist."""
  rng = np.random.default_rng(0)
  for variable in model.weights:
    name = variable.name.split('/')[-1]
    shape = variable.shape
    if name.startswith(('gamma', 'moving_variance')):
      variable.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
    elif name.startswith(('beta', 'moving_mean', 'bias')):
      variable.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))
  # TFM initializes the predictors' kernels at 1e-5: every score would sit at the bias, and
  # exact float ties would make the NMS order arbitrary. Spread them instead.
  predictors = {'/'.join(w.name.split('/')[-2:]): w for w in model.head.weights
                if w.name.split('/')[-2] in ('scores', 'boxes')}
  prior_logit = np.log(LIFTED_PRIOR / (1 - LIFTED_PRIOR))
  for name, stddev, mean in (('scores/kernel:0', 0.003, 0.0), ('scores/bias:0', 0.5, prior_logit),
                             ('boxes/kernel:0', 0.001, 0.0)):
    variable = predictors[name]
    variable.assign(rng.normal(mean, stddev, variable.shape).astype(np.float32))


@pytest.fixture(scope='module')
def tfm_model():
  tf_keras.utils.set_random_seed(0)
  model = build_tfm()
  randomize(model)
  return model


@pytest.fixture(scope='module')
def images():
  return tf.random.stateless_uniform([2, SIZE, SIZE, 3], seed=[3, 4], maxval=255.0)


def test_config_follows_the_tfm_model(tfm_model):
  ours = retinanet_from_tfm(tfm_model)
  config = ours.get_config()
  assert config['backbone'] == 'resnet10'
  assert config['block_specs'] == 'nasfpn'
  assert (config['num_filters'], config['num_repeats'], config['merge_filters']) == (32, 1, 256)
  assert (config['head_num_convs'], config['head_num_filters']) == (1, 32)
  assert config['num_classes'] == NUM_CLASSES and config['image_size'] == [SIZE, SIZE]
  assert config['l2_weight_decay'] == pytest.approx(1e-4)
  assert ours.count_params() == sum(int(np.prod(w.shape)) for w in tfm_model.weights)


def test_same_raw_outputs(tfm_model, images):
  outputs = retinanet_from_tfm(tfm_model)(images, training=False)
  scores, boxes, _ = tfm_model.head(tfm_model.decoder(tfm_model.backbone(normalize_pixels(images))))
  for key, theirs in (('cls_outputs', scores), ('box_outputs', boxes)):
    for level in theirs:
      np.testing.assert_allclose(outputs[key][level], theirs[level], atol=1e-4, rtol=0)


def test_same_detections_from_the_same_raw_outputs(tfm_model, images):
  """Each side's anchors and post-processing on our raw outputs. (Fed each side's own raw
  outputs, the two could differ by float noise where the 100th and 101st scores almost tie.)"""
  # Per-level top-k above every (anchor, class) pair: no cap binds on either side.
  ours = retinanet_from_tfm(tfm_model, pre_nms_top_k=100000)
  outputs = ours(images, training=False)
  detections = ours.detection_generator(outputs['cls_outputs'], outputs['box_outputs'],
                                        ours.anchor_boxes)
  config = tfm_model.get_config()
  their_anchors = anchor.Anchor(config['min_level'], config['max_level'], config['num_scales'],
                                config['aspect_ratios'], config['anchor_size'],
                                (SIZE, SIZE)).multilevel_boxes
  their_anchors = {level: tf.tile(boxes[None], [2, 1, 1, 1])
                   for level, boxes in their_anchors.items()}
  image_shape = tf.constant([[SIZE, SIZE]] * 2, tf.float32)
  theirs = tfm_model.detection_generator(outputs['box_outputs'], outputs['cls_outputs'],
                                         their_anchors, image_shape)
  for index in range(2):
    rows = sorted_detection_rows(detections, index)
    their_rows = sorted_detection_rows(theirs, index)
    assert len(rows) == len(their_rows) > 20
    np.testing.assert_array_equal(rows[:, 0], their_rows[:, 0])
    np.testing.assert_allclose(rows[:, 1:], their_rows[:, 1:], atol=1e-4, rtol=1e-5)


def test_mismatch_raises_and_copies_nothing(tfm_model):
  config = retinanet_from_tfm(tfm_model).get_config()
  ours = RetinaNet(**dict(config, head_num_convs=2))
  before = [w.numpy() for w in ours.weights]
  with pytest.raises(ValueError, match='head'):
    load_tfm_retinanet_weights(ours, tfm_model)
  for value, weight in zip(before, ours.weights):
    np.testing.assert_array_equal(value, weight.numpy())


def test_only_nasfpn_decoders_convert():
  with pytest.raises(ValueError, match='only NASFPN decoders'):
    retinanet_from_tfm(build_tfm(decoder='fpn'))
