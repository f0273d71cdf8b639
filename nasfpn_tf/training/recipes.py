"""The numbers of the paper's COCO recipes (gin_configs/recipe_*.gin) that gin cannot compute,
and `resolved_run`: what a parsed config would train, for `--mode=show_config`.

The paper (§4.1) trains with batch 64 at lr 0.08 for 50 epochs of COCO train2017. A recipe binds
the batch once (GLOBAL_BATCH_SIZE); `steps_per_epoch` turns epochs into steps for that batch, and
`batch_scaled` scales the paper's learning rates linearly with it (the linear scaling rule,
Goyal et al. 2017): 0.08 at 64 images is 0.02 at 16.
"""
import inspect
import math
from typing import Any, Dict

import gin

from nasfpn_tf.models import factory
from nasfpn_tf.training import schedules
from nasfpn_tf.training.trainer import RetinaNetTrainer

COCO_TRAIN2017_IMAGES = 118287
PAPER_BATCH_SIZE = 64


@gin.configurable
def steps_per_epoch(global_batch_size: int = PAPER_BATCH_SIZE,
                    num_train_images: int = COCO_TRAIN2017_IMAGES) -> int:
  """Steps of `global_batch_size` images that cover `num_train_images` once (the last batch
  rounded up): 1849 for COCO train2017 at batch 64."""
  if global_batch_size < 1 or num_train_images < 1:
    raise ValueError(f'steps_per_epoch: global_batch_size ({global_batch_size}) and '
                     f'num_train_images ({num_train_images}) must be >= 1.')
  return math.ceil(num_train_images / global_batch_size)


@gin.configurable
def steps_for_epochs(epochs: float,
                     steps_per_epoch: int) -> int:  # pylint: disable=redefined-outer-name
  """`epochs` passes of `steps_per_epoch` steps, e.g. the train_steps of a recipe."""
  return schedules.epochs_to_steps(epochs, steps_per_epoch, 'steps_for_epochs')


@gin.configurable
def batch_scaled(learning_rate: float, global_batch_size: int = PAPER_BATCH_SIZE,
                 reference_batch_size: int = PAPER_BATCH_SIZE) -> float:
  """`learning_rate`, tuned for `reference_batch_size` images, at `global_batch_size`."""
  return float(learning_rate) * global_batch_size / reference_batch_size


def _bound(configurable, name: str) -> Dict[str, Any]:
  """{parameter: value} of `configurable` under the parsed gin config: its bindings (references
  evaluated), else its defaults."""
  defaults = {n: p.default for n, p in inspect.signature(configurable).parameters.items()
              if p.default is not inspect.Parameter.empty}
  return {**defaults, **gin.get_bindings(name)}


def _rounded(value: float) -> float:
  """A float32 learning rate as the decimal it stands for (0.008, not 0.00800000037997961)."""
  return float(f'{value:.6g}')


def learning_rate_milestones(learning_rate) -> Dict[int, float]:
  """{step: lr} at step 0, at the end of warm-up, from each decay boundary on, and at the end of
  a cosine: where a schedule changes course."""
  if not callable(learning_rate):
    return {0: _rounded(float(learning_rate))}
  steps = {0, getattr(learning_rate, 'warmup_steps', 0)}
  steps.update(getattr(learning_rate, 'boundaries', ()))
  steps.add(getattr(learning_rate, 'total', 0))
  return {step: _rounded(float(learning_rate(step))) for step in sorted(steps)}


def resolved_run(count_params: bool = True) -> Dict[str, Any]:
  """The run the parsed gin config describes: length, batch, optimizer, precision, the learning
  rate at its milestones, the input size and (`count_params`: builds the model, no data, no
  training) the parameter count."""
  trainer = _bound(RetinaNetTrainer.__init__, 'RetinaNetTrainer')
  if trainer['learning_rate'] is None:
    raise ValueError('gin binding RetinaNetTrainer.learning_rate is required, e.g. '
                     '--gin_file=recipe_coco_50ep.gin')
  run = {
      'train_steps': trainer['train_steps'],
      'global_batch_size': trainer['global_batch_size'],
      'l2_weight_decay': factory.model_argument('l2_weight_decay'),
      'momentum': trainer['momentum'],
      'mixed_precision': trainer['mixed_precision'],
      'learning_rate': learning_rate_milestones(trainer['learning_rate']),
      'image_size': list(factory.model_argument('image_size')),
      'init_checkpoint': trainer['init_checkpoint'],
      'init_checkpoint_modules': trainer['init_checkpoint_modules'],
  }
  if count_params:
    run['num_params'] = factory.build_retinanet().count_params()
  return run
