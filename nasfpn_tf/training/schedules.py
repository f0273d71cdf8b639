"""Learning-rate schedules of the paper's recipes, gin-configurable, with linear warm-up.

The paper (§4.1) trains with SGD (momentum 0.9, weight decay 1e-4, batch 64) at lr 0.08, decayed
x0.1 at epochs 30 and 40 of 50 (or 120 and 140 of 150 with DropBlock), and uses a cosine schedule
where step decay was unstable. The reference configs add a linear warm-up; TF Model Garden's
RetinaNet recipes warm up for 500 steps from 0.0067, our defaults.

Both schedules are thin wrappers around TF Model Garden's building blocks
(`official.modeling.optimization.lr_schedule`): `LinearWarmup` over
`PiecewiseConstantDecayWithOffset` or `CosineDecayWithOffset`. What they add is the paper's
vocabulary (boundaries and lengths in epochs or steps), gin, and Keras serialization.

Conventions (both schedules take the optimizer's 0-based iteration count as `step`):
- Warm-up: `lr(step) = warmup_lr + step / warmup_steps * (lr_at_warmup_end - warmup_lr)` for
  `step < warmup_steps`, the decayed schedule from `warmup_steps` on (`warmup_steps=0`: none).
- Step decay: a boundary `b` (in steps) means the decayed rate is used from step `b` on, i.e. for
  every update after `b` updates (after epoch 30 has run in full when `b = 30 * steps_per_epoch`).
- Cosine: decays from `base_learning_rate` at the end of warm-up to
  `alpha * base_learning_rate` at `total_steps` and stays there.
- Epochs are converted to steps as `round(epochs * steps_per_epoch)`.
"""
from typing import Optional, Sequence

import gin
import tensorflow as tf
import tf_keras
from official.modeling.optimization import lr_schedule

__all__ = ['StepDecayWithWarmup', 'CosineDecayWithWarmup', 'epochs_to_steps']


def epochs_to_steps(epochs: float, steps_per_epoch: Optional[float], what: str) -> int:
  if steps_per_epoch is None or steps_per_epoch <= 0:
    raise ValueError(f'{what} is given in epochs: steps_per_epoch must be a positive number, '
                     f'got {steps_per_epoch!r}.')
  return int(round(float(epochs) * float(steps_per_epoch)))


def _one_of(epochs, steps, steps_per_epoch, what):
  """Exactly one of `epochs` / `steps`; returns steps (a scalar or a list)."""
  if (epochs is None) == (steps is None):
    raise ValueError(f'Give {what} either in epochs or in steps (exactly one); got '
                     f'epochs={epochs!r}, steps={steps!r}.')
  if steps is not None:
    return [int(s) for s in steps] if isinstance(steps, (list, tuple)) else int(steps)
  if isinstance(epochs, (list, tuple)):
    return [epochs_to_steps(e, steps_per_epoch, what) for e in epochs]
  return epochs_to_steps(epochs, steps_per_epoch, what)


def _check_warmup(warmup_steps, warmup_learning_rate):
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps}.')
  if warmup_learning_rate < 0:
    raise ValueError(f'warmup_learning_rate must be >= 0, got {warmup_learning_rate}.')


def _with_warmup(decay, step, warmup_steps, warmup_learning_rate):
  step = tf.cast(step, tf.float32)
  if warmup_steps <= 0:
    return tf.cast(decay(step) if callable(decay) else decay, tf.float32)
  # Built per call: LinearWarmup evaluates the decay at `warmup_steps` in its constructor, and a
  # tensor made there must belong to the graph (or eager context) that uses it.
  warmup = lr_schedule.LinearWarmup(after_warmup_lr_sched=decay, warmup_steps=warmup_steps,
                                    warmup_learning_rate=warmup_learning_rate)
  return tf.cast(warmup(step), tf.float32)


@gin.configurable
@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class StepDecayWithWarmup(tf_keras.optimizers.schedules.LearningRateSchedule):
  """Piecewise-constant decay by `decay_rate` at each boundary, after a linear warm-up.

  Boundaries go in `boundary_epochs` (with `steps_per_epoch`) or in `boundary_steps`. The paper's
  50-epoch recipe: `StepDecayWithWarmup(0.08, boundary_epochs=[30, 40],
  steps_per_epoch=...)`; with DropBlock, 150 epochs: `boundary_epochs=[120, 140]`.
  """

  def __init__(self,
               base_learning_rate: float = 0.08,
               boundary_epochs: Optional[Sequence[float]] = None,
               boundary_steps: Optional[Sequence[int]] = None,
               steps_per_epoch: Optional[float] = None,
               decay_rate: float = 0.1,
               warmup_steps: int = 500,
               warmup_learning_rate: float = 0.0067,
               name: str = 'StepDecayWithWarmup'):
    super().__init__()
    boundaries = _one_of(None if boundary_epochs is None else list(boundary_epochs),
                         None if boundary_steps is None else list(boundary_steps),
                         steps_per_epoch, 'The step-decay boundaries')
    if any(b < 0 for b in boundaries) or any(
        b1 >= b2 for b1, b2 in zip(boundaries, boundaries[1:])):
      raise ValueError(f'Step-decay boundaries must be >= 0 and strictly increasing, got '
                       f'{boundaries} steps.')
    _check_warmup(warmup_steps, warmup_learning_rate)
    self.base_learning_rate = float(base_learning_rate)
    self.boundary_epochs = None if boundary_epochs is None else [float(e) for e in boundary_epochs]
    self.boundary_steps = None if boundary_steps is None else [int(s) for s in boundary_steps]
    self.steps_per_epoch = steps_per_epoch
    self.decay_rate = float(decay_rate)
    self.warmup_steps = int(warmup_steps)
    self.warmup_learning_rate = float(warmup_learning_rate)
    self.name = name
    self.boundaries = boundaries
    self.values = [self.base_learning_rate * self.decay_rate**i
                   for i in range(len(boundaries) + 1)]
    if boundaries:
      # Keras keeps values[i] while step <= boundaries[i]; `b - 1` makes the decay start at b.
      self._decay = lr_schedule.PiecewiseConstantDecayWithOffset(
          boundaries=[float(b - 1) for b in boundaries], values=self.values, offset=0)
    else:
      self._decay = self.base_learning_rate  # LinearWarmup takes a constant too

  def __call__(self, step):
    with tf.name_scope(self.name):
      return _with_warmup(self._decay, step, self.warmup_steps, self.warmup_learning_rate)

  def get_config(self):
    return {'base_learning_rate': self.base_learning_rate,
            'boundary_epochs': self.boundary_epochs, 'boundary_steps': self.boundary_steps,
            'steps_per_epoch': self.steps_per_epoch, 'decay_rate': self.decay_rate,
            'warmup_steps': self.warmup_steps, 'warmup_learning_rate': self.warmup_learning_rate,
            'name': self.name}


@gin.configurable
@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class CosineDecayWithWarmup(tf_keras.optimizers.schedules.LearningRateSchedule):
  """Cosine decay from `base_learning_rate` (end of warm-up) to `alpha * base` at the end.

  The length, warm-up included, goes in `total_epochs` (with `steps_per_epoch`) or in
  `total_steps`.
  """

  def __init__(self,
               base_learning_rate: float = 0.08,
               total_epochs: Optional[float] = None,
               total_steps: Optional[int] = None,
               steps_per_epoch: Optional[float] = None,
               alpha: float = 0.0,
               warmup_steps: int = 500,
               warmup_learning_rate: float = 0.0067,
               name: str = 'CosineDecayWithWarmup'):
    super().__init__()
    total = _one_of(total_epochs, total_steps, steps_per_epoch, 'The cosine schedule length')
    _check_warmup(warmup_steps, warmup_learning_rate)
    if total <= warmup_steps:
      raise ValueError(f'The cosine schedule lasts {total} steps, not more than its '
                       f'{warmup_steps} warm-up steps.')
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f'alpha must be in [0, 1], got {alpha}.')
    self.base_learning_rate = float(base_learning_rate)
    self.total_epochs = None if total_epochs is None else float(total_epochs)
    self.total_steps = None if total_steps is None else int(total_steps)
    self.steps_per_epoch = steps_per_epoch
    self.alpha = float(alpha)
    self.warmup_steps = int(warmup_steps)
    self.warmup_learning_rate = float(warmup_learning_rate)
    self.name = name
    self.total = total
    self._decay = lr_schedule.CosineDecayWithOffset(
        offset=self.warmup_steps, initial_learning_rate=self.base_learning_rate,
        decay_steps=total - self.warmup_steps, alpha=self.alpha)

  def __call__(self, step):
    with tf.name_scope(self.name):
      return _with_warmup(self._decay, step, self.warmup_steps, self.warmup_learning_rate)

  def get_config(self):
    return {'base_learning_rate': self.base_learning_rate, 'total_epochs': self.total_epochs,
            'total_steps': self.total_steps, 'steps_per_epoch': self.steps_per_epoch,
            'alpha': self.alpha, 'warmup_steps': self.warmup_steps,
            'warmup_learning_rate': self.warmup_learning_rate, 'name': self.name}
