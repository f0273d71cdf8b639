"""ModelGeometry against TFM's Anchor and a hand computation; the image-size check; and the one
eval preprocessing as the input pipeline, the SavedModel export and predict run it."""
import dataclasses
import inspect
import types

import numpy as np
import pytest
import tensorflow as tf
from official.vision.ops import anchor

from nasfpn_tf import predict
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.data.tfexample import encode_example
from nasfpn_tf.export import saved_model
from nasfpn_tf.export import tflite_runtime
from nasfpn_tf.models import geometry
from nasfpn_tf.models.geometry import ModelGeometry
from nasfpn_tf.models.retinanet import RetinaNet

# Non-square, two scales, levels 3-5, anchors 3 x stride.
GEOMETRY = ModelGeometry(image_size=(64, 96), min_level=3, max_level=5, anchor_num_scales=2,
                         anchor_aspect_ratios=(0.5, 2.0), anchor_size=3.0)
# A uint8 image that needs scaling down and padding at the bottom: 64x64 input, 48x80 image.
IMAGE = np.random.RandomState(0).randint(0, 256, [48, 80, 3]).astype(np.uint8)


@pytest.fixture(scope='module')
def model():
  """A small model of 64x64 input (levels 3-6)."""
  return RetinaNet(image_size=(64, 64), num_classes=4, backbone='resnet10', min_level=3,
                   max_level=6, block_specs='nasfpn_lite', num_filters=8, num_repeats=1,
                   head_num_convs=1, head_num_filters=8)


def _hand_anchors(g: ModelGeometry):
  """{level: [h, w, A*4]}: centers at (i + 0.5) * stride, sides anchor_size * stride *
  2^(scale / num_scales), stretched by sqrt(ratio) in x and 1 / sqrt(ratio) in y."""
  boxes = {}
  for level in range(g.min_level, g.max_level + 1):
    stride = 2**level
    height, width = g.image_size[0] // stride, g.image_size[1] // stride
    yc, xc = np.meshgrid((np.arange(height) + 0.5) * stride, (np.arange(width) + 0.5) * stride,
                         indexing='ij')
    per_anchor = []
    for scale in range(g.anchor_num_scales):
      for ratio in g.anchor_aspect_ratios:
        side = g.anchor_size * stride * 2**(scale / g.anchor_num_scales)
        half_h, half_w = side / np.sqrt(ratio) / 2, side * np.sqrt(ratio) / 2
        per_anchor.append(np.stack([yc - half_h, xc - half_w, yc + half_h, xc + half_w], -1))
    boxes[str(level)] = np.concatenate(per_anchor, -1)
  return boxes


def test_levels_strides_and_sizes_by_hand():
  assert GEOMETRY.levels == ('3', '4', '5')
  assert GEOMETRY.strides == {'3': 8, '4': 16, '5': 32}
  assert GEOMETRY.feature_sizes == {'3': (8, 12), '4': (4, 6), '5': (2, 3)}
  assert GEOMETRY.num_anchors_per_location == 4
  assert GEOMETRY.num_anchors == 4 * (96 + 24 + 6)


def test_anchor_boxes_are_tfm_anchors_and_the_hand_computation():
  tfm = anchor.Anchor(3, 5, 2, [0.5, 2.0], 3.0, [64, 96]).multilevel_boxes
  ours = GEOMETRY.anchor_boxes()
  hand = _hand_anchors(GEOMETRY)
  assert list(ours) == list(GEOMETRY.levels)
  for level in GEOMETRY.levels:
    np.testing.assert_array_equal(ours[level], tfm[level])
    np.testing.assert_allclose(ours[level], hand[level], rtol=0, atol=1e-4)
    assert ours[level].shape == GEOMETRY.feature_sizes[level] + (4 * 4,)
  assert sum(int(np.prod(b.shape)) for b in ours.values()) == 4 * GEOMETRY.num_anchors


def test_image_size_check_names_the_binding_and_a_fix():
  with pytest.raises(ValueError, match=r'image_size \[100, 256\] \(gin: build_retinanet\.image_size'
                     r'\).*2\^max_level = 128.*use e\.g\. \[128, 256\]'):
    ModelGeometry(image_size=(100, 256), max_level=7)
  with pytest.raises(ValueError, match=r'is \[height, width\], got \[64\]'):
    ModelGeometry(image_size=(64,), max_level=6)
  ModelGeometry(image_size=(320, 320), max_level=6)  # the mobile configs: 320 = 5 x 64


def test_config_round_trip_and_the_model_geometry(model):
  assert ModelGeometry.from_config(GEOMETRY.to_config()) == GEOMETRY
  assert GEOMETRY.to_config()['image_size'] == [64, 96]
  assert model.geometry == ModelGeometry.from_config(model.get_config())
  assert model.geometry.to_config().items() <= model.get_config().items()
  for level, boxes in model.geometry.anchor_boxes().items():
    np.testing.assert_array_equal(model.anchor_boxes[level], boxes)
  for level, (height, width) in model.geometry.feature_sizes.items():
    assert model.output['cls_outputs'][level].shape[1:] == (height, width, 9 * 4)
  parameters = inspect.signature(RetinaNet.__init__).parameters
  assert {field.name for field in dataclasses.fields(ModelGeometry)} <= set(parameters)
  with pytest.raises(ValueError, match=r"lacks \['anchor_size'\]"):
    ModelGeometry.from_config({k: v for k, v in GEOMETRY.to_config().items()
                               if k != 'anchor_size'})


def test_resize_and_pad_by_hand():
  inputs, info = geometry.resize_and_pad(tf.constant(IMAGE), [64, 64])
  scale = 64 / 80  # the width binds: 48 rows become round(48 * scale) = 38
  np.testing.assert_allclose(info, [[48, 80], [64, 64], [38 / 48, scale], [0, 0]], rtol=1e-6)
  assert inputs.shape == (64, 64, 3) and inputs.dtype == tf.float32
  content = tf.image.resize(tf.constant(IMAGE), [38, 64]).numpy()
  np.testing.assert_array_equal(inputs[:38], content)
  assert not np.any(inputs[38:])
  # Boxes through the input and back: the original boxes, clipped to the image.
  original = np.array([[[4.0, 10.0, 40.0, 70.0], [0.0, 0.0, 60.0, 90.0]]], np.float32)
  in_input = original * np.tile(info[2], 2)
  np.testing.assert_allclose(geometry.to_original_image(in_input, info[None]),
                             [[[4, 10, 40, 70], [0, 0, 48, 80]]], atol=1e-4)


def test_normalize_pixels_by_hand():
  pixels = np.array([[[[0.0, 128.0, 255.0]]]], np.float32)
  mean, stddev = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
  np.testing.assert_allclose(geometry.normalize_pixels(pixels), (pixels - mean) / stddev,
                             rtol=1e-6)


def test_eval_pipeline_preprocesses_with_the_geometry(model, tmp_path):
  jpeg = tf.io.encode_jpeg(IMAGE).numpy()
  path = str(tmp_path / 'one.tfrecord')
  with tf.io.TFRecordWriter(path) as writer:
    writer.write(encode_example(jpeg, 48, 80, 1, '1.jpg', [], [], [], [], []))
  images, labels = next(iter(input_pipeline.build_eval_dataset(path, 1, model.get_config())))
  expected, info = geometry.resize_and_pad(tf.io.decode_jpeg(jpeg), model.image_size)
  np.testing.assert_array_equal(images[0], expected)
  np.testing.assert_array_equal(labels['image_info'][0], info)


def test_saved_model_module_preprocesses_with_the_geometry(model):
  """The export's signature, its network stood in by one that returns its input."""
  def echo(images):
    return {'detection_boxes': tf.fill([tf.shape(images)[0], 1, 4], 32.0), 'inputs': images}
  stand_in = types.SimpleNamespace(variables=model.variables, image_size=model.image_size,
                                   anytime=False, detect=echo)
  module = saved_model.DetectionModule(stand_in)  # held: its tf.functions bind it weakly
  outputs = module.detect_images(tf.constant(IMAGE[None]))
  expected, info = geometry.resize_and_pad(tf.constant(IMAGE), model.image_size)
  np.testing.assert_array_equal(outputs['inputs'][0], expected)
  np.testing.assert_array_equal(outputs['detection_boxes'],
                                geometry.to_original_image(tf.fill([1, 1, 4], 32.0), info[None]))


def test_predict_tflite_preprocesses_with_the_geometry(model, tmp_path, monkeypatch):
  """predict's .tflite path, the interpreter stood in by one that records its input."""
  seen = []

  class RecordingDetector:
    def __init__(self, model_path):
      del model_path
      self.image_size = model.image_size

    def __call__(self, image):
      seen.append(image)
      return {'detection_boxes': np.full([1, 1, 4], 32.0, np.float32),
              'detection_scores': np.ones([1, 1], np.float32),
              'detection_classes': np.ones([1, 1], np.int32),
              'num_detections': np.ones([1], np.int32)}

  monkeypatch.setattr(tflite_runtime, 'TFLiteDetector', RecordingDetector)
  path = tmp_path / 'model.tflite'
  path.write_bytes(b'')
  detect, _ = predict.load_detector(str(path))
  detections = detect(IMAGE)
  expected, info = geometry.resize_and_pad(tf.constant(IMAGE), model.image_size)
  np.testing.assert_array_equal(seen[0], expected)
  np.testing.assert_array_equal(detections['detection_boxes'],
                                geometry.to_original_image(tf.fill([1, 1, 4], 32.0), info[None]))
