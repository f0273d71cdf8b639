"""Peak memory (max RSS) of one side's job, each in a fresh process running the benchmark script
with --worker."""
import json
import pathlib
import resource
import subprocess
import sys
from typing import Any, Dict

import tensorflow as tf

from bench.models import CONFIGS, build_ours, build_tfm, random_images, tfm_detect_fn, tfm_task
from bench.timing import run
from bench.training import ours_train_step, tfm_train_step, train_batch
from nasfpn_tf.models.geometry import ModelGeometry


def _max_rss_mb() -> float:
  """This process's peak resident memory. Not getrusage's ru_maxrss: Linux keeps that across
  execve, so a worker would report its parent's peak; VmHWM starts afresh with the new image."""
  status = pathlib.Path('/proc/self/status')
  for line in status.read_text().splitlines() if status.exists() else []:
    if line.startswith('VmHWM:'):
      return int(line.split()[1]) / 1024.0  # kB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # BSDs: KiB.


def run_worker(kind: str, spec: Dict[str, Any]) -> Dict[str, float]:
  """One side's job ('infer': end to end at batch 8; 'train': 3 train steps) in this fresh
  process; returns its peak RSS (random weights: memory does not depend on their values)."""
  config = CONFIGS[spec['config']]
  base = _max_rss_mb()
  if kind == 'infer':
    images = random_images(8, config.image_size)
    if spec['side'] == 'ours':
      fn = tf.function(build_ours(spec['model_config'], spec['precision']).detect)
    else:
      fn = tfm_detect_fn(build_tfm(tfm_task(config)), config.image_size)
    run(fn, images)  # The peak is reached in the first (tracing) call already.
  else:
    images, labels = train_batch(ModelGeometry.from_config(spec['model_config']), spec['batch'])
    if spec['side'] == 'ours':
      step, _ = ours_train_step(spec['model_config'], spec['precision'], images, labels)
    else:
      task = tfm_task(config)
      step = tfm_train_step(task, build_tfm(task, spec['precision']), images, labels)
    for _ in range(3):
      run(step)
  return {'peak_rss_mb': _max_rss_mb(), 'rss_after_import_mb': base}


def measure_memory(script: str, kind: str, spec: Dict[str, Any]) -> Dict[str, float]:
  """`run_worker(kind, spec)` in a subprocess of `script` (the benchmark, which calls it for
  --worker and prints its result as a JSON line)."""
  command = [sys.executable, script, f'--worker={kind}', f'--worker_spec={json.dumps(spec)}']
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  lines = [l for l in result.stdout.splitlines() if l.startswith('{')]
  if result.returncode or not lines:
    raise RuntimeError(f'memory worker {kind} {spec["side"]} failed:\n{result.stderr[-3000:]}')
  return json.loads(lines[-1])
