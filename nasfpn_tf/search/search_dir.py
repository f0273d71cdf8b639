"""A search dir's layout, in one place, and the check that a dir holds the run asked for.

The search (`runner`, the CLI `python -m nasfpn_tf.search`, `progress`), the proxy gate
(`experiments/search_proxy_gate.py`), the experiments that read searches and the tests name the
files of a search dir through these constants, never by a string of their own:

  search.json          IDENTITY_FILE: what the search is; a rerun with other settings is refused
  trials.jsonl         TRIALS_FILE: the journal (`journal.Journal`), one line per finished sample
  controller.pkl       CONTROLLER_FILE: the controller's state after the last line it has seen
  results/             RESULTS_DIR: one file per trained key (`journal.ResultStore`)
  best.gin             BEST_GIN: the best architecture so far, as a gin binding
  search_progress.png  PROGRESS_PNG: the paper's Fig. 5
  architectures/       ARCHITECTURES_DIR: a drawing of each new best
  ray_results/         RAY_RESULTS_DIR: Ray Tune's trial logs
  proxy/               PROXY_DIR: what the trials share (the CPU proxy's cache) by default

A proxy gate dir holds TRIALS_FILE (its journal), GATE_IDENTITY_FILE and GATE_PNG.

`check_identity` writes a dir's identity (a JSON dict of the settings that must not change
within one run) on its first run and refuses a later run with other settings, naming them. Pure
Python: the search driver loads it without TensorFlow.
"""
import json
import pathlib
from typing import Any, Mapping, Optional

from nasfpn_tf.utils.files import atomic_write

IDENTITY_FILE = 'search.json'
TRIALS_FILE = 'trials.jsonl'
CONTROLLER_FILE = 'controller.pkl'
RESULTS_DIR = 'results'
BEST_GIN = 'best.gin'
PROGRESS_PNG = 'search_progress.png'
ARCHITECTURES_DIR = 'architectures'
RAY_RESULTS_DIR = 'ray_results'
PROXY_DIR = 'proxy'
# The proxy gate's dir: its journal is TRIALS_FILE too.
GATE_IDENTITY_FILE = 'gate_config.json'
GATE_PNG = 'gate.png'


def check_identity(directory, identity: Mapping[str, Any], record: bool = True,
                   defaults: Optional[Mapping[str, Any]] = None,
                   file_name: str = IDENTITY_FILE, what: str = 'search',
                   flag: str = '--search_dir') -> None:
  """Refuses `directory` when its `file_name` records another identity than `identity`, naming
  each setting that differs (recorded and asked) and `flag`; with `record`, writes `identity`
  into a dir that has none yet. A setting newer than the file counts at its value in `defaults`
  (None when it has none there).

  what: the run the dir holds, for the message ('search', 'proxy gate').
  """
  path = pathlib.Path(directory) / file_name
  identity = json.loads(json.dumps(dict(identity)))  # as the file would read it back
  if not path.exists():
    if record:
      atomic_write(path, json.dumps(identity, indent=2, sort_keys=True))
    return
  try:
    recorded = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f'{path} is not JSON ({e}); it records what the {what} in {directory} '
                     f'is: restore it, or use a new {flag}.') from e
  defaults = dict(defaults or {})
  differences = {}
  for name, value in identity.items():
    old = recorded[name] if name in recorded else defaults.get(name)
    if old != value:
      differences[name] = (old, value)
  if differences:
    listed = '; '.join(f'{name}: recorded {old!r}, asked {new!r}'
                       for name, (old, new) in sorted(differences.items()))
    raise ValueError(f'{directory} holds another {what} ({path}): {listed}. Use a new {flag}, '
                     'or the settings it was started with.')
