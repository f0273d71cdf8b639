"""export_tflite: a trained tiny model dir -> .tflite in every quantization; the float file
detects what `model.detect` detects, runs in the stock interpreter with builtin ops and the
TFLite_Detection_PostProcess op only; float16 and dynamic-range files detect most of what the
Keras model detects; int8 takes uint8 pixels and keeps the post-processing in float."""
import collections
import contextlib
import io
import json

from absl import flags
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from official.vision.ops import box_ops
from tensorflow.core.framework import attr_value_pb2

from nasfpn_tf import config
from nasfpn_tf import main
from nasfpn_tf import predict
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.export import tflite
from nasfpn_tf.export import tflite_postprocess
from nasfpn_tf.export import tflite_runtime
from nasfpn_tf.export.saved_model import load_model
from nasfpn_tf.models.postprocess import DetectionGenerator
from nasfpn_tf.training import trainer as trainer_lib
from training_helpers import match_detections
from training_helpers import pairwise_iou
from training_helpers import spread_scores
from training_helpers import tiny_bindings

FLAGS = flags.FLAGS


@pytest.fixture(scope='module')
def model_dir(synthetic_records, tmp_path_factory):
  """A tiny model dir (ResNet-10, 16 filters, 128 px) trained 2 steps, at a learning rate that
  spreads the scores away from the 0.01 prior enough to rank them robustly."""
  path = tmp_path_factory.mktemp('tflite_model')
  bindings = tiny_bindings(synthetic_records, train_steps=2, checkpoint_every_steps=2) + [
      'StepDecayWithWarmup.base_learning_rate = 0.03', 'StepDecayWithWarmup.warmup_steps = 0']
  with contextlib.redirect_stdout(io.StringIO()):
    config.parse_gin([], bindings)
    trainer_lib.RetinaNetTrainer(str(path), tf.distribute.get_strategy(), mode='train').run()
  return str(path)


@pytest.fixture(scope='module')
def loaded(model_dir):
  """(model, checkpoint, step) of the model dir."""
  return load_model(model_dir)


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
  image, in the widest gap between the scores: after 2 steps scores lie close to the 0.01
  prior, and a threshold right at a score would let float rounding decide what is kept."""
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


@pytest.fixture(scope='module')
def spread_model(model_dir):
  """The model dir's model, its scores spread (training_helpers.spread_scores), with room for 1000
  detections. After 2 steps its scores crowd near the 0.01 prior, where a quantized
  model's rounding reorders them and picks which of two overlapping boxes NMS keeps; spread,
  detections can be matched one to one, and no image reaches the max_detections cut."""
  model = load_model(model_dir, ['build_retinanet.max_detections = 1000'])[0]
  spread_scores(model)
  return model


@pytest.mark.parametrize('quantization,use_regular_nms,max_unmatched',
                         [('float16', True, 0.1), ('dynamic', True, 0.2), ('dynamic', False, None)])
def test_float16_and_dynamic_range_detect_like_the_keras_model(spread_model, val_images, tmp_path,
                                                               quantization, use_regular_nms,
                                                               max_unmatched):
  """With regular NMS (class-aware, like DetectionGenerator), all but `max_unmatched` of the
  Keras model's detections (20 or more) on every image are matched in the quantized model's.
  float16 (measured: up to 4% unmatched): the op suppresses among unclipped boxes,
  DetectionGenerator among boxes clipped to the image, which can change what is kept near the
  border. Dynamic range (up to 11%) also quantizes activations on the fly, which moves scores by
  up to ~0.006: candidates at the 0.05 threshold flip, and so does which of two close-scored
  overlapping boxes NMS keeps. Fast NMS is class-agnostic: no two of its boxes overlap."""
  path = str(tmp_path / f'{quantization}.tflite')
  summary = tflite.export_model_tflite(spread_model, path, quantization,
                                       use_regular_nms=use_regular_nms)
  with open(path, 'rb') as f:
    content = f.read()
  _check_ops(summary, content)
  assert summary['postprocess']['use_regular_nms'] == use_regular_nms
  assert summary['inputs']['images']['dtype'] == 'float32'
  dtypes = _op_input_dtypes(content)
  if quantization == 'float16':  # float16 weights, dequantized for float32 kernels
    assert any(op == 'DEQUANTIZE' and inputs == ('float16',) for op, inputs in dtypes)
  else:  # int8 weights in float convolutions
    assert any(op == 'CONV_2D' and inputs[1] == 'int8' for op, inputs in dtypes)

  detector = tflite_runtime.TFLiteDetector(model_content=content)
  for i, image in enumerate(val_images):
    raw = detector.raw(image)
    count = int(raw['num_detections'][0])
    assert count >= 20, f'image {i}: {count} detections'
    boxes, classes = raw['detection_boxes'][0, :count], raw['detection_classes'][0, :count]
    overlap = np.triu(pairwise_iou(boxes, boxes) > 0.5, k=1)
    if use_regular_nms:
      overlap &= classes[:, None] == classes[None, :]
    assert not overlap.any()
    if use_regular_nms:
      expected = {k: v.numpy() for k, v in spread_model.detect(tf.constant(image)).items()}
      expected_count = int(expected['num_detections'][0])
      missing, _ = match_detections(expected, detector(image))
      assert 20 <= expected_count < 1000 and len(missing) <= max_unmatched * expected_count, (
          f'image {i}: {len(missing)} of {expected_count} Keras detections unmatched')


def test_int8_takes_uint8_pixels_and_keeps_the_postprocessing_in_float(
    model_dir, synthetic_records, val_images, tmp_path):
  path = str(tmp_path / 'int8.tflite')
  # Representative images: the operative config's training records by default.
  summary = tflite.export_tflite(model_dir, path, 'int8', num_representative_images=4)
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

  out = tflite_runtime.TFLiteDetector(model_content=content)(np.round(val_images[0]))
  assert out['detection_boxes'].shape == (1, 100, 4)
  assert np.all(np.isfinite(out['detection_scores']))


def test_main_int8_with_float_input_fast_nms_and_other_calibration_records(
    model_dir, synthetic_records, val_images, tmp_path, capsys):
  path = str(tmp_path / 'int8_float_io.tflite')
  FLAGS.unparse_flags()
  try:
    main.main(FLAGS([
        'main.py', '--mode=export_tflite', f'--model_dir={model_dir}', f'--tflite_path={path}',
        '--quantization=int8', '--notflite_uint8_input', '--tflite_fast_nms',
        f'--representative_file_pattern={synthetic_records["val"]}',
        '--num_representative_images=2']))
  finally:
    FLAGS.unparse_flags()
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary['representative_file_pattern'] == synthetic_records['val']
  assert summary['int8_io'] is False
  assert summary['inputs']['images']['dtype'] == 'float32'
  assert summary['postprocess']['use_regular_nms'] is False
  with open(path, 'rb') as f:
    content = f.read()
  _check_ops(summary, content)
  convs = [inputs for op, inputs in _op_input_dtypes(content) if op == 'CONV_2D']
  assert convs and all(inputs[:2] == ('int8', 'int8') for inputs in convs)
  out = tflite_runtime.TFLiteDetector(model_content=content)(val_images[0])
  assert np.all(np.isfinite(out['detection_scores']))


def test_unknown_quantization_fails_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="'int4' is not one of"):
    tflite.export_tflite(str(tmp_path / 'missing'), str(tmp_path / 'x.tflite'), 'int4')
