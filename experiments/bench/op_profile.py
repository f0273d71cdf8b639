"""Where a train step spends its time, from the TF profiler, by op type."""
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from bench.timing import run, say

PROFILE_CATEGORIES = ('conv', 'norm_relu_pool', 'rest')
PROFILE_LABELS = {'conv': 'convolutions (forward, input and filter gradients)',
                  'norm_relu_pool': 'batch norm, ReLU, max pool (forward and gradients)',
                  'rest': 'rest (loss, casts, gradient sums, optimizer, resampling, XLA)'}


def op_category(op_type: str) -> str:
  op_type = op_type.replace('_MklNative', '').replace('_Mkl', '')
  if 'Conv2D' in op_type:
    return 'conv'
  if op_type.startswith(('FusedBatchNorm', 'Relu', 'MaxPool')):
    return 'norm_relu_pool'
  return 'rest'


def executor_events(logdir: str) -> Iterator[Tuple[str, float]]:
  """(name, seconds) of every event on the executor's threads (tf_Compute) in a trace."""
  for path in pathlib.Path(logdir).rglob('*.xplane.pb'):
    space = xplane_pb2.XSpace()
    space.ParseFromString(path.read_bytes())
    for plane in space.planes:
      for line in plane.lines:
        if line.name.startswith('tf_Compute'):
          for event in line.events:
            yield plane.event_metadata[event.metadata_id].name, event.duration_ps * 1e-12


def op_name_and_type(event_name: str) -> Optional[Tuple[str, str]]:
  """(op name, op type) of an executor event that is a TF op ('name:Type'), None for executor
  bookkeeping and XLA's own events inside its launch."""
  op_name, _, op_type = event_name.rpartition(':')
  if op_name and '::' not in event_name and not op_type.startswith(' '):
    return op_name, op_type
  return None


def _op_seconds_by_category(logdir: str) -> Dict[str, float]:
  """Sums the durations of the TF ops the executor ran (events 'name:Type' on the tf_Compute
  threads) by category; an async op's launch (our XLA-compiled focal loss) counts as 'rest'."""
  seconds = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
  for name, duration in executor_events(logdir):
    op = op_name_and_type(name)
    if name == 'ExecutorState::ProcessAsync::Start':
      seconds['rest'] += duration
    elif op is not None:
      seconds[op_category(op[1])] += duration
  return seconds


def profile_train_steps(steps: Dict[str, Callable[[], Any]],
                        repeats: int) -> Dict[str, Dict[str, float]]:
  """{side_variant: {category: seconds per step}} from `repeats` traced steps of each."""
  result = {}
  for name, step in steps.items():
    logdir = tempfile.mkdtemp(prefix='nasfpn_profile_')
    try:
      tf.profiler.experimental.start(logdir)
      for _ in range(repeats):
        run(step)
      tf.profiler.experimental.stop()
      result[name] = {k: v / repeats for k, v in _op_seconds_by_category(logdir).items()}
    finally:
      shutil.rmtree(logdir, ignore_errors=True)
    say(f'  profiled {name}: ' + ', '.join(f'{k} {v:.3f} s' for k, v in result[name].items()))
  return result
