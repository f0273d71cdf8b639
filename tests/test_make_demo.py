"""`make demo` twice in a row on a tiny configuration: the second run resumes from the finished
checkpoint, evaluates, exports again over the first exports and draws again, and exits 0."""
import json
import os
import shlex
import subprocess

import pytest

from training_helpers import REPO, SUBPROCESS_TIMEOUT, TINY_MODEL

# demo.gin's model made tiny, 2 steps, float32 on every CPU (the demo's own precision decision is
# tested in test_precision.py).
TINY_DEMO = TINY_MODEL + [
    'TRAIN_STEPS = 2', 'RetinaNetTrainer.checkpoint_every_steps = 2',
    'RetinaNetTrainer.log_every_steps = 1', 'RetinaNetTrainer.eval_batch_size = 2',
    'RetinaNetTrainer.mixed_precision = None', 'CosineDecayWithWarmup.warmup_steps = 1']


def _make_demo(demo_dir):
  gin_args = ' '.join(f'--gin_bindings={shlex.quote(b)}' for b in TINY_DEMO)
  return subprocess.run(
      ['make', '--no-print-directory', 'demo', f'DEMO_DIR={demo_dir}', 'DEMO_NUM_TRAIN=6',
       'DEMO_NUM_VAL=4', 'DEMO_IMAGE_SIZE=128', 'DEMO_MIN_SCORE=0.0', f'DEMO_GIN_ARGS={gin_args}'],
      cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
      env=dict(os.environ, MAKEFLAGS=''))


def test_make_demo_twice_in_a_row(tmp_path):
  if not (REPO / '.venv' / '.installed').exists():
    pytest.skip('make demo runs in the project .venv, which `make test` creates')
  demo_dir = tmp_path / 'demo'
  first = _make_demo(demo_dir)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  exported = demo_dir / 'export' / 'saved_model' / 'saved_model.pb'
  tflite = demo_dir / 'export' / 'model.tflite'
  drawn = sorted((demo_dir / 'predictions').iterdir())
  assert exported.exists() and tflite.stat().st_size > 0 and len(drawn) >= 4
  first_export = exported.stat().st_mtime_ns
  shards = sorted(p.name for p in (demo_dir / 'records').glob('*.tfrecord'))

  second = _make_demo(demo_dir)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  out = second.stdout
  assert '[demo] generate' not in out and '[demo] convert' not in out  # Kept from the first run.
  assert 'Restored' in out and 'at step 2' in out
  assert json.loads((demo_dir / 'eval_metrics.json').read_text())['step'] == 2
  summaries = [json.loads(line) for line in out.splitlines() if line.startswith('{"export_dir"')]
  assert [s['replaced'] for s in summaries] == [True]
  assert exported.stat().st_mtime_ns > first_export
  assert sorted((demo_dir / 'predictions').iterdir()) == drawn
  assert sorted(p.name for p in (demo_dir / 'records').glob('*.tfrecord')) == shards
  assert sorted(p.name for p in (demo_dir / 'export').iterdir()) == [
      'model.labels.json', 'model.tflite', 'saved_model']
  assert '[demo] total' in out
