"""RetinaNet training and COCO evaluation under a tf.distribute strategy, gin-configurable.

One `RetinaNetTrainer` owns the model (gin `build_retinanet`), the optimizer, the checkpoints
and the summaries of a model dir. The global step is the optimizer's iteration count: checkpoints
carry it, so a restarted run resumes with the same step, optimizer slots and learning-rate
schedule.

Losses with several replicas: each replica computes the RetinaNet loss on its share of the global
batch, re-normalized by the positives of the *global* batch (RetinaNetLoss divides by the
replica's own positives + 1), and the L2 regularization divided by the number of replicas; the
optimizer sums gradients over replicas, so a step equals the single-device step on the same
global batch (with sync BN, `build_retinanet.use_sync_bn = True`; without it BN statistics are
per replica, as in TF Model Garden).
"""
import datetime
import functools
import json
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Union

import gin
import numpy as np
import tensorflow as tf
import tf_keras

from nasfpn_tf import checkpointing
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.evaluation import coco_metrics
from nasfpn_tf.evaluation import evaluate
from nasfpn_tf.layers.dropblock import set_dropblock_step
from nasfpn_tf.models import tta as tta_lib
from nasfpn_tf.models.factory import build_loss, build_retinanet
from nasfpn_tf.models.losses import AnytimeLoss, exit_loss_keys
from nasfpn_tf.training import distribute
from nasfpn_tf.training import init_checkpoint as init_checkpoint_lib
from nasfpn_tf.training import optimizers
from nasfpn_tf.training import precision
from nasfpn_tf.training import settings
from nasfpn_tf.utils import files

MODES = settings.MODES
LOSS_KEYS = ('total_loss', 'cls_loss', 'box_loss', 'reg_loss')
METRICS_FILE = 'eval_metrics.json'


class TrainingDivergedError(RuntimeError):
  """The loss or the weights became NaN or Inf; the diverged state was not saved."""


def _duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(round(seconds))))


# Not `Trainer`: TF Model Garden registers official.core.base_trainer.Trainer with gin, which
# would make `RetinaNetTrainer.<name>` bindings ambiguous.
@gin.configurable(denylist=['model_dir', 'strategy', 'mode', 'train_dataset_fn', 'tta'])
class RetinaNetTrainer:
  """Trains and/or evaluates the gin-built RetinaNet in `model_dir`; see `run`.

  Gin bindings (`RetinaNetTrainer.<name>`):
    learning_rate: a schedule, e.g. `@StepDecayWithWarmup()` (gin_configs/recipe_*.gin), or a
      constant. Required: no default fits every batch size.
    train_steps, global_batch_size: the run length and the batch over all replicas.
    optimizer, momentum, weight_decay: 'sgd' with `momentum` (its decay: the model's
      `build_retinanet.l2_weight_decay`) or 'adamw' with decoupled `weight_decay`.
    mixed_precision: None, 'bfloat16', or 'float16' (with dynamic loss scaling). On a CPU without
      bfloat16 hardware (AVX2-only), 'bfloat16' trains in float32 (emulated bfloat16 is 5-8x
      slower; see `training.precision`) unless force_bfloat16; the run's first line says which.
    force_bfloat16: train in bfloat16 even where it is emulated.
    clip_gradient_norm: clip the summed gradients to this global norm (None: off).
    steps_per_execution: train steps per tf.function call (an in-graph loop: fewer host round
      trips on TPUs); logs and checkpoints fall on its multiples.
    checkpoint_every_steps, max_checkpoints_to_keep, log_every_steps: as named; a checkpoint is
      also written at the end.
    eval_every_steps: evaluate during train_and_eval every N steps (None: at the end only).
    eval_batch_size, eval_steps: eval batches of this size, this many (None: the whole set).
    eval_annotation_file: COCO json of the eval images; None: ground truth from the eval records.
    init_checkpoint, init_checkpoint_modules: a checkpoint (prefix or folder) to start from,
      'backbone' (TF Model Garden's ImageNet backbones, or a nasfpn_tf model dir's backbone) or
      'all' (a nasfpn_tf model dir); read once, when the model dir has no checkpoint of its own
      (`training.init_checkpoint`).
  Datasets: `build_train_dataset.*` and `build_eval_dataset.*` (file_pattern at least).

  `train_dataset_fn(input_context) -> dataset` replaces the gin train pipeline (tests feeding
  fixed batches); it must yield per-replica batches like `build_train_dataset`.
  `tta` (`models.tta.TTAConfig`, main's --tta_scales / --tta_flip; None: off) evaluates the
  model (its last exit) with test-time augmentation.
  """

  def __init__(self,
               model_dir: str,
               strategy: tf.distribute.Strategy,
               mode: str = 'train',
               learning_rate: Union[float, tf_keras.optimizers.schedules.LearningRateSchedule,
                                    None] = None,
               train_steps: int = 1000,
               global_batch_size: int = 8,
               optimizer: str = 'sgd',
               momentum: float = 0.9,
               weight_decay: float = 0.0,
               mixed_precision: Optional[str] = None,
               force_bfloat16: bool = False,
               clip_gradient_norm: Optional[float] = None,
               steps_per_execution: int = 1,
               checkpoint_every_steps: int = 500,
               max_checkpoints_to_keep: int = 5,
               log_every_steps: int = 50,
               eval_every_steps: Optional[int] = None,
               eval_batch_size: int = 8,
               eval_steps: Optional[int] = None,
               eval_annotation_file: Optional[str] = None,
               init_checkpoint: Optional[str] = None,
               init_checkpoint_modules: str = 'backbone',
               train_dataset_fn: Optional[Callable[[tf.distribute.InputContext],
                                                   tf.data.Dataset]] = None,
               tta: Optional[tta_lib.TTAConfig] = None):
    settings.check(mode, strategy, train_steps=train_steps,
                    global_batch_size=global_batch_size, steps_per_execution=steps_per_execution,
                    checkpoint_every_steps=checkpoint_every_steps,
                    log_every_steps=log_every_steps, eval_batch_size=eval_batch_size,
                    eval_steps=eval_steps or 1, eval_every_steps=eval_every_steps or 1)
    init_checkpoint_lib.check_modules(init_checkpoint_modules)
    optimizers.check(optimizer, weight_decay)
    training = mode != 'eval'
    if training and learning_rate is None:
      raise settings.missing_binding('RetinaNetTrainer.learning_rate', '@StepDecayWithWarmup()')
    self.model_dir = model_dir
    self.strategy = strategy
    self.mode = mode
    self.train_steps = train_steps
    self.global_batch_size = global_batch_size
    self.steps_per_execution = steps_per_execution
    self.checkpoint_every_steps = checkpoint_every_steps
    self.log_every_steps = log_every_steps
    self.eval_every_steps = eval_every_steps
    self.eval_steps = eval_steps
    self.eval_annotation_file = eval_annotation_file
    self._init_checkpoint = (init_checkpoint, init_checkpoint_modules)
    self.is_chief = distribute.is_chief(strategy)
    self._learning_rate = learning_rate
    self.tta = tta
    self.mixed_precision, precision_note = precision.training_precision(
        mixed_precision, force_bfloat16)
    self._say(precision_note)

    tf.io.gfile.makedirs(model_dir)
    self._build_model_and_optimizer(optimizer, momentum, weight_decay, clip_gradient_norm,
                                    training)
    task_id = getattr(getattr(strategy, 'cluster_resolver', None), 'task_id', 0) or 0
    self.checkpointer = checkpointing.Checkpointer(
        model_dir, self.model, self.optimizer, is_chief=self.is_chief, task_id=task_id,
        max_to_keep=max_checkpoints_to_keep)
    self._build_datasets(train_dataset_fn if training else None, eval_batch_size)
    self._restore(training)
    if training and self.is_chief:
      self._record_config()
    self._train_writer = self._writer('train') if training else None
    self._eval_writer = self._writer('eval') if mode != 'train' else None
    self._compile_functions()

  def _build_model_and_optimizer(self, optimizer, momentum, weight_decay, clip_gradient_norm,
                                 training) -> None:
    """The gin-built model in the training precision, the optimizer and the loss, under the
    strategy."""
    with self.strategy.scope():
      previous_policy = tf_keras.mixed_precision.global_policy()
      tf_keras.mixed_precision.set_global_policy(precision.POLICIES[self.mixed_precision])
      try:  # Layers take the policy when built; later models must not inherit it.
        self.model = build_retinanet()
        # The models of the other view sizes, in the same precision; weights synced at eval.
        self._tta_detector = (tta_lib.TTADetector(self.model, self.tta) if self.tta else None)
      finally:
        tf_keras.mixed_precision.set_global_policy(previous_policy)
      # Evaluation never steps the optimizer: it only holds the step count there.
      self.optimizer = optimizers.build(optimizer, self._learning_rate or 0.0, momentum,
                                        weight_decay, clip_gradient_norm)
      if self.mixed_precision == 'float16':
        self.optimizer = tf_keras.mixed_precision.LossScaleOptimizer(self.optimizer)
      if training:  # Slots exist before a restore, so every checkpoint value finds its variable.
        self.optimizer.build(self.model.trainable_variables)
    self.loss_fn = build_loss(self.model.get_config())
    self.loss_keys = LOSS_KEYS
    if self.model.anytime:  # Deep supervision: every exit's loss, weighted.
      self.loss_fn = AnytimeLoss(self.loss_fn, self.model.exit_loss_weights)
      self.loss_keys += exit_loss_keys(self.model.num_repeats)

  def _build_datasets(self, train_dataset_fn, eval_batch_size) -> None:
    """The distributed train dataset (when training; gin's pipeline unless `train_dataset_fn`)
    and the eval dataset (when evaluating), both shaped by the model's config."""
    model_config = self.model.get_config()
    if self.mode != 'eval':
      if train_dataset_fn is None:
        settings.require_binding('build_train_dataset.file_pattern', "'/data/train-*.tfrecord'")
        def train_dataset_fn(context):
          return input_pipeline.build_train_dataset(
              global_batch_size=self.global_batch_size, model_config=model_config,
              input_context=context)
      self._train_dataset = self.strategy.distribute_datasets_from_function(train_dataset_fn)
    if self.mode != 'train':
      settings.require_binding('build_eval_dataset.file_pattern', "'/data/val-*.tfrecord'")
      self._eval_dataset = input_pipeline.build_eval_dataset(
          global_batch_size=eval_batch_size, model_config=model_config)

  def _restore(self, training) -> None:
    restored = self.checkpointer.restore(model_only=not training)
    if restored:
      self._say(f'Restored {restored} at step {self.step}.')
    elif self.mode == 'eval':
      raise ValueError(f'--mode=eval: no checkpoint in --model_dir={self.model_dir}.')
    elif self._init_checkpoint[0]:  # A resumed run keeps its own weights.
      path, modules = self._init_checkpoint
      path = init_checkpoint_lib.initialize(self.model, path, modules)
      self._say(f'Initialized the {"model" if modules == "all" else "backbone"} from {path}.')

  def _record_config(self) -> None:
    """model_config.json and operative_config.gin beside the checkpoints. Written after the
    model, datasets and restore: complete, and never over the record of what an incompatible
    checkpoint was trained with."""
    checkpointing.write_model_config(self.model_dir, self.model.get_config())
    files.atomic_write(os.path.join(self.model_dir, checkpointing.OPERATIVE_CONFIG),
                       gin.operative_config_str())

  def _compile_functions(self) -> None:
    self._run_steps = tf.function(self._run_steps_fn)
    self._checked_variables = [v for v in self.model.variables if v.dtype.is_floating]
    # One compiled pass over every variable: cheap enough for each log interval.
    self._variables_finite = tf.function(lambda: tf.stack(
        [tf.reduce_all(tf.math.is_finite(v)) for v in self._checked_variables]))
    self._detect = tf.function(self.model.detect)
    if self._tta_detector is not None:
      self._detect = tf.function(self._tta_detector)
    # An anytime model's other exits, evaluated beside the last one.
    self._early_exits = {k: tf.function(functools.partial(self.model.detect, num_repeats=k))
                         for k in range(1, self.model.num_repeats) if self.model.anytime}

  @property
  def step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def _say(self, message: str) -> None:
    if self.is_chief:
      print(message, flush=True)

  def _writer(self, name: str):
    return (tf.summary.create_file_writer(os.path.join(self.model_dir, name)) if self.is_chief
            else tf.summary.create_noop_writer())

  def learning_rate(self, step: int) -> float:
    rate = self._learning_rate
    return float(rate(step)) if callable(rate) else float(rate)

  # Training.

  def replica_step(self, images, labels) -> Dict[str, tf.Tensor]:
    """One optimizer step on this replica's share of the global batch; its losses. Call it
    through `strategy.run` (as `run_steps` does), e.g. in an XLA-compiled function."""
    context = tf.distribute.get_replica_context()
    set_dropblock_step(self.model, self.optimizer.iterations)
    positives = tf.add_n([tf.reduce_sum(tf.cast(w, tf.float32))
                          for w in tf.nest.flatten(labels['box_weights'])])
    global_positives = context.all_reduce(tf.distribute.ReduceOp.SUM, positives)
    # RetinaNetLoss divides by this replica's positives + 1; the global batch's count is wanted.
    share = (positives + 1.0) / (global_positives + 1.0)
    variables = self.model.trainable_variables
    with tf.GradientTape() as tape:
      outputs = self.model(images, training=True)
      losses = {k: v * share for k, v in self.loss_fn(outputs, labels).items()}
      regularization = [tf.cast(l, tf.float32) for l in self.model.losses]
      losses['reg_loss'] = ((tf.add_n(regularization) if regularization else tf.constant(0.0)) /
                            context.num_replicas_in_sync)
      losses['total_loss'] += losses['reg_loss']
      loss = losses['total_loss']
      if isinstance(self.optimizer, tf_keras.mixed_precision.LossScaleOptimizer):
        loss = self.optimizer.get_scaled_loss(loss)
    gradients = tape.gradient(loss, variables)
    if isinstance(self.optimizer, tf_keras.mixed_precision.LossScaleOptimizer):
      gradients = self.optimizer.get_unscaled_gradients(gradients)
    self.optimizer.apply_gradients(zip(gradients, variables))
    return losses

  def train_iterator(self):
    """An iterator over the distributed train dataset, for `run_steps`."""
    return iter(self._train_dataset)

  def run_steps(self, iterator, num_steps: int) -> Dict[str, tf.Tensor]:
    """`num_steps` optimizer steps on batches of `iterator` (`train_iterator()`) in one compiled
    call; the global-batch losses (LOSS_KEYS, then an anytime model's exits') averaged over
    them. What `train` runs between its logs and saves, and the step the benchmark times; it
    neither logs, checks nor saves."""
    return self._run_steps(iterator, tf.constant(num_steps))

  def _run_steps_fn(self, iterator, num_steps):
    totals = {k: tf.constant(0.0) for k in self.loss_keys}
    for _ in tf.range(num_steps):
      images, labels = next(iterator)
      per_replica = self.strategy.run(self.replica_step, args=(images, labels))
      totals = {k: totals[k] + self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica[k],
                                                    axis=None)
                for k in self.loss_keys}
    return {k: v / tf.cast(num_steps, tf.float32) for k, v in totals.items()}

  def _non_finite_variables(self) -> List[str]:
    """Names of the model's float variables holding a NaN or Inf, in model order; batch-norm
    moving statistics included (the training loss never reads them, so it can stay finite)."""
    finite = self._variables_finite().numpy()
    return [v.name for v, ok in zip(self._checked_variables, finite) if not ok]

  def _check_variables(self, first: int, last: int) -> None:
    """Stops the run, naming the first bad variable, when steps first..last broke any."""
    bad = self._non_finite_variables()
    if bad:
      more = f' (and {len(bad) - 1} more, e.g. {", ".join(bad[1:4])})' if len(bad) > 1 else ''
      raise self._diverged(first, last, f'variable {bad[0]} became NaN or Inf{more}')

  def _diverged(self, first: int, last: int, what: str) -> TrainingDivergedError:
    latest = self.checkpointer.latest
    kept = (f'the last good checkpoint is kept: {latest}' if latest else
            'no checkpoint had been written yet')
    in_float32 = (' or train in float32 (RetinaNetTrainer.mixed_precision = None)'
                  if self.mixed_precision else '')
    return TrainingDivergedError(
        f'training diverged: {what} in steps {first}..{last}; stopped without saving this '
        f'state, {kept}. Lower RetinaNetTrainer.learning_rate, lengthen its warm-up, set '
        f'RetinaNetTrainer.clip_gradient_norm{in_float32}.')

  def _save(self, step: int) -> None:
    path = self.checkpointer.save(step)
    self._say(f'Saved checkpoint {path}.')

  def _log(self, step: int, losses: Mapping[str, float], images_per_second: Optional[float]):
    lr = self.learning_rate(step)
    rate = '-' if images_per_second is None else f'{images_per_second:.1f}'
    eta = ('-' if images_per_second is None else
           _duration((self.train_steps - step) * self.global_batch_size / images_per_second))
    exits = ''.join(f' {losses[k]:.4f}' for k in self.loss_keys[len(LOSS_KEYS):])
    self._say(f"step {step}/{self.train_steps} | loss {losses['total_loss']:.4f} "
              f"(cls {losses['cls_loss']:.4f} box {losses['box_loss']:.5f} "
              f"reg {losses['reg_loss']:.4f}){' | exits' + exits if exits else ''} | "
              f"lr {lr:.6g} | {rate} images/s | ETA {eta}")
    with self._train_writer.as_default(step=step):
      for name, value in losses.items():
        tf.summary.scalar(f'loss/{name}', value)
      tf.summary.scalar('learning_rate', lr)
      if images_per_second is not None:
        tf.summary.scalar('images_per_second', images_per_second)
    self._train_writer.flush()

  def _next_stop(self, step: int) -> int:
    """The next step that logs, checkpoints, evaluates or ends, at most steps_per_execution on."""
    stops = [self.train_steps, step + self.steps_per_execution]
    for every in (self.log_every_steps, self.checkpoint_every_steps, self.eval_every_steps):
      if every:
        stops.append((step // every + 1) * every)
    return min(stops)

  def train(self) -> int:
    """Trains from the restored step to `train_steps`; returns the final step."""
    step = self.step
    if step >= self.train_steps:
      self._say(f'Step {step} already reaches RetinaNetTrainer.train_steps={self.train_steps}.')
      return step
    iterator = self.train_iterator()
    # Throughput counts train calls only (not saves or evals), and not the first: it traces.
    timed_seconds, timed_steps, traced = 0.0, 0, False
    checked = step  # Variables were last found finite after this step.
    while step < self.train_steps:
      first, stop = step + 1, self._next_stop(step)
      start = time.perf_counter()
      losses = self.run_steps(iterator, stop - step)
      losses = {k: float(v) for k, v in losses.items()}  # Waits for the steps to finish.
      if traced:
        timed_seconds += time.perf_counter() - start
        timed_steps += stop - step
      traced = True
      step = self.step
      if not all(np.isfinite(v) for v in losses.values()):
        raise self._diverged(first, step, 'the loss became NaN or Inf (' + ', '.join(
            f'{k}={v}' for k, v in losses.items()) + ')')
      saving = step % self.checkpoint_every_steps == 0 or step == self.train_steps
      if step % self.log_every_steps == 0 or saving:
        # A loss can be finite while the update it produced is not: never log or save such a
        # state as if it were good.
        self._check_variables(checked + 1, step)
        checked = step
      if step % self.log_every_steps == 0 or step == self.train_steps:
        self._log(step, losses,
                  timed_steps * self.global_batch_size / timed_seconds if timed_steps else None)
        timed_seconds, timed_steps = 0.0, 0
      if saving:
        self._save(step)
      if (self.mode == 'train_and_eval' and self.eval_every_steps and
          step % self.eval_every_steps == 0 and step < self.train_steps):
        self.evaluate()
    return step

  # Evaluation.

  def evaluate(self) -> Optional[Dict[str, float]]:
    """COCO box metrics of the current weights on the eval set (of the last exit; an anytime
    model's file adds 'exits': {exit: metrics}); the chief writes eval_metrics.json and
    summaries and prints the table. Other workers return None."""
    if not self.is_chief:
      return None
    step = self.step
    by_exit = {}
    last = self.model.num_repeats
    for k, detect in {**self._early_exits, last: self._detect}.items():
      dataset, tta = self._eval_dataset, ''
      if k == last and self._tta_detector is not None:
        self._tta_detector.sync_weights()
        dataset = tta_lib.with_image_info(dataset)
        tta = f' with test-time augmentation ({self.tta.describe()})'
      result = evaluate.evaluate_detector(detect, dataset,
                                          annotation_file=self.eval_annotation_file,
                                          max_batches=self.eval_steps)
      by_exit[str(k)] = result.metrics
      what = (f' of exit {k}' if self.model.anytime else '') + tta
      self._say(f'COCO metrics{what} at step {step} ({result.num_images} images, '
                f'{result.seconds:.1f} s):\n{coco_metrics.format_metrics(result.metrics)}')
    metrics = by_exit[str(last)]
    with self._eval_writer.as_default(step=step):
      for k, exit_metrics in by_exit.items():  # The last exit's as a plain model's.
        prefix = 'coco' if k == str(last) else f'coco_exit{k}'
        for name, value in exit_metrics.items():
          tf.summary.scalar(f'{prefix}/{name}', value)
    self._eval_writer.flush()
    record = dict(metrics, step=step, **({'exits': by_exit} if self.model.anytime else {}))
    if self.tta:
      record['tta'] = {'scales': list(self.tta.scales), 'flip': self.tta.flip}
    files.atomic_write(os.path.join(self.model_dir, METRICS_FILE), json.dumps(record, indent=1))
    return metrics

  def run(self) -> Optional[Dict[str, float]]:
    """Does `mode`: train, eval (the restored checkpoint), or train then eval."""
    if self.mode != 'eval':
      self.train()
    if self.mode != 'train':
      return self.evaluate()
    return None

