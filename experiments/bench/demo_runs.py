"""Demo-scale runs: the demo's synthetic data, a gin variant of the demo config trained and
evaluated with `RetinaNetTrainer` in a model dir of its own (reused when finished), and the
FLOPs and CPU latency of a trained model's exits. What experiments/anytime.py and stacking.py
share; `synthetic_records` also feeds the benchmark's AP model."""
import concurrent.futures
import functools
import json
import multiprocessing
import os
import pathlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import gin
import tensorflow as tf
import tf_keras

from bench.timing import alternate, say
from nasfpn_tf import checkpointing
from nasfpn_tf import config
from nasfpn_tf.data import create_coco_tfrecord, synthetic
from nasfpn_tf.export.saved_model import load_model
from nasfpn_tf.models import factory
from nasfpn_tf.models.retinanet import RetinaNet
from nasfpn_tf.search.proxy import configure_threads
from nasfpn_tf.training import distribute
from nasfpn_tf.training import trainer as trainer_lib
from nasfpn_tf.utils import model_stats
from nasfpn_tf.utils.files import atomic_write

# What `make demo` trains: its gin file and the size of its synthetic splits.
DEMO_GIN = 'demo.gin'
DEMO_NUM_TRAIN, DEMO_NUM_VAL = 2000, 200


def synthetic_records(work_dir: pathlib.Path, num_train: int, num_val: int,
                      image_size: int = 256) -> Dict[str, str]:
  """The synthetic shapes (seed 0, ids 1..9; at 256 px nominal, the images of `make demo` at
  its sizes) as TFRecords in work_dir, made once; the val split in one shard, in image order.
  `num_train` 0: no train split (its pattern then matches nothing)."""
  suffix = '' if image_size == 256 else f'_{image_size}px'
  root = pathlib.Path(work_dir) / f'synthetic_{num_train}_{num_val}{suffix}'
  done = root / 'DONE'
  if not done.exists():
    say(f'writing {num_train} + {num_val} synthetic images to {root}')
    synthetic.generate(root / 'raw', num_train=num_train, num_val=num_val,
                       image_size=image_size, seed=0, num_processes=2)
    for split, count in (('train', num_train), ('val', num_val)):
      if count:
        create_coco_tfrecord.convert(
            str(root / 'raw' / 'annotations' / f'instances_{split}.json'),
            str(root / 'raw' / split), str(root / split),
            num_shards=4 if split == 'train' else 1, num_threads=2)
    done.write_text('ok')
  return {'train': str(root / 'train-*.tfrecord'), 'val': str(root / 'val-*.tfrecord'),
          'val_json': str(root / 'raw' / 'annotations' / 'instances_val.json')}


def demo_bindings(records: Dict[str, str], train_steps: Optional[int] = None,
                  extra: Sequence[str] = ()) -> list:
  """Bindings on top of demo.gin: its records, `train_steps` (None: the demo's 1100) with the
  cosine schedule stretched to it, then `extra`."""
  bindings = [f"build_train_dataset.file_pattern = '{records['train']}'",
              f"build_eval_dataset.file_pattern = '{records['val']}'"]
  if train_steps is not None:
    bindings += [f'TRAIN_STEPS = {train_steps}',
                 f'CosineDecayWithWarmup.warmup_steps = {max(1, min(100, train_steps // 10))}',
                 f'RetinaNetTrainer.checkpoint_every_steps = {min(500, train_steps)}',
                 f'RetinaNetTrainer.log_every_steps = {min(100, train_steps)}']
  return bindings + list(extra)


def train_and_evaluate(model_dir: pathlib.Path, bindings: Sequence[str],
                       seed: int = 0, gin_file: str = DEMO_GIN) -> Dict[str, Any]:
  """`gin_file` (demo.gin, or a variant that includes it such as fcos_demo.gin) with `bindings`
  trained in `model_dir` and evaluated on the val records; returns its eval_metrics.json. A
  model dir whose metrics are at the last step is reused as is; an interrupted one resumes from
  its last checkpoint. `seed` draws the initial weights and the data order. A finished model dir
  of another model than the bindings build (another pyramid, say) raises CheckpointMismatchError
  naming what differs, as resuming it would."""
  metrics_path = pathlib.Path(model_dir) / trainer_lib.METRICS_FILE
  config.parse_gin([gin_file], bindings)
  train_steps = _bound_value('RetinaNetTrainer.train_steps')
  if metrics_path.exists():
    metrics = json.loads(metrics_path.read_text())
    if metrics['step'] >= train_steps:
      differences = checkpointing.model_config_differences(
          str(model_dir), factory.build_retinanet().get_config())
      if differences:
        raise checkpointing.CheckpointMismatchError(
            f'{model_dir} holds a finished model other than the one asked for:\n{differences}\n'
            'Give another output dir, or remove that model dir to train it again.')
      say(f'{model_dir}: finished at step {metrics["step"]}, reused')
      return metrics
  say(f'{model_dir}: training to step {train_steps} (seed {seed})')
  tf_keras.utils.set_random_seed(seed)
  trainer = trainer_lib.RetinaNetTrainer(str(model_dir), distribute.get_strategy('auto'),
                                         mode='train_and_eval')
  trainer.run()
  return json.loads(metrics_path.read_text())


class Run(NamedTuple):
  """One `train_and_evaluate` call of `train_all`."""
  model_dir: pathlib.Path
  bindings: Sequence[str]
  seed: int = 0
  gin_file: str = DEMO_GIN


def _start_worker(num_threads: int) -> None:
  """A `train_all` process, before its first TensorFlow op: its share of the CPU's threads, and
  GPU memory grown as needed (the default takes all of it, and the next process has none)."""
  configure_threads(num_threads)
  for gpu in tf.config.list_physical_devices('GPU'):
    tf.config.experimental.set_memory_growth(gpu, True)


def _train_in_worker(run: Run) -> Dict[str, Any]:
  tf_keras.backend.clear_session()
  return train_and_evaluate(run.model_dir, run.bindings, run.seed, run.gin_file)


def train_all(runs: Sequence[Run], parallel: int = 1,
              starting: Callable[[int], None] = lambda index: None) -> List[Dict[str, Any]]:
  """`train_and_evaluate` of every run; returns their metrics in the order of `runs`. With
  `parallel` > 1, that many at once, each in a worker process of its own (spawned: its own
  TensorFlow and gin, the CPU's threads split between them, GPU memory shared): for a GPU or a
  machine of many cores, where one demo run does not use it all; never more workers than runs,
  and a single run trains in this process. `starting(i)` is called as run i starts (progress).
  """
  if parallel < 1:
    raise ValueError(f'parallel must be >= 1, got {parallel}.')
  parallel = min(parallel, len(runs))  # A lone run keeps every thread, in this process.
  if parallel <= 1:
    results = []
    for index, run in enumerate(runs):
      starting(index)
      results.append(train_and_evaluate(run.model_dir, run.bindings, run.seed, run.gin_file))
    return results
  results: List[Optional[Dict[str, Any]]] = [None] * len(runs)
  threads = max(1, (os.cpu_count() or 1) // parallel)
  with concurrent.futures.ProcessPoolExecutor(
      parallel, mp_context=multiprocessing.get_context('spawn'), initializer=_start_worker,
      initargs=(threads,)) as pool:
    pending, next_index = {}, 0
    while next_index < len(runs) or pending:
      while next_index < len(runs) and len(pending) < parallel:
        starting(next_index)
        pending[pool.submit(_train_in_worker, runs[next_index])] = next_index
        next_index += 1
      finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in finished:
        results[pending.pop(future)] = future.result()
  return results


def _bound_value(binding: str) -> Any:
  """The value of a gin binding, through a macro (demo.gin binds train_steps to %TRAIN_STEPS)."""
  value = gin.query_parameter(binding)
  if isinstance(value, gin.config.ConfigurableReference) and value.scoped_selector.endswith(
      'gin.macro'):
    value = gin.query_parameter(value.scoped_selector + '.value')
  return value


def trained_model(model_dir: pathlib.Path) -> RetinaNet:
  """The float32 model of a trained model dir (its recorded config and last checkpoint)."""
  return load_model(str(model_dir))[0]


def exit_flops(model: RetinaNet, num_repeats: Optional[int] = None) -> int:
  """FLOPs of exit `num_repeats` (None: the last) at batch 1: backbone, the pyramids up to it
  and one head, by the TF profiler (`utils.model_stats`)."""
  return model_stats.count_flops(functools.partial(model.exit_outputs, num_repeats=num_repeats),
                                 model.image_size + [3])


def exit_latencies_ms(model: RetinaNet, exits: Sequence[int], runs: int) -> Dict[int, float]:
  """Median CPU latency in ms of each exit's `detect` (network + post-processing) at batch 1,
  the exits timed in turns (`timing.alternate`) over `runs` rounds."""
  images = tf.random.stateless_uniform([1] + model.image_size + [3], [0, 0], maxval=255.0)
  calls = {k: tf.function(functools.partial(model.detect, num_repeats=k)) for k in exits}
  timings = alternate({f'exit {k}': (lambda f=f: f(images)) for k, f in calls.items()}, runs,
                      'latency b1')
  return {k: 1000 * timings[f'exit {k}'].median for k in exits}


def write_rows(rows: Sequence[Dict[str, Any]], path: pathlib.Path) -> None:
  """The rows as JSON lines, in `path` (whole or not at all) and on stdout."""
  lines = [json.dumps(row) for row in rows]
  atomic_write(path, ''.join(line + '\n' for line in lines))
  for line in lines:
    print(line, flush=True)
