"""Checkpoints in the model dir: crash-safe saves, multi-worker aware, clear restore errors.

tf.train.CheckpointManager writes a checkpoint's data files first and only then rewrites the
`checkpoint` index file (atomically, by rename), so a process killed at any moment leaves the
index naming the last complete checkpoint; restores always go through that index.
"""
import ast
import os
import re
import shutil
from typing import Any, Dict, Mapping, Optional

import gin
import tensorflow as tf
import tf_keras

OPERATIVE_CONFIG = 'operative_config.gin'
# The model's own bindings: what a checkpoint's variables depend on.
MODEL_CONFIGURABLE = 'build_retinanet'


class CheckpointMismatchError(ValueError):
  """A model_dir checkpoint that does not fit the model being built (another config)."""


def atomic_write_text(path: str, text: str) -> None:
  """Writes `path` through a temporary file and a rename: readers never see half a file."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with tf.io.gfile.GFile(tmp, 'w') as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def _bindings(config_text: str, configurable: str) -> Dict[str, str]:
  """{parameter: value text} of `configurable` in an operative config (continuations joined)."""
  joined = re.sub(r'\n[ \t]+', ' ', config_text)
  prefix = re.escape(configurable) + r'\.(\w+)\s*=\s*(.*)'
  return {m.group(1): m.group(2).strip() for m in re.finditer(prefix, joined)}


def _plain(value):
  """Tuples as lists, so a gin literal compares equal to the model config's value."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _means(text: str, value: Any) -> bool:
  try:
    return _plain(ast.literal_eval(text)) == _plain(value)
  except (ValueError, SyntaxError):
    return False


def model_config_differences(model_dir: str, model_config: Mapping[str, Any]) -> Optional[str]:
  """The `build_retinanet` bindings that differ between model_dir's operative config (what its
  checkpoints were trained with) and the current gin config; None when there is no record.

  `model_config` (the current model's `get_config()`) gives the values of unbound parameters:
  a binding dropped in favour of an equal default is no change.
  """
  path = os.path.join(model_dir, OPERATIVE_CONFIG)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    before = _bindings(f.read(), MODEL_CONFIGURABLE)
  now = _bindings(gin.operative_config_str(), MODEL_CONFIGURABLE)
  changed = []
  for name in sorted(set(before) | set(now)):
    old, new = before.get(name), now.get(name)
    if old == new or (new is None and _means(old, model_config.get(name))):
      continue
    if new is None:
      new = f'not bound ({model_config.get(name)!r})'
    changed.append(f'  {MODEL_CONFIGURABLE}.{name}: {old or "not bound"} in {path}, now {new}')
  return '\n'.join(changed)


class Checkpointer:
  """Saves and restores a model and its optimizer under `model_dir`, numbered by the step.

  In a multi-worker run every worker must take part in a save (variables are read with
  collectives); only the chief's files are kept, the others write to a scratch folder.
  """

  def __init__(self, model_dir: str, model: tf_keras.Model, optimizer, is_chief: bool = True,
               task_id: int = 0, max_to_keep: int = 5):
    self.model_dir = model_dir
    self._model = model
    self._optimizer = optimizer
    self._checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    self._is_chief = is_chief
    directory = model_dir if is_chief else os.path.join(model_dir, f'.worker{task_id}_tmp')
    self._manager = tf.train.CheckpointManager(self._checkpoint, directory,
                                               max_to_keep=max_to_keep)

  @property
  def latest(self) -> Optional[str]:
    """The last complete checkpoint of the model dir (the one the index names), or None."""
    return tf.train.latest_checkpoint(self.model_dir)

  def restore(self, model_only: bool = False) -> Optional[str]:
    """Restores the latest checkpoint; returns its path (None if there is none).

    For training, every value: call after every variable exists (build the optimizer first),
    since a checkpoint value left over or a variable left unrestored means the checkpoint belongs
    to another config. `model_only` (evaluation): every model weight, and the optimizer's step
    count only, so that optimizer settings need not match.
    """
    path = self.latest
    if path is None:
      return None
    statuses = []
    try:
      if model_only:
        statuses.append(tf.train.Checkpoint(model=self._model).restore(path))
        statuses[-1].assert_existing_objects_matched()
        statuses.append(tf.train.Checkpoint(optimizer=self._optimizer).restore(path))
      else:
        statuses.append(self._checkpoint.restore(path))
        statuses[-1].assert_consumed()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
      raise CheckpointMismatchError(self._mismatch_message(path, e)) from e
    finally:
      for status in statuses:  # Values left unread are reported above, not warned at exit.
        status.expect_partial()
    return path

  def _mismatch_message(self, path: str, error: Exception) -> str:
    lines = [f'checkpoint {path} was trained with another model config than the current gin '
             'config builds.']
    differences = model_config_differences(self.model_dir, self._model.get_config())
    if differences is None:
      lines.append(f'No {OPERATIVE_CONFIG} in the model dir says which config that was.')
    elif differences:
      lines += [f'{MODEL_CONFIGURABLE} bindings that changed since:', differences]
    else:
      lines.append(f'Its {OPERATIVE_CONFIG} has the same {MODEL_CONFIGURABLE} bindings: compare '
                   'the rest of it (e.g. RetinaNetTrainer.mixed_precision).')
    lines += ['Use a fresh --model_dir, or the config it was trained with.',
              f'Restore error: {str(error).strip()[:2000]}']
    return '\n'.join(lines)

  def save(self, step: int) -> str:
    """Writes checkpoint `ckpt-<step>`; returns its path (the chief's)."""
    path = self._manager.save(checkpoint_number=step)
    if not self._is_chief:
      shutil.rmtree(self._manager.directory, ignore_errors=True)
    return path
