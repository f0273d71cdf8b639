"""A trained model dir -> SavedModel for TF Serving, with preprocessing and NMS in the graph.

The model is rebuilt from the model dir's own record of its config, `model_config.json` (or, in
model dirs written before it, `operative_config.gin`), not from the user's gin files, so the
export is the network its checkpoints were trained as. Signatures:

  serving_default        images              uint8 [B, H, W, 3] RGB; one size per batch (a
                                             tensor), any size between batches.
  serving_encoded_image  encoded_image       string [B]: JPEG/PNG/GIF/BMP/WebP bytes, each its own
                                             size; grayscale and RGBA become RGB.
  serving_tf_example     serialized_example  string [B]: tf.Examples with `image/encoded`
                                             (the layout of nasfpn_tf.data.tfexample).

Each image is preprocessed exactly as evaluation does it (`models.geometry.resize_and_pad`):
resized keeping its aspect ratio to fit the model's image_size, zero-padded at the bottom/right;
the model normalizes pixels itself. Every signature returns
  detection_boxes    float32 [B, K, 4]  ymin, xmin, ymax, xmax in ORIGINAL image pixels
  detection_scores   float32 [B, K]
  detection_classes  int32 [B, K]       the dataset's category ids (as in the training records)
  num_detections     int32 [B]          valid rows per image; later rows are zero
with K = build_retinanet.max_detections. The category names are in assets/label_map.json
({"id": "name"}).

An anytime model (build_retinanet.anytime) adds, for every exit k = 1..num_repeats,
`serving_exit_<k>` (images, uint8 as serving_default) and `serving_exit_<k>_encoded_image`
(encoded_image, as serving_encoded_image): detections of exit k, which computes the first k
pyramids only. The default signatures are the last exit's.
"""
import functools
import os
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import gin
import tensorflow as tf
import tf_keras

from nasfpn_tf import checkpointing
from nasfpn_tf import config
from nasfpn_tf.data import label_map as label_map_lib
from nasfpn_tf.data import tfexample
from nasfpn_tf.models import factory
from nasfpn_tf.models import geometry
from nasfpn_tf.models.retinanet import RetinaNet
from nasfpn_tf.utils import files


# Signature name -> its input's name; an anytime model adds `exit_signature_inputs`.
SIGNATURE_INPUTS = {
    'serving_default': 'images',
    'serving_encoded_image': 'encoded_image',
    'serving_tf_example': 'serialized_example',
}


# What `load_model` returns: (model, checkpoint path, step).
Restored = Tuple[RetinaNet, str, int]


def exit_signature_inputs(exit_number: int) -> Dict[str, str]:
  """The signatures of an anytime model's exit `exit_number` -> their input's name."""
  return {f'serving_exit_{exit_number}': 'images',
          f'serving_exit_{exit_number}_encoded_image': 'encoded_image'}


def load_model(model_dir: str, gin_bindings: Sequence[str] = ()) -> Restored:
  """The model of `model_dir`'s recorded config with its last checkpoint restored (float32,
  whatever precision it trained in); returns (model, checkpoint path, step).

  The record is model_config.json, else (older model dirs) the operative config. `gin_bindings`
  apply on top: post-processing settings such as `build_retinanet.max_detections` are free, a
  change to the network fails the restore with a CheckpointMismatchError naming it. Leaves the
  operative config (the training records, where `find_label_map` looks) and `gin_bindings`
  parsed. Raises ValueError when the model dir lacks a checkpoint or any record of its config.
  """
  checkpoint = tf.train.latest_checkpoint(model_dir)
  if checkpoint is None:
    raise ValueError(f'no checkpoint (ckpt-N) in model dir {model_dir}: train it first '
                     '(--mode=train).')
  recorded = checkpointing.read_model_config(model_dir)
  operative_config = os.path.join(model_dir, checkpointing.OPERATIVE_CONFIG)
  has_operative_config = tf.io.gfile.exists(operative_config)
  if recorded is None and not has_operative_config:
    raise ValueError(f'{operative_config} not found (nor {checkpointing.MODEL_CONFIG}): the model '
                     'dir has no record of the config its checkpoints were trained with.')
  config.parse_gin([], gin_bindings)
  changes = factory.bound_model_arguments()
  config.parse_gin([operative_config] if has_operative_config else [], gin_bindings)
  if recorded is None:
    model = factory.build_retinanet()
  else:
    model = RetinaNet.from_config(dict(recorded, **changes))
  # The restore also reads the step count, into this otherwise unused optimizer.
  optimizer = tf_keras.optimizers.SGD()
  checkpoint = checkpointing.Checkpointer(model_dir, model, optimizer).restore(model_only=True)
  return model, checkpoint, int(optimizer.iterations.numpy())


def find_label_map() -> Optional[str]:
  """The label map beside the training (else eval) records that the parsed gin config names."""
  for binding in ('build_train_dataset.file_pattern', 'build_eval_dataset.file_pattern'):
    try:
      path = label_map_lib.find_records_label_map(gin.query_parameter(binding))
    except ValueError:
      continue
    if path:
      return path
  return None


def model_label_map(num_classes: int,
                    label_map_path: Optional[str] = None) -> Tuple[Dict[int, str], str]:
  """(label map, where it came from): `label_map_path`, else the records' label map
  (`find_label_map`; call after `load_model`), else the ids 1..num_classes-1 named by themselves.
  """
  path = label_map_path or find_label_map()
  if path:
    return label_map_lib.read_label_map(path), path
  return ({i: str(i) for i in range(1, num_classes)},
          'category ids only (no label map found beside the records in the operative config)')


class DetectionModule(tf.Module):
  """The model between evaluation's preprocessing (`geometry.resize_and_pad`) and
  `geometry.to_original_image`: images in, boxes in original pixels out. Its methods are the
  SavedModel signatures (see the module docstring)."""

  def __init__(self, model: RetinaNet, label_map_file: Optional[str] = None):
    super().__init__()
    # The weights are tracked, the Keras model is not: saving a tracked Keras model traces every
    # layer again for Keras metadata (most of the export time) that serving never reads.
    self.model_variables = model.variables
    self._image_size = model.image_size
    # Traced once each, called by every signature of the exit: one copy of each network in the
    # SavedModel. None: the last exit, as model.detect runs it.
    network_spec = [tf.TensorSpec([None] + self._image_size + [3], tf.float32)]
    self._exits = list(range(1, model.num_repeats + 1)) if model.anytime else []
    self._detect_networks = {
        str(k): tf.function(functools.partial(model.detect, num_repeats=k),
                            input_signature=network_spec)
        for k in self._exits}
    self._detect_network = tf.function(model.detect, input_signature=network_spec)
    if label_map_file:  # Copied into the SavedModel's assets/.
      self.label_map = tf.saved_model.Asset(label_map_file)

  def _detect(self, images: tf.Tensor, decode,
              exit_number: Optional[int] = None) -> Dict[str, tf.Tensor]:
    """`decode` maps one element of `images` to a uint8 [H, W, 3] image; `exit_number` picks an
    anytime model's exit (None: the last)."""
    inputs, image_info = tf.map_fn(
        lambda image: geometry.resize_and_pad(decode(image), self._image_size), images,
        fn_output_signature=(tf.TensorSpec(self._image_size + [3], tf.float32),
                             tf.TensorSpec([4, 2], tf.float32)))
    network = (self._detect_network if exit_number is None
               else self._detect_networks[str(exit_number)])
    detections = network(inputs)
    detections['detection_boxes'] = geometry.to_original_image(
        detections['detection_boxes'], image_info)
    return detections

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
  def detect_images(self, images):
    return self._detect(images, lambda image: image)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def detect_encoded_images(self, encoded_image):
    return self._detect(encoded_image, _decode_image)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
  def detect_tf_examples(self, serialized_example):
    features = tf.io.parse_example(
        serialized_example, {tfexample.ENCODED: tf.io.FixedLenFeature((), tf.string)})
    return self.detect_encoded_images(features[tfexample.ENCODED])

  def signatures(self) -> Dict[str, Any]:
    signatures = {
        'serving_default': self.detect_images.get_concrete_function(),
        'serving_encoded_image': self.detect_encoded_images.get_concrete_function(),
        'serving_tf_example': self.detect_tf_examples.get_concrete_function(),
    }
    for k in self._exits:
      images_name, encoded_name = exit_signature_inputs(k)
      detect_images = lambda images, k=k: self._detect(images, lambda image: image, k)  # noqa
      detect_encoded = lambda encoded_image, k=k: self._detect(  # noqa: E731
          encoded_image, _decode_image, k)
      signatures[images_name] = tf.function(detect_images).get_concrete_function(
          tf.TensorSpec([None, None, None, 3], tf.uint8))
      signatures[encoded_name] = tf.function(detect_encoded).get_concrete_function(
          tf.TensorSpec([None], tf.string))
    return signatures


def _decode_image(data: tf.Tensor) -> tf.Tensor:
  """The decode of `tfexample.decode_example`; a corrupt image fails with its
  InvalidArgumentError."""
  return tf.ensure_shape(tf.io.decode_image(data, channels=3, expand_animations=False),
                         [None, None, 3])


def export_saved_model(model_dir: str, export_dir: str, gin_bindings: Sequence[str] = (),
                       label_map_path: Optional[str] = None,
                       restored: Optional[Restored] = None) -> Mapping[str, Any]:
  """Writes the SavedModel of `model_dir`'s last checkpoint to `export_dir` and returns a
  summary. See `load_model` for `gin_bindings`, `model_label_map` for `label_map_path`.
  `restored`: what `load_model(model_dir, gin_bindings)` returned, when the caller has it (one
  restore for several exports, as `nasfpn_tf.main --mode=export`).

  `export_dir` is new, empty, or an earlier SavedModel, which is replaced (a rerun exports
  again; the summary's `replaced` says so): to keep both, export to another folder, such as the
  next version `<base>/<n+1>` of a TF Serving base path. A folder holding anything else is never
  touched. Written to a sibling folder and renamed into place: TF Serving, watching a base path
  for new version folders, never loads half an export.
  """
  replaced = tf.io.gfile.exists(export_dir) and bool(tf.io.gfile.listdir(export_dir))
  if replaced and not tf.saved_model.contains_saved_model(export_dir):
    raise ValueError(f'export dir {export_dir} exists and holds something other than a '
                     'SavedModel: remove it or choose another (TF Serving reads versions as '
                     '<base>/<number>).')
  model, checkpoint, step = restored or load_model(model_dir, gin_bindings)
  label_map, label_map_source = model_label_map(model.get_config()['num_classes'], label_map_path)
  with tempfile.TemporaryDirectory() as scratch, files.atomic_directory(
      export_dir, replace=replaced) as staging:
    label_map_file = os.path.join(scratch, label_map_lib.ASSET_FILE)
    label_map_lib.write_label_map(label_map_file, label_map)
    module = DetectionModule(model, label_map_file)
    tf.saved_model.save(module, staging, signatures=module.signatures())
  return {'export_dir': export_dir, 'replaced': replaced, 'checkpoint': checkpoint, 'step': step,
          'image_size': model.image_size, 'label_map': label_map_source,
          'signatures': dict(SIGNATURE_INPUTS, **{
              name: input_name for k in range(1, model.num_repeats + 1) if model.anytime
              for name, input_name in exit_signature_inputs(k).items()})}
