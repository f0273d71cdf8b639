"""Gaussian Soft-NMS (build_retinanet.soft_nms_sigma) vs NumPy, and the option end to end:
evaluation, predict and the SavedModel take it; off, the exports are as before; TFLite refuses it."""
import contextlib
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from official.vision.ops import anchor

from nasfpn_tf import config
from nasfpn_tf import predict
from nasfpn_tf.data import tfexample
from nasfpn_tf.export import saved_model
from nasfpn_tf.export import tflite_postprocess
from nasfpn_tf.models import postprocess
from nasfpn_tf.models.postprocess import DetectionGenerator
from nasfpn_tf.models.retinanet import RetinaNet
from nasfpn_tf.training import trainer as trainer_lib
from training_helpers import pairwise_iou, records_and_encoded_images, spread_scores
from training_helpers import tiny_bindings, TINY_MODEL_CONFIG

SIGMA = 0.3
SOFT = f'build_retinanet.soft_nms_sigma = {SIGMA}'


def numpy_soft_nms(boxes, scores, classes, sigma, threshold, max_detections):
  """The Soft-NMS paper's Gaussian variant, class by class, with TF's sigma convention
  (weight exp(-IoU^2 / (2 sigma))): [(box, score, class)] best first."""
  kept = []
  for c in np.unique(classes):
    index = np.flatnonzero(classes == c)
    current, alive = scores[index].astype(np.float64), scores[index] > threshold
    while alive.any():
      best = int(np.argmax(np.where(alive, current, -np.inf)))
      kept.append((boxes[index[best]], current[best], c))
      alive[best] = False
      iou = pairwise_iou(boxes[index[[best]]], boxes[index])[0]
      current = np.where(alive, current * np.exp(-iou**2 / (2 * sigma)), current)
      alive &= current > threshold
  return sorted(kept, key=lambda row: -row[1])[:max_detections]


def _assert_matches(detections, image, expected):
  count = int(detections['num_detections'][image])
  assert count == len(expected)
  np.testing.assert_allclose(detections['detection_scores'][image, :count],
                             [row[1] for row in expected], rtol=1e-5)
  np.testing.assert_array_equal(detections['detection_classes'][image, :count],
                                [row[2] for row in expected])
  np.testing.assert_allclose(detections['detection_boxes'][image, :count],
                             [row[0] for row in expected], atol=1e-4)
  assert not np.any(detections['detection_scores'][image, count:])


def test_soft_nms_matches_numpy_on_hand_boxes():
  # Image 0: class 1 has a stack of three overlapping boxes and one apart; class 2 repeats
  # class 1's best box (never decayed by it). Image 1: decays below the 0.3 threshold drop boxes.
  # max_detections = 3 of the four survivors of each.
  boxes = np.array([
      [[0, 0, 40, 40], [0, 0, 40, 30], [5, 5, 45, 45], [60, 60, 90, 90], [0, 0, 40, 40],
       [0, 0, 40, 36]],
      [[10, 10, 50, 50], [10, 10, 50, 30], [12, 12, 50, 50], [0, 0, 20, 20], [70, 0, 99, 30],
       [0, 0, 0, 0]]], np.float32)
  scores = np.array([[0.9, 0.85, 0.8, 0.6, 0.7, 0.65],
                     [0.95, 0.8, 0.45, 0.4, 0.31, 0.0]], np.float32)
  classes = np.array([[1, 1, 1, 1, 2, 2], [3, 3, 3, 1, 1, 1]], np.int32)
  detections = {k: v.numpy() for k, v in postprocess.soft_nms(
      tf.constant(boxes), tf.constant(scores), tf.constant(classes), (100, 100),
      max_detections=3, score_threshold=0.3, sigma=SIGMA).items()}
  for image in range(2):
    expected = numpy_soft_nms(boxes[image], scores[image], classes[image], SIGMA, 0.3, 3)
    _assert_matches(detections, image, expected)
  # By hand: class 2's copy of the best box keeps its 0.7; image 1's second box (IoU 0.5 with
  # the first) keeps 0.8 exp(-0.5^2 / (2 sigma)); its third (IoU 0.9) falls under 0.3.
  np.testing.assert_allclose(detections['detection_scores'][0], [0.9, 0.7, 0.6], rtol=1e-6)
  np.testing.assert_allclose(detections['detection_scores'][1],
                             [0.95, 0.8 * np.exp(-0.25 / (2 * SIGMA)), 0.4], rtol=1e-6)


def test_detection_generator_soft_nms_matches_numpy():
  """The generator's Soft-NMS on real candidates: per-level top-k, decode, clip, then NumPy."""
  rng = np.random.default_rng(0)
  image_size, num_classes = (64, 64), 4
  anchors = anchor.Anchor(3, 3, 1, [1.0], 3, image_size).multilevel_boxes  # 8x8 of 24 px
  logits = rng.normal(-1.0, 1.5, [2, 8, 8, num_classes]).astype(np.float32)
  deltas = rng.normal(0, 0.2, [2, 8, 8, 4]).astype(np.float32)
  generator = DetectionGenerator(image_size, num_classes, pre_nms_top_k=50,
                                 pre_nms_score_threshold=0.2, max_detections=100,
                                 soft_nms_sigma=SIGMA)
  detections = {k: v.numpy() for k, v in generator(
      {'3': tf.constant(logits)}, {'3': tf.constant(deltas)}, anchors).items()}
  hard = DetectionGenerator(image_size, num_classes, pre_nms_top_k=50,
                            pre_nms_score_threshold=0.2, max_detections=100)
  anchor_boxes = anchors['3'].numpy().reshape(-1, 4)
  for image in range(2):
    foreground = logits[image].reshape(-1, num_classes)[:, 1:].reshape(-1)
    top = np.argsort(-foreground)[:50]
    rows, columns = top // (num_classes - 1), top % (num_classes - 1) + 1
    dy, dx, dh, dw = deltas[image].reshape(-1, 4)[rows].T
    a = anchor_boxes[rows]
    ha, wa = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    yc, xc = a[:, 0] + ha / 2 + dy * ha, a[:, 1] + wa / 2 + dx * wa
    h, w = np.exp(dh) * ha, np.exp(dw) * wa
    boxes = np.clip(np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], 1), 0, 64)
    expected = numpy_soft_nms(boxes, 1 / (1 + np.exp(-foreground[top])), columns, SIGMA, 0.2, 100)
    _assert_matches(detections, image, expected)
  # Soft-NMS keeps decayed overlaps that NMS removes: more detections here.
  hard_detections = hard({'3': tf.constant(logits)}, {'3': tf.constant(deltas)}, anchors)
  assert np.all(detections['num_detections'] > hard_detections['num_detections'].numpy())


@pytest.mark.parametrize('sigma', [-1.0, float('nan'), float('inf')])
def test_bad_predict_sigma_is_named(sigma, tmp_path):
  # Refused before the model is looked at, naming predict's flag.
  with pytest.raises(ValueError, match=rf'--soft_nms_sigma={sigma}: give a finite number >= 0'):
    predict.load_detector(str(tmp_path), soft_nms_sigma=sigma)


@pytest.mark.parametrize('sigma', [-0.1, float('nan'), float('inf'), 'wide', True])
def test_bad_sigma_is_named(sigma):
  with pytest.raises(ValueError, match=r'build_retinanet\.soft_nms_sigma'):
    RetinaNet(**dict(TINY_MODEL_CONFIG, backbone='resnet10', num_filters=16, num_repeats=1),
              soft_nms_sigma=sigma)


@pytest.fixture(scope='module')
def soft_models(synthetic_records, tmp_path_factory):
  """A tiny untrained model dir (scores spread), its Soft-NMS SavedModel, the val images and
  the model's hard-NMS detections of them."""
  root = tmp_path_factory.mktemp('soft_nms')
  config.parse_gin([], tiny_bindings(synthetic_records) + [
      'build_retinanet.pre_nms_score_threshold = 0.05', 'build_retinanet.max_detections = 50'])
  trainer = trainer_lib.RetinaNetTrainer(str(root / 'model'), tf.distribute.get_strategy())
  spread_scores(trainer.model)
  trainer.checkpointer.save(0)
  saved_model.export_saved_model(str(root / 'model'), str(root / 'soft'), [SOFT])
  examples, _ = records_and_encoded_images(synthetic_records['val'])
  images = [tfexample.decode_example(example)['image'].numpy() for example in examples]
  return root / 'model', root / 'soft', images, _detect_in_process(trainer.model, images)


def _detect_in_process(model, images):
  """What a SavedModel of `model` serves (its serving_default), computed in this process."""
  module = saved_model.DetectionModule(model)
  outputs = [module.detect_images(image[None]) for image in images]
  return {key: np.concatenate([o[key].numpy() for o in outputs]) for key in outputs[0]}


def _ops(function, *args):
  graph_def = function.get_concrete_function(*args).graph.as_graph_def()
  return ({node.op for node in graph_def.node} |
          {node.op for f in graph_def.library.function for node in f.node_def})


def _serve(export_dir, images):
  signature = tf.saved_model.load(str(export_dir)).signatures['serving_default']
  outputs = [signature(images=tf.constant(image[None])) for image in images]
  return {key: np.concatenate([o[key].numpy() for o in outputs]) for key in outputs[0]}


def test_off_the_exports_and_records_are_as_before(soft_models):
  model_dir, _, images, hard = soft_models
  recorded = json.loads((model_dir / 'model_config.json').read_text())
  assert 'soft_nms_sigma' not in recorded  # The record of a hard-NMS model is unchanged.
  # The SavedModel's graph runs the NMS op it ran before; bound to 0, a model detects exactly as
  # by default.
  zero, _, _ = saved_model.load_model(str(model_dir), ['build_retinanet.soft_nms_sigma = 0'])
  module = saved_model.DetectionModule(zero)  # held: its tf.functions refer to it weakly
  ops = _ops(module.detect_images, tf.TensorSpec([None, None, None, 3], tf.uint8))
  assert 'CombinedNonMaxSuppression' in ops and 'NonMaxSuppressionV5' not in ops
  actual = _detect_in_process(zero, images)
  for key, value in hard.items():
    np.testing.assert_array_equal(actual[key], value, key)
  # The TFLite op's attributes (its post-processing) are those of before, too.
  hard = RetinaNet(**dict(TINY_MODEL_CONFIG, backbone='resnet10', num_filters=16,
                          num_repeats=1))
  zero_model = RetinaNet.from_config(dict(hard.get_config(), soft_nms_sigma=0))
  assert (tflite_postprocess.postprocess_attributes(zero_model) ==
          tflite_postprocess.postprocess_attributes(hard))


def test_saved_model_predict_and_eval_take_soft_nms(soft_models, synthetic_records, tmp_path):
  model_dir, soft_export, images, hard = soft_models
  served = _serve(soft_export, images)
  assert not np.allclose(served['detection_scores'], hard['detection_scores'])
  assert np.all(served['num_detections'] >= hard['num_detections'])
  # predict on the model dir with --soft_nms_sigma: the SavedModel's detections.
  detect, _ = predict.load_detector(str(model_dir), soft_nms_sigma=SIGMA)
  for i, image in enumerate(images):
    mine = detect(image)
    count = int(served['num_detections'][i])
    assert int(mine['num_detections'][0]) == count
    np.testing.assert_allclose(mine['detection_scores'][0, :count],
                               served['detection_scores'][i, :count], atol=1e-5)
    np.testing.assert_allclose(mine['detection_boxes'][0, :count],
                               served['detection_boxes'][i, :count], atol=1e-3)
  # Evaluation (--mode=eval with the gin binding) detects with Soft-NMS.
  config.parse_gin([], tiny_bindings(synthetic_records) + [
      'build_retinanet.pre_nms_score_threshold = 0.05', 'build_retinanet.max_detections = 50',
      SOFT])
  trainer = trainer_lib.RetinaNetTrainer(str(model_dir), tf.distribute.get_strategy(),
                                         mode='eval')
  assert trainer.model.detection_generator.soft_nms_sigma == SIGMA
  # Its first batch: the first val images, preprocessed as the SavedModel does it.
  batch, _ = next(iter(trainer._eval_dataset))  # pylint: disable=protected-access
  evaluated = trainer._detect(batch)['detection_scores'].numpy()  # pylint: disable=protected-access
  np.testing.assert_allclose(evaluated, served['detection_scores'][:len(evaluated)], atol=1e-5)
  with contextlib.redirect_stdout(io.StringIO()):
    assert 'AP' in trainer.evaluate()
  # The TFLite export refuses it: its op has hard NMS only; the message says how to export.
  with pytest.raises(ValueError, match=r"hard NMS only \(no Soft-NMS\).*soft_nms_sigma = 0"):
    tflite_postprocess.postprocess_attributes(trainer.model)


def test_soft_nms_refused_where_it_cannot_run(soft_models, tmp_path):
  model_dir, soft_export, _, _ = soft_models
  ops = {node.op for f in tf.saved_model.load(str(soft_export)).signatures['serving_default']
         .graph.as_graph_def().library.function for node in f.node_def}
  assert 'NonMaxSuppressionV5' in ops and 'CombinedNonMaxSuppression' not in ops
  with pytest.raises(ValueError, match='SavedModel, whose post-processing was fixed at export'):
    predict.load_detector(str(soft_export), soft_nms_sigma=SIGMA)
  fake_tflite = tmp_path / 'model.tflite'
  fake_tflite.write_bytes(b'')
  with pytest.raises(ValueError, match='hard NMS only'):
    predict.load_detector(str(fake_tflite), soft_nms_sigma=SIGMA)
  with pytest.raises(ValueError, match='--soft_nms_sigma=-1'):
    predict.load_detector(str(model_dir), soft_nms_sigma=-1.0)
