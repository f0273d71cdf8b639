"""Gin parsing with errors that name the file or binding at fault."""
import pathlib
from typing import Sequence

import gin

# Registers the configurables the model gin files bind.
import nasfpn_tf.models  # noqa: F401  pylint: disable=unused-import

GIN_CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / 'gin_configs'


def parse_gin(gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = ()) -> None:
  """Clears gin, then parses `gin_files` in order and `gin_bindings` (later ones win).

  Unknown configurables or parameters (a misspelled binding) raise ValueError naming the file
  or binding. Files can `include` others by path relative to themselves or to gin_configs/.
  """
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN_CONFIGS_DIR))
  for path in gin_files:
    gin.add_config_file_search_path(str(pathlib.Path(path).resolve().parent))
    try:
      gin.parse_config_file(str(path))
    except Exception as e:  # gin raises several types; all mean this file is at fault.
      raise ValueError(f'gin file {str(path)!r}: {e}') from e
  for binding in gin_bindings:
    try:
      gin.parse_config(binding)
    except Exception as e:
      raise ValueError(f'gin binding {binding!r}: {e}') from e
