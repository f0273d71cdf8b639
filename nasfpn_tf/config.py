"""Gin: the one place that registers every configurable, and parsing with errors that name the
file or binding at fault.

Gin files hold no `import` lines and no module imports another just to register names:
`register_configurables` makes every name of the layers below the search known before a parse.
The search registers its own names (`nasfpn_tf.search.configurables`, whose `parse_gin` parses
configurations that bind them): this module imports nothing above training, so nothing imports
back into it in a cycle.
"""
import logging
import pathlib
from typing import Sequence

import gin

GIN_CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / 'gin_configs'


def register_configurables() -> None:
  """Makes the gin names of data, models and training known (idempotent: modules import once).

  Imported here, on the first parse, rather than with this module: a module that imports config
  (export) loads training only when it parses a config that binds its names.
  """
  # pylint: disable=g-import-not-at-top,unused-import
  from nasfpn_tf.data import input_pipeline  # noqa: F401  build_train/eval_dataset
  from nasfpn_tf.models import factory  # noqa: F401  build_retinanet
  from nasfpn_tf.models import losses  # noqa: F401  RetinaNetLoss
  from nasfpn_tf.training import recipes  # noqa: F401  steps_per_epoch, batch_scaled
  from nasfpn_tf.training import schedules  # noqa: F401  StepDecay/CosineDecayWithWarmup
  from nasfpn_tf.training import trainer  # noqa: F401  RetinaNetTrainer


class _IncludeProbeFilter(logging.Filter):
  """Drops gin's 'Path not found' error for an `include` it goes on to find on a search path
  (it probes the name as a Python package first); a file found nowhere still fails, naming it."""

  def filter(self, record):
    return not (record.pathname.endswith('resource_reader.py') and
                record.getMessage().startswith('Path not found:'))


_INCLUDE_PROBE_FILTER = _IncludeProbeFilter()


def parse_gin(gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = ()) -> None:
  """Clears gin, then parses `gin_files` in order and `gin_bindings` (later ones win).

  A file is a path, or a name in gin_configs/ ('demo.gin'). Unknown configurables or parameters
  (a misspelled binding) raise ValueError naming the file or binding. Files can `include` others
  by path relative to themselves or to gin_configs/.
  """
  register_configurables()
  logging.getLogger().addFilter(_INCLUDE_PROBE_FILTER)  # Once: a filter is added only once.
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN_CONFIGS_DIR))
  for name in gin_files:
    path = pathlib.Path(name)
    if not path.exists() and (GIN_CONFIGS_DIR / path).exists():
      path = GIN_CONFIGS_DIR / path
    if not path.exists():
      raise ValueError(f'gin file {str(name)!r} not found (nor in {GIN_CONFIGS_DIR}).')
    gin.add_config_file_search_path(str(path.resolve().parent))
    try:
      gin.parse_config_file(str(path))
    except Exception as e:  # gin raises several types; all mean this file is at fault.
      raise ValueError(f'gin file {str(name)!r}: {e}') from e
  for binding in gin_bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:
      raise ValueError(f'gin binding {binding!r}: {e}') from e
