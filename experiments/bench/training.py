"""The training step, ours (`RetinaNetTrainer`'s) against TFM's (`RetinaNetTask.train_step`), on
one fixed batch with TFM `AnchorLabeler` targets, from the same weights."""
import tempfile
from typing import Any, Dict, List, Optional

import gin
import numpy as np
import tensorflow as tf
import tf_keras
from official.vision.ops import anchor

from bench.models import NUM_CLASSES, build_tfm, random_images
from bench.op_profile import profile_train_steps
from bench.rows import SUFFIX, Training, TrainStep
from bench.timing import alternate, say
from nasfpn_tf.compat.tfm import load_tfm_retinanet_weights
from nasfpn_tf.models import factory as model_factory  # gin: build_retinanet
from nasfpn_tf.models.geometry import ModelGeometry, normalize_pixels
from nasfpn_tf.training.trainer import RetinaNetTrainer


def train_batch(geometry: ModelGeometry, batch: int, seed: int = 0):
  """A fixed batch: random pixels, 1-8 random boxes per image labeled by TFM's AnchorLabeler
  on the model's anchors (the targets both RetinaNet losses read)."""
  size = np.array(geometry.image_size, np.float64)  # (height, width)
  anchors = geometry.anchor_boxes()
  labeler = anchor.AnchorLabeler(0.5, 0.5)
  rng = np.random.default_rng(seed)
  per_image = []
  for _ in range(batch):
    count = int(rng.integers(1, 9))
    corner = rng.uniform(0, size * 0.7, [count, 2])
    extent = rng.uniform(size * 0.05, size * 0.3, [count, 2])
    boxes = tf.constant(np.concatenate([corner, np.minimum(corner + extent, size)], 1),
                        tf.float32)
    classes = tf.constant(rng.integers(1, NUM_CLASSES, [count, 1]), tf.int32)
    cls_targets, box_targets, _, cls_weights, box_weights = labeler.label_anchors(
        anchors, boxes, classes)
    per_image.append({'cls_targets': {k: tf.cast(v, tf.int32) for k, v in cls_targets.items()},
                      'box_targets': box_targets, 'cls_weights': cls_weights,
                      'box_weights': box_weights})
  labels = tf.nest.map_structure(lambda *x: tf.stack(x), *per_image)
  return random_images(batch, geometry.image_size, seed=3), labels


def _gin_bindings(model_config: Dict[str, Any]) -> List[str]:
  return [f'build_retinanet.{key} = {value!r}' for key, value in model_config.items()
          if key in model_factory.MODEL_ARGUMENTS]


def ours_train_step(model_config, precision, images, labels, tfm_model=None,
                    jit_compile=False, model_dir=None):
  """Our `RetinaNetTrainer`'s own step (gin-built model, SGD 0.01 / momentum 0.9) on a fixed
  batch; returns (step() -> total loss, trainer). With `jit_compile`, its replica step under XLA
  (the trainer's loop reads the iterator, which XLA cannot compile)."""
  gin.clear_config()
  gin.parse_config(_gin_bindings(model_config))
  batch = int(images.shape[0])
  trainer = RetinaNetTrainer(
      model_dir=model_dir or tempfile.mkdtemp(prefix='nasfpn_bench_'),
      strategy=tf.distribute.get_strategy(), mode='train', learning_rate=0.01,
      global_batch_size=batch, mixed_precision=None if precision == 'float32' else precision,
      force_bfloat16=True,  # the step of the precision measured, on every CPU
      log_every_steps=10**9, checkpoint_every_steps=10**9,
      train_dataset_fn=lambda _: tf.data.Dataset.from_tensors((images, labels)).repeat())
  gin.clear_config()
  if tfm_model is not None:
    load_tfm_retinanet_weights(trainer.model, tfm_model)
  if jit_compile:
    replica_step = tf.function(
        lambda x, y: trainer.strategy.run(trainer.replica_step, args=(x, y)), jit_compile=True)
    return (lambda: replica_step(images, labels)['total_loss']), trainer
  iterator = trainer.train_iterator()
  return (lambda: trainer.run_steps(iterator, 1)['total_loss']), trainer


def tfm_train_step(task, tfm_model, images, labels):
  """TFM's `RetinaNetTask.train_step` (SGD 0.01 / momentum 0.9) on the fixed batch, fed by an
  iterator like ours."""
  optimizer = tf_keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
  iterator = iter(tf.data.Dataset.from_tensors((normalize_pixels(images), labels)).repeat())
  step = tf.function(lambda: task.train_step(next(iterator), tfm_model, optimizer)['loss'])
  return step


def training_comparison(task, tfm_model, model_config: Dict[str, Any],
                        precision: str, batch: int, repeats: int, xla: bool = False,
                        profile_steps: Optional[int] = None) -> Training:
  """Both sides' steps in float32 and at the fast `precision` (bfloat16: TFM's COCO experiment),
  from `tfm_model`'s weights, timed over `repeats` steps after two untimed; with `xla`, ours in
  float32 under XLA too; with `profile_steps`, that many steps of each traced by op type."""
  images, labels = train_batch(ModelGeometry.from_config(model_config), batch)
  say(f'training steps at batch {batch}: building the variants from the same weights')
  variants = ('float32',) + (() if precision == 'float32' else (precision,))
  steps = {}
  for variant in variants:
    suffix = SUFFIX[variant]
    steps[f'ours_{suffix}'], _ = ours_train_step(model_config, variant, images, labels,
                                                 tfm_model)
    steps[f'theirs_{suffix}'] = tfm_train_step(
        task, build_tfm(task, variant, weights_from=tfm_model), images, labels)
  if xla:
    steps['ours_fp32_xla'], _ = ours_train_step(model_config, 'float32', images, labels,
                                                tfm_model, jit_compile=True)
  times = alternate(steps, repeats, f'train b{batch}', warmup=2)
  # Every variant took the same number of steps on the same batch from the same weights:
  # the loss each computes next shows whether the two sides (and bfloat16) train alike.
  losses = {name: float(step()) for name, step in steps.items()}
  profile = None
  if profile_steps:
    say(f'profiling {profile_steps} train steps per side and variant')
    profile = profile_train_steps(steps, profile_steps)
  return Training(
      batch=batch, precision=precision, loss_after_steps=repeats + 2, profile=profile,
      steps={name: TrainStep(first=t.first, median=t.median, loss=losses[name])
             for name, t in times.items()})
