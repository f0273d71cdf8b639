"""What a Ray trial of the search costs around the proxy's work, before and after the cuts.

Runs short searches (`python -m nasfpn_tf.search --proxy=synthetic`, trials that only wait
--synthetic_seconds) with the code of --baseline_ref (`git archive`, "before") and of this
checkout ("after"), alternating, in the same run, so that the ratio is measured on the same
machine under the same load:

  .venv/bin/python experiments/trial_overhead.py --num_trials=16 --synthetic_seconds=0.5
  .venv/bin/python experiments/trial_overhead.py --beside_tf_load   # with a TF conv loop beside

Trials run one at a time by default (--cpus_per_trial = the CPU count, all Ray gets), so the
overhead per sample is the wall time per sample minus the seconds the trainable itself took (the
journal's `seconds`). Printed per search (one JSON row each):
- `startup_s`: launch to the first sample, less that trial's own seconds (Ray, TensorFlow and
  the controller in the driver; the first worker);
- `overhead_per_sample_s`: (last sample - first sample) / (samples - 1) - mean trial seconds of
  those samples: the steady cost of a sample;
- `workers`: distinct worker processes that ran the trained trials (Tune's result.json `pid`).
and per code version, measured apart in fresh processes of that version:
- `import_trials_s`: what a fresh worker imports to unpickle the trainable
  (`nasfpn_tf.search.trials`); `import_ray_tune_s`: `import ray; from ray import tune`;
- `driver_per_sample_s[algorithm]`: the searcher's own work per sample without Ray (propose,
  journal line with fsync, controller state, progress line and drawings), as
  `training_helpers.drive_in_process` drives it.
The last line sums it up: overhead per sample before and after and their ratio, beside the
parts measured apart (the driver's work per sample; the worker imports spread over the samples by
workers started per sample). The parts are measured in other processes at other moments: on a
machine whose load changes they show sizes, not terms that add up to the overhead.
"""
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from absl import app, flags

from nasfpn_tf.search import search_dir as search_dir_lib  # file names only, no TensorFlow
from nasfpn_tf.search.journal import Journal  # no TensorFlow either

REPO = pathlib.Path(__file__).resolve().parents[1]
# main before the trial-overhead cuts (workers reused across trials, no TensorFlow in a worker
# that trains nothing).
BEFORE_CUTS = '00011ce'
# A CPU-bound TensorFlow process with TensorFlow's default thread pools (one thread per core):
# what a busy machine (another test worker, a training) looks like to the search.
TF_LOAD = ('import tensorflow as tf\n'
           'x = tf.random.normal([8, 96, 96, 64]); w = tf.random.normal([3, 3, 64, 64])\n'
           'while True:\n'
           '  tf.nn.conv2d(x, w, 1, "SAME").numpy()\n')
TRIAL_LINE = re.compile(r'^trial (\d+)/\d+ \|')

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer('num_trials', 16, 'Samples per search.')
  flags.DEFINE_float('synthetic_seconds', 0.5, 'Seconds each trial waits (its "training").')
  flags.DEFINE_list('algorithms', ['ppo', 'evolution'], 'Controllers to measure.')
  flags.DEFINE_string('baseline_ref', BEFORE_CUTS, 'Git ref of the "before" code.')
  flags.DEFINE_integer('repeats', 1, 'Searches per (version, algorithm), interleaved.')
  flags.DEFINE_float('cpus_per_trial', os.cpu_count(), 'CPUs per trial (default: all, so that '
                     'trials run one at a time).')
  flags.DEFINE_bool('beside_tf_load', False, 'Run a CPU-bound TensorFlow process beside it.')
  flags.DEFINE_string('output_dir', None, 'Where the searches go (default: a temporary dir).')


def version_env(root: pathlib.Path) -> Dict[str, str]:
  """The environment that runs the nasfpn_tf under `root` (PYTHONPATH precedes the editable
  install; Ray's workers inherit it from the driver)."""
  return dict(os.environ, PYTHONPATH=str(root), PYTHONUNBUFFERED='1', RAY_USAGE_STATS_ENABLED='0',
              TF_CPP_MIN_LOG_LEVEL='2')


def checkout(ref: str, directory: pathlib.Path) -> pathlib.Path:
  """The package and gin files of git `ref`, extracted under `directory`."""
  directory.mkdir(parents=True)
  archive = subprocess.run(['git', 'archive', ref, 'nasfpn_tf', 'gin_configs'], cwd=REPO,
                           capture_output=True, check=True).stdout
  subprocess.run(['tar', '-x', '-C', str(directory)], input=archive, check=True)
  return directory


def python(root: pathlib.Path, code: str) -> str:
  """Runs `code` in a fresh interpreter on the code under `root`; returns its stdout."""
  return subprocess.run([sys.executable, '-c', code], cwd=root, env=version_env(root),
                        capture_output=True, text=True, check=True, timeout=600).stdout


def import_seconds(root: pathlib.Path, modules: str) -> float:
  """Seconds a fresh interpreter takes for `modules` (an import statement's tail)."""
  code = (f'import time; t = time.perf_counter()\nimport {modules}\n'
          'print(time.perf_counter() - t)')
  return float(python(root, code).split()[-1])


DRIVER_CODE = '''
import json, sys, tempfile, time
import gin
from nasfpn_tf.search.runner import ControllerSearcher, SearchSettings
from nasfpn_tf.search.space import SearchSpace
from nasfpn_tf.search.trials import synthetic_result
algorithm, num_trials = sys.argv[1], int(sys.argv[2])
gin.parse_config('PPOController.batch_size = 4')
settings = SearchSettings(search_dir=tempfile.mkdtemp(), algorithm=algorithm,
                          num_trials=num_trials, proxy='synthetic', space=SearchSpace(5, 3, 5))
searcher = ControllerSearcher(settings, log=lambda line: None)
spent = 0.0
for index in range(num_trials):
  started = time.perf_counter()
  config = searcher.suggest(f't{index}')
  spent += time.perf_counter() - started
  if config is None:
    break
  result = synthetic_result(settings.space, config['block_specs'])
  searcher.results.put(config['key'], result)  # the worker's write
  started = time.perf_counter()
  searcher.complete(f't{index}', {'result_json': json.dumps(result), 'reused': False,
                                  'seconds': 0.0}, False)
  spent += time.perf_counter() - started
print(spent / len(searcher.records))
'''


def driver_seconds_per_sample(root: pathlib.Path, algorithm: str, num_trials: int) -> float:
  """The searcher's own seconds per sample (no Ray), the same settings as the searches."""
  output = subprocess.run([sys.executable, '-c', DRIVER_CODE, algorithm, str(num_trials)],
                          cwd=root, env=version_env(root), capture_output=True, text=True,
                          check=True, timeout=600).stdout
  return float(output.split()[-1])


def run_search(root: pathlib.Path, search_dir: pathlib.Path, algorithm: str) -> Dict[str, Any]:
  """One search with the code under `root`; its timings (see the module docstring)."""
  command = [sys.executable, '-m', 'nasfpn_tf.search', f'--search_dir={search_dir}',
             f'--algorithm={algorithm}', '--proxy=synthetic', f'--num_trials={FLAGS.num_trials}',
             '--num_cells=5', '--max_level=5', f'--cpus_per_trial={FLAGS.cpus_per_trial}',
             f'--synthetic_seconds={FLAGS.synthetic_seconds}',
             '--gin_bindings=PPOController.batch_size = 4']
  search_dir.parent.mkdir(parents=True, exist_ok=True)
  seen_at: Dict[int, float] = {}
  with open(f'{search_dir}.stderr', 'w') as stderr:
    launched = time.monotonic()
    process = subprocess.Popen(command, cwd=root, env=version_env(root), stdout=subprocess.PIPE,
                               stderr=stderr, text=True)
    for line in process.stdout:
      match = TRIAL_LINE.match(line)
      if match:
        seen_at[int(match.group(1)) - 1] = time.monotonic() - launched
    wall = time.monotonic() - launched
  if process.wait() != 0:
    raise RuntimeError(f'{command} failed; see {search_dir}.stderr')
  records = Journal(search_dir / search_dir_lib.TRIALS_FILE).read()
  seconds = [record['seconds'] for record in records]
  steady = range(1, len(records))
  pids = {json.loads(path.read_text().splitlines()[-1])['pid']
          for path in search_dir.glob('ray_results/run*/*/result.json')}
  return {
      'samples': len(records), 'trained': sum(not r['cached'] for r in records),
      'wall_s': round(wall, 1), 'startup_s': round(seen_at[0] - seconds[0], 2),
      'overhead_per_sample_s': round(
          (seen_at[len(records) - 1] - seen_at[0]) / len(steady)
          - statistics.mean(seconds[i] for i in steady), 3),
      'trial_s': round(statistics.mean(seconds), 3), 'workers': len(pids)}


def measure(output_dir: pathlib.Path) -> List[Dict[str, Any]]:
  versions = {'before': checkout(FLAGS.baseline_ref, output_dir / 'before_code'), 'after': REPO}
  for name, root in versions.items():
    found = python(root, 'import nasfpn_tf; print(nasfpn_tf.__file__)').strip()
    assert found.startswith(str(root)), f'{name}: nasfpn_tf came from {found}, not {root}'
  rows = []
  for name, root in versions.items():
    row = {'version': name, 'code': FLAGS.baseline_ref if name == 'before' else 'checkout',
           'import_trials_s': round(import_seconds(root, 'nasfpn_tf.search.trials'), 2),
           'import_ray_tune_s': round(import_seconds(root, 'ray; from ray import tune'), 2),
           'driver_per_sample_s': {
               algorithm: round(driver_seconds_per_sample(root, algorithm, FLAGS.num_trials), 3)
               for algorithm in FLAGS.algorithms}}
    print(json.dumps(row), flush=True)
    rows.append(row)
  searches = []
  for repeat in range(FLAGS.repeats):
    for algorithm in FLAGS.algorithms:
      # Alternate which version goes first, so that a drift of the load favours neither.
      order = list(versions) if (repeat + FLAGS.algorithms.index(algorithm)) % 2 == 0 else [
          'after', 'before']
      for name in order:
        search_dir = output_dir / f'{name}_{algorithm}_{repeat}'
        row = {'version': name, 'algorithm': algorithm, 'repeat': repeat,
               **run_search(versions[name], search_dir, algorithm)}
        print(json.dumps(row), flush=True)
        searches.append(row)
  return rows + searches


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
  """Mean overhead per sample of each version and algorithm, the ratio, and the parts measured
  apart: the driver's own work, the worker imports per worker started spread over the samples."""
  imports = {r['version']: r for r in rows if 'import_trials_s' in r}
  out = {}
  for algorithm in FLAGS.algorithms:
    for version in ('before', 'after'):
      runs = [r for r in rows if r.get('algorithm') == algorithm and r['version'] == version]
      overhead = statistics.mean(r['overhead_per_sample_s'] for r in runs)
      workers_per_sample = statistics.mean(r['workers'] / r['samples'] for r in runs)
      info = imports[version]
      out[f'{algorithm}_{version}'] = {
          'overhead_per_sample_s': round(overhead, 3),
          'startup_s': round(statistics.mean(r['startup_s'] for r in runs), 1),
          'driver_s': info['driver_per_sample_s'][algorithm],
          'worker_imports_s': round(workers_per_sample * (info['import_trials_s']
                                                          + info['import_ray_tune_s']), 3),
          'workers_per_sample': round(workers_per_sample, 2)}
    out[f'{algorithm}_before_over_after'] = round(
        out[f'{algorithm}_before']['overhead_per_sample_s']
        / max(out[f'{algorithm}_after']['overhead_per_sample_s'], 1e-3), 1)
  return out


def main(argv):
  del argv
  load: Optional[subprocess.Popen] = None
  if FLAGS.beside_tf_load:
    load = subprocess.Popen([sys.executable, '-c', TF_LOAD], env=version_env(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(10)  # TensorFlow imported, the loop running
  try:
    with tempfile.TemporaryDirectory() as scratch:
      output_dir = pathlib.Path(FLAGS.output_dir or scratch)
      if output_dir.exists() and any(output_dir.iterdir()):
        raise app.UsageError(f'--output_dir={output_dir} is not empty: its searches would be '
                             'resumed, not measured.')
      rows = measure(output_dir)
  finally:
    if load is not None:
      load.kill()
      load.wait()
  print(json.dumps({'summary': summary(rows), 'cpu_count': os.cpu_count(),
                    'beside_tf_load': FLAGS.beside_tf_load}), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
