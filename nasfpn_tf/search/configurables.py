"""The search's gin names and the one parse of a configuration that may bind them.

`config.register_configurables` registers the names of the layers below the search (data,
models, training) and imports nothing of the search: a lower layer never imports a higher one.
Importing this module registers the search's own names (`PPOController`, `EvolutionController`,
`CpuProxy`, `CpuProxyCache`, `reward`) beside them, so every parse of a configuration that a
search, a proxy trial or an experiment driving them reads goes through `parse_gin` here.
"""
from typing import Sequence

from nasfpn_tf import config
# pylint: disable=unused-import  Imported for their gin names.
from nasfpn_tf.search import controllers  # noqa: F401  EvolutionController/PPOController
from nasfpn_tf.search import cpu_proxy  # noqa: F401  CpuProxy
from nasfpn_tf.search import feature_cache  # noqa: F401  CpuProxyCache
from nasfpn_tf.search import rewards  # noqa: F401  reward


def parse_gin(gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = ()) -> None:
  """`config.parse_gin` with the search's names known: clears gin, parses `gin_files` then
  `gin_bindings` (later ones win); ValueError naming the file or binding at fault."""
  config.parse_gin(gin_files, gin_bindings)
