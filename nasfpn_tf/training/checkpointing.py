"""Checkpoints in the model dir: crash-safe saves, multi-worker aware, clear restore errors.

tf.train.CheckpointManager writes a checkpoint's data files first and only then rewrites the
`checkpoint` index file (atomically, by rename), so a process killed at any moment leaves the
index naming the last complete checkpoint; restores always go through that index.
"""
import os
import re
import shutil
from typing import Dict, Optional

import gin
import tensorflow as tf

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


def model_config_differences(model_dir: str) -> Optional[str]:
  """The `build_retinanet` bindings that differ between model_dir's operative config (what its
  checkpoints were trained with) and the current gin config; None when there is no record."""
  path = os.path.join(model_dir, OPERATIVE_CONFIG)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    before = _bindings(f.read(), MODEL_CONFIGURABLE)
  now = _bindings(gin.operative_config_str(), MODEL_CONFIGURABLE)
  changed = [f'  {MODEL_CONFIGURABLE}.{name}: {before.get(name, "(default)")} in {path}, now '
             f'{now.get(name, "(default)")}'
             for name in sorted(set(before) | set(now)) if before.get(name) != now.get(name)]
  return '\n'.join(changed)


class Checkpointer:
  """Saves and restores `checkpoint` under `model_dir`, numbered by the training step.

  In a multi-worker run every worker must take part in a save (variables are read with
  collectives); only the chief's files are kept, the others write to a scratch folder.
  """

  def __init__(self, model_dir: str, checkpoint: tf.train.Checkpoint, is_chief: bool = True,
               task_id: int = 0, max_to_keep: int = 5):
    self.model_dir = model_dir
    self._checkpoint = checkpoint
    self._is_chief = is_chief
    directory = model_dir if is_chief else os.path.join(model_dir, f'.worker{task_id}_tmp')
    self._manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=max_to_keep)

  @property
  def latest(self) -> Optional[str]:
    """The last complete checkpoint of the model dir (the one the index names), or None."""
    return tf.train.latest_checkpoint(self.model_dir)

  def restore(self) -> Optional[str]:
    """Restores the latest checkpoint, every variable of it; returns its path (None if none).

    Call after every variable exists (build the optimizer first): a checkpoint value left over or
    a variable left unrestored means the checkpoint belongs to another model config.
    """
    path = self.latest
    if path is None:
      return None
    try:
      self._checkpoint.restore(path).assert_consumed()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
      differences = model_config_differences(self.model_dir)
      if differences is None:
        why = f'no {OPERATIVE_CONFIG} in the model dir says which config that was'
      elif differences:
        why = f'{MODEL_CONFIGURABLE} bindings changed since:\n{differences}\n'
      else:
        why = (f'its {OPERATIVE_CONFIG} has the same {MODEL_CONFIGURABLE} bindings: compare '
               'the rest of it (e.g. RetinaNetTrainer.mixed_precision)')
      raise CheckpointMismatchError(
          f'checkpoint {path} was trained with another model config than the current gin '
          f'config builds; {why}. Use a fresh --model_dir, or the config it was trained with.\n'
          f'Restore error: {str(e).strip()[:2000]}') from e
    return path

  def save(self, step: int) -> str:
    """Writes checkpoint `ckpt-<step>`; returns its path (the chief's)."""
    path = self._manager.save(checkpoint_number=step)
    if not self._is_chief:
      shutil.rmtree(self._manager.directory, ignore_errors=True)
    return path
