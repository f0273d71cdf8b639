"""tf.distribute strategies by name, and logical CPU devices to exercise them without GPUs."""
import json
import os
from typing import Optional

import tensorflow as tf

STRATEGIES = ('auto', 'one_device', 'mirrored', 'multi_worker_mirrored', 'tpu')


def configure_cpu_devices(num_devices: int) -> None:
  """Splits the CPU into `num_devices` logical devices (CPU:0..N-1).

  TF fixes its devices when it first uses them, so this must run before anything touches a
  device (creating a tensor or a strategy); later it fails with a message saying so.
  """
  if num_devices < 1:
    raise ValueError(f'--num_cpu_devices must be >= 1, got {num_devices}.')
  cpus = tf.config.list_physical_devices('CPU')
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)])
  except RuntimeError as e:
    raise RuntimeError(f'--num_cpu_devices={num_devices}: TensorFlow already initialized its '
                       f'devices; configure them before any TF op runs ({e}).') from e


def _mirrored_devices():
  """GPUs if any, else every logical CPU (MirroredStrategy alone would take CPU:0 only)."""
  gpus = tf.config.list_logical_devices('GPU')
  return [d.name for d in (gpus or tf.config.list_logical_devices('CPU'))]


def get_strategy(name: str = 'auto', tpu: Optional[str] = None) -> tf.distribute.Strategy:
  """The strategy `name` (see STRATEGIES); 'auto': TPU if `tpu` is given, mirrored if more than
  one GPU, else one device (the GPU, or the CPU).

  multi_worker_mirrored reads the cluster from $TF_CONFIG. Create the strategy before building
  models or datasets: multi-worker and TPU strategies set up the runtime.
  """
  if name not in STRATEGIES:
    raise ValueError(f'--strategy={name!r} is not one of {list(STRATEGIES)}.')
  if name == 'auto':
    if tpu:
      name = 'tpu'
    elif len(tf.config.list_physical_devices('GPU')) > 1:
      name = 'mirrored'
    else:
      name = 'one_device'
  if tpu and name != 'tpu':
    raise ValueError(f'--tpu={tpu!r} is only used with --strategy=tpu (or auto), not {name!r}.')
  if name == 'one_device':
    gpus = tf.config.list_logical_devices('GPU')
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else '/cpu:0')
  if name == 'mirrored':
    return tf.distribute.MirroredStrategy(devices=_mirrored_devices())
  if name == 'multi_worker_mirrored':
    if 'TF_CONFIG' not in os.environ:
      raise ValueError('--strategy=multi_worker_mirrored needs $TF_CONFIG (the cluster and this '
                       "worker's task), e.g. {\"cluster\": {\"worker\": [\"host1:port\", "
                       '"host2:port"]}, "task": {"type": "worker", "index": 0}}.')
    try:
      json.loads(os.environ['TF_CONFIG'])
    except json.JSONDecodeError as e:
      raise ValueError(f'$TF_CONFIG is not valid json: {e}') from e
    return tf.distribute.MultiWorkerMirroredStrategy()
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
  tf.config.experimental_connect_to_cluster(resolver)
  tf.tpu.experimental.initialize_tpu_system(resolver)
  return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes summaries, configs and metrics (the only one but in multi-worker
  runs: the 'chief' task, or worker 0 when there is none)."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  if task_type is None or task_type == 'chief':
    return True
  has_chief = 'chief' in resolver.cluster_spec().as_dict()
  return task_type == 'worker' and task_id == 0 and not has_chief
