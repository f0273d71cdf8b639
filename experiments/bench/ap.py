"""COCO AP of both sides with the same weights on the same images: TFM's model of the small
architecture trained briefly on the synthetic shapes, copied into ours."""
import dataclasses
import pathlib
import time
from typing import Dict

import numpy as np
import tensorflow as tf
import tf_keras

from bench import demo_runs
from bench.models import (CONFIGS, NUM_CLASSES, Config, build_ours, build_tfm, tfm_detect_fn,
                          tfm_task)
from bench.rows import Ap
from bench.timing import say
from nasfpn_tf.compat.tfm import geometry_from_tfm, retinanet_from_tfm
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.evaluation import coco_metrics
from nasfpn_tf.models import geometry
from nasfpn_tf.models.postprocess import sorted_detection_rows

# The AP model: the small architecture, trained once on the synthetic shapes.
AP_ARCHITECTURE = 'small'
AP_TRAIN_BATCH = 8


@dataclasses.dataclass(frozen=True)
class ApData:
  """The synthetic images (train, val) and the AP model's training steps (batch 8)."""
  num_train: int
  num_val: int
  train_steps: int


def synthetic_records(work_dir: pathlib.Path, data: ApData) -> Dict[str, str]:
  """The synthetic shapes (256 px nominal, ids 1..9) as TFRecords, made once."""
  return demo_runs.synthetic_records(work_dir, data.num_train, data.num_val)


def trained_ap_weights(work_dir: pathlib.Path, records: Dict[str, str], data: ApData) -> str:
  """TFM's model of the AP architecture trained with TFM's own train step in float32 on the
  synthetic train split; returns its checkpoint, made once. (In bfloat16, 1.5x faster, one run of
  it diverged at step 39 on an AMD Zen 4.)"""
  config = CONFIGS[AP_ARCHITECTURE]
  steps = data.train_steps
  prefix = work_dir / f'ap_model_{AP_ARCHITECTURE}_{data.num_train}_{steps}' / 'weights'
  if tf.io.gfile.exists(str(prefix) + '.index'):
    return str(prefix)
  say(f'AP: training TFM {config.label} for {steps} steps at batch {AP_TRAIN_BATCH} '
      '(once; cached in --work_dir)')
  task = tfm_task(config)
  model = build_tfm(task, 'float32')
  warmup = min(100, steps // 5)
  schedule = tf_keras.optimizers.schedules.CosineDecay(
      0.002, steps - warmup, alpha=0.0, warmup_target=0.02, warmup_steps=warmup)
  optimizer = tf_keras.optimizers.SGD(learning_rate=schedule, momentum=0.9, global_clipnorm=10.0)
  dataset = input_pipeline.build_train_dataset(
      file_pattern=records['train'], global_batch_size=AP_TRAIN_BATCH,
      model_config=dict(geometry_from_tfm(model).to_config(), num_classes=NUM_CLASSES))
  dataset = dataset.map(lambda images, labels: (geometry.normalize_pixels(images), labels))
  iterator = iter(dataset)
  step = tf.function(lambda: task.train_step(next(iterator), model, optimizer)['loss'])
  start = time.perf_counter()
  for i in range(1, steps + 1):
    loss = float(step())
    if not np.isfinite(loss):
      raise RuntimeError(f'AP model training diverged at step {i}.')
    if i % 50 == 0 or i == steps:
      say(f'  AP training step {i}/{steps}: loss {loss:.4f} '
          f'({(time.perf_counter() - start) / i:.2f} s/step)')
  prefix.parent.mkdir(parents=True, exist_ok=True)
  model.save_weights(str(prefix))
  return str(prefix)


def same_detections(a, b, index) -> bool:
  """Same count, classes, scores (1e-5) and boxes (1e-3 px) for image `index`."""
  rows_a, rows_b = sorted_detection_rows(a, index), sorted_detection_rows(b, index)
  return (rows_a.shape == rows_b.shape and np.array_equal(rows_a[:, 0], rows_b[:, 0]) and
          np.allclose(rows_a[:, 1], rows_b[:, 1], atol=1e-5) and
          np.allclose(rows_a[:, 2:], rows_b[:, 2:], atol=1e-3))


def ap_comparison(config: Config, precision: str, work_dir: pathlib.Path, data: ApData) -> Ap:
  """AP of theirs and ours (float32, and ours in `precision` when that is bfloat16) with the
  trained AP weights, on the synthetic val split at the configuration's image size."""
  records = synthetic_records(work_dir, data)
  weights = trained_ap_weights(work_dir, records, data)
  ap_config = CONFIGS[AP_ARCHITECTURE]
  size = config.image_size
  tfm_model = build_tfm(tfm_task(ap_config, image_size=size))
  tfm_model.load_weights(weights).expect_partial()
  ours = retinanet_from_tfm(tfm_model)
  detectors = {'theirs': tfm_detect_fn(tfm_model, size), 'ours': tf.function(ours.detect)}
  if precision != 'float32':
    detectors['ours_bf16'] = tf.function(
        build_ours(ours.get_config(), precision, tfm_model).detect)
  evaluators = {name: coco_metrics.CocoEvaluator(annotation_file=records['val_json'])
                for name in detectors}
  dataset = input_pipeline.build_eval_dataset(
      file_pattern=records['val'], global_batch_size=8,
      model_config=ours.get_config())
  identical = {name: 0 for name in detectors if name != 'theirs'}
  seconds = {name: 0.0 for name in detectors}
  num_images = 0
  for images, labels in dataset:
    outputs = {}
    for name, detect in detectors.items():
      start = time.perf_counter()
      outputs[name] = {k: v.numpy() for k, v in detect(images).items()}
      seconds[name] += time.perf_counter() - start
    for name, detections in outputs.items():
      mapped = dict(detections, detection_boxes=geometry.to_original_image(
          detections['detection_boxes'], labels['image_info']).numpy())
      evaluators[name].update(labels['source_id'], mapped)
    for i in range(int(images.shape[0])):
      for name in identical:
        identical[name] += same_detections(outputs[name], outputs['theirs'], i)
    num_images += int(images.shape[0])
  metrics = {name: evaluator.evaluate() for name, evaluator in evaluators.items()}
  return Ap(
      images=num_images,
      model=(f'{ap_config.label} trained {data.train_steps} steps on synthetic shapes' +
             ('' if size == ap_config.image_size else f', run at {size} px')),
      ap={name: m['AP'] for name, m in metrics.items()},
      ap50={name: m['AP50'] for name, m in metrics.items()},
      eval_seconds=seconds,
      identical={name: count / num_images for name, count in identical.items()})
