r"""Is bfloat16 training sound on this CPU? Two checks on real COCO images (issue 10).

  .venv/bin/python experiments/bfloat16_numerics.py                    # ../shared/data/coco128
  .venv/bin/python experiments/bfloat16_numerics.py --train_steps=100 --check_numerics

On the model of gin_configs/overfit_coco128.gin and a coco128-like folder, with the flags of
experiments/overfit_coco128.py (--data_dir, --work_dir: this writes under <work_dir>/bfloat16_numerics,
--gin_file, --gin_bindings):

1. Gradient agreement: one real batch, the same weights, the training loss's gradients computed in
   bfloat16 (mixed_bfloat16) and in float32; per variable the cosine between the two, summarized by
   part (backbone, pyramid, class head, box head) with the least agreeing variables. Variables with
   a gradient norm under 1e-6 are left out: the biases of convolutions followed by batch norm,
   whose true gradient is zero, so both sides are rounding noise.
2. The first --train_steps of the config's run (its learning-rate schedule unchanged) in bfloat16,
   forced even where `training.precision` would pick float32, every variable checked after each step: the first step and variable that become NaN or Inf, if any. With
   --check_numerics, `tf.debugging.enable_check_numerics` names the first op whose output is not
   finite instead (much slower).

Prints both as text, and last one JSON line: cpu (model name and bfloat16 hardware), the cosine
summary, and the training outcome (steps run, the divergence message; the loss is in the progress
lines above it).
"""
import json
import pathlib
import shutil
import sys
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tf_keras

import overfit_coco128
from nasfpn_tf import config
from nasfpn_tf.data import create_coco_tfrecord
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.models.factory import build_retinanet
from nasfpn_tf.models.losses import RetinaNetLoss
from nasfpn_tf.training import distribute
from nasfpn_tf.training import precision
from nasfpn_tf.training import trainer as trainer_lib

# --data_dir, --work_dir, --gin_file and --gin_bindings are overfit_coco128's flags.
FLAGS = flags.FLAGS
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 100, 'bfloat16 steps of check 2 (0: skip).')
_CHECK_NUMERICS = flags.DEFINE_bool('check_numerics', False,
                                    'Name the first op with a NaN/Inf output (slow).')
_SEED = flags.DEFINE_integer('seed', 0, 'Weight and data-order seed.')
TINY_GRADIENT = 1e-6


def _part(name):
  for part, keys in (('class head', ('classnet', 'scores')), ('box head', ('boxnet', 'boxes')),
                     ('pyramid', ('repeat', 'lateral'))):
    if any(key in name for key in keys):
      return part
  return 'backbone'


def gradient_agreement(batch):
  """{part: {median, min}} cosines of bfloat16 vs float32 gradients, and the 5 worst variables."""
  models = {}
  for policy in ('float32', 'mixed_bfloat16'):
    tf_keras.mixed_precision.set_global_policy(policy)
    models[policy] = build_retinanet()
  tf_keras.mixed_precision.set_global_policy('float32')
  models['mixed_bfloat16'].set_weights(models['float32'].get_weights())
  loss_fn = RetinaNetLoss(num_classes=models['float32'].get_config()['num_classes'])

  @tf.function
  def gradients(model, images, labels):
    with tf.GradientTape() as tape:
      loss = loss_fn(model(images, training=True), labels)['total_loss']
    return tape.gradient(loss, model.trainable_variables)

  grads = {policy: gradients(model, *batch) for policy, model in models.items()}
  rows = []
  for variable, g32, g16 in zip(models['float32'].trainable_variables, grads['float32'],
                                grads['mixed_bfloat16']):
    a, b = (g.numpy().ravel().astype(np.float64) for g in (g32, g16))
    if np.linalg.norm(a) < TINY_GRADIENT:
      continue
    cosine = (float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
              if np.isfinite(b).all() and np.linalg.norm(b) else float('nan'))
    rows.append((cosine, variable.name))
  parts = {}
  for cosine, name in rows:
    parts.setdefault(_part(name), []).append(cosine)
  summary = {part: {'median': round(float(np.median(c)), 3), 'min': round(float(np.min(c)), 3)}
             for part, c in sorted(parts.items())}
  worst = sorted(rows, key=lambda row: np.nan_to_num(row[0], nan=-2.0))[:5]
  return summary, [(name, round(cosine, 3)) for cosine, name in worst]


def train_in_bfloat16(records, model_dir, steps):
  """Trains `steps` bfloat16 steps, logging and checking every variable after each one."""
  config.parse_gin(FLAGS.gin_file, _bindings(records) + [
      f'RetinaNetTrainer.train_steps = {steps}', 'RetinaNetTrainer.log_every_steps = 1',
      f'RetinaNetTrainer.checkpoint_every_steps = {steps}',
      "RetinaNetTrainer.mixed_precision = 'bfloat16'", 'RetinaNetTrainer.force_bfloat16 = True'])
  trainer = trainer_lib.RetinaNetTrainer(str(model_dir), distribute.get_strategy('auto'))
  try:
    trainer.train()
    diverged = None
  except (trainer_lib.TrainingDivergedError, tf.errors.InvalidArgumentError) as e:
    diverged = str(e).splitlines()[0][:500]
  return {'steps': trainer.step, 'diverged': diverged}


def _bindings(records):
  return [f'build_train_dataset.file_pattern = {records!r}'] + FLAGS.gin_bindings


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.get_logger().setLevel('WARNING')
  try:
    image_dir, annotations = overfit_coco128.data_paths(FLAGS.data_dir)
  except ValueError as e:
    sys.exit(f'bfloat16_numerics: error: {e}')
  work_dir = pathlib.Path(FLAGS.work_dir) / 'bfloat16_numerics'
  prefix = str(work_dir / 'records' / 'train')
  create_coco_tfrecord.convert(str(annotations), str(image_dir), prefix, num_shards=1,
                               num_threads=2)
  records = prefix + '-*.tfrecord'
  cpu = {'model': precision.cpu_name(),
         'bfloat16_hardware': precision.bfloat16_hardware(precision.cpu_flags())}
  print(f'CPU: {cpu["model"]}; bfloat16 hardware: {cpu["bfloat16_hardware"] or "none (emulated)"}')

  tf_keras.utils.set_random_seed(_SEED.value)
  config.parse_gin(FLAGS.gin_file, _bindings(records))
  model_config = build_retinanet().get_config()
  batch = next(iter(input_pipeline.build_train_dataset(global_batch_size=8,
                                                       model_config=model_config)))
  start = time.perf_counter()
  summary, worst = gradient_agreement(batch)
  print(f'1. bfloat16 vs float32 gradient cosines ({time.perf_counter() - start:.0f} s):')
  for part, values in summary.items():
    print(f'   {part:10s} median {values["median"]:.3f}  min {values["min"]:.3f}')
  print('   least agreeing: ' + ', '.join(f'{name} {cosine}' for name, cosine in worst))

  training = None
  if _TRAIN_STEPS.value:
    if _CHECK_NUMERICS.value:
      tf.debugging.enable_check_numerics()
    model_dir = work_dir / 'model'
    shutil.rmtree(model_dir, ignore_errors=True)
    tf_keras.utils.set_random_seed(_SEED.value)
    training = train_in_bfloat16(records, model_dir, _TRAIN_STEPS.value)
    print(f'2. bfloat16 training: {training}')
  print(json.dumps({'cpu': cpu, 'gradient_cosines': summary, 'least_agreeing': worst,
                    'bfloat16_training': training}), flush=True)


if __name__ == '__main__':
  app.run(main)
