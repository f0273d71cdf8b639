"""RetinaNetTrainer in-process: model-dir outputs, eval wiring, NaN stop, config mismatch, clipping,
loss scaling."""
import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from nasfpn_tf import checkpointing
from nasfpn_tf import config
from nasfpn_tf.evaluation.coco_metrics import METRIC_NAMES
from nasfpn_tf.layers.dropblock import DropBlock
from nasfpn_tf.models.retinanet import RetinaNet
from nasfpn_tf.training import trainer as trainer_lib
import training_helpers
from training_helpers import checkpoint_step, read_scalars, tiny_bindings


def _trainer(model_dir, bindings, mode='train'):
  config.parse_gin([], bindings)
  return trainer_lib.RetinaNetTrainer(str(model_dir), tf.distribute.get_strategy(), mode=mode)


@pytest.fixture(scope='module')
def trained(synthetic_records, tmp_path_factory):
  """A train_and_eval run of 4 steps: (model_dir, trainer, printed output, returned metrics)."""
  model_dir = tmp_path_factory.mktemp('trained')
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    trainer = _trainer(model_dir, tiny_bindings(synthetic_records), mode='train_and_eval')
    metrics = trainer.run()
  return model_dir, trainer, out.getvalue(), metrics


def test_train_and_eval_writes_the_model_dir(trained):
  model_dir, trainer, printed, metrics = trained
  assert trainer.step == 4
  assert tf.train.latest_checkpoint(str(model_dir)) == str(model_dir / 'ckpt-4')
  assert checkpoint_step(str(model_dir / 'ckpt-4')) == 4
  assert (model_dir / 'ckpt-2.index').exists()

  operative = (model_dir / 'operative_config.gin').read_text()
  for line in ('RetinaNetTrainer.train_steps = 4', 'build_retinanet.num_filters = 16',
               'build_train_dataset.flip_prob = 0.5', 'build_eval_dataset.max_num_instances = 100',
               'StepDecayWithWarmup.warmup_steps = 2', 'RetinaNetLoss.focal_gamma = 1.5'):
    assert line in operative
  # The model's config as data: JSON round-trips it to the same model config.
  recorded = json.loads((model_dir / 'model_config.json').read_text())
  assert recorded == json.loads(json.dumps(trainer.model.get_config()))
  assert recorded['num_filters'] == 16 and recorded['image_size'] == [128, 128]
  assert RetinaNet.from_config(recorded).get_config() == recorded

  # Progress lines at every log step: step, loss terms, learning rate, throughput, ETA.
  progress = re.findall(r'step (\d+)/4 \| loss [\d.]+ \(cls [\d.]+ box [\d.]+ reg [\d.]+\) \| '
                        r'lr [\d.e-]+ \| ([\d.]+|-) images/s \| ETA \S+', printed)
  assert [step for step, _ in progress] == ['2', '4']
  assert progress[1][1] != '-'

  train = read_scalars(model_dir / 'train')
  assert set(train) >= {'loss/total_loss', 'loss/cls_loss', 'loss/box_loss', 'loss/reg_loss',
                        'learning_rate', 'images_per_second'}
  assert sorted(train['loss/total_loss']) == [2, 4]
  assert train['learning_rate'][2] == pytest.approx(0.01)  # warm-up over 2 steps
  assert train['loss/reg_loss'][2] > 0  # l2_weight_decay reaches the loss

  saved = json.loads((model_dir / 'eval_metrics.json').read_text())
  assert set(saved) == set(METRIC_NAMES) | {'step'}
  assert saved['step'] == 4
  assert saved == pytest.approx(dict(metrics, step=4))
  assert set(read_scalars(model_dir / 'eval')) == {f'coco/{name}' for name in METRIC_NAMES}
  assert '| AP | AP50 |' in printed  # the COCO table


def test_evaluation_maps_boxes_and_classes_back_to_the_dataset(trained, synthetic_records,
                                                                monkeypatch):
  """Perfect detections (the ground truth, mapped into model-input pixels as the model would
  see it) must score AP 1, against record and json ground truth: checks to_original_image, the
  ground truth's normalization and that class ids stay the dataset's."""
  _, trainer, _, _ = trained
  labels_seen = []

  def ground_truth_as_detections(images):
    labels = next(eval_labels)
    labels_seen.append(labels['source_id'])
    truth, info = labels['groundtruths'], labels['image_info']
    scale, offset = info[:, 2:3], info[:, 3:4]
    valid = truth['classes'] > 0
    return {'detection_boxes': truth['boxes'] * tf.tile(scale, [1, 1, 2]) -
                               tf.tile(offset, [1, 1, 2]),
            'detection_scores': tf.where(valid, 1.0, 0.0),
            'detection_classes': tf.where(valid, truth['classes'], 0),
            'num_detections': truth['num_instances']}

  monkeypatch.setattr(trainer, '_detect', ground_truth_as_detections)
  results = []
  for annotation_file in (None, synthetic_records['val_json']):
    monkeypatch.setattr(trainer, 'eval_annotation_file', annotation_file)
    eval_labels = iter([labels for _, labels in trainer._eval_dataset])
    with contextlib.redirect_stdout(io.StringIO()):
      results.append(trainer.evaluate())
  assert len(tf.concat(labels_seen, 0)) == 8  # the 4 val images, twice
  for metrics in results:
    assert metrics['AP'] == pytest.approx(1.0)
    assert metrics['AR100'] == pytest.approx(1.0)


def test_eval_mode_restores_the_weights_and_step_whatever_the_optimizer_settings(
    trained, synthetic_records):
  model_dir, trained_trainer, _, _ = trained
  bindings = tiny_bindings(synthetic_records) + ['RetinaNetTrainer.learning_rate = None',
                                                 'RetinaNetTrainer.momentum = 0.5']
  with contextlib.redirect_stdout(io.StringIO()) as out:
    evaluator = _trainer(model_dir, bindings, mode='eval')
    metrics = evaluator.run()
  assert f'Restored {model_dir / "ckpt-4"} at step 4.' in out.getvalue()
  for restored, trained_weight in zip(evaluator.model.weights, trained_trainer.model.weights):
    np.testing.assert_array_equal(restored.numpy(), trained_weight.numpy())
  saved = json.loads((model_dir / 'eval_metrics.json').read_text())
  assert saved == pytest.approx(dict(metrics, step=4))
  assert set(saved) == set(METRIC_NAMES) | {'step'}


def test_a_checkpoint_of_another_model_config_fails_naming_the_change(trained, synthetic_records):
  model_dir, _, _, _ = trained
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    _trainer(model_dir, tiny_bindings(synthetic_records) + ['build_retinanet.num_filters = 24'])
  message = str(error.value)
  assert 'ckpt-4' in message
  assert (f'build_retinanet.num_filters: 16 in {model_dir / "model_config.json"}, now 24'
          in message)
  assert message.count('build_retinanet.') == 1  # only what changed
  # The record of what the checkpoints were trained with survives the failed start.
  assert 'build_retinanet.num_filters = 16' in (model_dir / 'operative_config.gin').read_text()


def test_a_model_dir_without_model_config_json_restores_from_its_operative_config(
    trained, synthetic_records, tmp_path):
  """Model dirs written before model_config.json: the operative config is their record."""
  model_dir = tmp_path / 'model'
  shutil.copytree(trained[0], model_dir)
  (model_dir / 'model_config.json').unlink()
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    _trainer(model_dir, tiny_bindings(synthetic_records) + ['build_retinanet.num_filters = 24'])
  assert (f'build_retinanet.num_filters: 16 in {model_dir / "operative_config.gin"}, now 24'
          in str(error.value))
  with contextlib.redirect_stdout(io.StringIO()) as out:
    trainer = _trainer(model_dir, tiny_bindings(synthetic_records))
  assert f'Restored {model_dir / "ckpt-4"} at step 4.' in out.getvalue()
  # A training start records it.
  assert json.loads((model_dir / 'model_config.json').read_text()) == json.loads(
      json.dumps(trainer.model.get_config()))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_records, tmp_path):
  bindings = tiny_bindings(synthetic_records, checkpoint_every_steps=1, log_every_steps=1) + [
      'StepDecayWithWarmup.base_learning_rate = 1e30', 'StepDecayWithWarmup.warmup_steps = 0']
  trainer = _trainer(tmp_path, bindings)
  with contextlib.redirect_stdout(io.StringIO()):
    with pytest.raises(trainer_lib.TrainingDivergedError,
                       match=r'NaN or Inf .* steps 2\.\.2; stopped without saving this state, '
                             r'the last good checkpoint is kept: .*ckpt-1'):
      trainer.train()
  assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / 'ckpt-1')
  assert not list(tmp_path.glob('ckpt-2*'))


def test_a_non_finite_variable_the_loss_never_reads_stops_at_the_next_log(synthetic_records,
                                                                          tmp_path):
  # A batch-norm moving variance: training reads batch statistics, so the loss stays finite.
  trainer = _trainer(tmp_path, tiny_bindings(synthetic_records, train_steps=2,
                                             checkpoint_every_steps=6, log_every_steps=2))
  with contextlib.redirect_stdout(io.StringIO()):
    assert trainer.train() == 2
    variance = next(v for v in trainer.model.variables if 'moving_variance' in v.name)
    variance.assign(tf.tensor_scatter_nd_update(variance, [[0]], [np.nan]))
    trainer.train_steps = 6
    with pytest.raises(trainer_lib.TrainingDivergedError,
                       match=rf'variable {re.escape(variance.name)} became NaN or Inf in steps '
                             r'3\.\.4; stopped without saving this state, the last good '
                             r'checkpoint is kept: .*ckpt-2'):
      trainer.train()
  assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / 'ckpt-2')
  assert read_scalars(tmp_path / 'train')['loss/total_loss'].keys() == {2}


def _batch(trainer):
  """The first batch of `trainer`'s train pipeline: (images, labels)."""
  return next(trainer.train_iterator())


def _one_step(trainer, images, labels):
  """One optimizer step of `trainer` on this batch (its replica_step, as run_steps calls it);
  the change of each trainable variable, as float64 arrays."""
  before = [v.numpy().astype(np.float64) for v in trainer.model.trainable_variables]
  trainer.strategy.run(trainer.replica_step, args=(images, labels))
  return [v.numpy().astype(np.float64) - b
          for v, b in zip(trainer.model.trainable_variables, before)]


def _global_norm(arrays):
  return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays)))


def test_clipping_bounds_the_applied_update(synthetic_records, tmp_path):
  """SGD's first step is -lr x g (momentum starts at 0); with clip_gradient_norm c the summed
  gradient is rescaled to norm c first: the update is -lr x g x c / ||g||, g from a tape here."""
  clip = 0.05
  trainer = _trainer(tmp_path, tiny_bindings(synthetic_records, train_steps=1,
                                             clip_gradient_norm=clip))
  images, labels = _batch(trainer)
  model, variables = trainer.model, trainer.model.trainable_variables
  with tf.GradientTape() as tape:  # the loss replica_step minimizes, on one replica
    total = trainer.loss_fn(model(images, training=True), labels)['total_loss']
    total += tf.add_n(model.losses)
  gradients = [g.numpy().astype(np.float64) for g in tape.gradient(total, variables)]
  norm = _global_norm(gradients)
  assert norm > 10 * clip  # the clip is active
  rate = trainer.learning_rate(0)
  deltas = _one_step(trainer, images, labels)
  assert _global_norm(deltas) == pytest.approx(rate * clip, rel=1e-4)
  expected = [-rate * g * clip / norm for g in gradients]
  # float32 rounding of the weights (~0.1) leaves ~1% noise on a change ~1e-7 per weight.
  assert _global_norm([d - e for d, e in zip(deltas, expected)]) < 0.02 * rate * clip


def test_adamw_first_step_is_the_sign_step_plus_decoupled_decay_off_norms_and_biases(
    synthetic_records, tmp_path):
  """AdamW's first step, by hand: with m = (1 - b1) g and v = (1 - b2) g^2 after one gradient,
  Keras's bias-corrected update is lr g / (|g| + eps / sqrt(1 - b2)), and the decoupled decay
  subtracts lr x wd x w first, except from batch-norm gammas/betas and biases."""
  decay = 0.5
  bindings = [b for b in tiny_bindings(synthetic_records, train_steps=1, optimizer='adamw',
                                       weight_decay=decay)
              if 'l2_weight_decay' not in b]  # AdamW decays the weights itself
  trainer = _trainer(tmp_path, bindings)
  optimizer = trainer.optimizer
  assert isinstance(optimizer, tf_keras.optimizers.AdamW)
  images, labels = _batch(trainer)
  model, variables = trainer.model, trainer.model.trainable_variables
  with tf.GradientTape() as tape:
    total = trainer.loss_fn(model(images, training=True), labels)['total_loss']
  gradients = [g.numpy().astype(np.float64) for g in tape.gradient(total, variables)]
  weights = [v.numpy().astype(np.float64) for v in variables]
  rate = float(trainer.learning_rate(0))
  deltas = _one_step(trainer, images, labels)
  eps = optimizer.epsilon / np.sqrt(1.0 - optimizer.beta_2)
  decayed = 0
  for variable, g, w, delta in zip(variables, gradients, weights, deltas):
    exempt = any(key in variable.name for key in ('gamma', 'beta', 'bias'))
    decayed += not exempt
    expected = -rate * g / (np.abs(g) + eps) - (0.0 if exempt else rate * decay * w)
    np.testing.assert_allclose(delta, expected, atol=2e-3 * rate, err_msg=variable.name)
  assert 0 < decayed < len(variables)  # kernels decay, norms and biases do not


@pytest.mark.parametrize('binding, message', [
    ("RetinaNetTrainer.optimizer = 'adam'",
     "RetinaNetTrainer.optimizer = 'adam' is not one of ['sgd', 'adamw']"),
    ('RetinaNetTrainer.weight_decay = 1e-4', "RetinaNetTrainer.weight_decay = 0.0001 needs "
     "optimizer = 'adamw'"),
])
def test_bad_optimizer_bindings_name_the_binding(synthetic_records, tmp_path, binding, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _trainer(tmp_path, tiny_bindings(synthetic_records) + [binding])


@training_helpers.HALF_PRECISION_HELD_BACK
def test_float16_scales_the_loss_and_unscales_the_gradients(synthetic_records, tmp_path,
                                                             monkeypatch):
  """The float16 step multiplies the loss by the dynamic loss scale (2^15 to start) and divides
  the gradients by it again: its update equals a float32 model's on the same batch and weights
  (float16 rounding apart), not 2^15 times it or 2^-15 times it; a finite step counts one good
  step towards growing the scale, which stays 2^15."""
  # float16 is emulated on CPUs (slow): a 64 px FPN on P3-P6, two steps.
  bindings = tiny_bindings(synthetic_records, train_steps=2) + [
      'build_retinanet.image_size = (64, 64)', 'build_retinanet.max_level = 6',
      "build_retinanet.block_specs = 'fpn'"]
  trainer = _trainer(tmp_path / 'float16',
                     bindings + ["RetinaNetTrainer.mixed_precision = 'float16'"])
  assert tf_keras.mixed_precision.global_policy().name == 'float32'  # not leaked to later models
  optimizer = trainer.optimizer
  assert isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
  assert trainer.model.get_layer('decoder').compute_dtype == 'float16'
  assert optimizer.dynamic and float(optimizer.loss_scale) == 2.0**15
  reference = _trainer(tmp_path / 'float32', bindings)
  reference.model.set_weights(trainer.model.get_weights())
  images, labels = _batch(trainer)

  scaled = []
  get_scaled_loss = optimizer.get_scaled_loss

  def spy(loss):
    scaled.append((loss, get_scaled_loss(loss)))
    return scaled[-1][1]
  monkeypatch.setattr(optimizer, 'get_scaled_loss', spy)
  deltas = _one_step(trainer, images, labels)
  [(loss, scaled_loss)] = scaled
  assert float(scaled_loss) == pytest.approx(float(loss) * 2.0**15, rel=1e-6) and float(loss) > 0
  expected = _one_step(reference, images, labels)
  assert _global_norm([d - e for d, e in zip(deltas, expected)]) < 0.05 * _global_norm(expected)
  assert float(optimizer.loss_scale) == 2.0**15 and int(optimizer.dynamic_counter) == 1

  with contextlib.redirect_stdout(io.StringIO()):
    assert trainer.train() == 2  # the trainer's own compiled loop for the second step
  losses = read_scalars(tmp_path / 'float16' / 'train')['loss/total_loss']
  assert np.isfinite(losses[2])


@training_helpers.HALF_PRECISION_HELD_BACK
def test_bfloat16_dropblock_ramp_and_steps_per_execution(synthetic_records, tmp_path):
  """bfloat16 with DropBlock, 3 steps in one compiled call, clipping on (its effect:
  test_clipping_bounds_the_applied_update)."""
  bindings = tiny_bindings(synthetic_records, train_steps=3, steps_per_execution=3,
                           log_every_steps=3, mixed_precision='bfloat16', force_bfloat16=True,
                           clip_gradient_norm=0.1) + [
      'build_retinanet.dropblock_keep_prob = 0.9', 'build_retinanet.dropblock_ramp_steps = 10']
  trainer = _trainer(tmp_path, bindings)
  assert trainer.model.get_layer('decoder').compute_dtype == 'bfloat16'
  dropblocks = [layer for layer in trainer.model.submodules if isinstance(layer, DropBlock)]
  assert dropblocks
  with contextlib.redirect_stdout(io.StringIO()) as out:
    assert trainer.train() == 3
  # One call ran the 3 steps; each set the ramp to its own step (0, 1, 2) before its update.
  assert re.findall(r'step (\d+)/3', out.getvalue()) == ['3']
  assert [int(layer.step.numpy()) for layer in dropblocks] == [2] * len(dropblocks)
  assert np.isfinite(read_scalars(tmp_path / 'train')['loss/total_loss'][3])


@pytest.mark.parametrize('binding, message', [
    ('RetinaNetTrainer.learning_rate = None', 'binding RetinaNetTrainer.learning_rate is required'),
    ("RetinaNetTrainer.mixed_precision = 'float8'", "RetinaNetTrainer.mixed_precision='float8'"),
    ('RetinaNetTrainer.log_every_steps = 0', 'RetinaNetTrainer.log_every_steps must be >= 1'),
    ("RetinaNetTrainer.init_checkpoint_modules = 'decoder'",
     "RetinaNetTrainer.init_checkpoint_modules must be one of ['backbone', 'all']"),
])
def test_bad_trainer_bindings_name_the_binding(synthetic_records, tmp_path, binding, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _trainer(tmp_path, tiny_bindings(synthetic_records) + [binding])
