"""TFLite metadata for MediaPipe Tasks' ObjectDetector (`nasfpn_tf.export.tflite_metadata`)."""
import io
import json
import os
import pathlib
import subprocess
import zipfile

import flatbuffers
from flatbuffers import number_types
from flatbuffers.table import Table
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from nasfpn_tf import config
from nasfpn_tf.export import tflite
from nasfpn_tf.export import tflite_metadata
from nasfpn_tf.export import tflite_runtime
from nasfpn_tf.models import factory
from training_helpers import REPO, SUBPROCESS_TIMEOUT, TINY_MODEL, run_main, spread_scores

NAMES = {1: 'circle', 3: 'square', 5: 'triangle', 7: 'star', 9: 'ring'}
# labels.txt: line i names foreground index i (class id i + 1); ids without a name stand as is.
LABEL_LINES = ['circle', '2', 'square', '4', 'triangle', '6', 'star', '8', 'ring']


def _output(name, description, content, files=None):
  tensor = {'name': name, 'description': description, 'content': content, 'stats': {}}
  if files:
    tensor['associated_files'] = files
  return tensor


_FEATURE_2D = {'content_properties_type': 'FeatureProperties', 'content_properties': {},
               'range': {'min': 2, 'max': 2}}
# What MediaPipe 1.2.2's own writer (metadata_writers.object_detector.MetadataWriter.
# create_for_models_with_nms, mean [0], std [1], these labels) writes for our float32 file, as
# its MetadataDisplayer shows it; its min_parser_version left out (see MIN_PARSER_VERSION). The
# subgraph lists the op's outputs number, boxes, classes, scores: the metadata follows.
MEDIAPIPE_WRITER_METADATA = {
    'name': 'ObjectDetector',
    'description': tflite_metadata.MODEL_DESCRIPTION,
    'subgraph_metadata': [{
        'input_tensor_metadata': [{
            'name': 'image', 'description': 'Input image to be processed.',
            'content': {'content_properties_type': 'ImageProperties',
                        'content_properties': {'color_space': 'RGB'}},
            'process_units': [{'options_type': 'NormalizationOptions',
                               'options': {'mean': [0.0], 'std': [1.0]}}],
            'stats': {'max': [255.0], 'min': [0.0]}}],
        'output_tensor_metadata': [
            _output('number of detections', 'The number of the detected boxes.',
                    {'content_properties_type': 'FeatureProperties', 'content_properties': {}}),
            _output('location', 'The locations of the detected boxes.',
                    {'content_properties_type': 'BoundingBoxProperties',
                     'content_properties': {'index': [1, 0, 3, 2], 'type': 'BOUNDARIES'},
                     'range': {'min': 2, 'max': 2}}),
            _output('category', 'The categories of the detected boxes.', _FEATURE_2D,
                    [{'name': 'labels.txt', 'type': 'TENSOR_VALUE_LABELS',
                      'description': 'Labels for categories that the model can recognize.'}]),
            _output('score', 'The scores of the detected boxes.', _FEATURE_2D)],
        'output_tensor_groups': [{'name': 'detection_result',
                                  'tensor_names': ['location', 'category', 'score']}],
    }],
}


class _Reader:
  """Reads the ModelMetadata flatbuffer into the dict MediaPipe's MetadataDisplayer prints, from
  the slots of MediaPipe's metadata_schema.fbs (independent of the writer under test)."""

  def __init__(self, buf):
    self.buf = buf

  def _slot(self, t, i):
    return t.Offset(4 + 2 * i)

  def string(self, t, i):
    o = self._slot(t, i)
    return t.String(o + t.Pos).decode() if o else None

  def byte(self, t, i):
    o = self._slot(t, i)
    return t.Get(number_types.Int8Flags, o + t.Pos) if o else 0

  def int(self, t, i):
    o = self._slot(t, i)
    return t.Get(number_types.Int32Flags, o + t.Pos) if o else 0

  def table(self, t, i):
    o = self._slot(t, i)
    return Table(self.buf, t.Indirect(o + t.Pos)) if o else None

  def tables(self, t, i):
    o = self._slot(t, i)
    return [Table(self.buf, t.Indirect(t.Vector(o) + 4 * j)) for j in range(t.VectorLen(o))] \
        if o else None

  def numbers(self, t, i, flags):
    o = self._slot(t, i)
    return [t.Get(flags, t.Vector(o) + 4 * j) for j in range(t.VectorLen(o))] if o else None

  def strings(self, t, i):
    o = self._slot(t, i)
    return [t.String(t.Vector(o) + 4 * j).decode() for j in range(t.VectorLen(o))]

  def model(self):
    root = Table(self.buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, self.buf, 0))
    return {'name': self.string(root, 0), 'description': self.string(root, 1),
            'subgraph_metadata': [self.subgraph(s) for s in self.tables(root, 3)],
            'min_parser_version': self.string(root, 7)}

  def subgraph(self, t):
    out = {'input_tensor_metadata': [self.tensor(x) for x in self.tables(t, 2)],
           'output_tensor_metadata': [self.tensor(x) for x in self.tables(t, 3)]}
    groups = self.tables(t, 8)
    if groups:
      out['output_tensor_groups'] = [{'name': self.string(g, 0), 'tensor_names':
                                      self.strings(g, 1)} for g in groups]
    return out

  def tensor(self, t):
    out = {'name': self.string(t, 0), 'description': self.string(t, 1)}
    content = self.table(t, 3)
    kind = ['NONE', 'FeatureProperties', 'ImageProperties', 'BoundingBoxProperties'][
        self.byte(content, 0)]
    properties = self.table(content, 1)
    out['content'] = {'content_properties_type': kind, 'content_properties': {
        'FeatureProperties': lambda p: {},
        'ImageProperties': lambda p: {'color_space': ['UNKNOWN', 'RGB'][self.byte(p, 0)]},
        'BoundingBoxProperties': lambda p: {
            'index': self.numbers(p, 0, number_types.Uint32Flags),
            'type': ['UNKNOWN', 'BOUNDARIES'][self.byte(p, 1)]},
    }[kind](properties)}
    value_range = self.table(content, 2)
    if value_range:
      out['content']['range'] = {'min': self.int(value_range, 0), 'max': self.int(value_range, 1)}
    units = self.tables(t, 4)
    if units:
      assert all(self.byte(u, 0) == 1 for u in units)  # NormalizationOptions
      out['process_units'] = [{'options_type': 'NormalizationOptions', 'options': {
          'mean': self.numbers(self.table(u, 1), 0, number_types.Float32Flags),
          'std': self.numbers(self.table(u, 1), 1, number_types.Float32Flags)}} for u in units]
    stats = self.table(t, 5)
    if stats:
      out['stats'] = {k: v for k, v in (
          ('max', self.numbers(stats, 0, number_types.Float32Flags)),
          ('min', self.numbers(stats, 1, number_types.Float32Flags))) if v is not None}
    files = self.tables(t, 6)
    if files:
      out['associated_files'] = [{'name': self.string(f, 0), 'description': self.string(f, 1),
                                  'type': ['UNKNOWN', 'DESCRIPTIONS', 'TENSOR_AXIS_LABELS',
                                           'TENSOR_VALUE_LABELS'][self.byte(f, 2)]}
                                 for f in files]
    return out


@pytest.fixture(scope='module')
def model():
  """The tiny model, its classifier drawn wide so that it detects with spread scores."""
  config.parse_gin([], TINY_MODEL)
  built = factory.build_retinanet()
  spread_scores(built)
  return built


@pytest.fixture(scope='module')
def bare(model):
  """The model's float32 .tflite without metadata."""
  return tflite.convert(model)


def test_metadata_is_what_mediapipes_writer_writes(bare):
  content = tflite_metadata.with_metadata(bare, NAMES, 9)
  buf = tflite_metadata.read_metadata(content)
  assert buf[4:8] == b'M001'
  expected = dict(MEDIAPIPE_WRITER_METADATA, min_parser_version='1.2.0')
  assert _Reader(buf).model() == expected
  assert tflite_metadata.associated_files(content) == {
      'labels.txt': ('\n'.join(LABEL_LINES) + '\n').encode()}
  # Written again (e.g. other labels), it replaces the metadata rather than adding a second.
  again = tflite_metadata.with_metadata(content[:len(content)], {1: 'disc'}, 9)
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  names = [schema.Model.GetRootAsModel(again, 0).Metadata(i).Name()
           for i in range(schema.Model.GetRootAsModel(again, 0).MetadataLength())]
  assert names.count(b'TFLITE_METADATA') == 1
  assert tflite_metadata.associated_files(again)['labels.txt'].split(b'\n')[0] == b'disc'


def test_metadata_leaves_the_interpreters_detections_unchanged(bare):
  content = tflite_metadata.with_metadata(bare, NAMES, 9)
  image = np.random.RandomState(0).uniform(0, 255, [1, 128, 128, 3]).astype(np.float32)
  outputs = []
  for model_content in (bare, content):
    interpreter = tflite_runtime.interpreter(model_content=model_content)
    interpreter.set_tensor(interpreter.get_input_details()[0]['index'], image)
    interpreter.invoke()
    outputs.append([interpreter.get_tensor(d['index'])
                    for d in interpreter.get_output_details()])
  assert float(outputs[0][0].sum()) != 0.0 or outputs[0][1].size
  for a, b in zip(*outputs):
    np.testing.assert_array_equal(a, b)


def test_export_writes_metadata_unless_told_not_to(model, bare, tmp_path, monkeypatch):
  monkeypatch.setattr(tflite, 'convert', lambda *args, **kwargs: bare)
  summary = tflite.export_model_tflite(model, str(tmp_path / 'with.tflite'), label_map=NAMES)
  assert summary['metadata'] == 'mediapipe_object_detector'
  written = (tmp_path / 'with.tflite').read_bytes()
  assert written == tflite_metadata.with_metadata(bare, NAMES, 9)
  # The same bytes whenever written: the labels' zip entry carries a fixed date, not the clock's.
  with zipfile.ZipFile(io.BytesIO(written)) as archive:
    assert archive.getinfo(tflite_metadata.LABELS_FILE).date_time == (1980, 1, 1, 0, 0, 0)
  summary = tflite.export_model_tflite(model, str(tmp_path / 'bare.tflite'), label_map=NAMES,
                                       metadata=False)
  assert summary['metadata'] is None
  assert (tmp_path / 'bare.tflite').read_bytes() == bare


def test_a_model_without_the_detection_op_is_refused():
  function = tf.function(lambda x: {'y': 2.0 * x},
                         input_signature=[tf.TensorSpec([1, 4], tf.float32)])
  content = tf.lite.TFLiteConverter.from_concrete_functions(
      [function.get_concrete_function()], tf.Module()).convert()
  with pytest.raises(ValueError, match='not the four of TFLite_Detection_PostProcess'):
    tflite_metadata.with_metadata(content, NAMES, 9)


def test_tflite_metadata_flag_is_for_the_tflite_export(tmp_path):
  with pytest.raises(SystemExit, match='--tflite_metadata is for --mode=export_tflite'):
    run_main('--mode=export_saved_model', f'--model_dir={tmp_path}',
             f'--export_dir={tmp_path / "export"}', '--notflite_metadata')


def mediapipe_python():
  """A Python with mediapipe ($NASFPN_MEDIAPIPE_PYTHON, else .venv-mediapipe's: `make
  mediapipe-venv`), or None. mediapipe cannot be installed beside TensorFlow here
  (docs/mediapipe.md)."""
  path = os.environ.get('NASFPN_MEDIAPIPE_PYTHON') or str(REPO / '.venv-mediapipe' / 'bin' /
                                                         'python')
  return path if pathlib.Path(path).exists() else None


_DETECT = """
import json, sys
import numpy as np
import mediapipe as mp
from mediapipe.tasks.python import vision
from mediapipe.tasks.python.core import base_options
options = vision.ObjectDetectorOptions(
    base_options=base_options.BaseOptions(model_asset_path=sys.argv[1]),
    max_results=int(sys.argv[3]), score_threshold=0.0)
image = mp.Image.create_from_file(sys.argv[2])
np.save(sys.argv[4], image.numpy_view())  # the pixels its JPEG decoder gave
with vision.ObjectDetector.create_from_options(options) as detector:
  result = detector.detect(image)
print(json.dumps([[d.bounding_box.origin_x, d.bounding_box.origin_y, d.bounding_box.width,
                   d.bounding_box.height, d.categories[0].category_name, d.categories[0].score]
                  for d in result.detections]))
"""


def _as_mediapipe_reports(raw, count):
  """The interpreter's first `count` raw detections (normalized, unclipped ymin, xmin, ymax,
  xmax; 0-based foreground indices) as MediaPipe reports them: [x, y, width, height] in pixels
  of the 128 px image (as MediaPipe 1.2.2 turns a box into pixels: the corner clipped at 0, the
  size that of the unclipped box, at most the image's, and both truncated), and the label."""
  names = {**{i: str(i) for i in range(1, 10)}, **NAMES}
  reports = []
  for (ymin, xmin, ymax, xmax), index, score in zip(raw['detection_boxes'][0][:count] * 128,
                                                    raw['detection_classes'][0][:count],
                                                    raw['detection_scores'][0][:count]):
    reports.append(([max(xmin, 0), max(ymin, 0), min(xmax - xmin, 128), min(ymax - ymin, 128)],
                    names[int(index) + 1], float(score)))
  return reports


def _mediapipe_python_or_skip():
  python = mediapipe_python()
  if python is None:
    message = 'no Python with mediapipe: `make mediapipe-venv` or $NASFPN_MEDIAPIPE_PYTHON'
    if os.environ.get('CI') == 'true':  # `make test` builds it: CI must run this, not skip it
      pytest.fail(f'{message}; CI=true, where this test must run', pytrace=False)
    pytest.skip(message)
  return python


def _square_photo(coco128_dir, index, path=None):
  """coco128's `index`-th JPEG, cropped square and resized to the model's 128 px input, so that
  neither side resizes (MediaPipe stretches to the input size, our pipeline pads); saved as a
  JPEG at `path` if given. Returns its pixels [128, 128, 3] uint8."""
  photo = Image.open(sorted((coco128_dir / 'train2017').glob('*.jpg'))[index]).convert('RGB')
  side = min(photo.size)
  photo = photo.crop((0, 0, side, side)).resize((128, 128), Image.BILINEAR)
  if path:
    photo.save(path, quality=95)
  return np.asarray(photo)


def _mediapipe_detects_as_the_interpreter(model_file, python, coco128_dir, tmp_path, count=5):
  """MediaPipe's ObjectDetector on a real photo (coco128's first JPEG) with `model_file`: it
  reads the file's outputs as the metadata says, so it reports the interpreter's first `count`
  detections, in order, with their labels, scores and boxes (MediaPipe's in whole pixels).
  Returns the interpreter's detector and the pixels MediaPipe decoded ([1, 128, 128, 3])."""
  _square_photo(coco128_dir, 0, tmp_path / 'photo.jpg')
  found = json.loads(subprocess.run(
      [python, '-c', _DETECT, str(model_file), str(tmp_path / 'photo.jpg'),
       str(count), str(tmp_path / 'pixels.npy')], capture_output=True, text=True, check=True,
      timeout=SUBPROCESS_TIMEOUT).stdout.strip().splitlines()[-1])
  assert len(found) == count
  # Ours on the very pixels MediaPipe decoded (JPEG decoders differ by a level here and there,
  # which moves an untrained model's scores by up to 0.01).
  pixels = np.load(tmp_path / 'pixels.npy').astype(np.float32)[np.newaxis]
  assert pixels.shape == (1, 128, 128, 3)
  detector = tflite_runtime.TFLiteDetector(model_path=str(model_file))
  for (x, y, width, height, name, score), (box, expected_name, expected_score) in zip(
      found, _as_mediapipe_reports(detector.raw(pixels), count)):
    assert (name, score) == (expected_name, pytest.approx(expected_score, abs=1e-6))
    np.testing.assert_allclose([x, y, width, height], box, atol=1.0)
  return detector, pixels


def test_mediapipe_object_detector_returns_the_keras_models_best_detections(
    model, bare, coco128_dir, tmp_path):
  python = _mediapipe_python_or_skip()
  (tmp_path / 'model.tflite').write_bytes(tflite_metadata.with_metadata(bare, NAMES, 9))
  detector, pixels = _mediapipe_detects_as_the_interpreter(tmp_path / 'model.tflite', python,
                                                           coco128_dir, tmp_path)
  # And the file's best three are the Keras model's (`tflite_postprocess`: lower down, the op's
  # NMS on unclipped boxes may keep a box that the Keras NMS, on clipped ones, drops).
  in_file = {k: v[0] for k, v in detector(pixels).items()}
  keras = {k: v.numpy()[0] for k, v in model.detect(tf.constant(pixels)).items()}
  np.testing.assert_array_equal(in_file['detection_classes'][:3], keras['detection_classes'][:3])
  np.testing.assert_allclose(in_file['detection_scores'][:3], keras['detection_scores'][:3],
                             atol=0.02)
  np.testing.assert_allclose(in_file['detection_boxes'][:3], keras['detection_boxes'][:3],
                             atol=2.0)


# A tiny NAS-FPNLite as the mobile gin files build it (nasfpn_lite_mnv2_*: MobileNetV2, P3-P6,
# separable convolutions in the pyramid and the head).
TINY_NASFPN_LITE = TINY_MODEL + [
    "build_retinanet.backbone = 'mobilenetv2'", 'build_retinanet.max_level = 6',
    "build_retinanet.block_specs = 'nasfpn_lite'", 'build_retinanet.use_separable_conv = True',
    'build_retinanet.head_use_separable_conv = True']


def test_mediapipe_runs_the_int8_nasfpn_lite_export_as_is(coco128_dir, tmp_path):
  # The mobile model as the TFLite export writes it by default for phones: int8 with uint8
  # input, the metadata on; MediaPipe passes the photo's uint8 pixels as they are.
  python = _mediapipe_python_or_skip()
  config.parse_gin([], TINY_NASFPN_LITE)
  lite = factory.build_retinanet()
  # Untrained, the MobileNetV2 and the separable pyramid and head hand the classifier features
  # of about 1e-3: its pointwise kernel drawn this wide spreads the scores over (0.05, 0.6).
  kernel = lite.head.classifier.pointwise_kernel
  kernel.assign(tf.random.stateless_normal(kernel.shape, [0, 0], stddev=1000.0))
  calibration = [_square_photo(coco128_dir, i)[np.newaxis].astype(np.float32)
                 for i in range(1, 5)]
  summary = tflite.export_model_tflite(lite, str(tmp_path / 'lite.tflite'), 'int8',
                                       calibration, label_map=NAMES)
  assert summary['metadata'] == 'mediapipe_object_detector'
  assert summary['inputs']['images']['dtype'] == 'uint8'
  _mediapipe_detects_as_the_interpreter(tmp_path / 'lite.tflite', python, coco128_dir, tmp_path)
