"""A trained model dir -> TFLite for mobile: float32, float16, dynamic-range or full-integer int8.

The file runs in the stock TFLite interpreter: every op is a TFLite builtin except the
post-processing, `TFLite_Detection_PostProcess` (`tflite_postprocess`: how it is wired and how
it compares with `model.detect`). Its input and outputs, and running it: `tflite_runtime`. Its
label names: `<stem>.labels.json` beside it (`data.label_map.write_tflite_labels`) and, with the
TFLite metadata that MediaPipe Tasks' ObjectDetector needs (`metadata=True`, the default),
labels.txt inside the file (`tflite_metadata`).

int8: the network is quantized to int8 (`TFLITE_BUILTINS_INT8`), calibrated on images of the
training records preprocessed as evaluation does; the sigmoid scores and box deltas are
dequantized before the post-processing op, which stays float.
"""
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import gin
import numpy as np
import tensorflow as tf

from nasfpn_tf.data import input_pipeline
from nasfpn_tf.data import label_map as label_map_lib
from nasfpn_tf.export import tflite_metadata
from nasfpn_tf.export import tflite_postprocess
from nasfpn_tf.export import tflite_runtime
from nasfpn_tf.export.saved_model import Restored, load_model, model_label_map
from nasfpn_tf.models.retinanet import RetinaNet
from nasfpn_tf.utils import files

QUANTIZATIONS = ('float32', 'float16', 'dynamic', 'int8')


def tflite_function(model: RetinaNet, use_regular_nms: bool = True,
                    num_repeats: Optional[int] = None):
  """The concrete function to convert: images [1, H, W, 3] float32 -> the op's four outputs,
  of exit `num_repeats` (None: the last; see RetinaNet.exit_outputs)."""
  height, width = model.image_size
  num_classes = model.get_config()['num_classes']
  levels = model.geometry.levels
  fcos = model.detector == 'fcos'
  anchors = (tflite_postprocess.fcos_points_center_size(model) if fcos else
             tflite_postprocess.anchors_center_size(model.geometry))
  postprocess = tflite_postprocess.postprocess_op(
      tflite_postprocess.postprocess_attributes(model, use_regular_nms))

  @tf.function(input_signature=[
      tf.TensorSpec([1, height, width, 3], tf.float32, tflite_runtime.INPUT_NAME)])
  def detect(images):
    outputs = model.exit_outputs(images, num_repeats)
    if fcos:  # Points as anchors; scores already probabilities (tflite_postprocess).
      box_encodings, scores = tflite_postprocess.fcos_op_inputs(model, outputs)
      results = postprocess(box_encodings, scores, tf.constant(anchors))
      return dict(zip(tflite_runtime.OUTPUT_NAMES, results))
    box_encodings = tf.concat(
        [tf.reshape(tf.cast(outputs['box_outputs'][l], tf.float32), [1, -1, 4]) for l in levels],
        axis=1)
    logits = tf.concat(
        [tf.reshape(tf.cast(outputs['cls_outputs'][l], tf.float32), [1, -1, num_classes])
         for l in levels], axis=1)
    results = postprocess(box_encodings, tf.sigmoid(logits), tf.constant(anchors))
    return dict(zip(tflite_runtime.OUTPUT_NAMES, results))

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
            use_regular_nms: bool = True, num_repeats: Optional[int] = None) -> bytes:
  """The TFLite flatbuffer of a built `model`, of its exit `num_repeats` (None: the last; see
  the module docstring; regular NMS, the default, or the op's fast NMS: see
  `tflite_postprocess`).

  quantization: 'float32'; 'float16' (weights stored in float16, computed in float32 on CPU);
  'dynamic' (dynamic-range: int8 weights, activations quantized on the fly); 'int8' (full
  integer, calibrated on `representative_data`, an iterable of [1, H, W, 3] or [H, W, 3] float
  images preprocessed like evaluation; `int8_io`: uint8 input, else float32).
  """
  if quantization not in QUANTIZATIONS:
    raise ValueError(f'quantization {quantization!r} is not one of {list(QUANTIZATIONS)}.')
  if quantization == 'int8' and representative_data is None:
    raise ValueError("quantization='int8' needs representative images for calibration.")
  function = tflite_function(model, use_regular_nms, num_repeats)
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
  custom = sorted(set(tflite_runtime.custom_op_names(content)) -
                  {tflite_postprocess.POSTPROCESS_OP})
  if custom:
    raise RuntimeError('the TFLite model has custom ops besides '
                       f'{tflite_postprocess.POSTPROCESS_OP}: {custom}')
  return content


def export_model_tflite(model: RetinaNet, tflite_path: str, quantization: str = 'float32',
                        representative_data: Optional[Iterable[np.ndarray]] = None,
                        int8_io: bool = True, use_regular_nms: bool = True,
                        label_map: Optional[Mapping[int, str]] = None,
                        num_repeats: Optional[int] = None,
                        metadata: bool = True) -> Dict[str, Any]:
  """`convert`s a built model (exit `num_repeats`, None: the last) and writes it to
  `tflite_path`, with `<stem>.labels.json` beside it (`label_map` {class id: name}; names null
  without one) and, with `metadata`, MediaPipe ObjectDetector metadata inside it
  (`tflite_metadata.with_metadata`: the labels, input normalization, output roles). Returns the
  summary of `export_tflite`."""
  content = convert(model, quantization, representative_data, int8_io, use_regular_nms,
                    num_repeats)
  if metadata:
    content = tflite_metadata.with_metadata(content, label_map or {},
                                            model.get_config()['num_classes'] - 1)
  files.atomic_write(tflite_path, content)
  labels_file = label_map_lib.tflite_labels_path(tflite_path)
  label_map_lib.write_tflite_labels(labels_file, model.get_config()['num_classes'],
                                    label_map or {})
  ops = tflite_runtime.op_details(content)
  return {
      'path': tflite_path,
      'size_bytes': len(content),
      'quantization': quantization,
      'int8_io': bool(int8_io) if quantization == 'int8' else None,
      'image_size': model.image_size,
      'exit': num_repeats or model.num_repeats,
      'postprocess': tflite_postprocess.postprocess_attributes(model, use_regular_nms),
      'labels': labels_file,
      'metadata': 'mediapipe_object_detector' if metadata else None,
      'ops': sorted({op['op_name'] for op in ops}),
      'custom_ops': sorted(set(tflite_runtime.custom_op_names(content))),
      **tflite_runtime.io_details(content),
  }


def check_quantization(quantization: str) -> None:
  """ValueError unless `quantization` is one of QUANTIZATIONS."""
  if quantization not in QUANTIZATIONS:
    raise ValueError(f'quantization {quantization!r} is not one of {list(QUANTIZATIONS)}.')


def check_exit(model, num_repeats: Optional[int], model_dir: str) -> None:
  """ValueError naming --tflite_exit unless `num_repeats` is None or an exit of `model`, an
  anytime model (`RetinaNet.check_exit`); builds nothing, so callers check before writing."""
  if num_repeats is None:
    return
  if not model.anytime:
    raise ValueError(f'exit {num_repeats} (--tflite_exit): {model_dir} holds no anytime model '
                     '(build_retinanet.anytime = False); only its last exit is trained.')
  model.check_exit(num_repeats)


def export_tflite(model_dir: str, tflite_path: str, quantization: str = 'float32',
                  representative_file_pattern: Optional[str] = None,
                  num_representative_images: int = 100, int8_io: bool = True,
                  use_regular_nms: bool = True, gin_bindings: Sequence[str] = (),
                  label_map_path: Optional[str] = None,
                  num_repeats: Optional[int] = None, metadata: bool = True,
                  restored: Optional[Restored] = None) -> Dict[str, Any]:
  """Writes the TFLite model of `model_dir`'s last checkpoint (built from its operative config)
  to `tflite_path`, and `<stem>.labels.json` beside it; returns a summary: path, size_bytes,
  quantization, int8_io, image_size, exit, postprocess (the op's attributes), labels, ops,
  custom_ops, checkpoint, step, and 'inputs' / 'outputs' {name: shape, dtype, quantization}.

  quantization: one of QUANTIZATIONS (see `convert`). int8 calibrates on the first
  `num_representative_images` of `representative_file_pattern` (default: the operative
  config's build_train_dataset.file_pattern), preprocessed as evaluation does it.
  `gin_bindings` go on top of the operative config (e.g. build_retinanet.max_detections or
  .pre_nms_score_threshold for the op; network changes fail the restore). `label_map_path`: a
  {"id": "name"} JSON, default the one beside the records (see saved_model.model_label_map).
  `num_repeats`: the exit of an anytime model the file stops at (None: the last).
  `metadata`: write the TFLite metadata MediaPipe Tasks' ObjectDetector needs (`tflite_metadata`).
  Like saved_model.load_model, it leaves the model dir's operative config parsed in gin.
  `restored`: what `load_model(model_dir, gin_bindings)` returned, when the caller has it (one
  restore for several exports, as `nasfpn_tf.main --mode=export`).
  """
  check_quantization(quantization)
  model, checkpoint, step = restored or load_model(model_dir, gin_bindings)
  check_exit(model, num_repeats, model_dir)
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
                                use_regular_nms, label_map, num_repeats, metadata)
  summary.update(checkpoint=checkpoint, step=step)
  if quantization == 'int8':
    summary['representative_file_pattern'] = representative_file_pattern
  return summary
