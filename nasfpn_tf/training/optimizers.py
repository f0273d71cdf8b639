"""The trainer's optimizer by name: SGD with momentum (the paper's) or AdamW.

`build` is the one place a training optimizer is made from `RetinaNetTrainer`'s bindings;
`check` names the binding at fault before anything is built.
"""
from typing import Optional, Union

import tf_keras

OPTIMIZERS = ('sgd', 'adamw')
# Variables AdamW does not decay (matched in variable names), as TF Model Garden's AdamW
# leaves batch-norm scales and offsets and biases alone.
NO_WEIGHT_DECAY = ('gamma', 'beta', 'bias')


def check(optimizer: str, weight_decay: float) -> None:
  """Fails naming the binding for an unknown optimizer or a weight decay it does not take."""
  if optimizer not in OPTIMIZERS:
    raise ValueError(
        f'RetinaNetTrainer.optimizer = {optimizer!r} is not one of {list(OPTIMIZERS)}.')
  if weight_decay < 0 or (weight_decay and optimizer != 'adamw'):
    raise ValueError(
        f'RetinaNetTrainer.weight_decay = {weight_decay} needs optimizer = \'adamw\' and a value '
        ">= 0; SGD's weight decay is build_retinanet.l2_weight_decay.")


def build(optimizer: str,
          learning_rate: Union[float, tf_keras.optimizers.schedules.LearningRateSchedule],
          momentum: float, weight_decay: float,
          clip_gradient_norm: Optional[float]) -> tf_keras.optimizers.Optimizer:
  """SGD(learning_rate, momentum) or AdamW(learning_rate, weight_decay; Keras's betas), both
  clipping the summed gradients to `clip_gradient_norm` when given."""
  check(optimizer, weight_decay)
  if optimizer == 'adamw':
    adamw = tf_keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay,
                                      global_clipnorm=clip_gradient_norm)
    adamw.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    return adamw
  return tf_keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum,
                                 global_clipnorm=clip_gradient_norm)
