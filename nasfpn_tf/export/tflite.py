"""A trained model dir -> TFLite for mobile: float32, float16, dynamic-range or full-integer int8.

The file runs in the stock TFLite interpreter: every op is a TFLite builtin except the
post-processing, which is `TFLite_Detection_PostProcess`, the custom op compiled into the TFLite
runtime (no Flex / select-TF ops). TensorFlow's `CombinedNonMaxSuppression` has no TFLite kernel;
as in TF Model Garden (`detection_generator._generate_detections_tflite`), the graph calls an
empty `tf.function` whose `experimental_implements` attribute names the op and its attributes,
and the converter replaces the call by the op.

Model (batch 1, the fixed `build_retinanet.image_size` [H, W]):
  input   images             [1, H, W, 3] RGB pixels in [0, 255], already resized / padded as
                             evaluation does it (`build_eval_dataset`: resized keeping the aspect
                             ratio to fit, zero-padded at the bottom / right):
                             float32, or uint8 for int8 with `int8_io` (its scale is 1 and zero
                             point 0, so raw pixels go in as they are).
  outputs detection_boxes    float32 [1, K, 4] ymin, xmin, ymax, xmax NORMALIZED to the input
                             (multiply by H, W for model-input pixels); not clipped to [0, 1].
          detection_classes  float32 [1, K] 0-based FOREGROUND index i: class id = i + 1 (our
                             class 0 is background), name in `<stem>.labels.json`.
          detection_scores   float32 [1, K] sigmoid scores, decreasing.
          num_detections     float32 [1] valid rows; later rows are zero.
  with K = build_retinanet.max_detections. The op's outputs are float32 whatever the quantization:
  it runs in float (its inputs are dequantized in an int8 model).

The op and our `DetectionGenerator` (what `model.detect` and evaluation run) agree on:
  - box decoding: TFM `box_ops.decode_boxes` without weights, i.e. y/x/h/w scales 1.0 (the
    labeler's `AnchorLabeler` encodes with `box_coder_weights=None`); anchors are baked in as a
    constant [N, 4] (ycenter, xcenter, h, w) normalized by the input size;
  - scores: sigmoid of the logits, background column skipped (the op's label offset 1);
  - NMS (`use_regular_nms=True`, the default): per class, scores >= build_retinanet.
    pre_nms_score_threshold, IoU > nms_iou_threshold suppressed, up to max_detections per class,
    then the max_detections best overall: the class-aware NMS of `combined_non_max_suppression`.
Differences, all small on a trained model: `DetectionGenerator` keeps the pre_nms_top_k best
(anchor, class) pairs per level before NMS and clips boxes to the image before NMS (the op sees
unclipped boxes, so IoUs of boxes crossing the border differ); TFM clips the decoded log-size at
log(1000/16), the op does not. `use_regular_nms=False` is the op's fast NMS: one class per anchor
(its best), class-AGNOSTIC NMS; faster with many classes, but a box suppresses overlapping boxes
of other classes. Regular NMS is the default for that fidelity: on the demo config (ResNet-10,
256 px, synthetic shapes, 1000 steps) the float32 file scores AP 33.2 / AP50 47.4 with it (the
Keras evaluation: 33.1 / 47.4), 30.6 / 43.1 with fast NMS. Its price, from
experiments/tflite_latency.py (the op alone, 320 px anchors, 90 classes, one x86 core, fastest
runs): about 7 ms per image against 2.5 ms, mostly a fixed per-class scan of every anchor.

int8: the network is quantized to int8 (`TFLITE_BUILTINS_INT8`), calibrated on images of the
training records preprocessed as evaluation does; the sigmoid scores and box deltas are
dequantized before the post-processing op, which stays float.
"""
import json
import os
import pathlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import gin
import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema

from nasfpn_tf.data import input_pipeline
from nasfpn_tf.export.saved_model import load_model, model_label_map
from nasfpn_tf.models.retinanet import RetinaNet

QUANTIZATIONS = ('float32', 'float16', 'dynamic', 'int8')
POSTPROCESS_OP = 'TFLite_Detection_PostProcess'
OUTPUT_NAMES = ('detection_boxes', 'detection_classes', 'detection_scores', 'num_detections')
INPUT_NAME = 'images'


def labels_path(tflite_path: str) -> str:
  """`<dir>/<stem>.labels.json` beside `<dir>/<stem>.tflite`."""
  path = pathlib.Path(tflite_path)
  return str(path.with_name(path.stem + '.labels.json'))


def anchors_center_size(model: RetinaNet) -> np.ndarray:
  """The model's anchors, flattened in the order of its outputs (level, y, x, anchor), as the
  op reads them: [N, 4] float32 (ycenter, xcenter, height, width) divided by the input size."""
  height, width = model.image_size
  levels = sorted(model.anchor_boxes, key=int)
  boxes = np.concatenate([np.asarray(model.anchor_boxes[level], np.float64).reshape(-1, 4)
                          for level in levels])
  ymin, xmin, ymax, xmax = boxes.T
  return np.stack([(ymin + ymax) / 2 / height, (xmin + xmax) / 2 / width,
                   (ymax - ymin) / height, (xmax - xmin) / width], axis=-1).astype(np.float32)


def postprocess_attributes(model: RetinaNet, use_regular_nms: bool = True) -> Dict[str, Any]:
  """The op's attributes from the model config (`build_retinanet` post-processing bindings)."""
  config = model.get_config()
  return {
      'max_detections': int(config['max_detections']),
      'max_classes_per_detection': 1,
      # Regular NMS: as many per class as overall, like combined_non_max_suppression here.
      'detections_per_class': int(config['max_detections']),
      'use_regular_nms': bool(use_regular_nms),
      'nms_score_threshold': float(config['pre_nms_score_threshold']),
      'nms_iou_threshold': float(config['nms_iou_threshold']),
      # TFM box coder without weights (AnchorLabeler's box_coder_weights=None, decode_boxes).
      'y_scale': 1.0, 'x_scale': 1.0, 'h_scale': 1.0, 'w_scale': 1.0,
      'num_classes': int(config['num_classes']) - 1,  # foreground; the op skips column 0
  }


def _implements_signature(attributes: Mapping[str, Any]) -> str:
  """The `experimental_implements` NameAttrList text the converter legalizes into the op."""
  parts = [f'name: "{POSTPROCESS_OP}"']
  for key, value in attributes.items():
    if isinstance(value, bool):
      text = f'b: {str(value).lower()}'
    elif isinstance(value, int):
      text = f'i: {value}'
    else:
      text = f'f: {value!r}'
    parts.append(f'attr {{ key: "{key}" value {{ {text} }} }}')
  return ' '.join(parts)


def postprocess_op(attributes: Mapping[str, Any]):
  """A tf.function (box_encodings [1, N, 4], class_predictions [1, N, C], anchors [N, 4]) ->
  (boxes, classes, scores, num_detections) that the converter replaces by the op with these
  `attributes` (see `postprocess_attributes`). In TensorFlow it returns zeros: only the
  converted model computes."""
  @tf.function(experimental_implements=_implements_signature(attributes))
  def postprocess(box_encodings, class_predictions, anchors):  # pylint: disable=unused-argument
    dummy = tf.constant(0.0, tf.float32)
    return dummy, dummy, dummy, dummy
  return postprocess


def tflite_function(model: RetinaNet, use_regular_nms: bool = True):
  """The concrete function to convert: images [1, H, W, 3] float32 -> the op's four outputs."""
  height, width = model.image_size
  num_classes = model.get_config()['num_classes']
  levels = sorted(model.anchor_boxes, key=int)
  anchors = anchors_center_size(model)
  postprocess = postprocess_op(postprocess_attributes(model, use_regular_nms))

  @tf.function(input_signature=[tf.TensorSpec([1, height, width, 3], tf.float32, INPUT_NAME)])
  def detect(images):
    outputs = model(images, training=False)
    box_encodings = tf.concat(
        [tf.reshape(tf.cast(outputs['box_outputs'][l], tf.float32), [1, -1, 4]) for l in levels],
        axis=1)
    logits = tf.concat(
        [tf.reshape(tf.cast(outputs['cls_outputs'][l], tf.float32), [1, -1, num_classes])
         for l in levels], axis=1)
    results = postprocess(box_encodings, tf.sigmoid(logits), tf.constant(anchors))
    return dict(zip(OUTPUT_NAMES, results))

  return detect.get_concrete_function()


def representative_images(file_pattern: str, model_config: Mapping[str, Any],
                          num_images: int = 100) -> Iterator[np.ndarray]:
  """The first `num_images` images of `file_pattern`'s records, preprocessed as evaluation
  (`build_eval_dataset`): [1, H, W, 3] float32 each."""
  dataset = input_pipeline.build_eval_dataset(
      file_pattern=file_pattern, global_batch_size=1, model_config=model_config)
  for images, _ in dataset.take(num_images):
    yield images.numpy()


def _calibration_data(images: Iterable[np.ndarray]) -> Callable[[], Iterator[List[np.ndarray]]]:
  """The converter's representative dataset. The first image gets one pixel 0 and one 255, so
  the input's calibrated range is exactly [0, 255]: with uint8 input the quantization is then
  scale 1, zero point 0 and raw pixels feed in unchanged."""
  def generate():
    count = 0
    for image in images:
      image = np.array(image, np.float32).reshape((1,) + np.shape(image)[-3:])
      if not count:
        image[0, 0, 0, 0], image[0, -1, -1, -1] = 0.0, 255.0
      count += 1
      yield [image]
    if not count:
      raise ValueError('int8 calibration got no representative images.')
  return generate


def convert(model: RetinaNet, quantization: str = 'float32',
            representative_data: Optional[Iterable[np.ndarray]] = None, int8_io: bool = True,
            use_regular_nms: bool = True) -> bytes:
  """The TFLite flatbuffer of a built `model` (see the module docstring).

  quantization: 'float32'; 'float16' (weights stored in float16, computed in float32 on CPU);
  'dynamic' (dynamic-range: int8 weights, activations quantized on the fly); 'int8' (full
  integer, calibrated on `representative_data`, an iterable of [1, H, W, 3] or [H, W, 3] float
  images preprocessed like evaluation; `int8_io`: uint8 input, else float32).
  """
  if quantization not in QUANTIZATIONS:
    raise ValueError(f'quantization {quantization!r} is not one of {list(QUANTIZATIONS)}.')
  if quantization == 'int8' and representative_data is None:
    raise ValueError("quantization='int8' needs representative images for calibration.")
  function = tflite_function(model, use_regular_nms)
  # The variables only: tracking the Keras model would make the converter's SavedModel save
  # trace every layer again for Keras metadata.
  variables = tf.Module()
  variables.model_variables = model.variables
  converter = tf.lite.TFLiteConverter.from_concrete_functions([function], variables)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  converter.allow_custom_ops = True  # the post-processing op only: checked below
  if quantization == 'float16':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif quantization == 'dynamic':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  elif quantization == 'int8':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _calibration_data(representative_data)
    # Integer kernels for the network; TFLITE_BUILTINS for the float glue around the op.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                           tf.lite.OpsSet.TFLITE_BUILTINS]
    if int8_io:
      converter.inference_input_type = tf.uint8
  content = converter.convert()
  custom = sorted(set(custom_op_names(content)) - {POSTPROCESS_OP})
  if custom:
    raise RuntimeError(f'the TFLite model has custom ops besides {POSTPROCESS_OP}: {custom}')
  return content


def _interpreter_module():
  """(Interpreter, OpResolverType): LiteRT's, else TensorFlow's (deprecated from TF 2.20)."""
  try:
    from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
    return litert.Interpreter, litert.OpResolverType
  except ImportError:
    return tf.lite.Interpreter, tf.lite.experimental.OpResolverType


def interpreter(model_path: Optional[str] = None, model_content: Optional[bytes] = None,
                num_threads: Optional[int] = None):
  """A stock TFLite interpreter (builtin ops + the post-processing op), tensors allocated."""
  interpreter_class, _ = _interpreter_module()
  result = interpreter_class(model_path=model_path, model_content=model_content,
                             num_threads=num_threads)
  result.allocate_tensors()
  return result


def op_details(content: bytes) -> List[Dict[str, Any]]:
  """The model's ops in execution order: [{'op_name', 'inputs', 'outputs', ...}] (builtins by
  name, custom ops by their custom code), read without delegates (XNNPACK would replace most
  of them by one delegate node)."""
  interpreter_class, resolver = _interpreter_module()
  result = interpreter_class(
      model_content=content,
      experimental_op_resolver_type=resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  result.allocate_tensors()
  return result._get_ops_details()  # pylint: disable=protected-access


def custom_op_names(content: bytes) -> List[str]:
  """Names of the ops that are not TFLite builtins (custom ops, Flex ops: 'Flex...')."""
  model = schema.Model.GetRootAs(content, 0)
  names = []
  for i in range(model.OperatorCodesLength()):
    code = model.OperatorCodes(i)
    if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) == schema.BuiltinOperator.CUSTOM:
      names.append(code.CustomCode().decode())
  return names


def _tensor_summary(detail: Mapping[str, Any]) -> Dict[str, Any]:
  scales, zero_points = detail['quantization_parameters']['scales'], \
      detail['quantization_parameters']['zero_points']
  summary = {'name': detail['name'], 'shape': [int(s) for s in detail['shape']],
             'dtype': np.dtype(detail['dtype']).name}
  if len(scales):
    summary['quantization'] = {'scale': float(scales[0]), 'zero_point': int(zero_points[0])}
  return summary


def io_details(content: bytes) -> Dict[str, Any]:
  """{'inputs': {name: {...}}, 'outputs': {name: {...}}} of the serving signature: shape, dtype
  and quantization (scale, zero point) where quantized."""
  runner = interpreter(model_content=content)
  signature = runner.get_signature_runner()
  return {kind: {name: _tensor_summary(detail) for name, detail in sorted(details.items())}
          for kind, details in (('inputs', signature.get_input_details()),
                                ('outputs', signature.get_output_details()))}


class TFLiteDetector:
  """Runs an exported .tflite like `model.detect`: one preprocessed image [H, W, 3] (or [1, H, W,
  3]) float pixels in [0, 255] -> 'detection_boxes' [1, K, 4] in model-input pixels (clipped to
  the input, as DetectionGenerator does), 'detection_scores' [1, K], 'detection_classes' [1, K]
  int32 class ids (op index + 1; 0 in padding rows), 'num_detections' [1] int32."""

  def __init__(self, model_path: Optional[str] = None, model_content: Optional[bytes] = None,
               num_threads: Optional[int] = None):
    self.interpreter = interpreter(model_path, model_content, num_threads)
    self._runner = self.interpreter.get_signature_runner()
    self._input = self._runner.get_input_details()[INPUT_NAME]
    self.image_size = [int(s) for s in self._input['shape'][1:3]]

  def _input_tensor(self, image) -> np.ndarray:
    image = np.asarray(image, np.float32).reshape([1] + self.image_size + [3])
    dtype = np.dtype(self._input['dtype'])
    if dtype == np.float32:
      return image
    scale, zero_point = self._input['quantization']
    info = np.iinfo(dtype)
    return np.clip(np.round(image / scale + zero_point), info.min, info.max).astype(dtype)

  def raw(self, image) -> Dict[str, np.ndarray]:
    """The op's outputs as they are (normalized boxes, 0-based foreground indices, floats)."""
    return self._runner(**{INPUT_NAME: self._input_tensor(image)})

  def __call__(self, image) -> Dict[str, np.ndarray]:
    out = self.raw(image)
    height, width = self.image_size
    count = int(out['num_detections'][0])
    valid = np.arange(out['detection_scores'].shape[1])[None] < count
    boxes = np.clip(out['detection_boxes'] * [height, width, height, width], 0,
                    [height, width, height, width]).astype(np.float32)
    return {
        'detection_boxes': np.where(valid[..., None], boxes, 0).astype(np.float32),
        'detection_scores': np.where(valid, out['detection_scores'], 0).astype(np.float32),
        'detection_classes': np.where(valid, out['detection_classes'].astype(np.int32) + 1, 0),
        'num_detections': np.array([count], np.int32),
    }


def write_labels(path: str, num_classes: int, label_map: Mapping[int, str]) -> Dict[str, Any]:
  """Writes `{"<op index>": {"id": class id, "name": name or null}}` for every foreground index
  0..num_classes-2 (class id = index + 1; null where the dataset has no such category)."""
  labels = {str(index): {'id': index + 1, 'name': label_map.get(index + 1)}
            for index in range(num_classes - 1)}
  with tf.io.gfile.GFile(path, 'w') as f:
    json.dump(labels, f, indent=1)
  return labels


def _atomic_write_bytes(path: str, content: bytes) -> None:
  """Writes through a temporary file and a rename: an app never picks up half a model."""
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  tmp = f'{path}.tmp-{os.getpid()}'
  with tf.io.gfile.GFile(tmp, 'wb') as f:
    f.write(content)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def export_model_tflite(model: RetinaNet, tflite_path: str, quantization: str = 'float32',
                        representative_data: Optional[Iterable[np.ndarray]] = None,
                        int8_io: bool = True, use_regular_nms: bool = True,
                        label_map: Optional[Mapping[int, str]] = None) -> Dict[str, Any]:
  """`convert`s a built model and writes it to `tflite_path`, with `<stem>.labels.json` beside
  it (`label_map` {class id: name}; names null without one). Returns the summary of
  `export_tflite`."""
  content = convert(model, quantization, representative_data, int8_io, use_regular_nms)
  _atomic_write_bytes(tflite_path, content)
  num_classes = model.get_config()['num_classes']
  labels_file = labels_path(tflite_path)
  write_labels(labels_file, num_classes, label_map or {})
  ops = op_details(content)
  return {
      'path': tflite_path,
      'size_bytes': len(content),
      'quantization': quantization,
      'int8_io': bool(int8_io) if quantization == 'int8' else None,
      'image_size': model.image_size,
      'postprocess': postprocess_attributes(model, use_regular_nms),
      'labels': labels_file,
      'ops': sorted({op['op_name'] for op in ops}),
      'custom_ops': sorted(set(custom_op_names(content))),
      **io_details(content),
  }


def export_tflite(model_dir: str, tflite_path: str, quantization: str = 'float32',
                  representative_file_pattern: Optional[str] = None,
                  num_representative_images: int = 100, int8_io: bool = True,
                  use_regular_nms: bool = True, gin_bindings: Sequence[str] = (),
                  label_map_path: Optional[str] = None) -> Dict[str, Any]:
  """Writes the TFLite model of `model_dir`'s last checkpoint (built from its operative config)
  to `tflite_path`, and `<stem>.labels.json` beside it; returns a summary: path, size_bytes,
  quantization, int8_io, image_size, postprocess (the op's attributes), labels, ops,
  custom_ops, checkpoint, step, and 'inputs' / 'outputs' {name: shape, dtype, quantization}.

  quantization: one of QUANTIZATIONS (see `convert`). int8 calibrates on the first
  `num_representative_images` of `representative_file_pattern` (default: the operative
  config's build_train_dataset.file_pattern), preprocessed as evaluation does it.
  `gin_bindings` go on top of the operative config (e.g. build_retinanet.max_detections or
  .pre_nms_score_threshold for the op; network changes fail the restore). `label_map_path`: a
  {"id": "name"} JSON, default the one beside the records (see saved_model.model_label_map).
  Like saved_model.load_model, it leaves the model dir's operative config parsed in gin.
  """
  if quantization not in QUANTIZATIONS:
    raise ValueError(f'quantization {quantization!r} is not one of {list(QUANTIZATIONS)}.')
  model, checkpoint, step = load_model(model_dir, gin_bindings)
  representative_data = None
  if quantization == 'int8':
    if representative_file_pattern is None:
      try:
        representative_file_pattern = gin.query_parameter('build_train_dataset.file_pattern')
      except ValueError:
        raise ValueError(f'int8 needs representative images: pass representative_file_pattern '
                         f'(the operative config of {model_dir} has no '
                         'build_train_dataset.file_pattern).') from None
    representative_data = representative_images(representative_file_pattern,
                                                 model.get_config(), num_representative_images)
  label_map, _ = model_label_map(model.get_config()['num_classes'], label_map_path)
  summary = export_model_tflite(model, tflite_path, quantization, representative_data, int8_io,
                                use_regular_nms, label_map)
  summary.update(checkpoint=checkpoint, step=step)
  if quantization == 'int8':
    summary['representative_file_pattern'] = representative_file_pattern
  return summary
