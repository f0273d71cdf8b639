"""Gin parsing with errors that name the file or binding at fault."""
import pathlib
from typing import Sequence

import gin

# Registers the configurables the model gin files bind.
import nasfpn_tf.models  # noqa: F401  pylint: disable=unused-import

GIN_CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / 'gin_configs'


def parse_gin(gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = ()) -> None:
  """Clears gin, then parses `gin_files` in order and `gin_bindings` (later ones win).

  A file is a path, or a name in gin_configs/ ('demo.gin'). Unknown configurables or parameters
  (a misspelled binding) raise ValueError naming the file or binding. Files can `include` others
  by path relative to themselves or to gin_configs/.
  """
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
