"""The model dir's checkpoints and the record of their model config: crash-safe saves,
multi-worker aware, restore errors that name what changed.

tf.train.CheckpointManager writes a checkpoint's data files first and only then rewrites the
`checkpoint` index file (atomically, by rename), so a process killed at any moment leaves the
index naming the last complete checkpoint; restores always go through that index.

Below training and export, which both restore: it imports no other module of the package.
"""
import ast
import json
import os
import re
import shutil
from typing import Any, Dict, Mapping, Optional

import gin
import tensorflow as tf
import tf_keras

from nasfpn_tf.utils import files

# The model's config (`RetinaNet.get_config()`) its checkpoints were trained with, as JSON.
MODEL_CONFIG = 'model_config.json'
# Every setting of the run; the only record in model dirs older than MODEL_CONFIG.
OPERATIVE_CONFIG = 'operative_config.gin'
# The configurable whose arguments are the model config: what a checkpoint's variables depend on.
MODEL_CONFIGURABLE = 'build_retinanet'


# Arguments a model config leaves out at these defaults (RetinaNet.get_config omits the anytime
# ones of a plain model and soft_nms_sigma when off, so records of before them stay equal).
OMITTED_DEFAULTS = {'anytime': False, 'anytime_shared_head': True, 'anytime_loss_weights': None,
                    'soft_nms_sigma': 0.0}


# FCOS's arguments: RetinaNet.get_config leaves them out of a RetinaNet's config.
OMITTED_DEFAULTS.update({'detector': 'retinanet', 'fcos_range_bounds': None,
                         'fcos_center_sampling_radius': 1.5, 'fcos_norm_groups': 32,
                         'fcos_centerness_on_reg': True})


class CheckpointMismatchError(ValueError):
  """A model_dir checkpoint that does not fit the model being built (another config)."""


def write_model_config(model_dir: str, model_config: Mapping[str, Any]) -> None:
  """Records `model_config` (the model's `get_config()`) as model_dir's MODEL_CONFIG."""
  files.atomic_write(os.path.join(model_dir, MODEL_CONFIG),
                     json.dumps(model_config, indent=1, sort_keys=True) + '\n')


def read_model_config(model_dir: str) -> Optional[Dict[str, Any]]:
  """model_dir's recorded model config; None when the dir has no MODEL_CONFIG (older dirs)."""
  path = os.path.join(model_dir, MODEL_CONFIG)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      model_config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not a JSON model config ({e}).') from e
  if not isinstance(model_config, dict):
    raise ValueError(f'{path}: expected a JSON object of RetinaNet arguments, got '
                     f'{str(model_config)[:200]}.')
  return model_config


def _plain(value):
  """Tuples as lists, so a config value compares equal to its JSON or gin literal."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _recorded_differences(path: str, recorded: Mapping[str, Any],
                          model_config: Mapping[str, Any]) -> str:
  """A line per argument whose value in `recorded` (read from `path`) differs from now."""
  recorded, model_config = ({**OMITTED_DEFAULTS, **config} for config in (recorded, model_config))
  changed = []
  for name in sorted(set(recorded) | set(model_config)):
    old, new = _plain(recorded.get(name)), _plain(model_config.get(name))
    if name in recorded and name in model_config and old == new:
      continue
    old_text = json.dumps(old) if name in recorded else 'not recorded'
    new_text = json.dumps(new) if name in model_config else 'no longer an argument'
    changed.append(f'  {MODEL_CONFIGURABLE}.{name}: {old_text} in {path}, now {new_text}')
  return '\n'.join(changed)


def _bindings(config_text: str, configurable: str) -> Dict[str, str]:
  """{parameter: value text} of `configurable` in an operative config (continuations joined)."""
  joined = re.sub(r'\n[ \t]+', ' ', config_text)
  prefix = re.escape(configurable) + r'\.(\w+)\s*=\s*(.*)'
  return {m.group(1): m.group(2).strip() for m in re.finditer(prefix, joined)}


def _means(text: str, value: Any) -> bool:
  try:
    return _plain(ast.literal_eval(text)) == _plain(value)
  except (ValueError, SyntaxError):
    return False


def _operative_differences(path: str, model_config: Mapping[str, Any]) -> str:
  """The `build_retinanet` bindings of the operative config at `path` that the current gin
  config changed; `model_config` gives the values of unbound parameters (a binding dropped in
  favour of an equal default is no change)."""
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


def model_config_differences(model_dir: str, model_config: Mapping[str, Any]) -> Optional[str]:
  """What differs between the model config model_dir's checkpoints were trained with and
  `model_config` (the current model's `get_config()`), a line per argument; None when the model
  dir has no record.

  The record is MODEL_CONFIG; in a model dir without one, the `build_retinanet` bindings of its
  OPERATIVE_CONFIG, compared with the current gin config's.
  """
  recorded = read_model_config(model_dir)
  if recorded is not None:
    return _recorded_differences(os.path.join(model_dir, MODEL_CONFIG), recorded, model_config)
  path = os.path.join(model_dir, OPERATIVE_CONFIG)
  if tf.io.gfile.exists(path):
    return _operative_differences(path, model_config)
  return None


def _heads_layout(model_config: Mapping[str, Any]):
  """(anytime, one head shared by the exits) of a model config. A plain model's variables are
  those of an anytime model with a shared head, and an anytime model with a head per exit holds
  those too: restores cannot tell these apart, the recorded config can."""
  config = {**OMITTED_DEFAULTS, **model_config}
  return bool(config['anytime']), bool(config['anytime'] and config['anytime_shared_head'])


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
    recorded = read_model_config(self.model_dir)
    if (recorded is not None and
        _heads_layout(recorded) != _heads_layout(self._model.get_config())):
      raise CheckpointMismatchError(self._mismatch_message(path, ValueError(
          'the checkpoint holds the heads of another anytime setting (its variables may fit, '
          'their meaning does not).')))
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
      lines.append(f'No {MODEL_CONFIG} or {OPERATIVE_CONFIG} in the model dir says which config '
                   'that was.')
    elif differences:
      lines += [f'{MODEL_CONFIGURABLE} arguments that changed since:', differences]
    else:
      lines.append(f'Its record has the same {MODEL_CONFIGURABLE} arguments: compare the rest of '
                   f'its {OPERATIVE_CONFIG} (e.g. RetinaNetTrainer.mixed_precision).')
    lines += ['Use a fresh --model_dir, or the config it was trained with.',
              f'Restore error: {str(error).strip()[:2000]}']
    return '\n'.join(lines)

  def save(self, step: int) -> str:
    """Writes checkpoint `ckpt-<step>`; returns its path (the chief's)."""
    path = self._manager.save(checkpoint_number=step)
    if not self._is_chief:
      shutil.rmtree(self._manager.directory, ignore_errors=True)
    return path
