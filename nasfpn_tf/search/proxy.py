"""Proxy tasks of the architecture search (paper §4.2): one trial trains one candidate pyramid
briefly and scores it by COCO AP on images held out from the training set.

  proxy='cpu'    the embedded synthetic dataset on a CPU in about a minute
                 (gin_configs/search_proxy_cpu.gin): the backbone is trained once per search
                 and frozen, its features cached (`feature_cache`), and a trial trains only the
                 candidate pyramid and the head on them (`cpu_proxy`), as NAS-FCOS does.
  proxy='paper'  the paper's proxy (gin_configs/search_proxy_r10_3x256_512.gin): ResNet-10 at
                 512x512, the pyramid stacked 3 times, 10 epochs with lr 0.08 decayed x0.1 at
                 epoch 8, trained whole with `RetinaNetTrainer` on COCO records that
                 `search.heldout` split into proxy_train and proxy_heldout (`data_dir`).

Call order in a worker process (a Ray worker runs one trial per call): `configure_threads(n)`
first, before anything runs a TensorFlow op, since TensorFlow fixes its thread pools then (Ray
only sets OMP_NUM_THREADS); `run_trial(..., num_threads=n)` calls it too and fails with a clear
error when the pools were already fixed at other sizes. `prepare` builds what trials share (the
CPU proxy's cache) once, e.g. in the driver before the trials start; a trial that finds it
missing builds it (one process builds, the others wait).
"""
import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import shutil
import time
from typing import Any, Dict, Optional, Sequence

import gin
import tensorflow as tf
import tf_keras

from nasfpn_tf import config
from nasfpn_tf.decoders import block_specs as block_specs_lib
from nasfpn_tf.models import factory
from nasfpn_tf.search import cpu_proxy
from nasfpn_tf.search import feature_cache
from nasfpn_tf.search import heldout
from nasfpn_tf.training import distribute
from nasfpn_tf.training import trainer as trainer_lib
from nasfpn_tf.utils import model_stats

PROXIES = {'cpu': 'search_proxy_cpu.gin', 'paper': 'search_proxy_r10_3x256_512.gin'}
DEFAULT_WORK_DIR = 'runs/search_proxy'


@dataclasses.dataclass(frozen=True)
class TrialResult:
  """What one trial measured. ap, ap50: COCO metrics on the held-out split (0-1); flops, params:
  the whole detector's (`utils.model_stats`, batch 1, at the proxy's image size); seconds: the
  whole call (a cache built by this call included); steps: optimizer steps; final_loss: the
  mean training loss of the last steps (None for the paper proxy)."""
  ap: float
  ap50: float
  flops: int
  params: int
  seconds: float
  steps: int
  final_loss: Optional[float]

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


def configure_threads(num_threads: Optional[int]) -> None:
  """TensorFlow's intra- and inter-op pools to `num_threads` threads each (None: leave them).

  Call first thing in a worker: TensorFlow fixes the pools when it runs its first op, so a later
  call that would change them raises RuntimeError saying so.
  """
  if num_threads is None:
    return
  if num_threads < 1:
    raise ValueError(f'num_threads must be >= 1, got {num_threads}.')
  threading = tf.config.threading
  if (threading.get_intra_op_parallelism_threads(),
      threading.get_inter_op_parallelism_threads()) == (num_threads, num_threads):
    return
  try:
    threading.set_intra_op_parallelism_threads(num_threads)
    threading.set_inter_op_parallelism_threads(num_threads)
  except RuntimeError as e:
    raise RuntimeError(
        f'configure_threads({num_threads}): TensorFlow already runs with '
        f'{threading.get_intra_op_parallelism_threads()} intra-op and '
        f'{threading.get_inter_op_parallelism_threads()} inter-op threads (0: its default); '
        'call it first thing in the worker process, before any TensorFlow op runs.') from e


def _gin_files(proxy: str, gin_file: Optional[str]) -> Sequence[str]:
  if proxy not in PROXIES:
    raise ValueError(f'unknown proxy {proxy!r} (--proxy); known: {sorted(PROXIES)}.')
  return [gin_file or PROXIES[proxy]]


def prepare(proxy: str = 'cpu', work_dir: str = DEFAULT_WORK_DIR, gin_bindings=(),
            gin_file: Optional[str] = None) -> Optional[str]:
  """Builds what the trials of `proxy` share, if missing: the CPU proxy's cache folder (returned);
  the paper proxy shares nothing (None)."""
  files = _gin_files(proxy, gin_file)
  if proxy != 'cpu':
    return None
  return feature_cache.prepare(work_dir, files, gin_bindings)


def _bind_block_specs(block_specs, where: str):
  """Validates the specs for the parsed config's levels and binds build_retinanet.block_specs;
  returns them resolved."""
  min_level, max_level = (factory.model_argument(name) for name in ('min_level', 'max_level'))
  try:
    specs = block_specs_lib.resolve(block_specs, min_level, max_level)
    block_specs_lib.validate(specs, min_level, max_level)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f'block_specs {block_specs!r} do not build a P{min_level}-P{max_level} '
                     f'pyramid under {where}: {e}') from e
  gin.bind_parameter('build_retinanet.block_specs', block_specs_lib.to_config(specs))
  return specs


@contextlib.contextmanager
def _builds(proxy: str, where: str):
  """Any error while the trial's model is built says that the proxy does not build, and where."""
  try:
    yield
  except Exception as e:  # gin, Keras and the model raise several types; all mean the config.
    raise ValueError(f'proxy {proxy!r} does not build under {where}: {e}') from e


def run_trial(block_specs, proxy: str = 'cpu', seed: int = 0,
              work_dir: str = DEFAULT_WORK_DIR, gin_bindings: Sequence[str] = (),
              num_threads: Optional[int] = None, data_dir: Optional[str] = None,
              gin_file: Optional[str] = None) -> TrialResult:
  """Trains `block_specs` (rows (level, op, (in0, in1), is_output), or a name of
  `block_specs.SPECS`) on `proxy` with `seed` and returns what it measured.

  work_dir: shared by the trials of a search: the CPU proxy's cache lives in it, and the paper
  proxy's model dirs (kept until their trial ends, so a retried trial resumes). gin_bindings go
  on top of the proxy's gin file (`gin_file` replaces it). data_dir: the paper proxy's records
  (`search.heldout`). ValueError naming the gin file and bindings, or the specs, when the proxy
  does not build.
  """
  configure_threads(num_threads)
  start = time.perf_counter()
  files = _gin_files(proxy, gin_file)
  where = f'gin files {list(files)} with bindings {list(gin_bindings)}'
  if proxy == 'paper' and not data_dir:
    raise ValueError("proxy 'paper' trains on COCO records: pass data_dir, a folder of "
                     'proxy_train-*/proxy_heldout-* records written by nasfpn_tf.search.heldout.')
  cache_folder = prepare(proxy, work_dir, gin_bindings, gin_file)
  config.parse_gin(files, gin_bindings)
  specs = _bind_block_specs(block_specs, where)
  # Trials in one process do not pile up models, traced functions and layer names.
  tf_keras.backend.clear_session()
  gc.collect()
  tf_keras.utils.set_random_seed(seed)
  if proxy == 'cpu':
    with _builds(proxy, where):
      settings = cpu_proxy.CpuProxy()
      model = cpu_proxy.build_model(settings)
    measured = cpu_proxy.run(cache_folder, model, settings, seed)
  else:
    for binding, split in (('build_train_dataset.file_pattern', heldout.TRAIN_PREFIX),
                           ('build_eval_dataset.file_pattern', heldout.HELDOUT_PREFIX)):
      gin.bind_parameter(binding, heldout.record_pattern(data_dir, split))
    trial = json.dumps([block_specs_lib.to_config(specs), seed, list(files),
                        list(gin_bindings), data_dir])
    model_dir = os.path.join(work_dir, 'paper_trials',
                             hashlib.sha256(trial.encode()).hexdigest()[:16])
    with _builds(proxy, where):
      trainer = trainer_lib.RetinaNetTrainer(model_dir, distribute.get_strategy('auto'),
                                             mode='train_and_eval')
    measured = _train_and_evaluate(trainer)
    model = trainer.model
    shutil.rmtree(model_dir, ignore_errors=True)
  return TrialResult(ap=float(measured['ap']), ap50=float(measured['ap50']),
                     flops=model_stats.count_flops(model, list(model.image_size) + [3]),
                     params=model_stats.count_params(model),
                     seconds=time.perf_counter() - start, steps=int(measured['steps']),
                     final_loss=measured['final_loss'])


def _train_and_evaluate(trainer: trainer_lib.RetinaNetTrainer) -> Dict[str, Any]:
  """The paper proxy's trial: `RetinaNetTrainer` to its train_steps (resuming a retried
  trial's checkpoint), then COCO AP on the held-out records."""
  steps = trainer.train()
  metrics = trainer.evaluate()
  return {'ap': metrics['AP'], 'ap50': metrics['AP50'], 'steps': steps, 'final_loss': None}
