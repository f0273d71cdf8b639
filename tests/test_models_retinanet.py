"""RetinaNet: output shapes, detect(), config and .keras round trips, image size check, factory,
initial weights that replay in another process."""
import hashlib
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from nasfpn_tf.decoders import block_specs
from nasfpn_tf.models import RetinaNet
from training_helpers import REPO, SUBPROCESS_TIMEOUT, match_detections
from training_helpers import spread_scores

TINY = dict(image_size=(128, 256), num_classes=4, backbone='resnet10', min_level=3, max_level=7,
            num_filters=32, num_repeats=1, head_num_convs=1, head_num_filters=32,
            anchor_num_scales=2, anchor_aspect_ratios=(1.0, 2.0), max_detections=20)


@pytest.fixture(scope='module')
def model():
  return RetinaNet(**TINY)


@pytest.fixture(scope='module')
def images():
  return tf.random.stateless_uniform([2, 128, 256, 3], seed=[1, 2], maxval=255.0)


def test_raw_outputs_non_square_batch_2(model, images):
  outputs = model(images, training=False)
  for level in range(3, 8):
    size = [2, 128 // 2**level, 256 // 2**level]
    assert outputs['cls_outputs'][str(level)].shape == size + [4 * 4]
    assert outputs['box_outputs'][str(level)].shape == size + [4 * 4]
    assert model.anchor_boxes[str(level)].shape == size[1:] + [4 * 4]
  assert sorted(outputs['cls_outputs']) == ['3', '4', '5', '6', '7']


def test_detect(model, images):
  detections = model.detect(images)
  assert detections['detection_boxes'].shape == [2, 20, 4]
  assert detections['detection_scores'].shape == [2, 20]
  assert detections['detection_classes'].dtype == tf.int32
  assert detections['num_detections'].shape == [2]
  # Untrained logits sit at the 0.01 prior, below the 0.05 threshold.
  assert detections['num_detections'].numpy().tolist() == [0, 0]


def test_detections_lie_inside_the_image(images):
  spread = RetinaNet(**TINY)
  spread_scores(spread)
  detections = spread.detect(images)
  for i, count in enumerate(detections['num_detections'].numpy()):
    assert count >= 10
    boxes = detections['detection_boxes'][i, :count].numpy()
    assert boxes.min() >= 0 and boxes[:, 2].max() <= 128 and boxes[:, 3].max() <= 256
    assert np.all(boxes[:, 2:] >= boxes[:, :2])


def test_detect_in_graph_with_unknown_batch(images):
  """As exported: a tf.function with a None batch detects what eager execution detects, on a
  model whose scores are spread so that both images have detections. On the same raw outputs
  the post-processing is exact; the network's graph kernels differ from eager in the last bits."""
  model = RetinaNet(**TINY)
  spread_scores(model)
  generator = model.detection_generator
  raw = model(images, training=False)
  unknown_batch = lambda outputs: {k: tf.TensorSpec([None] + v.shape[1:])  # noqa: E731
                                   for k, v in outputs.items()}
  generate = tf.function(lambda c, b: generator(c, b, model.anchor_boxes),
                         input_signature=[unknown_batch(raw['cls_outputs']),
                                          unknown_batch(raw['box_outputs'])])
  eager = generator(raw['cls_outputs'], raw['box_outputs'], model.anchor_boxes)
  assert eager['num_detections'].numpy().min() >= 10
  tf.nest.map_structure(np.testing.assert_array_equal,
                        generate(raw['cls_outputs'], raw['box_outputs']), eager)

  detect = tf.function(model.detect, input_signature=[tf.TensorSpec([None, 128, 256, 3])])
  in_graph = {k: v.numpy() for k, v in detect(images).items()}
  eager = {k: v.numpy() for k, v in eager.items()}
  for image in range(2):
    assert match_detections(eager, in_graph, image) == ([], [])


def test_config_round_trip(model):
  clone = RetinaNet.from_config(model.get_config())
  assert clone.get_config() == model.get_config()
  assert clone.count_params() == model.count_params()


def test_custom_block_specs_round_trip():
  model = RetinaNet(**dict(TINY, image_size=(128, 128), block_specs=block_specs.fpn(3, 7)))
  config = model.get_config()
  assert config['block_specs'] == block_specs.to_config(block_specs.fpn(3, 7))
  assert RetinaNet.from_config(config).count_params() == model.count_params()


def test_keras_save_reload_identical_outputs(model, images, tmp_path):
  path = str(tmp_path / 'tiny.keras')
  model.save(path)
  reloaded = tf_keras.models.load_model(path)
  assert isinstance(reloaded, RetinaNet)
  expected, outputs = model(images, training=False), reloaded(images, training=False)
  tf.nest.map_structure(np.testing.assert_array_equal, expected, outputs)


def test_training_updates_batch_norm_everywhere(model, images):
  clone = RetinaNet.from_config(model.get_config())
  parts = {'backbone': clone.backbone, 'decoder': clone.decoder, 'head': clone.head}
  moving = {k: [w for w in p.non_trainable_weights if 'moving_mean' in w.name]
            for k, p in parts.items()}
  before = {k: [w.numpy() for w in ws] for k, ws in moving.items()}
  clone(images, training=True)
  for k, ws in moving.items():
    assert ws and not all(np.array_equal(b, w.numpy()) for b, w in zip(before[k], ws)), k


def test_bad_image_size_names_the_binding():
  with pytest.raises(ValueError, match=r'build_retinanet\.image_size.*2\^max_level = 128'):
    RetinaNet(**dict(TINY, image_size=(100, 256)))


def test_l2_weight_decay_adds_regularization_losses():
  model = RetinaNet(**dict(TINY, image_size=(128, 128), l2_weight_decay=1e-4))
  assert len(model.losses) > 20


def test_factory_accepts_exactly_the_model_arguments():
  from nasfpn_tf.models import factory
  params = [k for k, p in inspect.signature(RetinaNet.__init__).parameters.items()
            if p.kind == p.POSITIONAL_OR_KEYWORD and k != 'self']
  assert factory.MODEL_ARGUMENTS == tuple(params)
  assert 'num_repeats' in params and 'kwargs' not in params


def initial_weights_digest():
  """sha256 of the initial weights of a RetinaNet built now (16 filters, ResNet-10)."""
  model = RetinaNet(**dict(TINY, image_size=(128, 128), num_filters=16, head_num_filters=16))
  return hashlib.sha256(b''.join(w.tobytes() for w in model.get_weights())).hexdigest()


def test_initial_weights_replay_in_a_fresh_process():
  """The autouse seeding covers everything initializers draw from: weights built here, after
  whatever else ran on this worker, equal those of a fresh process seeded 0; seed 1 differs."""
  digest = initial_weights_digest()
  script = ('import tf_keras, test_models_retinanet as t; tf_keras.utils.set_random_seed(0); '
            'print(t.initial_weights_digest())')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / 'tests')]),
             TF_CPP_MIN_LOG_LEVEL='2')
  fresh = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT, check=True)
  assert fresh.stdout.split()[-1] == digest
  tf_keras.utils.set_random_seed(1)
  assert initial_weights_digest() != digest
