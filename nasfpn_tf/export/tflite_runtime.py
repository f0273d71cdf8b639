"""Running and inspecting an exported .tflite: the stock interpreter, its ops, `TFLiteDetector`.

The file's interface (batch 1, the fixed `build_retinanet.image_size` [H, W]):
  input   images             [1, H, W, 3] RGB pixels in [0, 255], already resized / padded as
                             evaluation does it (`models.geometry.resize_and_pad`: resized
                             keeping the aspect ratio to fit, zero-padded at the bottom / right):
                             float32, or uint8 for int8 with `int8_io` (its scale is 1 and zero
                             point 0, so raw pixels go in as they are).
  outputs detection_boxes    float32 [1, K, 4] ymin, xmin, ymax, xmax NORMALIZED to the input
                             (multiply by H, W for model-input pixels); not clipped to [0, 1].
          detection_classes  float32 [1, K] 0-based FOREGROUND index i: class id = i + 1 (our
                             class 0 is background), name in `<stem>.labels.json`
                             (`data.label_map.read_tflite_labels`).
          detection_scores   float32 [1, K] sigmoid scores, decreasing.
          num_detections     float32 [1] valid rows. Read only those: with regular NMS the op
                             zeroes later rows, with fast NMS it leaves them unwritten (what
                             the buffer held: an earlier image's rows, or garbage such as NaN).
  with K = build_retinanet.max_detections; the outputs are those of the post-processing op
  (`tflite_postprocess`).
"""
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema

INPUT_NAME = 'images'
OUTPUT_NAMES = ('detection_boxes', 'detection_classes', 'detection_scores', 'num_detections')


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
    """The op's outputs as they are (normalized boxes, 0-based foreground indices, floats; rows
    past num_detections undefined with fast NMS, see the module docstring)."""
    return self._runner(**{INPUT_NAME: self._input_tensor(image)})

  def __call__(self, image) -> Dict[str, np.ndarray]:
    out = self.raw(image)
    count = int(out['num_detections'][0])
    max_detections = out['detection_scores'].shape[1]
    size = np.array(self.image_size * 2, np.float32)  # height, width, height, width
    # Only the first `count` rows are read: the rest may be unwritten (fast NMS).
    boxes = np.zeros([1, max_detections, 4], np.float32)
    scores = np.zeros([1, max_detections], np.float32)
    classes = np.zeros([1, max_detections], np.int32)
    boxes[0, :count] = np.clip(out['detection_boxes'][0, :count] * size, 0, size)
    scores[0, :count] = out['detection_scores'][0, :count]
    classes[0, :count] = out['detection_classes'][0, :count].astype(np.int32) + 1
    return {'detection_boxes': boxes, 'detection_scores': scores, 'detection_classes': classes,
            'num_detections': np.array([count], np.int32)}
