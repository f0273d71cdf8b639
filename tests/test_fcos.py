"""FCOS beside RetinaNet: targets against a hand computation, each loss against NumPy, the head,
the config round trip, the post-process's RetinaNet-compatible outputs, training on a fixed
batch, and the SavedModel and TFLite exports against the Keras model's detections."""
import contextlib
import io
import json

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from nasfpn_tf import config
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.export import saved_model
from nasfpn_tf.export import tflite
from nasfpn_tf.export import tflite_runtime
from nasfpn_tf.models import factory
from nasfpn_tf.models.fcos_head import FCOSHead
from nasfpn_tf.models.fcos_postprocess import FCOSDetectionGenerator
from nasfpn_tf.models.fcos_targets import FCOSTargets, centerness
from nasfpn_tf.models.geometry import ModelGeometry
from nasfpn_tf.models.losses import FCOSLoss, giou_loss
from nasfpn_tf.models.postprocess import DetectionGenerator
from nasfpn_tf.models.retinanet import RetinaNet
from nasfpn_tf.training import trainer as trainer_lib
from training_helpers import TINY_MODEL, TINY_MODEL_CONFIG, keras_detections, match_detections
from training_helpers import records_and_encoded_images, tiny_bindings

TINY_FCOS = TINY_MODEL + ["build_retinanet.detector = 'fcos'"]
FCOS_CONFIG = dict(TINY_MODEL_CONFIG, detector='fcos')


def _positives(labels):
  """{level: [(y index, x index, class)]} of the positive points."""
  return {level: [(int(y), int(x), int(t[y, x, 0])) for y, x in np.argwhere(t[..., 0] >= 0)]
          for level, t in ((l, t.numpy()) for l, t in labels['cls_targets'].items())}


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


# Targets.

def test_a_box_on_its_level_with_center_sampling():
  """A 40 x 40 box (10, 20)-(50, 60): its largest distance from any point inside is under 64, so
  P3 (range 0-64). Center sampling keeps the P3 points (8i + 4) within 1.5 x 8 = 12 px of its
  center (30, 40): y in (18, 42) -> 20, 28, 36; x in (28, 52) -> 36, 44 (28 is on the border)."""
  targets = FCOSTargets(ModelGeometry((128, 128)))
  assert targets.regress_ranges == {'3': (0, 64), '4': (64, 128), '5': (128, 256),
                                    '6': (256, 512), '7': (512, np.inf)}
  labels = targets(tf.constant([[10., 20., 50., 60.]]), tf.constant([3]))
  assert _positives(labels) == {'3': [(y, x, 3) for y in (2, 3, 4) for x in (4, 5)],
                                '4': [], '5': [], '6': [], '7': []}
  assert float(tf.reduce_sum(labels['box_weights'])) == 6
  # The point (20, 36): t, l, b, r = 10, 16, 30, 24 px, in strides of 8.
  np.testing.assert_allclose(labels['box_targets']['3'][2, 4], [10 / 8, 16 / 8, 30 / 8, 24 / 8])
  np.testing.assert_allclose(centerness(labels['box_targets']['3'][2, 4]),
                             np.sqrt(16 / 24 * 10 / 30), rtol=1e-6)
  assert not np.any(labels['box_targets']['3'].numpy()[labels['cls_targets']['3'][..., 0] < 0])
  # Without center sampling every P3 point inside the box: y 12..44 (5), x 28..52 (4).
  labels = FCOSTargets(ModelGeometry((128, 128)), center_sampling_radius=0)(
      tf.constant([[10., 20., 50., 60.]]), tf.constant([3]))
  assert _positives(labels)['3'] == [(y, x, 3) for y in range(1, 6) for x in range(3, 7)]


def test_a_large_box_goes_to_the_level_of_its_regression_range():
  """The whole 128 x 128 image, center (64, 64): its P3 center points (60 or 68) reach 68 > 64,
  its P5 ones (48 or 80) only 80 < 128; its P4 ones (56 or 72) reach 72 in 64-128: P4 only."""
  labels = FCOSTargets(ModelGeometry((128, 128)))(tf.constant([[0., 0., 128., 128.]]),
                                                  tf.constant([7]))
  assert _positives(labels) == {'3': [], '4': [(y, x, 7) for y in (3, 4) for x in (3, 4)],
                                '5': [], '6': [], '7': []}
  np.testing.assert_allclose(labels['box_targets']['4'][3, 3], np.array([56, 56, 72, 72]) / 16)
  # Bounds of our own move it: P3 up to 80 px.
  labels = FCOSTargets(ModelGeometry((128, 128)), range_bounds=(80, 160, 320, 640))(
      tf.constant([[0., 0., 128., 128.]]), tf.constant([7]))
  assert _positives(labels)['3'] == [(y, x, 7) for y in (7, 8) for x in (7, 8)]


@pytest.mark.parametrize('order', [(0, 1), (1, 0)])
def test_an_ambiguous_point_takes_the_smallest_box(order):
  """Without center sampling, the P3 point (60, 60) lies in (0, 0)-(100, 100) (class 1, reach
  60) and in (30, 30)-(90, 90) (class 2, reach 30), both in P3's range: the smaller wins,
  whatever the order of the boxes. (20, 20) lies in the big box only, reaching 80: not P3."""
  boxes = np.array([[0., 0., 100., 100.], [30., 30., 90., 90.]], np.float32)[list(order)]
  classes = np.array([1, 2], np.int32)[list(order)]
  labels = FCOSTargets(ModelGeometry((128, 128)), center_sampling_radius=0)(boxes, classes)
  assert int(labels['cls_targets']['3'][7, 7, 0]) == 2
  np.testing.assert_allclose(labels['box_targets']['3'][7, 7], [30 / 8] * 4)
  assert int(labels['cls_targets']['3'][2, 2, 0]) == -1
  assert int(labels['cls_targets']['4'][1, 1, 0]) == 1  # (24, 24): reach 76, P4


def test_an_image_without_boxes_has_no_positives():
  labels = FCOSTargets(ModelGeometry((128, 128)))(tf.zeros([0, 4]), tf.zeros([0], tf.int32))
  assert float(tf.reduce_sum(labels['box_weights'])) == 0
  assert all(int(tf.reduce_max(t)) == -1 for t in labels['cls_targets'].values())


def test_bad_range_bounds_and_radius_name_the_binding():
  with pytest.raises(ValueError, match='build_retinanet.fcos_range_bounds'):
    FCOSTargets(ModelGeometry((128, 128)), range_bounds=(64, 32, 256, 512))
  with pytest.raises(ValueError, match='build_retinanet.fcos_range_bounds'):
    FCOSTargets(ModelGeometry((128, 128)), range_bounds=(64, 128))
  with pytest.raises(ValueError, match='build_retinanet.fcos_center_sampling_radius'):
    FCOSTargets(ModelGeometry((128, 128)), center_sampling_radius=-1)


# Losses.

def _numpy_giou(predicted, target):
  """1 - GIoU of boxes around the point (0, 0) from (t, l, b, r), with corner boxes."""
  a = np.stack([-predicted[:, 0], -predicted[:, 1], predicted[:, 2], predicted[:, 3]], -1)
  b = np.stack([-target[:, 0], -target[:, 1], target[:, 2], target[:, 3]], -1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
  low, high = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
  inter = np.prod(np.clip(high - low, 0, None), -1)
  union = area(a) + area(b) - inter
  hull = np.prod(np.maximum(a[:, 2:], b[:, 2:]) - np.minimum(a[:, :2], b[:, :2]), -1)
  return 1 - (inter / union - (hull - union) / hull)


def test_giou_loss_matches_numpy():
  rng = np.random.default_rng(0)
  predicted = rng.uniform(0.1, 5, size=(50, 4)).astype(np.float32)
  target = rng.uniform(0.1, 5, size=(50, 4)).astype(np.float32)
  np.testing.assert_allclose(giou_loss(predicted, target), _numpy_giou(predicted, target),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(giou_loss(target, target), 0.0, atol=1e-5)
  # Disjoint boxes cannot happen around a shared point; a zero box costs 1 + (hull - 0) / hull.
  assert np.isfinite(giou_loss(np.zeros([1, 4]), np.zeros([1, 4]))).all()


def test_fcos_loss_matches_numpy():
  """Focal loss over every point and class / (positives + 1), GIoU weighted by the centerness
  targets / their sum, centerness BCE on positives / (positives + 1)."""
  rng = np.random.default_rng(1)
  num_classes, batch, shapes = 4, 2, {'3': (4, 4), '4': (2, 2)}
  outputs = {
      'cls_outputs': {l: rng.normal(size=(batch, h, w, num_classes)).astype(np.float32)
                      for l, (h, w) in shapes.items()},
      'box_outputs': {l: rng.uniform(0, 3, size=(batch, h, w, 4)).astype(np.float32)
                      for l, (h, w) in shapes.items()},
      'centerness_outputs': {l: rng.normal(size=(batch, h, w, 1)).astype(np.float32)
                             for l, (h, w) in shapes.items()}}
  num = sum(h * w for h, w in shapes.values())
  classes = rng.choice([-1, -1, 1, 2, 3], size=(batch, num))
  box_targets = rng.uniform(0.2, 3, size=(batch, num, 4)).astype(np.float32)
  box_targets[classes < 0] = 0
  positive = (classes >= 0).astype(np.float32)

  def per_level(flat, depth):
    out, start = {}, 0
    for level, (h, w) in shapes.items():
      out[level] = flat[:, start:start + h * w].reshape(batch, h, w, depth)
      start += h * w
    return out

  labels = {'cls_targets': per_level(classes, 1), 'box_targets': per_level(box_targets, 4),
            'box_weights': positive}
  losses = FCOSLoss(num_classes, box_loss_weight=2.0, centerness_loss_weight=3.0)(outputs,
                                                                                  labels)
  flat = lambda d, depth: np.concatenate(  # noqa: E731
      [d[l].reshape(batch, -1, depth) for l in shapes], axis=1).reshape(-1, depth)
  logits = flat(outputs['cls_outputs'], num_classes)
  onehot = np.eye(num_classes)[np.maximum(classes.reshape(-1), 0)] * (classes.reshape(-1, 1) >= 0)
  p = _sigmoid(logits)
  p_true = np.where(onehot == 1, p, 1 - p)
  focal = np.where(onehot == 1, 0.25, 0.75) * (1 - p_true)**2 * -np.log(p_true)
  normalizer = positive.sum() + 1
  t, l, b, r = box_targets.reshape(-1, 4).T
  pos = positive.reshape(-1) > 0
  with np.errstate(invalid='ignore'):  # 0 / 0 at the negatives, masked next
    center = np.sqrt(np.minimum(l, r) / np.maximum(l, r) * np.minimum(t, b) / np.maximum(t, b))
  center = np.where(pos, center, 0)
  giou = _numpy_giou(flat(outputs['box_outputs'], 4)[pos], box_targets.reshape(-1, 4)[pos])
  c = _sigmoid(flat(outputs['centerness_outputs'], 1)[:, 0])
  bce = -(center * np.log(c) + (1 - center) * np.log(1 - c))
  expected = {'cls_loss': focal.sum() / normalizer,
              'box_loss': (giou * center[pos]).sum() / center[pos].sum(),
              'centerness_loss': bce[pos].sum() / normalizer}
  expected['total_loss'] = (expected['cls_loss'] + 2 * expected['box_loss'] +
                            3 * expected['centerness_loss'])
  for key, value in expected.items():
    np.testing.assert_allclose(float(losses[key]), value, rtol=1e-4, err_msg=key)
  assert pos.sum() > 3


# The model: head, config, post-process.

TINY_ARGUMENTS = dict(image_size=(128, 128), num_classes=10, backbone='resnet10', num_filters=16,
                      num_repeats=1, head_num_convs=1, head_num_filters=16, max_detections=7)


@pytest.fixture(scope='module')
def fcos_model():
  return RetinaNet(**TINY_ARGUMENTS, detector='fcos')


@pytest.fixture(scope='module')
def retinanet_model():
  return RetinaNet(**TINY_ARGUMENTS)


def test_head_output_shapes_and_layers(fcos_model):
  outputs = fcos_model(tf.zeros([2, 128, 128, 3]))
  shapes = {k: {l: v.shape.as_list() for l, v in d.items()} for k, d in outputs.items()}
  sizes = {str(l): 128 // 2**l for l in range(3, 8)}
  assert shapes == {
      'cls_outputs': {l: [2, s, s, 10] for l, s in sizes.items()},
      'box_outputs': {l: [2, s, s, 4] for l, s in sizes.items()},
      'centerness_outputs': {l: [2, s, s, 1] for l, s in sizes.items()}}
  head = fcos_model.head
  assert isinstance(head, FCOSHead) and head.groups == 16  # gcd(32, 16 filters)
  assert all(float(tf.reduce_min(v)) >= 0 for v in outputs['box_outputs'].values())
  # One tower conv + GroupNorm per branch, shared by the levels; one scale per level.
  names = sorted(w.name.split('/', 1)[1] for w in head.weights)
  assert sum('scale' in n for n in names) == 5
  assert sum('norm' in n for n in names) == 4  # gamma, beta x 2 towers
  assert FCOSHead(3, 7, 10, num_filters=256).groups == 32
  assert FCOSHead(3, 7, 10, num_filters=48).groups == 16


def test_config_round_trip_and_gin_binding(fcos_model, retinanet_model):
  model_config = fcos_model.get_config()
  assert model_config['detector'] == 'fcos'
  assert list(model_config['fcos_range_bounds']) == [64.0, 128.0, 256.0, 512.0]
  rebuilt = RetinaNet.from_config(json.loads(json.dumps(model_config)))
  assert json.loads(json.dumps(rebuilt.get_config())) == json.loads(json.dumps(model_config))
  assert rebuilt.count_params() == fcos_model.count_params()
  config.parse_gin([], TINY_FCOS + ['build_retinanet.fcos_center_sampling_radius = 0.0'])
  bound = factory.bound_model_arguments()
  assert bound['detector'] == 'fcos' and bound['fcos_center_sampling_radius'] == 0.0
  assert factory.model_argument('fcos_norm_groups') == 32
  assert isinstance(factory.build_loss(model_config), FCOSLoss)
  # A RetinaNet's config holds none of FCOS's arguments (records before FCOS stay equal).
  plain = retinanet_model.get_config()
  assert not any('fcos' in k or k == 'detector' for k in plain)
  assert plain == {k: v for k, v in model_config.items()
                   if 'fcos' not in k and k not in ('detector', 'name')} | {'name': plain['name']}
  assert type(factory.build_loss(plain)).__name__ == 'RetinaNetLoss'


def test_bad_detector_settings_name_the_binding():
  with pytest.raises(ValueError, match="build_retinanet.detector = 'yolo'"):
    RetinaNet(image_size=(128, 128), detector='yolo')
  with pytest.raises(ValueError, match='build_retinanet.fcos_norm_groups only applies'):
    RetinaNet(image_size=(128, 128), fcos_norm_groups=16)


def _hand_made_outputs(batch=1, num_classes=10):
  """Raw FCOS outputs: all logits -10 but P3 point (5, 6), class 3 (logit 2, centerness 1),
  distances 1, 2, 3, 4 strides, and P4 point (0, 0), class 7 (class probability 0.04, below
  the 0.05 threshold: no candidate)."""
  sizes = {str(l): 128 // 2**l for l in range(3, 8)}
  cls = {l: np.full([batch, s, s, num_classes], -10.0, np.float32) for l, s in sizes.items()}
  box = {l: np.ones([batch, s, s, 4], np.float32) for l, s in sizes.items()}
  center = {l: np.full([batch, s, s, 1], -10.0, np.float32) for l, s in sizes.items()}
  cls['3'][:, 5, 6, 3], center['3'][:, 5, 6, 0], box['3'][:, 5, 6] = 2.0, 1.0, [1, 2, 3, 4]
  cls['4'][:, 0, 0, 7], center['4'][:, 0, 0, 0] = np.log(0.04 / 0.96), 5.0
  return cls, box, center


def test_post_process_gives_retinanet_outputs(fcos_model, retinanet_model):
  """One candidate above the threshold: its box is (y - t, x - l, y + b, x + r) in pixels around
  the point (44, 52), its score sqrt(p_class p_center); the keys, shapes and dtypes are
  DetectionGenerator's."""
  cls, box, center = _hand_made_outputs(batch=2)
  generator = FCOSDetectionGenerator((128, 128), 10, max_detections=7)
  detections = generator(cls, box, center, fcos_model.points)
  assert list(detections['num_detections'].numpy()) == [1, 1]
  np.testing.assert_allclose(detections['detection_boxes'][0, 0], [44 - 8, 52 - 16, 44 + 24,
                                                                   52 + 32], atol=1e-4)
  np.testing.assert_allclose(detections['detection_scores'][0, 0],
                             np.sqrt(_sigmoid(2.0) * _sigmoid(1.0)), rtol=1e-5)
  assert int(detections['detection_classes'][0, 0]) == 3
  assert not np.any(detections['detection_boxes'][0, 1:]) and not np.any(
      detections['detection_classes'][0, 1:])
  reference = retinanet_model.detect(tf.zeros([2, 128, 128, 3]))
  assert isinstance(retinanet_model.detection_generator, DetectionGenerator)
  assert {k: (v.shape, v.dtype) for k, v in detections.items()} == {
      k: (v.shape, v.dtype) for k, v in reference.items()}
  config = generator.get_config()
  assert config['pre_nms_score_threshold'] == 0.05
  assert FCOSDetectionGenerator.from_config(config).candidate_threshold == 0.05


# Training and exports.

def _spread_scores(model, seed=0):
  """Class and centerness kernels 10x wider than FCOS's init: the untrained model's scores
  spread instead of tying."""
  for layer in (model.head.classifier, model.head.centerness):
    layer.kernel.assign(tf.random.stateless_normal(layer.kernel.shape, [seed, 0], stddev=0.1))


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(synthetic_records):
  """Training's input pipeline makes FCOS targets from the records (positives in every image);
  Adam on that fixed batch lowers the FCOS loss within 5 steps."""
  model_config = FCOS_CONFIG
  parse = input_pipeline.train_example_parser(model_config, flip_prob=0.0)
  records, _ = records_and_encoded_images(synthetic_records['train'])
  images, labels = (tf.data.Dataset.from_tensor_slices(records[:2]).map(parse).batch(2)
                    .get_single_element())
  assert set(labels) == {'cls_targets', 'box_targets', 'box_weights', 'image_info'}
  assert labels['box_weights'].shape == [2, 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1]
  assert all(float(w) > 0 for w in tf.reduce_sum(labels['box_weights'], axis=1))
  tf_keras.utils.set_random_seed(0)
  model = RetinaNet(image_size=(128, 128), num_classes=10, backbone='resnet10', num_filters=16,
                    num_repeats=1, head_num_convs=1, head_num_filters=16, detector='fcos')
  loss_fn = factory.build_loss(model.get_config())
  optimizer = tf_keras.optimizers.Adam(1e-3)

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      losses = loss_fn(model(images, training=True), labels)
    optimizer.apply_gradients(zip(tape.gradient(losses['total_loss'],
                                                model.trainable_variables),
                                  model.trainable_variables))
    return losses

  history = [{k: float(v) for k, v in step().items()} for _ in range(5)]
  # Measured: total 2.78 -> 2.33 (cls 1.10 -> 0.83, GIoU 1.00 -> 0.85).
  assert history[-1]['total_loss'] < 0.9 * history[0]['total_loss'], history
  assert history[-1]['cls_loss'] < history[0]['cls_loss'], history
  assert history[-1]['box_loss'] < history[0]['box_loss'], history
  assert all(np.isfinite(h['total_loss']) for h in history)


@pytest.fixture(scope='module')
def trained(synthetic_records, tmp_path_factory):
  """A tiny FCOS trained 2 steps by the trainer on the records, its checkpoint exported as a
  SavedModel: (model_dir, export_dir, the Keras model)."""
  root = tmp_path_factory.mktemp('fcos')
  model_dir = root / 'model'
  config.parse_gin([], tiny_bindings(synthetic_records, train_steps=2) + [
      "build_retinanet.detector = 'fcos'", 'build_retinanet.pre_nms_score_threshold = 0.0',
      'build_retinanet.max_detections = 20'])
  trainer = trainer_lib.RetinaNetTrainer(str(model_dir), tf.distribute.get_strategy())
  _spread_scores(trainer.model)
  with contextlib.redirect_stdout(io.StringIO()):
    trainer.run()
  assert json.loads((model_dir / 'model_config.json').read_text())['detector'] == 'fcos'
  export_dir = root / 'export'
  saved_model.export_saved_model(str(model_dir), str(export_dir))
  return model_dir, export_dir, trainer.model


def _val_images(synthetic_records, model, count=2):
  """Eval-preprocessed val images [1, H, W, 3] float32."""
  dataset = input_pipeline.build_eval_dataset(synthetic_records['val'], 1, model.get_config())
  return [images.numpy() for images, _ in dataset.take(count)]


def test_saved_model_detects_what_the_keras_model_detects(trained, synthetic_records):
  _, export_dir, model = trained
  serving = tf.saved_model.load(str(export_dir)).signatures['serving_default']
  detect = tf.function(model.detect)
  images = np.stack([np.full([96, 96, 3], 90, np.uint8),
                     np.random.default_rng(0).integers(0, 255, [96, 96, 3], np.uint8)])
  actual = {k: v.numpy() for k, v in serving(images=tf.constant(images)).items()}
  expected = keras_detections(detect, model.image_size, images)
  np.testing.assert_array_equal(actual['num_detections'], expected['num_detections'])
  for i in range(len(images)):
    assert expected['num_detections'][i] > 0
    assert match_detections(expected, actual, i) == ([], [])


def test_tflite_detects_what_the_keras_model_detects(trained, synthetic_records):
  """Points as the op's anchors and FCOS's scores fed in: with NMS off on both sides (IoU 1),
  the file keeps the same (point, class) detections as FCOSDetectionGenerator."""
  model_dir, _, model = trained
  content = tflite.convert(saved_model.load_model(
      str(model_dir), ['build_retinanet.nms_iou_threshold = 1.0'])[0])
  assert tflite_runtime.custom_op_names(content) == ['TFLite_Detection_PostProcess']
  detector = tflite_runtime.TFLiteDetector(model_content=content)
  # One more than the file keeps: a near tie at the 20th place may go either way.
  generator = FCOSDetectionGenerator(model.image_size, 10, pre_nms_score_threshold=0.0,
                                     nms_iou_threshold=1.0, max_detections=21)
  for image in _val_images(synthetic_records, model):
    outputs = model(tf.constant(image), training=False)
    expected = {k: v.numpy() for k, v in generator(
        outputs['cls_outputs'], outputs['box_outputs'], outputs['centerness_outputs'],
        model.points).items()}
    assert int(expected['num_detections'][0]) == 21
    next_score = expected['detection_scores'][0, 20]
    expected = {k: v[:, :20] for k, v in expected.items() if k != 'num_detections'}
    expected['num_detections'] = np.array([20])
    actual = detector(image)
    assert int(actual['num_detections'][0]) == 20
    missing, extra = match_detections(expected, actual, score_tolerance=1e-4)
    assert len(missing) == len(extra) <= 1, (missing, extra)
    assert all(abs(expected['detection_scores'][0, i] - next_score) < 1e-4 for i in missing)
