"""Proxy tasks of the architecture search (paper §4.2): one trial trains one candidate pyramid
briefly and scores it by COCO AP (and, on the CPU proxy, the loss) on images held out from the
training set.

  proxy='cpu'    the embedded synthetic dataset, or the user's converter records (`data_dir`),
                 on 2 CPU cores in about 30 s (gin_configs/search_proxy_cpu.gin): the backbone is
                 trained once per search on the proxy's training images, or read from
                 `backbone_checkpoint`, and frozen, its features cached (`feature_cache`), and a
                 trial trains only the candidate pyramid and the head on them
                 (`cpu_proxy.CpuSearchProxy`), as NAS-FCOS does. A trial parses the gin config
                 once (twice when it builds the cache: the build binds its pretraining).
  proxy='e2e'    the CPU proxy's images, split and pretrained backbone (its cache), and the
                 demo's detector trained whole from that backbone, or `backbone_checkpoint`'s,
                 for 300 steps of the demo's recipe (gin_configs/search_proxy_e2e.gin) with
                 `RetinaNetTrainer`: the backbone trains with the candidate pyramid, as in the
                 demo, rather than frozen; a few minutes a trial on 2 cores (how it ranks
                 pyramids against the demo's training: docs/search.md, "The end-to-end proxy").
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
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import gin
import numpy as np
import tensorflow as tf
import tf_keras

from nasfpn_tf.decoders import block_specs as block_specs_lib
from nasfpn_tf.models import factory
from nasfpn_tf.search import cache_inputs
from nasfpn_tf.search import configurables
from nasfpn_tf.search import cpu_proxy
from nasfpn_tf.search import feature_cache
from nasfpn_tf.search import heldout
from nasfpn_tf.training import distribute
from nasfpn_tf.training import trainer as trainer_lib
from nasfpn_tf.utils import model_stats

PROXIES = {'cpu': 'search_proxy_cpu.gin', 'e2e': 'search_proxy_e2e.gin',
           'paper': 'search_proxy_r10_3x256_512.gin'}
# The proxies that split the user's converter records (--data_dir) themselves.
OWN_SPLIT = ('cpu', 'e2e')
DEFAULT_WORK_DIR = 'runs/search_proxy'


@dataclasses.dataclass(frozen=True)
class TrialResult:
  """What one trial measured. ap, ap50: COCO metrics on the held-out split (0-1); flops, params:
  the whole detector's (`utils.model_stats`, batch 1, at the proxy's image size); seconds: the
  whole call (a cache built by this call included); steps: optimizer steps; final_loss: the
  mean training loss of the last steps, heldout_loss: the loss on the held-out images
  (`cpu_proxy.heldout_loss`; both None for the e2e and paper proxies). seeds: with several
  seeds, each one's result ({'seed': s, ...}, without seeds); the fields above are then their
  mean (flops, params, steps: the same in each) and seconds the whole call's. phases: where a
  CPU-proxy trial's seconds went, {'build': the model, 'train': the steps (tracing included),
  'evaluate': the held-out evaluation(s), intermediate reports' included, 'count': FLOPs and
  params}; over several seeds, their sums; None for the e2e and paper proxies."""
  ap: float
  ap50: float
  flops: int
  params: int
  seconds: float
  steps: int
  final_loss: Optional[float]
  heldout_loss: Optional[float] = None
  seeds: Tuple[Dict[str, Any], ...] = ()
  phases: Optional[Dict[str, float]] = None

  def to_dict(self) -> Dict[str, Any]:
    """The fields as a JSON-ready dict; `seeds` only when there are several, `phases` only
    when measured."""
    result = dataclasses.asdict(self)
    if self.phases is None:
      del result['phases']
    if not self.seeds:
      del result['seeds']
    else:
      result['seeds'] = [dict(seed) for seed in self.seeds]
    return result

  @classmethod
  def mean_of(cls, results: Sequence['TrialResult'], seeds: Sequence[int],
              seconds: float) -> 'TrialResult':
    """One seed's result as it is, or several seeds' mean, each kept under `seeds`."""
    if len(results) == 1:
      return dataclasses.replace(results[0], seconds=seconds)

    def mean(name):
      values = [getattr(r, name) for r in results]
      return None if any(v is None for v in values) else float(np.mean(values))

    phases = None
    if all(r.phases is not None for r in results):
      phases = {name: sum(r.phases[name] for r in results) for name in results[0].phases}
    return cls(ap=mean('ap'), ap50=mean('ap50'), flops=results[0].flops,
               params=results[0].params, seconds=seconds, steps=results[0].steps,
               final_loss=mean('final_loss'), heldout_loss=mean('heldout_loss'),
               seeds=tuple({'seed': seed, **r.to_dict()} for seed, r in zip(seeds, results)),
               phases=phases)


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


def space_bindings(space) -> list:
  """The gin bindings a search space's trials need under every other binding: FCOS for the
  NAS-FCOS spaces (`DETECTOR`), so the CPU proxy's cache holds FCOS's point targets and its
  backbone is pretrained in an FCOS (with `CpuProxyCache.pretrain_block_specs`)."""
  if space is None or space.DETECTOR == 'retinanet':
    return []
  return [f'build_retinanet.detector = {space.DETECTOR!r}']


def prepare(proxy: str = 'cpu', work_dir: str = DEFAULT_WORK_DIR, gin_bindings=(),
            gin_file: Optional[str] = None, data_dir: Optional[str] = None,
            backbone_checkpoint: Optional[str] = None, space=None) -> Optional[str]:
  """Builds what the trials of `proxy` share, if missing: the CPU proxy's cache folder (returned)
  for its gin config, the user's records in `data_dir` (default: the embedded synthetic data)
  and `backbone_checkpoint` (default: the backbone pretrained on the proxy's images), also the
  e2e proxy's (its records and backbone); the paper proxy shares nothing (None). Leaves the
  proxy's gin config parsed: `data_bindings` (the label map's num_classes), then
  `gin_bindings`, then `space_bindings(space)` (a search space; None: NAS-FPN's). ValueError
  naming the flag, binding, file or checkpoint at fault."""
  files = _gin_files(proxy, gin_file)
  if proxy not in OWN_SPLIT:
    if backbone_checkpoint:
      raise ValueError(f'--backbone_checkpoint is for --proxy={" or ".join(OWN_SPLIT)}; '
                       f'--proxy={proxy} trains the whole model from scratch (bind '
                       'RetinaNetTrainer.init_checkpoint to start it from one).')
    return None
  bindings = (cache_inputs.data_bindings(data_dir) + list(gin_bindings)
              + space_bindings(space))
  configurables.parse_gin(files, bindings)
  folder, built = feature_cache.prepare(work_dir, data_dir, backbone_checkpoint)
  if built:  # The build bound its pretraining's settings.
    configurables.parse_gin(files, bindings)
  return folder


def _resolve_block_specs(block_specs, min_level: int, max_level: int, where: str):
  """The specs resolved and validated for the levels; ValueError naming them and `where`."""
  try:
    specs = block_specs_lib.resolve(block_specs, min_level, max_level)
    block_specs_lib.validate(specs, min_level, max_level)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f'block_specs {block_specs!r} do not build a P{min_level}-P{max_level} '
                     f'pyramid under {where}: {e}') from e
  return specs


def _model_arguments(block_specs, space, min_level: int, max_level: int,
                     where: str) -> Dict[str, Any]:
  """The `build_retinanet` arguments of the trial's candidate: a NAS-FPN pyramid resolved for
  the proxy's levels, or a spec of a NAS-FCOS `space` (ValueError naming it when outside)."""
  if space is None or space.DETECTOR == 'retinanet':
    return {'block_specs': block_specs_lib.to_config(
        _resolve_block_specs(block_specs, min_level, max_level, where))}
  try:
    return space.model_arguments(block_specs)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f'{block_specs!r} is not a spec of the search space {space!r}: {e}') from e


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
              gin_file: Optional[str] = None, backbone_checkpoint: Optional[str] = None,
              num_seeds: int = 1, report_steps: Sequence[int] = (),
              report: Optional[Callable[[int, Dict[str, Any]], None]] = None,
              space=None) -> TrialResult:
  """Trains `block_specs` (rows (level, op, (in0, in1), is_output), or a name of
  `block_specs.SPECS`) on `proxy` with seeds seed .. seed + num_seeds - 1 and returns what it
  measured (several seeds: their mean, each kept, `TrialResult.mean_of`).

  space: a NAS-FCOS search space (`nasfcos_space`): `block_specs` is then one of its specs,
  trained in FCOS as its `model_arguments` build it (`space_bindings`); None or NAS-FPN's: a
  NAS-FPN pyramid for the proxy's levels.

  report: with the CPU proxy and one seed, called as report(step, result so far as
  `TrialResult.to_dict()`) after each of `report_steps` (the held-out evaluation at that step;
  for `schedulers`' ASHA).

  work_dir: shared by the trials of a search: the CPU and e2e proxies' cache lives in it, and
  the e2e and paper proxies' model dirs (kept until their trial ends, so a retried trial
  resumes). gin_bindings go on top of the proxy's gin file (`gin_file` replaces it). data_dir:
  the CPU and e2e proxies' converter records (`cache_inputs.DATA_RECORDS`; default: the
  embedded synthetic data), or the paper proxy's split records (`search.heldout`).
  backbone_checkpoint: the CPU proxy's frozen backbone (see `prepare`), the e2e proxy's
  starting one. ValueError naming the gin file and bindings, or the specs, when the proxy does
  not build.
  """
  configure_threads(num_threads)
  start = time.perf_counter()
  files = _gin_files(proxy, gin_file)
  if num_seeds < 1:
    raise ValueError(f'--proxy_seeds must be >= 1, got {num_seeds}.')
  seeds = [seed + k for k in range(num_seeds)]
  if report is not None and (proxy != 'cpu' or num_seeds != 1):
    raise ValueError(f'intermediate reports (--scheduler=asha) need --proxy=cpu and '
                     f'--proxy_seeds=1, not --proxy={proxy} and --proxy_seeds={num_seeds}.')
  if proxy == 'paper' and not data_dir:
    raise ValueError("proxy 'paper' trains on COCO records: pass data_dir, a folder of "
                     'proxy_train-*/proxy_heldout-* records written by nasfpn_tf.search.heldout.')
  cache_folder = prepare(proxy, work_dir, gin_bindings, gin_file, data_dir, backbone_checkpoint,
                         space)
  bindings = (cache_inputs.data_bindings(data_dir) if proxy in OWN_SPLIT else []) + \
      list(gin_bindings) + space_bindings(space)
  where = f'gin files {list(files)} with bindings {bindings}'
  results = []
  if proxy == 'cpu':
    task = cpu_proxy.CpuSearchProxy.from_gin(cache_folder)
    cpu_proxy.check_report_steps(report_steps, task.settings)  # before a model is built
    arguments = _model_arguments(block_specs, space, task.model_arguments['min_level'],
                                 task.model_arguments['max_level'], where)
    for trial_seed in seeds:
      seed_start = time.perf_counter()
      with _builds(proxy, where):
        model = task.new_model(arguments, trial_seed)
      counted = {'build': time.perf_counter() - seed_start}  # FLOPs, params: counted once

      def on_report(step, measured, model=model, seed_start=seed_start, counted=counted):
        report(step, _result(model, measured, time.perf_counter() - seed_start,
                             counted).to_dict())

      measured = task.run(model, trial_seed, report_steps, on_report if report else None)
      results.append(_result(model, measured, time.perf_counter() - seed_start, counted))
  else:
    configurables.parse_gin(files, bindings)
    arguments = _model_arguments(block_specs, space, factory.model_argument('min_level'),
                                 factory.model_argument('max_level'), where)
    for name, value in arguments.items():
      gin.bind_parameter(f'build_retinanet.{name}', value)
    records = data_dir
    if proxy == 'e2e':  # the cache's records, and its backbone or the checkpoint's to start from
      records = os.path.join(cache_folder, feature_cache.RECORDS)
      initial = backbone_checkpoint or feature_cache.pretrained_backbone(cache_folder)
      if initial:
        gin.bind_parameter('RetinaNetTrainer.init_checkpoint', initial)
        gin.bind_parameter('RetinaNetTrainer.init_checkpoint_modules', 'backbone')
    for binding, split in (('build_train_dataset.file_pattern', heldout.TRAIN_PREFIX),
                           ('build_eval_dataset.file_pattern', heldout.HELDOUT_PREFIX)):
      gin.bind_parameter(binding, heldout.record_pattern(records, split))
    for trial_seed in seeds:
      seed_start = time.perf_counter()
      # Trials in one process do not pile up models, traced functions and layer names.
      tf_keras.backend.clear_session()
      gc.collect()
      tf_keras.utils.set_random_seed(trial_seed)
      trial = json.dumps([arguments, trial_seed, list(files), list(bindings), data_dir,
                          cache_folder, backbone_checkpoint])
      model_dir = os.path.join(work_dir, f'{proxy}_trials',
                               hashlib.sha256(trial.encode()).hexdigest()[:16])
      with _builds(proxy, where):
        trainer = trainer_lib.RetinaNetTrainer(model_dir, distribute.get_strategy('auto'),
                                               mode='train_and_eval')
      measured = _train_and_evaluate(trainer)
      results.append(_result(trainer.model, measured, time.perf_counter() - seed_start))
      shutil.rmtree(model_dir, ignore_errors=True)
  return TrialResult.mean_of(results, seeds, time.perf_counter() - start)


def _result(model: tf_keras.Model, measured: Dict[str, Any], seconds: float,
            counted: Optional[Dict[str, Any]] = None) -> TrialResult:
  """`measured` with the model's FLOPs and params, counted into `counted` unless it has them (a
  dict kept across calls for one model counts them once). With the CPU proxy's phase seconds in
  `measured` ('train_seconds', 'evaluate_seconds') and the model's build seconds in `counted`
  ('build'), the result's `phases`."""
  counted = {} if counted is None else counted
  if 'flops' not in counted:
    start = time.perf_counter()
    counted.update(flops=model_stats.count_flops(model, list(model.image_size) + [3]),
                   params=model_stats.count_params(model), count=time.perf_counter() - start)
  phases = None
  if 'build' in counted and 'train_seconds' in measured:
    phases = {'build': counted['build'], 'train': measured['train_seconds'],
              'evaluate': measured['evaluate_seconds'], 'count': counted['count']}
    phases = {name: round(value, 2) for name, value in phases.items()}
  return TrialResult(ap=float(measured['ap']), ap50=float(measured['ap50']),
                     flops=counted['flops'], params=counted['params'], seconds=seconds,
                     steps=int(measured['steps']), final_loss=measured['final_loss'],
                     heldout_loss=measured.get('heldout_loss'), phases=phases)


def _train_and_evaluate(trainer: trainer_lib.RetinaNetTrainer) -> Dict[str, Any]:
  """The e2e and paper proxies' trial: `RetinaNetTrainer` to its train_steps (resuming a retried
  trial's checkpoint), then COCO AP on the held-out records."""
  steps = trainer.train()
  metrics = trainer.evaluate()
  return {'ap': metrics['AP'], 'ap50': metrics['AP50'], 'steps': steps, 'final_loss': None}
