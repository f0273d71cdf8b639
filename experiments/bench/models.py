"""Both sides' models: TF Model Garden's RetinaNet as its users get it, ours converted from it,
and the functions the benchmark times (end to end, network only)."""
from typing import Any, Dict, NamedTuple, Optional, Sequence, Union

import numpy as np
import tensorflow as tf
import tf_keras
from official.core import exp_factory, task_factory
from official.vision import registry_imports  # noqa: F401  (TFM experiments and tasks)

from nasfpn_tf.compat.tfm import load_tfm_retinanet_weights
from nasfpn_tf.evaluation import coco_metrics
from nasfpn_tf.models.geometry import normalize_pixels
from nasfpn_tf.models.head import CLASS_PRIOR
from nasfpn_tf.models.retinanet import RetinaNet
from nasfpn_tf.training import precision as training_precision


class Config(NamedTuple):
  """One benchmark configuration: a NAS-FPN RetinaNet, 91 classes (COCO ids), levels 3-7."""
  resnet: int
  num_filters: int
  num_repeats: int
  image_size: int
  train_batch: int
  label: str


CONFIGS = {
    'small': Config(18, 64, 3, 256, 8, 'NAS-FPN R-18 3@64, 256 px'),
    'r50_640': Config(50, 256, 7, 640, 2, 'NAS-FPN R-50 7@256, 640 px'),
}
NUM_CLASSES = 91


def fast_precision(choice: str = 'auto') -> str:
  """`choice`, or for 'auto' the precision the trainer would train a requested bfloat16 in on this
  machine (`training.precision.training_precision`, the one decision of everything that trains):
  bfloat16 on a GPU or a CPU with AMX-BF16, else float32."""
  if choice != 'auto':
    return choice
  return training_precision.training_precision('bfloat16')[0] or 'float32'


class Policy:
  """Keras global policy of `precision` inside a with block: layers take it when built."""

  def __init__(self, precision: str):
    self._policy = {'float32': 'float32', 'bfloat16': 'mixed_bfloat16'}[precision]

  def __enter__(self):
    self._previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy(self._policy)

  def __exit__(self, *exc):
    tf_keras.mixed_precision.set_global_policy(self._previous)


def tfm_task(config: Config, image_size: Optional[int] = None):
  """TFM's RetinaNet task for `config`: the COCO experiment with the nasfpn decoder."""
  size = image_size or config.image_size
  experiment = exp_factory.get_exp_config('retinanet_resnetfpn_coco')
  task_config = experiment.task
  task_config.init_checkpoint = None  # No ImageNet download; weights come from us.
  model = task_config.model
  model.num_classes = NUM_CLASSES
  model.input_size = [size, size, 3]
  model.backbone.resnet.model_id = config.resnet
  model.decoder.type = 'nasfpn'
  model.decoder.nasfpn.num_filters = config.num_filters
  model.decoder.nasfpn.num_repeats = config.num_repeats
  model.head.num_filters = config.num_filters
  return task_factory.get_task(task_config)


def build_tfm(task, precision: str = 'float32', weights_from=None):
  """TFM's model (`task.build_model()`: l2 from the task's losses), optionally with the weights of
  another TFM model of the same architecture."""
  with Policy(precision):
    model = task.build_model()
  if weights_from is not None:
    model.set_weights(weights_from.get_weights())
  return model


def build_ours(model_config: Dict[str, Any], precision: str, tfm_model=None) -> RetinaNet:
  """Our RetinaNet from its config in `precision`, with the TFM model's weights if given."""
  with Policy(precision):
    model = RetinaNet(**model_config)
  if tfm_model is not None:
    load_tfm_retinanet_weights(model, tfm_model)
  return model


def plain(value):
  """A config with Keras-tracked lists (ListWrapper) as plain lists: for gin and JSON."""
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)) or type(value).__name__ == 'ListWrapper':
    return [plain(v) for v in value]
  return value


def tfm_detect_fn(tfm_model, image_size: int):
  """TFM end to end: normalization (outside the model, TFM's input convention) + model + its
  default detection generator."""
  def detect(images):
    image_shape = tf.tile(tf.constant([[image_size, image_size]], tf.float32),
                          [tf.shape(images)[0], 1])
    outputs = tfm_model(normalize_pixels(images), image_shape=image_shape, training=False)
    return {k: outputs[k] for k in coco_metrics.DETECTION_KEYS}
  return tf.function(detect)


def tfm_network_fn(tfm_model):
  """TFM backbone + decoder + head, inference mode (its model call adds post-processing)."""
  def network(images):
    features = tfm_model.decoder(tfm_model.backbone(normalize_pixels(images), training=False),
                                 training=False)
    scores, boxes, _ = tfm_model.head(features, training=False)
    return scores, boxes
  return tf.function(network)


def ours_network_fn(model, jit_compile=False):
  return tf.function(lambda images: model(images, training=False), jit_compile=jit_compile)


def random_images(batch: int, size: Union[int, Sequence[int]], seed: int = 1) -> tf.Tensor:
  """[batch, height, width, 3] pixels in [0, 255); `size` is [height, width] or one side."""
  height, width = (size, size) if isinstance(size, int) else size
  return tf.random.stateless_uniform([batch, height, width, 3], seed=[seed, 0], maxval=255.0)


def max_abs_diff(ours_model, tfm_model, size: int) -> float:
  """Largest difference of the raw outputs (class logits, box deltas) of the two networks."""
  images = random_images(2, size, seed=7)
  ours = ours_model(images, training=False)
  features = tfm_model.decoder(tfm_model.backbone(normalize_pixels(images)))
  scores, boxes, _ = tfm_model.head(features)
  diffs = [tf.reduce_max(tf.abs(tf.cast(ours[key][level], tf.float32) - theirs[level]))
           for key, theirs in (('cls_outputs', scores), ('box_outputs', boxes))
           for level in theirs]
  return float(tf.reduce_max(diffs))


def lifted_raw_outputs(ours_model, images, prior: float):
  """Raw outputs of the network with every class logit shifted so the untrained head's 0.01
  prior becomes `prior`: nearly every pre-NMS candidate then passes the score threshold."""
  outputs = ours_model(images, training=False)
  shift = float(np.log(prior / (1 - prior)) - np.log(CLASS_PRIOR / (1 - CLASS_PRIOR)))
  cls = {k: tf.cast(v, tf.float32) + shift for k, v in outputs['cls_outputs'].items()}
  box = {k: tf.cast(v, tf.float32) for k, v in outputs['box_outputs'].items()}
  return cls, box
