"""export_tflite: a tiny model dir -> .tflite in every quantization and NMS, each run in the stock
interpreter (builtin ops and the TFLite_Detection_PostProcess op only) and compared with the
Keras model's detections on the validation images: float32 one to one (regular NMS with NMS off;
fast NMS against the same NMS on the Keras model's outputs), float16, dynamic-range and int8
(uint8 pixels in, post-processing in float) within tolerances that fit each quantization."""
import collections
import contextlib
import io
import json
from typing import NamedTuple
import warnings

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from official.vision.ops import box_ops
from tensorflow.core.framework import attr_value_pb2

from nasfpn_tf import config
from nasfpn_tf import predict
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.export import tflite
from nasfpn_tf.export import tflite_postprocess
from nasfpn_tf.export import tflite_runtime
from nasfpn_tf.export.saved_model import load_model
from nasfpn_tf.models.postprocess import DetectionGenerator
from nasfpn_tf.training import trainer as trainer_lib
from training_helpers import match_detections, run_main
from training_helpers import pairwise_iou
from training_helpers import spread_scores
from training_helpers import tiny_bindings


# Room for every detection: no image reaches the max_detections cut, where a quantized file's
# rounding would pick which detections are cut.
MAX_DETECTIONS = 1000
ROOM = [f'build_retinanet.max_detections = {MAX_DETECTIONS}']
# The Keras model's best detections on each image, which every file must find.
TOP_DETECTIONS = 5


class Tolerance(NamedTuple):
  """How closely a file's detections follow the Keras model's (`_assert_detects_like_keras`)."""
  min_iou: float  # a match: same class, box IoU at least this (match_detections),
  score: float  # score within this;
  unmatched: float  # the share of the Keras model's detections that may go unmatched.


# (quantization, use_regular_nms) -> Tolerance. float32 fast NMS is the same NMS on the same
# outputs as the reference. With regular NMS, the op suppresses among unclipped boxes,
# DetectionGenerator among boxes clipped to the image, which can change what is kept near the
# border. Dynamic range also quantizes activations on the fly, and int8 quantizes every tensor
# (scores in steps of about 1/256, boxes a little off): scores move, so candidates near the 0.05
# threshold flip, and so does which of two close-scored overlapping boxes NMS keeps (the fast
# NMS compares boxes of all classes, so more of them). Each `unmatched` leaves room above the
# worst share seen on the models of other spread_scores seeds.
TOLERANCES = {
    ('float32', False): Tolerance(min_iou=0.95, score=1e-5, unmatched=0.0),
    ('float16', True): Tolerance(min_iou=0.95, score=0.02, unmatched=0.2),
    ('dynamic', True): Tolerance(min_iou=0.95, score=0.02, unmatched=0.25),
    ('dynamic', False): Tolerance(min_iou=0.95, score=0.02, unmatched=0.3),
    ('int8', True): Tolerance(min_iou=0.9, score=0.05, unmatched=0.5),
    ('int8', False): Tolerance(min_iou=0.9, score=0.05, unmatched=0.5),
}


@pytest.fixture(scope='module')
def model_dir(synthetic_records, tmp_path_factory):
  """A tiny model dir (ResNet-10, 16 filters, 128 px) trained 2 steps from a classifier drawn
  wide (training_helpers.spread_scores): it detects things on each validation image, with scores
  spread over (0, 1), not tied at the 0.01 prior where rounding would rank them."""
  path = tmp_path_factory.mktemp('tflite_model')
  with contextlib.redirect_stdout(io.StringIO()):
    config.parse_gin([], tiny_bindings(synthetic_records, train_steps=2,
                                       checkpoint_every_steps=2))
    trainer = trainer_lib.RetinaNetTrainer(str(path), tf.distribute.get_strategy(), mode='train')
    spread_scores(trainer.model)
    trainer.run()
  return str(path)


@pytest.fixture(scope='module')
def loaded(model_dir):
  """(model, checkpoint, step) of the model dir."""
  return load_model(model_dir)


@pytest.fixture(scope='module')
def keras_model(model_dir):
  """The model dir's model with room for MAX_DETECTIONS."""
  return load_model(model_dir, ROOM)[0]


@pytest.fixture(scope='module')
def val_images(loaded, synthetic_records):
  """The 4 validation images preprocessed as evaluation does: [1, 128, 128, 3] float32 each."""
  dataset = input_pipeline.build_eval_dataset(file_pattern=synthetic_records['val'],
                                              global_batch_size=1,
                                              model_config=loaded[0].get_config())
  return [images.numpy() for images, _ in dataset]


@pytest.fixture(scope='module')
def score_threshold(loaded, val_images):
  """A score threshold that leaves 20 or more (anchor, class) candidates in all, at most 90 per
  image, in the widest gap between the scores: a threshold right at a score would let float
  rounding decide what is kept."""
  model = loaded[0]
  num_classes = model.get_config()['num_classes']
  per_image = []
  for image in val_images:
    outputs = model(image, training=False)['cls_outputs']
    per_image.append(np.concatenate([tf.sigmoid(v).numpy().reshape(-1, num_classes)[:, 1:].ravel()
                                     for v in outputs.values()]))
  pooled = np.sort(np.concatenate(per_image))[::-1]
  best, threshold = 0.0, None
  for rank in range(20, 400):
    candidate = (pooled[rank - 1] + pooled[rank]) / 2
    if max(int(np.sum(s >= candidate)) for s in per_image) > 90:
      break
    if pooled[rank - 1] - pooled[rank] > best:
      best, threshold = pooled[rank - 1] - pooled[rank], float(candidate)
  assert best > 5e-7, f'scores too close to pick a threshold: {pooled[:30]}'
  return threshold


def _op_input_dtypes(content):
  """Counter of (op name, input dtypes) over the model's ops."""
  tensors = {t['index']: np.dtype(t['dtype']).name
             for t in tflite_runtime.interpreter(model_content=content).get_tensor_details()}
  return collections.Counter(
      (op['op_name'], tuple(tensors[i] for i in op['inputs'] if i >= 0))
      for op in tflite_runtime.op_details(content))


def _check_ops(summary, content):
  """Builtins and the post-processing op only: no Flex (select TF) ops, no other custom op."""
  assert tflite_runtime.custom_op_names(content) == [tflite_postprocess.POSTPROCESS_OP]
  assert summary['custom_ops'] == [tflite_postprocess.POSTPROCESS_OP]
  assert tflite_postprocess.POSTPROCESS_OP in summary['ops']
  assert not [op for op in summary['ops'] if op.startswith('Flex')]


def test_anchors_and_scales_decode_like_the_box_coder(loaded):
  """The op's decoding (center-size anchors normalized, y/x/h/w scales) on our anchors equals
  TFM's decode_boxes in pixels, and the implements string parses as the op's attributes."""
  model = loaded[0]
  height, width = model.image_size
  anchors = tflite_postprocess.anchors_center_size(model.geometry)
  pixels = np.concatenate([model.anchor_boxes[l].numpy().reshape(-1, 4)
                           for l in sorted(model.anchor_boxes, key=int)])
  deltas = np.random.RandomState(0).uniform(-1, 1, pixels.shape).astype(np.float32)
  attributes = tflite_postprocess.postprocess_attributes(model)
  y, x, h, w = (deltas[:, i] / attributes[k] for i, k in
                enumerate(('y_scale', 'x_scale', 'h_scale', 'w_scale')))
  yc, xc = y * anchors[:, 2] + anchors[:, 0], x * anchors[:, 3] + anchors[:, 1]
  half_h, half_w = np.exp(h) * anchors[:, 2] / 2, np.exp(w) * anchors[:, 3] / 2
  op_boxes = np.stack([yc - half_h, xc - half_w, yc + half_h, xc + half_w], -1)
  expected = box_ops.decode_boxes(tf.constant(deltas), tf.constant(pixels)).numpy()
  np.testing.assert_allclose(op_boxes * [height, width, height, width], expected, atol=1e-3)

  parsed = text_format.Parse(tflite_postprocess._implements_signature(attributes),
                             attr_value_pb2.NameAttrList())
  assert parsed.name == tflite_postprocess.POSTPROCESS_OP
  assert parsed.attr['num_classes'].i == 9  # foreground: ids 1..9 of num_classes = 10
  assert parsed.attr['use_regular_nms'].b
  assert parsed.attr['max_detections'].i == parsed.attr['detections_per_class'].i == 100
  assert parsed.attr['nms_score_threshold'].f == pytest.approx(0.05)


def test_float32_detects_what_the_keras_model_detects(model_dir, loaded, val_images,
                                                      score_threshold, tmp_path):
  """With NMS off on both sides (IoU threshold 1), the outputs are every (anchor, class) above
  the score threshold: the same boxes, scores and classes as DetectionGenerator, one to one.
  (With NMS on, the op suppresses among unclipped boxes, DetectionGenerator among boxes clipped
  to the image, which can change what is kept near the border: see the next test.)"""
  model, checkpoint, step = loaded
  path = str(tmp_path / 'model.tflite')
  summary = tflite.export_tflite(
      model_dir, path, gin_bindings=[
          f'build_retinanet.pre_nms_score_threshold = {score_threshold!r}',
          'build_retinanet.nms_iou_threshold = 1.0'])

  with open(path, 'rb') as f:
    content = f.read()
  assert summary['path'] == path and summary['size_bytes'] == len(content)
  assert (summary['checkpoint'], summary['step'], summary['quantization']) == (
      checkpoint, step, 'float32')
  assert summary['postprocess']['nms_score_threshold'] == pytest.approx(score_threshold)
  _check_ops(summary, content)
  assert summary['inputs'] == {'images': {'name': 'serving_default_images:0',
                                          'shape': [1, 128, 128, 3], 'dtype': 'float32'}}
  assert {name: (o['shape'], o['dtype']) for name, o in summary['outputs'].items()} == {
      'detection_boxes': ([1, 100, 4], 'float32'), 'detection_classes': ([1, 100], 'float32'),
      'detection_scores': ([1, 100], 'float32'), 'num_detections': ([1], 'float32')}
  # Op index i is class id i + 1, named from the label map beside the training records.
  with open(summary['labels']) as f:
    labels = json.load(f)
  assert summary['labels'] == str(tmp_path / 'model.labels.json')
  assert sorted(labels, key=int) == [str(i) for i in range(9)]
  assert labels['0'] == {'id': 1, 'name': 'circle'} and labels['8'] == {'id': 9, 'name': 'ring'}
  # predict finds the labels beside the file and maps boxes to the original image.
  detect, names = predict.load_detector(path)
  assert names == {e['id']: e['name'] for e in labels.values() if e['name']} and names[9] == 'ring'
  assert detect(np.zeros([64, 96, 3], np.uint8))['detection_boxes'].shape == (1, 100, 4)

  detector = tflite_runtime.TFLiteDetector(model_path=path)
  generator = DetectionGenerator(model.image_size, 10, pre_nms_score_threshold=score_threshold,
                                 nms_iou_threshold=1.0)
  total = 0
  for image in val_images:
    outputs = model(tf.constant(image), training=False)
    expected = {k: v.numpy() for k, v in generator(outputs['cls_outputs'], outputs['box_outputs'],
                                                   model.anchor_boxes).items()}
    actual = detector(image)
    assert match_detections(expected, actual) == ([], [])
    assert int(actual['num_detections'][0]) == int(expected['num_detections'][0]) <= 90
    count = int(expected['num_detections'][0])
    np.testing.assert_allclose(actual['detection_scores'][0, :count],
                               expected['detection_scores'][0, :count], atol=1e-5)
    total += count
  assert total >= 20


def _fast_nms_detections(model, image):
  """What the op's fast NMS makes of the Keras model's outputs on `image`, laid out as
  model.detect: each anchor scored by its best foreground class, class-agnostic NMS of the
  decoded boxes, unclipped (see tflite_postprocess), then clipped to the image as TFLiteDetector
  clips them."""
  model_config = model.get_config()
  levels = sorted(model.anchor_boxes, key=int)
  outputs = model(tf.constant(image), training=False)
  def flat(tensors, width):
    return tf.concat([tf.reshape(tensors[level], [-1, width]) for level in levels], axis=0)
  boxes = box_ops.decode_boxes(flat(outputs['box_outputs'], 4), flat(model.anchor_boxes, 4))
  scores = tf.sigmoid(flat(outputs['cls_outputs'], model_config['num_classes']))[:, 1:]
  kept, kept_scores = tf.image.non_max_suppression_with_scores(
      boxes, tf.reduce_max(scores, axis=1), model_config['max_detections'],
      model_config['nms_iou_threshold'], model_config['pre_nms_score_threshold'])
  return {
      'detection_boxes': np.clip(tf.gather(boxes, kept).numpy(), 0, model.image_size * 2)[None],
      'detection_scores': kept_scores.numpy()[None],
      'detection_classes': tf.argmax(tf.gather(scores, kept), axis=1).numpy()[None] + 1,
      'num_detections': np.array([len(kept)]),
  }


def _fill_outputs_with_nan(detector):
  """NaN in the output buffers (but num_detections), as garbage memory may hold: what the op
  leaves unwritten stays NaN."""
  for name, detail in detector.interpreter.get_signature_runner().get_output_details().items():
    if name != 'num_detections':
      detector.interpreter.set_tensor(detail['index'],
                                      np.full(detail['shape'], np.nan, np.float32))


def _assert_detects_like_keras(content, model, images, quantization, use_regular_nms):
  """The file's detections follow the Keras model's (model.detect, or _fast_nms_detections for
  fast NMS) within TOLERANCES: on each image the Keras model detects TOP_DETECTIONS or more
  things and the file finds each of the TOP_DETECTIONS best (same class, score within the
  tolerance, box IoU >= 0.5: an NMS that kept an overlapping neighbour instead still finds the
  object); over all images, all but the tolerance's share of the Keras detections are matched one
  to one (match_detections with its IoU and score). The file's NMS leaves no two overlapping
  boxes (of one class, for regular NMS). Rows past num_detections: zeroed by the op's regular
  NMS, left unwritten by its fast NMS, zero from TFLiteDetector, without numpy warnings."""
  tolerance = TOLERANCES[quantization, use_regular_nms]
  detector = tflite_runtime.TFLiteDetector(model_content=content)
  unmatched, total = [], 0
  for i, image in enumerate(images):
    if use_regular_nms:
      expected = {k: v.numpy() for k, v in model.detect(tf.constant(image)).items()}
    else:
      expected = _fast_nms_detections(model, image)
    expected_count = int(expected['num_detections'][0])
    assert TOP_DETECTIONS <= expected_count < MAX_DETECTIONS, (
        f'image {i}: {expected_count} Keras detections')

    _fill_outputs_with_nan(detector)
    raw = detector.raw(image)
    count = int(raw['num_detections'][0])
    unwritten = raw['detection_scores'][0, count:]
    assert np.all(unwritten == 0) if use_regular_nms else np.all(np.isnan(unwritten))
    boxes, classes = raw['detection_boxes'][0, :count], raw['detection_classes'][0, :count]
    overlap = np.triu(pairwise_iou(boxes, boxes) > 0.5, k=1)
    if use_regular_nms:
      overlap &= classes[:, None] == classes[None, :]
    assert not overlap.any()

    _fill_outputs_with_nan(detector)
    with warnings.catch_warnings():
      warnings.simplefilter('error', RuntimeWarning)
      actual = detector(image)
    assert int(actual['num_detections'][0]) == count
    for name in ('detection_boxes', 'detection_scores', 'detection_classes'):
      assert not np.any(actual[name][0, count:]), name

    best = dict(expected, num_detections=np.array([TOP_DETECTIONS]))
    missing, _ = match_detections(best, actual, min_iou=0.5, score_tolerance=tolerance.score)
    assert not missing, (f'image {i}: the file misses Keras detections {missing}, classes '
                         f'{expected["detection_classes"][0, missing]}, scores '
                         f'{expected["detection_scores"][0, missing]}')
    missing, _ = match_detections(expected, actual, min_iou=tolerance.min_iou,
                                  score_tolerance=tolerance.score)
    unmatched += [(i, j) for j in missing]
    total += expected_count
  assert len(unmatched) <= tolerance.unmatched * total, (
      f'{len(unmatched)} of {total} Keras detections unmatched (image, index): {unmatched}')


@pytest.mark.parametrize('quantization,use_regular_nms',
                         [('float32', False), ('float16', True), ('dynamic', True),
                          ('dynamic', False)])
def test_float_and_dynamic_range_files_detect_like_the_keras_model(
    keras_model, val_images, tmp_path, quantization, use_regular_nms):
  path = str(tmp_path / f'{quantization}.tflite')
  summary = tflite.export_model_tflite(keras_model, path, quantization,
                                       use_regular_nms=use_regular_nms)
  with open(path, 'rb') as f:
    content = f.read()
  _check_ops(summary, content)
  assert summary['postprocess']['use_regular_nms'] == use_regular_nms
  assert summary['inputs']['images']['dtype'] == 'float32'
  convs = [inputs for op, inputs in _op_input_dtypes(content) if op == 'CONV_2D']
  if quantization == 'float16':  # float16 weights, dequantized for float32 kernels
    assert any(op == 'DEQUANTIZE' and inputs == ('float16',)
               for op, inputs in _op_input_dtypes(content))
  expected_weights = 'int8' if quantization == 'dynamic' else 'float32'
  assert convs and all(inputs[1] == expected_weights for inputs in convs)
  _assert_detects_like_keras(content, keras_model, val_images, quantization, use_regular_nms)


def test_int8_takes_uint8_pixels_keeps_the_postprocessing_in_float_and_detects_like_keras(
    model_dir, keras_model, synthetic_records, val_images, tmp_path):
  path = str(tmp_path / 'int8.tflite')
  # Representative images: the operative config's training records by default.
  summary = tflite.export_tflite(model_dir, path, 'int8', num_representative_images=4,
                                 gin_bindings=ROOM)
  assert summary['representative_file_pattern'] == synthetic_records['train']
  with open(path, 'rb') as f:
    content = f.read()
  _check_ops(summary, content)
  # Raw pixels go in as they are: the input's quantization is the identity on [0, 255].
  assert summary['inputs']['images']['dtype'] == 'uint8'
  assert summary['inputs']['images']['quantization'] == {'scale': 1.0, 'zero_point': 0}
  assert all(o['dtype'] == 'float32' for o in summary['outputs'].values())
  dtypes = _op_input_dtypes(content)
  convs = [inputs for op, inputs in dtypes if op == 'CONV_2D']
  assert convs and all(inputs[:2] == ('int8', 'int8') for inputs in convs)
  assert dtypes[(tflite_postprocess.POSTPROCESS_OP, ('float32', 'float32', 'float32'))] == 1
  assert {op for op, inputs in dtypes if 'float32' in inputs} <= {
      tflite_postprocess.POSTPROCESS_OP, 'DEQUANTIZE'}
  # uint8 holds whole pixels: both models see the images rounded.
  _assert_detects_like_keras(content, keras_model, [np.round(image) for image in val_images],
                             'int8', use_regular_nms=True)


def test_main_int8_with_float_input_fast_nms_and_other_calibration_records(
    model_dir, keras_model, synthetic_records, val_images, tmp_path):
  path = str(tmp_path / 'int8_float_io.tflite')
  printed = run_main(
      '--mode=export_tflite', f'--model_dir={model_dir}', f'--tflite_path={path}',
      '--quantization=int8', '--notflite_uint8_input', '--tflite_fast_nms',
      f'--representative_file_pattern={synthetic_records["val"]}',
      '--num_representative_images=2', f'--gin_bindings={ROOM[0]}')
  summary = json.loads(printed.strip().splitlines()[-1])
  assert summary['representative_file_pattern'] == synthetic_records['val']
  assert summary['int8_io'] is False
  assert summary['inputs']['images']['dtype'] == 'float32'
  assert summary['postprocess']['use_regular_nms'] is False
  with open(path, 'rb') as f:
    content = f.read()
  _check_ops(summary, content)
  convs = [inputs for op, inputs in _op_input_dtypes(content) if op == 'CONV_2D']
  assert convs and all(inputs[:2] == ('int8', 'int8') for inputs in convs)
  _assert_detects_like_keras(content, keras_model, val_images, 'int8', use_regular_nms=False)


def test_unknown_quantization_fails_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="'int4' is not one of"):
    tflite.export_tflite(str(tmp_path / 'missing'), str(tmp_path / 'x.tflite'), 'int4')
