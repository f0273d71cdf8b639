r"""What one CPU-proxy trial costs with this checkout's code against --baseline_ref's, side by side.

  .venv/bin/python experiments/trial_cost.py --work_dir=runs/compare_fast/proxy --rounds=2

Each version (the package and gin files of git --baseline_ref, "before"; this checkout, "after")
runs `proxy.run_trial` on the default CPU proxy (gin_configs/search_proxy_cpu.gin plus
--gin_bindings) for each of --architectures, one after another in one process, as a reused Ray
worker runs trial after trial; the versions alternate for --rounds rounds, so both see the same
machine and load. The proxy cache in --work_dir is shared (the first trial builds it when
missing; give an existing search's `proxy` folder to skip that).

Prints a JSON line per trial (version, round, architecture, seconds: `TrialResult.seconds`, ap,
heldout_loss) and a summary: per version the mean seconds of each process's first trial (imports
and autograph's first conversions) and of the later ones, the later ones' ratio after/before,
and per architecture the range of ap each version measured. Those need not be equal even for one
version: a trial replays its numbers within a process, but trainings in two processes drift apart
after a few steps (the XLA-compiled focal loss, docs/results.md), so whether a cut changes what a
trial measures is for a test on the same trained weights (as tests/test_search_own_data.py
checks the one-pass evaluation), not for this script.
"""
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

# trial_overhead's checkout of a git ref, also when this file is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import trial_overhead  # noqa: E402

FLAGS = flags.FLAGS

TRIAL_CODE = '''
import json, sys
from nasfpn_tf.search import proxy
work_dir, bindings, architectures = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
for name in architectures:
  result = proxy.run_trial(name, 'cpu', seed=0, work_dir=work_dir, gin_bindings=bindings,
                           num_threads=None)
  print('TRIAL ' + json.dumps({'architecture': name, 'seconds': result.seconds, 'ap': result.ap,
                               'heldout_loss': result.heldout_loss}), flush=True)
'''


def define_flags():
  flags.DEFINE_string('work_dir', None, 'The proxy cache folder (a search\'s `proxy` folder); '
                      'default: a temporary one, built by the first trial.')
  flags.DEFINE_string('baseline_ref', 'HEAD', 'Git ref of the "before" code.')
  flags.DEFINE_list('architectures', ['nasfpn', 'fpn', 'nasfpn'],
                    'Tables of block_specs.SPECS trained one after another in each process.')
  flags.DEFINE_integer('rounds', 2, 'Processes per version, alternating.')
  flags.DEFINE_multi_string('gin_bindings', [], 'Bindings on top of the proxy\'s gin file.')


def run_version(root: pathlib.Path, work_dir: str, bindings: List[str],
                architectures: List[str]) -> List[Dict[str, Any]]:
  """One process of the code under `root`: its trials' lines, in order."""
  output = subprocess.run(
      [sys.executable, '-c', TRIAL_CODE, work_dir, json.dumps(bindings), *architectures],
      cwd=root, env=trial_overhead.version_env(root), capture_output=True, text=True,
      check=True, timeout=3600).stdout
  return [json.loads(line[len('TRIAL '):]) for line in output.splitlines()
          if line.startswith('TRIAL ')]


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
  """Mean seconds per version (first trial of a process, later ones), the ratio of the later
  ones, and the range of ap per architecture and version."""
  result: Dict[str, Any] = {}
  for version in ('before', 'after'):
    mine = [r for r in rows if r['version'] == version]
    first = [r['seconds'] for r in mine if r['index'] == 0]
    later = [r['seconds'] for r in mine if r['index'] > 0]
    result[version] = {'first_trial_s': round(statistics.mean(first), 1),
                       'later_trials_s': round(statistics.mean(later), 1) if later else None}
  if result['before']['later_trials_s'] and result['after']['later_trials_s']:
    result['later_ratio_after_before'] = round(
        result['after']['later_trials_s'] / result['before']['later_trials_s'], 3)
  for name in dict.fromkeys(r['architecture'] for r in rows):
    result[f'ap_{name}'] = {
        version: [round(min(aps), 4), round(max(aps), 4)]
        for version in ('before', 'after')
        for aps in [[r['ap'] for r in rows if r['version'] == version and
                     r['architecture'] == name]] if aps}
  return result


def main(argv):
  del argv
  repo = trial_overhead.REPO
  with tempfile.TemporaryDirectory() as scratch:
    before = trial_overhead.checkout(FLAGS.baseline_ref, pathlib.Path(scratch) / 'before')
    # Absolute: each version's process runs in its own code's folder.
    work_dir = os.path.abspath(FLAGS.work_dir or os.path.join(scratch, 'proxy'))
    rows = []
    for round_index in range(FLAGS.rounds):
      for version, root in (('before', before), ('after', repo)):
        for index, row in enumerate(run_version(root, work_dir, FLAGS.gin_bindings,
                                                FLAGS.architectures)):
          row.update(version=version, round=round_index, index=index)
          print(json.dumps(row), flush=True)
          rows.append(row)
  print(json.dumps({'summary': summary(rows), 'cpu_count': os.cpu_count(),
                    'baseline_ref': FLAGS.baseline_ref}), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
