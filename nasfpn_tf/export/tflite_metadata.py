"""TFLite metadata for MediaPipe Tasks' ObjectDetector: labels, input normalization, output roles.

MediaPipe Tasks (`mediapipe.tasks.python.vision.ObjectDetector`, and the same task on Android, iOS
and the web) only runs a detection model that carries TFLite metadata: a `ModelMetadata`
flatbuffer (MediaPipe's `metadata_schema.fbs`, file identifier "M001") in the model's metadata
list under "TFLITE_METADATA", and its associated files (here the label file) in a zip archive
appended to the .tflite. The stock TFLite interpreter ignores both: the detections are unchanged.

MediaPipe's own writer (`mediapipe.tasks.python.metadata.metadata_writers.object_detector`)
cannot be used here: no mediapipe release installs beside this project's TensorFlow stack (docs/
mediapipe.md says why). `with_metadata` therefore writes the same metadata as that writer's
`create_for_models_with_nms` does, with the `flatbuffers` runtime TensorFlow already needs:
  input   'image': RGB, NormalizationOptions mean [0] std [1] (the file takes [0, 255] pixels
          and normalizes inside), stats min 0 max 255;
  outputs the four outputs of TFLite_Detection_PostProcess by role: 'location' (boxes
          ymin, xmin, ymax, xmax as ratios: BoundingBoxProperties index [1, 0, 3, 2],
          BOUNDARIES), 'category' (labels.txt, TENSOR_VALUE_LABELS: line i names foreground
          index i), 'score', 'number of detections'; the first three grouped as
          'detection_result'. Their order follows the subgraph's outputs.
"""
import io
import zipfile
from typing import Mapping, Optional, Sequence

import flatbuffers
import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

from nasfpn_tf.export import tflite_postprocess

METADATA_NAME = 'TFLITE_METADATA'
FILE_IDENTIFIER = b'M001'
LABELS_FILE = 'labels.txt'
# The newest schema field written is SubGraphMetadata.output_tensor_groups (schema 1.2.0).
MIN_PARSER_VERSION = '1.2.0'
MODEL_NAME = 'ObjectDetector'
MODEL_DESCRIPTION = ('Identify which of a known set of objects might be present and provide '
                     'information about their positions within the given image or a video '
                     'stream.')
# The post-processing op's output ports, in order: (name, description) as MediaPipe's writer.
ROLES = (('location', 'The locations of the detected boxes.'),
         ('category', 'The categories of the detected boxes.'),
         ('score', 'The scores of the detected boxes.'),
         ('number of detections', 'The number of the detected boxes.'))
GROUP_NAME = 'detection_result'
# Union tags (metadata_schema.fbs): ContentProperties and ProcessUnitOptions.
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES, _BOUNDING_BOX_PROPERTIES = 1, 2, 3
_NORMALIZATION_OPTIONS = 1
_RGB, _BOUNDARIES, _TENSOR_VALUE_LABELS = 1, 1, 3


def label_lines(labels: Mapping[int, Optional[str]], num_foreground: int) -> list:
  """Line i of labels.txt: the name of foreground index i (class id i + 1), else the id."""
  return [labels.get(i + 1) or str(i + 1) for i in range(num_foreground)]


def output_roles(content: bytes) -> list:
  """The role index (into ROLES) of each subgraph output, from the post-processing op's ports."""
  model = schema.Model.GetRootAsModel(content, 0)
  if model.SubgraphsLength() != 1:
    raise ValueError(f'the TFLite model has {model.SubgraphsLength()} subgraphs; MediaPipe '
                     'metadata needs exactly one.')
  subgraph = model.Subgraphs(0)
  codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
  ports = None
  for i in range(subgraph.OperatorsLength()):
    op = subgraph.Operators(i)
    code = codes[op.OpcodeIndex()].CustomCode()
    if code and code.decode() == tflite_postprocess.POSTPROCESS_OP:
      ports = list(op.OutputsAsNumpy())
  outputs = list(subgraph.OutputsAsNumpy())
  if ports is None or sorted(ports) != sorted(outputs):
    raise ValueError(f'the TFLite model\'s outputs are not the four of '
                     f'{tflite_postprocess.POSTPROCESS_OP}; MediaPipe\'s ObjectDetector reads '
                     'exactly those.')
  return [ports.index(index) for index in outputs]


def metadata_buffer(roles: Sequence[int], num_inputs: int = 1) -> bytes:
  """The ModelMetadata flatbuffer (identifier M001) for outputs of these `roles`."""
  b = flatbuffers.Builder(1024)

  def string(text):
    return b.CreateString(text)

  def table(fields):
    """fields: (slot, kind, value) with kind 'offset', 'byte', 'int' or 'uint'; None skipped."""
    b.StartObject(max(slot for slot, _, _ in fields) + 1)
    for slot, kind, value in fields:
      if value is None:
        continue
      if kind == 'offset':
        b.PrependUOffsetTRelativeSlot(slot, value, 0)
      elif kind == 'byte':
        b.PrependInt8Slot(slot, value, 0)
      elif kind == 'int':
        b.PrependInt32Slot(slot, value, 0)
      else:
        b.PrependUint32Slot(slot, value, 0)
    return b.EndObject()

  def vector(offsets):
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
      b.PrependUOffsetTRelative(offset)
    return b.EndVector()

  def numbers(values, prepend, size=4):
    b.StartVector(size, len(values), size)
    for value in reversed(values):
      prepend(value)
    return b.EndVector()

  def tensor(name, description, properties_type, properties, value_range=None,
             process_units=None, stats=None, files=None):
    name, description = string(name), string(description)
    content = table([(0, 'byte', properties_type), (1, 'offset', properties),
                     (2, 'offset', value_range)])
    return table([(0, 'offset', name), (1, 'offset', description), (3, 'offset', content),
                  (4, 'offset', process_units), (5, 'offset', stats or table([(0, 'int', None)])),
                  (6, 'offset', files)])

  # Input: RGB image, pixels in [0, 255] used as they are (mean 0, std 1).
  mean = numbers([0.0], b.PrependFloat32)
  std = numbers([1.0], b.PrependFloat32)
  normalization = table([(0, 'offset', mean), (1, 'offset', std)])
  unit = table([(0, 'byte', _NORMALIZATION_OPTIONS), (1, 'offset', normalization)])
  stats = table([(0, 'offset', numbers([255.0], b.PrependFloat32)),
                 (1, 'offset', numbers([0.0], b.PrependFloat32))])
  image = tensor('image', 'Input image to be processed.', _IMAGE_PROPERTIES,
                 table([(0, 'byte', _RGB)]), process_units=vector([unit]), stats=stats)
  if num_inputs != 1:
    raise ValueError(f'the TFLite model has {num_inputs} inputs; MediaPipe\'s ObjectDetector '
                     'takes one image.')

  # Outputs, by role; location, category and score have 2-D content (dimension 2: [1, K, ...]).
  by_role = {}
  for role in sorted(set(roles)):
    name, description = ROLES[role]
    value_range = None if role == 3 else table([(0, 'int', 2), (1, 'int', 2)])
    files = None
    if role == 0:
      index = numbers([1, 0, 3, 2], b.PrependUint32)
      properties_type = _BOUNDING_BOX_PROPERTIES
      properties = table([(0, 'offset', index), (1, 'byte', _BOUNDARIES)])
    else:
      properties_type, properties = _FEATURE_PROPERTIES, table([(0, 'int', None)])
    if role == 1:
      labels = table([(0, 'offset', string(LABELS_FILE)), (1, 'offset', string(
          'Labels for categories that the model can recognize.')),
                      (2, 'byte', _TENSOR_VALUE_LABELS)])
      files = vector([labels])
    by_role[role] = tensor(name, description, properties_type, properties, value_range,
                           files=files)
  group_names = vector([string(ROLES[role][0]) for role in range(3)])
  group = table([(0, 'offset', string(GROUP_NAME)), (1, 'offset', group_names)])
  subgraph = table([(2, 'offset', vector([image])),
                    (3, 'offset', vector([by_role[role] for role in roles])),
                    (8, 'offset', vector([group]))])
  name, description = string(MODEL_NAME), string(MODEL_DESCRIPTION)
  version = string(MIN_PARSER_VERSION)
  root = table([(0, 'offset', name), (1, 'offset', description), (3, 'offset', vector([subgraph])),
                (7, 'offset', version)])
  b.Finish(root, FILE_IDENTIFIER)
  return bytes(b.Output())


def with_metadata(content: bytes, labels: Mapping[int, Optional[str]],
                  num_foreground: int) -> bytes:
  """`content` (a detection .tflite of `tflite.convert`) with MediaPipe ObjectDetector metadata:
  the ModelMetadata under TFLITE_METADATA (replacing one already there) and labels.txt (from
  `labels` {class id: name}, `num_foreground` lines) appended as a zip archive; the same bytes
  for the same arguments."""
  roles = output_roles(content)
  model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(content, 0))
  buffer = schema.BufferT()
  buffer.data = np.frombuffer(
      metadata_buffer(roles, len(model.subgraphs[0].inputs)), np.uint8)
  model.metadata = [m for m in (model.metadata or []) if m.name.decode() != METADATA_NAME]
  model.buffers.append(buffer)
  entry = schema.MetadataT()
  entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
  model.metadata.append(entry)
  builder = flatbuffers.Builder(len(content) + 4096)
  builder.Finish(model.Pack(builder), b'TFL3')
  out = io.BytesIO(bytes(builder.Output()))
  out.seek(0, io.SEEK_END)
  # A fixed entry date (zip's earliest) keeps the file the same bytes for the same model
  # whenever it is written.
  entry = zipfile.ZipInfo(LABELS_FILE, date_time=(1980, 1, 1, 0, 0, 0))
  with zipfile.ZipFile(out, 'a') as archive:
    archive.writestr(entry, '\n'.join(label_lines(labels, num_foreground)) + '\n')
  return out.getvalue()


def read_metadata(content: bytes) -> Optional[bytes]:
  """The TFLITE_METADATA buffer of a .tflite, or None."""
  model = schema.Model.GetRootAsModel(content, 0)
  for i in range(model.MetadataLength()):
    entry = model.Metadata(i)
    if entry.Name().decode() == METADATA_NAME:
      return model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
  return None


def associated_files(content: bytes) -> dict:
  """{name: bytes} of the zip archive appended to a .tflite ({} without one)."""
  if not zipfile.is_zipfile(io.BytesIO(content)):
    return {}
  with zipfile.ZipFile(io.BytesIO(content)) as archive:
    return {name: archive.read(name) for name in archive.namelist()}
