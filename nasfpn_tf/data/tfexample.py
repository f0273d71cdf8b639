"""The detection tf.Example layout, in one place for the writer and every reader.

Keys follow the TF Object Detection API / TFM `TfExampleDecoder`, so TFM's decoder reads our
records too. Boxes are normalized [ymin, xmin, ymax, xmax]; class labels are the dataset's own
category ids (COCO: 1..90, not contiguous), kept end to end.
"""
import tensorflow as tf

ENCODED = 'image/encoded'
FORMAT = 'image/format'
HEIGHT = 'image/height'
WIDTH = 'image/width'
SOURCE_ID = 'image/source_id'
FILENAME = 'image/filename'
YMIN = 'image/object/bbox/ymin'
XMIN = 'image/object/bbox/xmin'
YMAX = 'image/object/bbox/ymax'
XMAX = 'image/object/bbox/xmax'
LABEL = 'image/object/class/label'
TEXT = 'image/object/class/text'
IS_CROWD = 'image/object/is_crowd'
AREA = 'image/object/area'

_FEATURES = {
    ENCODED: tf.io.FixedLenFeature((), tf.string),
    FORMAT: tf.io.FixedLenFeature((), tf.string, ''),
    HEIGHT: tf.io.FixedLenFeature((), tf.int64),
    WIDTH: tf.io.FixedLenFeature((), tf.int64),
    SOURCE_ID: tf.io.FixedLenFeature((), tf.string),
    FILENAME: tf.io.FixedLenFeature((), tf.string, ''),
    YMIN: tf.io.VarLenFeature(tf.float32),
    XMIN: tf.io.VarLenFeature(tf.float32),
    YMAX: tf.io.VarLenFeature(tf.float32),
    XMAX: tf.io.VarLenFeature(tf.float32),
    LABEL: tf.io.VarLenFeature(tf.int64),
    TEXT: tf.io.VarLenFeature(tf.string),
    IS_CROWD: tf.io.VarLenFeature(tf.int64),
    AREA: tf.io.VarLenFeature(tf.float32),
}


def _bytes(values):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _floats(values):
  return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _ints(values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def encode_example(encoded_jpeg, height, width, source_id, filename, boxes, classes, class_texts,
                   is_crowd, areas):
  """Builds one serialized tf.Example; `boxes` are normalized [ymin, xmin, ymax, xmax] rows."""
  boxes = list(boxes)
  feature = {
      ENCODED: _bytes([encoded_jpeg]),
      FORMAT: _bytes([b'jpeg']),
      HEIGHT: _ints([height]),
      WIDTH: _ints([width]),
      SOURCE_ID: _bytes([str(source_id).encode()]),
      FILENAME: _bytes([filename.encode()]),
      YMIN: _floats([b[0] for b in boxes]),
      XMIN: _floats([b[1] for b in boxes]),
      YMAX: _floats([b[2] for b in boxes]),
      XMAX: _floats([b[3] for b in boxes]),
      LABEL: _ints([int(c) for c in classes]),
      TEXT: _bytes([t.encode() for t in class_texts]),
      IS_CROWD: _ints([int(c) for c in is_crowd]),
      AREA: _floats([float(a) for a in areas]),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def decode_example(serialized):
  """Parses one serialized example into tensors (works eagerly and inside `tf.data.map`).

  Returns a dict: image (uint8 [H, W, 3]), boxes (float32 [N, 4] normalized ymin, xmin, ymax,
  xmax), classes (int64 [N], dataset category ids), class_text (string [N]), is_crowd (bool [N]),
  area (float32 [N], pixels), source_id (string), filename (string), height, width (int64).
  """
  parsed = tf.io.parse_single_example(serialized, _FEATURES)
  dense = {key: tf.sparse.to_dense(value) if isinstance(value, tf.SparseTensor) else value
           for key, value in parsed.items()}
  image = tf.io.decode_image(dense[ENCODED], channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return {
      'image': image,
      'boxes': tf.reshape(tf.stack([dense[YMIN], dense[XMIN], dense[YMAX], dense[XMAX]], -1),
                          [-1, 4]),
      'classes': dense[LABEL],
      'class_text': dense[TEXT],
      'is_crowd': tf.cast(dense[IS_CROWD], tf.bool),
      'area': dense[AREA],
      'source_id': dense[SOURCE_ID],
      'filename': dense[FILENAME],
      'height': dense[HEIGHT],
      'width': dense[WIDTH],
  }
