"""experiments/bench/demo_runs.train_all: demo-scale runs trained one after the other in this
process, or several at once in worker processes of their own (search_retrain.py --parallel)."""
import json
import pathlib
import sys

import gin
import pytest

import training_helpers

sys.path.insert(0, str(training_helpers.REPO / 'experiments'))
from bench import demo_runs  # noqa: E402  pylint: disable=wrong-import-position


def _runs(records, tmp_path, seeds, extra=()):
  bindings = training_helpers.tiny_bindings(records, train_steps=2) + [
      'RetinaNetTrainer.mixed_precision = None'] + list(extra)
  return [demo_runs.Run(pathlib.Path(tmp_path) / f'tiny_seed{seed}', bindings, seed)
          for seed in seeds]


def test_parallel_runs_train_in_processes_of_their_own_and_keep_their_order(synthetic_records,
                                                                             tmp_path):
  runs = _runs(synthetic_records, tmp_path, [0, 1, 2])
  started = []
  results = demo_runs.train_all(runs, parallel=2, starting=started.append)
  assert started == [0, 1, 2]
  for run, metrics in zip(runs, results):
    assert metrics == json.loads((run.model_dir / 'eval_metrics.json').read_text())
    assert metrics['step'] == 2 and 0.0 <= metrics['AP'] <= 1.0
    assert (run.model_dir / 'model_config.json').exists()
  # The training parsed its gin in the workers: this process's config was left as it was.
  with pytest.raises(ValueError):
    gin.query_parameter('build_train_dataset.file_pattern')
  # Finished model dirs are reused, in this process too: the same metrics, nothing trained. A
  # lone run is not sent to a worker whatever `parallel` says: this process parses its gin.
  again = demo_runs.train_all(runs[:1], parallel=4)
  assert again == results[:1]
  assert gin.query_parameter('build_train_dataset.file_pattern') == synthetic_records['train']


def test_a_failing_run_in_a_worker_raises_its_error_here(synthetic_records, tmp_path):
  runs = _runs(synthetic_records, tmp_path, [0, 1],
               extra=['RetinaNetTrainer.no_such_setting = 1'])
  with pytest.raises(ValueError, match='no_such_setting'):
    demo_runs.train_all(runs, parallel=2)
  with pytest.raises(ValueError, match='parallel must be >= 1'):
    demo_runs.train_all(runs, parallel=0)
