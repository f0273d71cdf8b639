"""The CPU proxy's trial: the candidate pyramid and the head trained on cached backbone features.

The model is the package's RetinaNet built from the proxy gin config with the candidate's block
specs; a trial trains its `decoder` and `head` (the backbone stays frozen: its features come
from `feature_cache`), SGD with momentum on `RetinaNetLoss`, a cosine learning rate after a
linear warm-up (`CosineDecayWithWarmup`), batches drawn with the trial's seed, then scores it on
the held-out features with the model's own post-processing and `evaluate_detector`.
"""
import dataclasses
from typing import Any, Dict, Mapping, Optional

import gin
import numpy as np
import tensorflow as tf
import tf_keras

from nasfpn_tf.evaluation import evaluate
from nasfpn_tf.models import factory
from nasfpn_tf.models.losses import RetinaNetLoss
from nasfpn_tf.search import feature_cache
from nasfpn_tf.training import precision
from nasfpn_tf.training import schedules

# The losses of the last steps average into the trial's final loss.
_FINAL_LOSS_STEPS = 20


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CpuProxy:
  """One trial's training (gin `CpuProxy.<field>`).

  train_steps of batch_size cached images; learning_rate reached after warmup_steps (from a
  sixth of it), then a cosine to 0 at the last step; SGD momentum; mixed_precision as
  `RetinaNetTrainer.mixed_precision` (bfloat16 where the trainer trusts it, else float32);
  eval_batch_size for the held-out images. pretrained_head: start the head from the cache's
  pretraining head (`feature_cache.HEAD_FILE`) instead of its initialisation; the head must
  then be the pretraining one (4 convs of CpuProxyCache.pretrain_filters).
  """
  train_steps: int = 300
  batch_size: int = 8
  learning_rate: float = 0.04
  warmup_steps: int = 50
  momentum: float = 0.9
  mixed_precision: Optional[str] = 'bfloat16'
  eval_batch_size: int = 50
  pretrained_head: bool = False


def build_model(settings: CpuProxy) -> tf_keras.Model:
  """The gin-configured RetinaNet in the trial's training precision (the one build of a trial;
  its errors say the proxy gin config does not build)."""
  chosen, _ = precision.training_precision(settings.mixed_precision)
  previous = tf_keras.mixed_precision.global_policy()
  tf_keras.mixed_precision.set_global_policy(precision.POLICIES[chosen])
  try:
    return factory.build_retinanet()
  finally:
    tf_keras.mixed_precision.set_global_policy(previous)


def feature_network(model: tf_keras.Model) -> tf_keras.Model:
  """The model's pyramid and head as one Keras model on backbone features {'3': C3, ...}."""
  inputs = {level: tf_keras.Input(shape[1:], name=f'c{level}')
            for level, shape in model.backbone.output_specs.items()}
  cls_outputs, box_outputs = model.head(model.decoder(inputs))
  return tf_keras.Model(inputs, {'cls_outputs': cls_outputs, 'box_outputs': box_outputs},
                        name='pyramid_and_head')


def batch_order(num_images: int, num_steps: int, batch_size: int, seed: int) -> np.ndarray:
  """[num_steps, batch_size] image indices: epochs of seeded permutations, back to back."""
  rng = np.random.default_rng(seed)
  needed = num_steps * batch_size
  epochs = [rng.permutation(num_images) for _ in range(-(-needed // num_images))]
  return np.concatenate(epochs)[:needed].reshape(num_steps, batch_size)


def train(net: tf_keras.Model, train_split: Mapping[str, Any], settings: CpuProxy, num_classes: int,
          seed: int) -> float:
  """Trains `net` on the cached split; returns the mean loss of its last steps."""
  features = train_split['features']
  labels = {k: v for k, v in train_split['labels'].items() if k != 'image_info'}
  loss_fn = RetinaNetLoss(num_classes=num_classes)
  optimizer = tf_keras.optimizers.SGD(
      learning_rate=schedules.CosineDecayWithWarmup(
          settings.learning_rate, total_steps=settings.train_steps,
          warmup_steps=min(settings.warmup_steps, settings.train_steps - 1),
          warmup_learning_rate=settings.learning_rate / 6),
      momentum=settings.momentum)
  variables = net.trainable_variables

  @tf.function
  def step(indices):
    batch_features = {k: tf.cast(tf.gather(v, indices), tf.float32)
                      for k, v in features.items()}
    batch_labels = tf.nest.map_structure(lambda t: tf.gather(t, indices), labels)
    batch_labels['cls_targets'] = tf.nest.map_structure(
        lambda t: tf.cast(t, tf.int32), batch_labels['cls_targets'])
    for key in ('box_targets', 'cls_weights', 'box_weights'):
      batch_labels[key] = tf.nest.map_structure(lambda t: tf.cast(t, tf.float32),
                                                batch_labels[key])
    with tf.GradientTape() as tape:
      outputs = net(batch_features, training=True)
      loss = loss_fn(outputs, batch_labels)['total_loss']
      if net.losses:
        loss += tf.add_n([tf.cast(l, tf.float32) for l in net.losses])
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  num_images = len(next(iter(train_split['features'].values())))
  losses = [step(tf.constant(indices)) for indices in batch_order(
      num_images, settings.train_steps, settings.batch_size, seed)]
  return float(np.mean([float(l) for l in losses[-_FINAL_LOSS_STEPS:]]))


def evaluate_on_heldout(model: tf_keras.Model, net: tf_keras.Model,
                        heldout_split: Mapping[str, Any],
                        batch_size: int) -> evaluate.Evaluation:
  """COCO metrics of the trained pyramid and head on the held-out features, through the model's
  own post-processing."""
  @tf.function
  def detect(features):
    outputs = net({k: tf.cast(v, tf.float32) for k, v in features.items()}, training=False)
    return model.detection_generator(outputs['cls_outputs'], outputs['box_outputs'],
                                     model.anchor_boxes)

  dataset = tf.data.Dataset.from_tensor_slices(
      (heldout_split['features'], heldout_split['labels'])).batch(batch_size)
  return evaluate.evaluate_detector(detect, dataset)


def run(cache_folder: str, model: tf_keras.Model, settings: CpuProxy,
        seed: int) -> Dict[str, Any]:
  """Trains `model`'s pyramid and head (the trial's, from `build_model`) on the cache in
  `cache_folder` with `seed`; {'ap', 'ap50', 'steps', 'final_loss'}."""
  cache = feature_cache.load(cache_folder)
  if settings.pretrained_head:
    _load_head(model, cache['head'])
  net = feature_network(model)
  final_loss = train(net, cache['train'], settings, model.get_config()['num_classes'], seed)
  metrics = evaluate_on_heldout(model, net, cache['heldout'], settings.eval_batch_size).metrics
  return {'ap': metrics['AP'], 'ap50': metrics['AP50'], 'steps': settings.train_steps,
          'final_loss': final_loss}


def _load_head(model: tf_keras.Model, weights) -> None:
  """The pretraining head's weights into the trial's head, whose shapes must be the same."""
  shapes = [tuple(w.shape) for w in model.head.weights]
  if shapes != [w.shape for w in weights]:
    raise ValueError('CpuProxy.pretrained_head = True needs the pretraining head: '
                     'build_retinanet.head_num_convs = 4 and head_num_filters = '
                     'CpuProxyCache.pretrain_filters (the head has weights of shapes '
                     f'{shapes}, the cached one {[w.shape for w in weights]}).')
  model.head.set_weights(weights)
