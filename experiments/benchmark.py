"""Our NAS-FPN RetinaNet vs TF Model Garden's, same architecture and weights, side by side.

For each configuration, TFM's model is built as a TFM user gets it (the `retinanet_resnetfpn_coco`
experiment with decoder `nasfpn`, its default detection generator: `nms_version` 'v2', per-class
top 5000 then per-class NMS), its batch-norm statistics set from random images so that
activations and scores keep a trained model's scale (`nasfpn_tf.utils.batch_norm`; scores then
sit near the 0.01 prior, below the 0.05 threshold, as most (anchor, class) scores of a trained
model do), ours is converted from it (`compat.tfm.retinanet_from_tfm`: same weights, raw outputs
checked equal), and in one process, alternating the two call by call:

* end-to-end inference (network + post-processing) at batch 1 and 8, and network-only latency
  (backbone + pyramid + head); each side gets its own input convention from the same pixels
  (ours: [0, 255], normalized inside; TFM: normalized outside, in the timed function);
* the post-processing alone on the same raw outputs with class logits lifted so that every
  pre-NMS candidate passes the score threshold (the worst case for ours: full NMS; not for
  TFM, whose padded NMS is slower when few candidates pass, as with real outputs);
* the training step (our `RetinaNetTrainer` step; TFM's `RetinaNetTask.train_step`) on one fixed
  batch with TFM `AnchorLabeler` targets, steady state after warm-up, from the same weights;
* with --profile_train_step, where each side's step spends its time, from the TF profiler, by
  op type: convolutions (forward and both gradients), batch norm + ReLU + max pool, and the rest
  (loss, casts, gradient sums, optimizer, resampling); and the ratio ours / TFM that would remain
  if everything but our convolutions and batch norms took no time (`train_step_ratio_bound_*`);
* peak memory (max RSS) of a subprocess per side running the end-to-end inference at batch 8,
  and one running train steps;
* COCO AP (pycocotools, 0-1 scale) of both on the same images with the same weights: TFM's model
  of the `small` architecture trained briefly on the synthetic shapes (`nasfpn_tf.data.synthetic`,
  cached in --work_dir), copied into ours, evaluated on the synthetic val split at the
  configuration's image size (for `r50_640` this is the small network run at 640 px: a trained
  R-50 is out of reach here, and its raw outputs equal TFM's anyway, so AP checks the
  post-processing and the precision).

Precision: inference and AP compare both in float32 (what TFM's factory builds and what our
exports run), so the detections can be equal; where bfloat16 runs natively (CPUs with AMX-BF16
or AVX512-BF16, GPUs; --fast_precision) ours in bfloat16 is an extra column. Training compares
like with like at that fast precision (TFM's COCO experiment trains in bfloat16:
`mixed_precision_dtype`), and in float32.

  python experiments/benchmark.py --configs=small,r50_640 --json --ap_num_val=64
      # 2 cores: small ~15 min plus ~15 min to train the AP model once; r50_640 ~30 min
  python experiments/benchmark.py --configs=r50_640 --repeats=3 --json
  python experiments/benchmark.py --configs=small --skip_train --skip_ap --skip_memory
  python experiments/benchmark.py --configs=r50_640 --profile_train_step --skip_inference \
      --skip_ap --skip_memory  # ~10 min
"""
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import gin  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from official.core import exp_factory, task_factory  # noqa: E402
from official.vision import registry_imports  # noqa: E402,F401  (TFM experiments and tasks)
from official.vision.ops import anchor  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

from nasfpn_tf.compat.tfm import load_tfm_retinanet_weights, retinanet_from_tfm  # noqa: E402
from nasfpn_tf.data import create_coco_tfrecord, input_pipeline, synthetic  # noqa: E402
from nasfpn_tf.evaluation import coco_metrics  # noqa: E402
from nasfpn_tf.models import factory as model_factory  # noqa: E402,F401  (gin: build_retinanet)
from nasfpn_tf.models.backbones import IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB  # noqa: E402
from nasfpn_tf.models.head import CLASS_PRIOR  # noqa: E402
from nasfpn_tf.models.retinanet import RetinaNet  # noqa: E402
from nasfpn_tf.training import precision as training_precision  # noqa: E402
from nasfpn_tf.training.trainer import RetinaNetTrainer  # noqa: E402
from nasfpn_tf.utils.batch_norm import calibrate_batch_norm  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', ['small', 'r50_640'], 'Configurations to run (see CONFIGS).')
flags.DEFINE_bool('json', False, 'Also print one JSON object per configuration (last lines).')
flags.DEFINE_integer('repeats', 5, 'Timed calls per side for batch-1 and network-only latency, '
                     'and timed train steps per variant.')
flags.DEFINE_integer('repeats_b8', 3, 'Timed calls per side at batch 8.')
flags.DEFINE_integer('train_batch', None, 'Training batch (default: per configuration).')
flags.DEFINE_bool('skip_inference', False, 'Skip the latency comparison (to debug the rest).')
flags.DEFINE_bool('skip_train', False, 'Skip the training-step comparison.')
flags.DEFINE_bool('skip_ap', False, 'Skip the COCO AP comparison.')
flags.DEFINE_bool('skip_memory', False, 'Skip the peak-memory subprocesses.')
flags.DEFINE_bool('profile_train_step', False,
                  'After timing, trace --profile_steps train steps per side and variant and print '
                  'where the time goes by op type. Runs TF with one inter-op thread (ops one at '
                  'a time, so their durations add up to the step; step times stay within noise).')
flags.DEFINE_integer('profile_steps', 2, 'Train steps traced per side with --profile_train_step.')
flags.DEFINE_bool('xla', False, 'Also time ours with XLA (jit_compile) for the network and the '
                  'train step (on this 2-core CPU: train step 2.3x slower than without).')
flags.DEFINE_enum('fast_precision', 'auto', ['auto', 'float32', 'bfloat16'],
                  'Training precision of both sides (and the extra inference column of ours); '
                  'auto: bfloat16 with AMX-BF16, AVX512-BF16 or a GPU, else float32.')
flags.DEFINE_string('work_dir', os.path.join(tempfile.gettempdir(), 'nasfpn_benchmark'),
                    'Cache of the synthetic data and the AP model (reused across runs).')
flags.DEFINE_integer('ap_train_steps', 800, 'Training steps of the AP model (batch 8).')
flags.DEFINE_integer('ap_num_train', 800, 'Synthetic training images for the AP model.')
flags.DEFINE_integer('ap_num_val', 100, 'Synthetic validation images AP is measured on.')
# Memory workers (internal): one side, one job, in a fresh process.
flags.DEFINE_enum('worker', None, ['infer', 'train'], 'Internal: run one peak-memory job.')
flags.DEFINE_string('worker_spec', None, 'Internal: JSON job description of a worker.')


class Config(NamedTuple):
  """One benchmark configuration: a NAS-FPN RetinaNet, 91 classes (COCO ids), levels 3-7."""
  resnet: int
  num_filters: int
  num_repeats: int
  image_size: int
  train_batch: int
  label: str


CONFIGS = {
    'small': Config(18, 64, 3, 256, 8, 'NAS-FPN R-18 3@64, 256 px'),
    'r50_640': Config(50, 256, 7, 640, 2, 'NAS-FPN R-50 7@256, 640 px'),
}
# The AP model: the small architecture, trained once on the synthetic shapes.
AP_ARCHITECTURE = 'small'
AP_TRAIN_BATCH = 8
NUM_CLASSES = 91
# Class prior that lifts every pre-NMS candidate above the 0.05 score threshold (worst case).
WORST_CASE_PRIOR = 0.3


def _say(message: str) -> None:
  print(f'[{time.strftime("%H:%M:%S")} load {os.getloadavg()[0]:.2f}] {message}', flush=True)


_SUFFIX = {'float32': 'fp32', 'bfloat16': 'bf16'}


def _policy(precision: str) -> str:
  return {'float32': 'float32', 'bfloat16': 'mixed_bfloat16'}[precision]


def fast_precision() -> str:
  """bfloat16 where the hardware runs it natively, else float32: a GPU, or a CPU with AMX-BF16
  (Intel Sapphire Rapids and later) or AVX512-BF16 (AMD Zen 4: a 3x3 conv at 256 channels ran
  2.0x faster than in float32 on 2 cores)."""
  if FLAGS.fast_precision != 'auto':
    return FLAGS.fast_precision
  if tf.config.list_physical_devices('GPU'):
    return 'bfloat16'
  hardware = training_precision.bfloat16_hardware(training_precision.cpu_flags())
  return 'bfloat16' if hardware else 'float32'


class _Policy:
  """Keras global policy inside a with block: layers take it when built."""

  def __init__(self, precision: str):
    self._policy = _policy(precision)

  def __enter__(self):
    self._previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy(self._policy)

  def __exit__(self, *exc):
    tf_keras.mixed_precision.set_global_policy(self._previous)


# Models.

def tfm_task(config: Config, image_size: Optional[int] = None):
  """TFM's RetinaNet task for `config`: the COCO experiment with the nasfpn decoder."""
  size = image_size or config.image_size
  experiment = exp_factory.get_exp_config('retinanet_resnetfpn_coco')
  task_config = experiment.task
  task_config.init_checkpoint = None  # No ImageNet download; weights come from us.
  model = task_config.model
  model.num_classes = NUM_CLASSES
  model.input_size = [size, size, 3]
  model.backbone.resnet.model_id = config.resnet
  model.decoder.type = 'nasfpn'
  model.decoder.nasfpn.num_filters = config.num_filters
  model.decoder.nasfpn.num_repeats = config.num_repeats
  model.head.num_filters = config.num_filters
  return task_factory.get_task(task_config)


def build_tfm(task, precision: str = 'float32', weights_from=None):
  """TFM's model (`task.build_model()`: l2 from the task's losses), optionally with the weights of
  another TFM model of the same architecture."""
  with _Policy(precision):
    model = task.build_model()
  if weights_from is not None:
    model.set_weights(weights_from.get_weights())
  return model


def build_ours(model_config: Dict[str, Any], precision: str, tfm_model=None) -> RetinaNet:
  """Our RetinaNet from its config in `precision`, with the TFM model's weights if given."""
  with _Policy(precision):
    model = RetinaNet(**model_config)
  if tfm_model is not None:
    load_tfm_retinanet_weights(model, tfm_model)
  return model


def normalize(images: tf.Tensor) -> tf.Tensor:
  """TFM's input convention (its parser normalizes outside the model)."""
  return (images - tf.constant(IMAGENET_MEAN_RGB)) / tf.constant(IMAGENET_STDDEV_RGB)


def tfm_detect_fn(tfm_model, image_size: int):
  """TFM end to end: normalization + model + its default detection generator."""
  def detect(images):
    image_shape = tf.tile(tf.constant([[image_size, image_size]], tf.float32),
                          [tf.shape(images)[0], 1])
    outputs = tfm_model(normalize(images), image_shape=image_shape, training=False)
    return {k: outputs[k] for k in coco_metrics.DETECTION_KEYS}
  return tf.function(detect)


def tfm_network_fn(tfm_model):
  """TFM backbone + decoder + head, inference mode (its model call adds post-processing)."""
  def network(images):
    features = tfm_model.decoder(tfm_model.backbone(normalize(images), training=False),
                                 training=False)
    scores, boxes, _ = tfm_model.head(features, training=False)
    return scores, boxes
  return tf.function(network)


def ours_network_fn(model, jit_compile=False):
  return tf.function(lambda images: model(images, training=False), jit_compile=jit_compile)


def random_images(batch: int, size: int, seed: int = 1) -> tf.Tensor:
  return tf.random.stateless_uniform([batch, size, size, 3], seed=[seed, 0], maxval=255.0)


def max_abs_diff(ours_model, tfm_model, size: int) -> float:
  """Largest difference of the raw outputs (class logits, box deltas) of the two networks."""
  images = random_images(2, size, seed=7)
  ours = ours_model(images, training=False)
  scores, boxes, _ = tfm_model.head(tfm_model.decoder(tfm_model.backbone(normalize(images))))
  diffs = [tf.reduce_max(tf.abs(tf.cast(ours[key][level], tf.float32) - theirs[level]))
           for key, theirs in (('cls_outputs', scores), ('box_outputs', boxes))
           for level in theirs]
  return float(tf.reduce_max(diffs))


# Timing.

def _run(fn: Callable, *args) -> float:
  start = time.perf_counter()
  tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, 'numpy') else t, fn(*args))
  return time.perf_counter() - start


def alternate(calls: Dict[str, Callable[[], Any]], repeats: int, what: str,
              warmup: int = 1) -> Dict[str, Dict[str, float]]:
  """Times each call `repeats` times, alternating the calls (order reversed every round so that
  background load hits all alike); returns {name: {'first', 'median', 'min'}} in seconds. The
  first call (tracing, one-off setup) and `warmup` - 1 more are untimed in the median."""
  first = {}
  for name, call in calls.items():
    first[name] = _run(call)
    _say(f'  {what} {name}: first call {first[name]:.2f} s')
    for _ in range(warmup - 1):
      _run(call)
  times = {name: [] for name in calls}
  names = list(calls)
  for round_index in range(repeats):
    for name in (names if round_index % 2 == 0 else names[::-1]):
      times[name].append(_run(calls[name]))
    _say(f'  {what} round {round_index + 1}/{repeats}: ' +
         ', '.join(f'{n} {times[n][-1]:.3f} s' for n in names))
  return {name: {'first': first[name], 'median': float(np.median(times[name])),
                 'min': float(np.min(times[name]))} for name in calls}


def lifted_raw_outputs(ours_model, images, prior: float):
  """Raw outputs of the network with every class logit shifted so the untrained head's 0.01
  prior becomes `prior`: nearly every pre-NMS candidate then passes the score threshold."""
  outputs = ours_model(images, training=False)
  shift = float(np.log(prior / (1 - prior)) - np.log(CLASS_PRIOR / (1 - CLASS_PRIOR)))
  cls = {k: tf.cast(v, tf.float32) + shift for k, v in outputs['cls_outputs'].items()}
  box = {k: tf.cast(v, tf.float32) for k, v in outputs['box_outputs'].items()}
  return cls, box


# Training steps.

def train_batch(config: Config, batch: int, seed: int = 0):
  """A fixed batch: random pixels, 1-8 random boxes per image labeled by TFM's AnchorLabeler
  (the targets both RetinaNet losses read)."""
  size = config.image_size
  anchors = anchor.Anchor(3, 7, 3, [0.5, 1.0, 2.0], 4.0, [size, size]).multilevel_boxes
  labeler = anchor.AnchorLabeler(0.5, 0.5)
  rng = np.random.default_rng(seed)
  per_image = []
  for _ in range(batch):
    count = int(rng.integers(1, 9))
    corner = rng.uniform(0, size * 0.7, [count, 2])
    extent = rng.uniform(size * 0.05, size * 0.3, [count, 2])
    boxes = tf.constant(np.concatenate([corner, np.minimum(corner + extent, size)], 1),
                        tf.float32)
    classes = tf.constant(rng.integers(1, NUM_CLASSES, [count, 1]), tf.int32)
    cls_targets, box_targets, _, cls_weights, box_weights = labeler.label_anchors(
        anchors, boxes, classes)
    per_image.append({'cls_targets': {k: tf.cast(v, tf.int32) for k, v in cls_targets.items()},
                      'box_targets': box_targets, 'cls_weights': cls_weights,
                      'box_weights': box_weights})
  labels = tf.nest.map_structure(lambda *x: tf.stack(x), *per_image)
  return random_images(batch, size, seed=3), labels


def _plain(value):
  """A config with Keras-tracked lists (ListWrapper) as plain lists: for gin and JSON."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)) or type(value).__name__ == 'ListWrapper':
    return [_plain(v) for v in value]
  return value


def _gin_bindings(model_config: Dict[str, Any]) -> List[str]:
  return [f'build_retinanet.{key} = {value!r}' for key, value in model_config.items()
          if key in model_factory.MODEL_ARGUMENTS]


def ours_train_step(model_config, precision, images, labels, tfm_model=None,
                    jit_compile=False, model_dir=None):
  """Our `RetinaNetTrainer`'s own step (gin-built model, SGD 0.01 / momentum 0.9) on a fixed
  batch; returns (step() -> total loss, trainer). With `jit_compile`, its replica step under XLA
  (the trainer's loop reads the iterator, which XLA cannot compile)."""
  gin.clear_config()
  gin.parse_config(_gin_bindings(model_config))
  batch = int(images.shape[0])
  trainer = RetinaNetTrainer(
      model_dir=model_dir or tempfile.mkdtemp(prefix='nasfpn_bench_'),
      strategy=tf.distribute.get_strategy(), mode='train', learning_rate=0.01,
      global_batch_size=batch, mixed_precision=None if precision == 'float32' else precision,
      force_bfloat16=True,  # the step of the precision measured, on every CPU
      log_every_steps=10**9, checkpoint_every_steps=10**9,
      train_dataset_fn=lambda _: tf.data.Dataset.from_tensors((images, labels)).repeat())
  gin.clear_config()
  if tfm_model is not None:
    load_tfm_retinanet_weights(trainer.model, tfm_model)
  if jit_compile:
    replica_step = tf.function(
        lambda x, y: trainer.strategy.run(trainer.replica_step, args=(x, y)), jit_compile=True)
    return (lambda: replica_step(images, labels)['total_loss']), trainer
  iterator = trainer.train_iterator()
  return (lambda: trainer.run_steps(iterator, 1)['total_loss']), trainer


def tfm_train_step(task, tfm_model, images, labels):
  """TFM's `RetinaNetTask.train_step` (SGD 0.01 / momentum 0.9) on the fixed batch, fed by an
  iterator like ours."""
  optimizer = tf_keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
  iterator = iter(tf.data.Dataset.from_tensors((normalize(images), labels)).repeat())
  step = tf.function(lambda: task.train_step(next(iterator), tfm_model, optimizer)['loss'])
  return step


# Where a train step spends its time (TF profiler).

PROFILE_CATEGORIES = ('conv', 'norm_relu_pool', 'rest')
_PROFILE_LABELS = {'conv': 'convolutions (forward, input and filter gradients)',
                   'norm_relu_pool': 'batch norm, ReLU, max pool (forward and gradients)',
                   'rest': 'rest (loss, casts, gradient sums, optimizer, resampling, XLA)'}


def _op_category(op_type: str) -> str:
  op_type = op_type.replace('_MklNative', '').replace('_Mkl', '')
  if 'Conv2D' in op_type:
    return 'conv'
  if op_type.startswith(('FusedBatchNorm', 'Relu', 'MaxPool')):
    return 'norm_relu_pool'
  return 'rest'


def _op_seconds_by_category(logdir: str) -> Dict[str, float]:
  """Sums the durations of the TF ops the executor ran (events 'name:Type' on the tf_Compute
  threads) by category; an async op's launch (our XLA-compiled focal loss) counts as 'rest'."""
  seconds = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
  for path in pathlib.Path(logdir).rglob('*.xplane.pb'):
    space = xplane_pb2.XSpace()
    space.ParseFromString(path.read_bytes())
    for plane in space.planes:
      for line in plane.lines:
        if not line.name.startswith('tf_Compute'):
          continue
        for event in line.events:
          name = plane.event_metadata[event.metadata_id].name
          op_type = name.rsplit(':', 1)[-1]
          if name == 'ExecutorState::ProcessAsync::Start':
            category = 'rest'
          elif ':' in name and '::' not in name and not op_type.startswith(' '):
            category = _op_category(op_type)
          else:
            continue  # Executor bookkeeping, or XLA's own events inside its launch.
          seconds[category] += event.duration_ps * 1e-12
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
        _run(step)
      tf.profiler.experimental.stop()
      result[name] = {k: v / repeats for k, v in _op_seconds_by_category(logdir).items()}
    finally:
      shutil.rmtree(logdir, ignore_errors=True)
    _say(f'  profiled {name}: ' + ', '.join(f'{k} {v:.3f} s' for k, v in result[name].items()))
  return result


# Peak memory (subprocesses).

def _max_rss_mb() -> float:
  """This process's peak resident memory. Not getrusage's ru_maxrss: Linux keeps that across
  execve, so a worker would report its parent's peak; VmHWM starts afresh with the new image."""
  status = pathlib.Path('/proc/self/status')
  for line in status.read_text().splitlines() if status.exists() else []:
    if line.startswith('VmHWM:'):
      return int(line.split()[1]) / 1024.0  # kB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # BSDs: KiB.


def run_worker(kind: str, spec: Dict[str, Any]) -> Dict[str, float]:
  """One side's job in this fresh process; returns its peak RSS (random weights: memory does not
  depend on their values)."""
  config = CONFIGS[spec['config']]
  base = _max_rss_mb()
  if kind == 'infer':
    images = random_images(8, config.image_size)
    if spec['side'] == 'ours':
      fn = tf.function(build_ours(spec['model_config'], spec['precision']).detect)
    else:
      fn = tfm_detect_fn(build_tfm(tfm_task(config)), config.image_size)
    _run(fn, images)  # The peak is reached in the first (tracing) call already.
  else:
    images, labels = train_batch(config, spec['batch'])
    if spec['side'] == 'ours':
      step, _ = ours_train_step(spec['model_config'], spec['precision'], images, labels)
    else:
      task = tfm_task(config)
      step = tfm_train_step(task, build_tfm(task, spec['precision']), images, labels)
    for _ in range(3):
      _run(step)
  return {'peak_rss_mb': _max_rss_mb(), 'rss_after_import_mb': base}


def measure_memory(kind: str, spec: Dict[str, Any]) -> Dict[str, float]:
  command = [sys.executable, os.path.abspath(__file__), f'--worker={kind}',
             f'--worker_spec={json.dumps(spec)}']
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  lines = [l for l in result.stdout.splitlines() if l.startswith('{')]
  if result.returncode or not lines:
    raise RuntimeError(f'memory worker {kind} {spec["side"]} failed:\n{result.stderr[-3000:]}')
  return json.loads(lines[-1])


# COCO AP.

def synthetic_records(work_dir: pathlib.Path) -> Dict[str, str]:
  """The synthetic shapes (256 px nominal, ids 1..9) as TFRecords, made once."""
  root = work_dir / f'synthetic_{FLAGS.ap_num_train}_{FLAGS.ap_num_val}'
  done = root / 'DONE'
  if not done.exists():
    _say(f'AP: writing {FLAGS.ap_num_train} + {FLAGS.ap_num_val} synthetic images to {root}')
    synthetic.generate(root / 'raw', num_train=FLAGS.ap_num_train, num_val=FLAGS.ap_num_val,
                       image_size=256, seed=0)
    for split in ('train', 'val'):
      create_coco_tfrecord.convert(str(root / 'raw' / 'annotations' / f'instances_{split}.json'),
                                   str(root / 'raw' / split), str(root / split),
                                   num_shards=4 if split == 'train' else 1, num_threads=2)
    done.write_text('ok')
  return {'train': str(root / 'train-*.tfrecord'), 'val': str(root / 'val-*.tfrecord'),
          'val_json': str(root / 'raw' / 'annotations' / 'instances_val.json')}


def _pipeline_config(image_size: int) -> Dict[str, Any]:
  return {'image_size': [image_size, image_size], 'num_classes': NUM_CLASSES, 'min_level': 3,
          'max_level': 7, 'anchor_num_scales': 3, 'anchor_aspect_ratios': [0.5, 1.0, 2.0],
          'anchor_size': 4.0}


def trained_ap_weights(work_dir: pathlib.Path, records: Dict[str, str]) -> str:
  """TFM's model of the AP architecture trained with TFM's own train step in float32 on the
  synthetic train split; returns its checkpoint, made once. (In bfloat16, 1.5x faster, one run of
  it diverged at step 39 on an AMD Zen 4.)"""
  config = CONFIGS[AP_ARCHITECTURE]
  steps = FLAGS.ap_train_steps
  prefix = work_dir / f'ap_model_{AP_ARCHITECTURE}_{FLAGS.ap_num_train}_{steps}' / 'weights'
  if tf.io.gfile.exists(str(prefix) + '.index'):
    return str(prefix)
  _say(f'AP: training TFM {config.label} for {steps} steps at batch {AP_TRAIN_BATCH} '
       '(once; cached in --work_dir)')
  task = tfm_task(config)
  model = build_tfm(task, 'float32')
  warmup = min(100, steps // 5)
  schedule = tf_keras.optimizers.schedules.CosineDecay(
      0.002, steps - warmup, alpha=0.0, warmup_target=0.02, warmup_steps=warmup)
  optimizer = tf_keras.optimizers.SGD(learning_rate=schedule, momentum=0.9, global_clipnorm=10.0)
  dataset = input_pipeline.build_train_dataset(
      file_pattern=records['train'], global_batch_size=AP_TRAIN_BATCH,
      model_config=_pipeline_config(config.image_size))
  dataset = dataset.map(lambda images, labels: (normalize(images), labels))
  iterator = iter(dataset)
  step = tf.function(lambda: task.train_step(next(iterator), model, optimizer)['loss'])
  start = time.perf_counter()
  for i in range(1, steps + 1):
    loss = float(step())
    if not np.isfinite(loss):
      raise RuntimeError(f'AP model training diverged at step {i}.')
    if i % 50 == 0 or i == steps:
      _say(f'  AP training step {i}/{steps}: loss {loss:.4f} '
           f'({(time.perf_counter() - start) / i:.2f} s/step)')
  prefix.parent.mkdir(parents=True, exist_ok=True)
  model.save_weights(str(prefix))
  return str(prefix)


def _sorted_detections(detections, index):
  count = int(detections['num_detections'][index])
  rows = np.concatenate([
      np.asarray(detections['detection_classes'][index, :count], np.float64)[:, None],
      np.asarray(detections['detection_scores'][index, :count], np.float64)[:, None],
      np.asarray(detections['detection_boxes'][index, :count], np.float64)], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


def same_detections(a, b, index) -> bool:
  """Same count, classes, scores (1e-5) and boxes (1e-3 px) for image `index`."""
  rows_a, rows_b = _sorted_detections(a, index), _sorted_detections(b, index)
  return (rows_a.shape == rows_b.shape and np.array_equal(rows_a[:, 0], rows_b[:, 0]) and
          np.allclose(rows_a[:, 1], rows_b[:, 1], atol=1e-5) and
          np.allclose(rows_a[:, 2:], rows_b[:, 2:], atol=1e-3))


def ap_comparison(config: Config, precision: str, work_dir: pathlib.Path) -> Dict[str, Any]:
  """AP of theirs and ours (float32, and ours in `precision` when that is bfloat16) with the
  trained AP weights, on the synthetic val split at the configuration's image size."""
  records = synthetic_records(work_dir)
  weights = trained_ap_weights(work_dir, records)
  ap_config = CONFIGS[AP_ARCHITECTURE]
  size = config.image_size
  tfm_model = build_tfm(tfm_task(ap_config, image_size=size))
  tfm_model.load_weights(weights).expect_partial()
  ours = retinanet_from_tfm(tfm_model)
  detectors = {'theirs': tfm_detect_fn(tfm_model, size), 'ours': tf.function(ours.detect)}
  if precision != 'float32':
    detectors['ours_bf16'] = tf.function(
        build_ours(ours.get_config(), precision, tfm_model).detect)
  evaluators = {name: coco_metrics.CocoEvaluator(annotation_file=records['val_json'])
                for name in detectors}
  dataset = input_pipeline.build_eval_dataset(
      file_pattern=records['val'], global_batch_size=8,
      model_config=_pipeline_config(size))
  identical = {name: 0 for name in detectors if name != 'theirs'}
  seconds = {name: 0.0 for name in detectors}
  num_images = 0
  for images, labels in dataset:
    outputs = {}
    for name, detect in detectors.items():
      start = time.perf_counter()
      outputs[name] = {k: v.numpy() for k, v in detect(images).items()}
      seconds[name] += time.perf_counter() - start
    for name, detections in outputs.items():
      mapped = dict(detections, detection_boxes=input_pipeline.to_original_image(
          detections['detection_boxes'], labels['image_info']).numpy())
      evaluators[name].update(labels['source_id'], mapped)
    for i in range(int(images.shape[0])):
      for name in identical:
        identical[name] += same_detections(outputs[name], outputs['theirs'], i)
    num_images += int(images.shape[0])
  result = {'ap_images': num_images, 'ap_model': (
      f'{ap_config.label} trained {FLAGS.ap_train_steps} steps on synthetic shapes' +
      ('' if size == ap_config.image_size else f', run at {size} px'))}
  for name, evaluator in evaluators.items():
    metrics = evaluator.evaluate()
    result[f'ap_{name}'] = metrics['AP']
    result[f'ap50_{name}'] = metrics['AP50']
    result[f'eval_seconds_{name}'] = seconds[name]
  for name, count in identical.items():
    result[f'identical_detections_{name}'] = count / num_images
  result['ap_diff'] = result['ap_ours'] - result['ap_theirs']
  return result


# One configuration.

def inference_comparison(ours, ours_bf16, tfm_model, size: int) -> Dict[str, Any]:
  """Latency rows: end to end at batch 1 and 8, network only, post-processing alone with every
  candidate above the threshold; ours float32 against TFM float32, `ours_bf16` (None: not
  measured) as an extra column."""
  row = {}
  for batch, repeats in ((1, FLAGS.repeats), (8, FLAGS.repeats_b8)):
    images = random_images(batch, size)
    calls = {'ours': tf.function(ours.detect), 'theirs': tfm_detect_fn(tfm_model, size)}
    if ours_bf16 is not None:
      calls['ours_bf16'] = tf.function(ours_bf16.detect)
    calls = {k: (lambda f=f: f(images)) for k, f in calls.items()}
    if batch == 1:
      calls.update({f'{k}_net': (lambda f=f: f(images)) for k, f in (
          ('ours', ours_network_fn(ours)), ('theirs', tfm_network_fn(tfm_model)))})
      if ours_bf16 is not None:
        calls['ours_bf16_net'] = (lambda f=ours_network_fn(ours_bf16): f(images))
      if FLAGS.xla:
        calls['ours_net_xla'] = (lambda f=ours_network_fn(ours, True): f(images))
    times = alternate(calls, repeats, f'b{batch}')
    for k, t in times.items():
      kind = 'network' if '_net' in k else 'e2e'
      key = k.replace('_net', '')  # ours_bf16_net -> network_s_b1_ours_bf16
      row[f'{kind}_s_b{batch}_{key}'] = t['median']
      row[f'{kind}_first_call_s_b{batch}_{key}'] = t['first']
  row['e2e_latency_ratio_b1'] = row['e2e_s_b1_ours'] / row['e2e_s_b1_theirs']
  row['e2e_latency_ratio_b8'] = row['e2e_s_b8_ours'] / row['e2e_s_b8_theirs']
  row['network_latency_ratio'] = row['network_s_b1_ours'] / row['network_s_b1_theirs']
  row['postprocess_share'] = max(0.0, (row['e2e_s_b1_ours'] - row['network_s_b1_ours']) /
                                 row['e2e_s_b1_ours'])
  row['postprocess_share_theirs'] = max(0.0, (row['e2e_s_b1_theirs'] -
                                              row['network_s_b1_theirs']) /
                                        row['e2e_s_b1_theirs'])

  # Post-processing alone, every candidate above the score threshold (our worst case).
  cls, box = lifted_raw_outputs(ours, random_images(1, size), WORST_CASE_PRIOR)
  anchors = ours.anchor_boxes
  theirs_generator = tfm_model.detection_generator
  ours_pp = tf.function(lambda c, b: ours.detection_generator(c, b, anchors))
  theirs_pp = tf.function(lambda c, b: theirs_generator(
      b, c, {k: v[None] for k, v in anchors.items()}, tf.constant([[size, size]], tf.float32)))
  times = alternate({'ours': lambda: ours_pp(cls, box), 'theirs': lambda: theirs_pp(cls, box)},
                    FLAGS.repeats, 'post-processing, all candidates pass, b1')
  row['postprocess_worst_s_ours'] = times['ours']['median']
  row['postprocess_worst_s_theirs'] = times['theirs']['median']
  row['postprocess_share_worst'] = row['postprocess_worst_s_ours'] / (
      row['postprocess_worst_s_ours'] + row['network_s_b1_ours'])
  return row


def run_config(name: str, precision: str, work_dir: pathlib.Path) -> Dict[str, Any]:
  config = CONFIGS[name]
  size = config.image_size
  row: Dict[str, Any] = {'config': name, 'label': config.label, 'fast_precision': precision,
                         'load_avg_start': os.getloadavg()[0]}
  _say(f'== {name}: {config.label}, 91 classes; fast precision {precision}')
  task = tfm_task(config)
  tfm_model = build_tfm(task)
  # Trained-like activations: without this, random BN statistics let activations grow through
  # the repeats until every score saturates, a regime no trained model is in (and one where
  # TFM's NMS is much faster: its padded NMS stops early once 100 boxes per class are kept).
  calibrate_batch_norm(tfm_model, normalize(random_images(2, size, seed=5)))
  ours = retinanet_from_tfm(tfm_model)
  ours_bf16 = (None if precision == 'float32' else
               build_ours(ours.get_config(), precision, tfm_model))
  model_config = _plain(ours.get_config())
  row['params'] = int(ours.count_params())
  row['network_max_abs_diff'] = max_abs_diff(ours, tfm_model, size)
  if ours_bf16 is not None:
    row['network_max_abs_diff_bf16'] = max_abs_diff(ours_bf16, tfm_model, size)
  _say(f'built; raw outputs ours float32 vs TFM float32: max |diff| '
       f'{row["network_max_abs_diff"]:.3g}' + (
           f', ours bfloat16: {row["network_max_abs_diff_bf16"]:.3g}' if ours_bf16 else ''))

  if not FLAGS.skip_inference:
    row.update(inference_comparison(ours, ours_bf16, tfm_model, size))

  # Training.
  if not FLAGS.skip_train:
    batch = FLAGS.train_batch or config.train_batch
    images, labels = train_batch(config, batch)
    _say(f'training steps at batch {batch}: building the variants from the same weights')
    # float32 on both sides, and both at the fast precision (bfloat16: TFM's COCO experiment).
    variants = ('float32',) + (() if precision == 'float32' else (precision,))
    steps = {}
    for variant in variants:
      suffix = _SUFFIX[variant]
      steps[f'ours_{suffix}'], _ = ours_train_step(model_config, variant, images, labels,
                                                   tfm_model)
      steps[f'theirs_{suffix}'] = tfm_train_step(
          task, build_tfm(task, variant, weights_from=tfm_model), images, labels)
    if FLAGS.xla:
      steps['ours_fp32_xla'], _ = ours_train_step(model_config, 'float32', images, labels,
                                                  tfm_model, jit_compile=True)
    times = alternate(steps, FLAGS.repeats, f'train b{batch}', warmup=2)
    row['train_batch'] = batch
    for k, t in times.items():
      row[f'train_step_s_{k}'] = t['median']
      row[f'train_images_per_s_{k}'] = batch / t['median']
      row[f'train_first_step_s_{k}'] = t['first']
    # Every variant took the same number of steps on the same batch from the same weights:
    # the loss each computes next shows whether the two sides (and bfloat16) train alike.
    row['train_loss_after_steps'] = FLAGS.repeats + 2
    row['train_loss'] = {k: float(step()) for k, step in steps.items()}
    if FLAGS.profile_train_step:
      _say(f'profiling {FLAGS.profile_steps} train steps per side and variant')
      row['train_profile_s'] = profile_train_steps(steps, FLAGS.profile_steps)
      for variant in variants:
        ours = row['train_profile_s'][f'ours_{_SUFFIX[variant]}']
        theirs = row['train_profile_s'][f'theirs_{_SUFFIX[variant]}']
        # If everything but our convolutions and batch norms took no time.
        row[f'train_step_ratio_bound_{_SUFFIX[variant]}'] = (
            (ours['conv'] + ours['norm_relu_pool']) / sum(theirs.values()))
    for variant in variants:
      suffix = _SUFFIX[variant]
      row[f'train_step_ratio_{suffix}'] = (row[f'train_step_s_ours_{suffix}'] /
                                           row[f'train_step_s_theirs_{suffix}'])
    # Like with like: both at the fast precision (TFM's COCO experiment trains in bfloat16).
    row['train_step_ratio'] = row[f'train_step_ratio_{_SUFFIX[precision]}']
    # Ours at the fast precision against TFM's model as its factory builds it (float32).
    row['train_step_ratio_vs_tfm_fp32'] = (row[f'train_step_s_ours_{_SUFFIX[precision]}'] /
                                           row['train_step_s_theirs_fp32'])

  # Peak memory.
  if not FLAGS.skip_memory:
    for kind in ('infer',) + (() if FLAGS.skip_train else ('train',)):
      for side in ('ours', 'theirs'):
        spec = {'config': name, 'side': side, 'model_config': model_config,
                # Inference in float32 on both sides, training at the fast precision.
                'precision': 'float32' if kind == 'infer' else precision,
                'batch': FLAGS.train_batch or config.train_batch}
        _say(f'peak memory: {kind} {side} ({spec["precision"]}) in a subprocess')
        row[f'peak_rss_mb_{kind}_{side}'] = measure_memory(kind, spec)['peak_rss_mb']
      row[f'peak_memory_ratio_{kind}'] = (row[f'peak_rss_mb_{kind}_ours'] /
                                          row[f'peak_rss_mb_{kind}_theirs'])
    row['peak_memory_ratio'] = row['peak_memory_ratio_infer']

  if not FLAGS.skip_ap:
    row.update(ap_comparison(config, precision, work_dir))
  row['load_avg_end'] = os.getloadavg()[0]
  return row


# Report.

def _fmt(value, unit='s'):
  if value is None:
    return '-'
  if unit == 's':
    return f'{value * 1000:.0f} ms' if value < 1 else f'{value:.2f} s'
  return f'{value:.3g}'


def print_table(row: Dict[str, Any]) -> None:
  bf16 = row['fast_precision'] != 'float32'
  lines = [f'\n### {row["config"]}: {row["label"]}, {row["params"]:,} params '
           f'(load {row["load_avg_start"]:.1f} -> {row["load_avg_end"]:.1f})',
           f'raw outputs, ours float32 vs TFM float32: max |diff| = '
           f'{row["network_max_abs_diff"]:.3g}' + (
               f' (ours bfloat16: {row["network_max_abs_diff_bf16"]:.3g})' if bf16 else ''), '',
           '| measure | ours | TFM | ours / TFM |' + (' ours bfloat16 |' if bf16 else ''),
           '|---|---:|---:|---:|' + ('---:|' if bf16 else '')]

  def add(label, key_ours, key_theirs, key_bf16=None):
    ours, theirs = row.get(key_ours), row.get(key_theirs)
    if ours is None or theirs is None:
      return
    cells = [label, _fmt(ours), _fmt(theirs), f'{ours / theirs:.3f}']
    if bf16:
      cells.append(_fmt(row.get(key_bf16)) if key_bf16 else '')
    lines.append('| ' + ' | '.join(cells) + ' |')

  add('end-to-end latency, batch 1 (float32)', 'e2e_s_b1_ours', 'e2e_s_b1_theirs',
      'e2e_s_b1_ours_bf16')
  add('end-to-end latency, batch 8 (float32)', 'e2e_s_b8_ours', 'e2e_s_b8_theirs',
      'e2e_s_b8_ours_bf16')
  add('network only, batch 1 (float32)', 'network_s_b1_ours', 'network_s_b1_theirs',
      'network_s_b1_ours_bf16')
  add('first call (trace + run), batch 1', 'e2e_first_call_s_b1_ours',
      'e2e_first_call_s_b1_theirs', 'e2e_first_call_s_b1_ours_bf16')
  add('post-processing alone, all candidates pass, b1', 'postprocess_worst_s_ours',
      'postprocess_worst_s_theirs')
  if 'train_step_s_theirs_fp32' in row:
    batch = row['train_batch']
    add(f'train step, batch {batch}, float32', 'train_step_s_ours_fp32',
        'train_step_s_theirs_fp32')
    add(f'train step, batch {batch}, bfloat16', 'train_step_s_ours_bf16',
        'train_step_s_theirs_bf16')
  lines.append('')
  if 'postprocess_share' in row:
    lines.append(f'post-processing share of our end-to-end time: {row["postprocess_share"]:.1%} '
                 f'(all candidates passing: {row["postprocess_share_worst"]:.1%}); TFM: '
                 f'{row["postprocess_share_theirs"]:.1%}')
  if 'network_s_b1_ours_xla' in row:
    lines.append(f'ours network with XLA: {_fmt(row["network_s_b1_ours_xla"])}')
  if 'train_step_s_theirs_fp32' in row:
    names = [k[len('train_step_s_'):] for k in row if k.startswith('train_step_s_')]
    if bf16:
      lines.append(f'train step, ours bfloat16 / TFM float32 (as its factory builds it): '
                   f'{row["train_step_ratio_vs_tfm_fp32"]:.3f}')
    lines.append('train step (images/s; loss after the same steps): ' + ', '.join(
        f'{n} {_fmt(row["train_step_s_" + n])} ({row["train_images_per_s_" + n]:.2f}/s; '
        f'{row["train_loss"][n]:.4f})' for n in names))
  if 'train_profile_s' in row:
    profile = row['train_profile_s']
    names = list(profile)
    lines += ['', 'train step by op type, seconds per step (TF profiler, one inter-op thread):',
              '| op type | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
    rows = [(_PROFILE_LABELS[c], [profile[n][c] for n in names]) for c in PROFILE_CATEGORIES]
    rows.append(('total', [sum(profile[n].values()) for n in names]))
    lines += [f'| {label} | ' + ' | '.join(f'{v:.3f}' for v in values) + ' |'
              for label, values in rows]
    lines.append('ours / TFM if everything but our convolutions and batch norms took no time: ' +
                 ', '.join(f'{k[len("train_step_ratio_bound_"):]} {v:.3f}' for k, v in row.items()
                           if k.startswith('train_step_ratio_bound_')))
  if 'peak_memory_ratio' in row:
    lines.append('peak RSS: ' + ', '.join(
        f'{kind} ours {row[f"peak_rss_mb_{kind}_ours"]:.0f} MB / TFM '
        f'{row[f"peak_rss_mb_{kind}_theirs"]:.0f} MB = {row[f"peak_memory_ratio_{kind}"]:.2f}'
        for kind in ('infer', 'train') if f'peak_memory_ratio_{kind}' in row))
  if 'ap_theirs' in row:
    bf16_ap = (f'; ours bfloat16 {row["ap_ours_bf16"]:.4f} (identical detections on '
               f'{row["identical_detections_ours_bf16"]:.0%} of images)'
               if 'ap_ours_bf16' in row else '')
    lines.append(f'COCO AP ({row["ap_images"]} images; {row["ap_model"]}): ours '
                 f'{row["ap_ours"]:.4f}, TFM {row["ap_theirs"]:.4f}, diff {row["ap_diff"]:+.4f}, '
                 f'identical detections on {row["identical_detections_ours"]:.0%} of images'
                 f'{bf16_ap}')
  print('\n'.join(lines), flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  tf.get_logger().setLevel('ERROR')
  if FLAGS.profile_train_step:
    tf.config.threading.set_inter_op_parallelism_threads(1)
  if FLAGS.worker:
    print(json.dumps(run_worker(FLAGS.worker, json.loads(FLAGS.worker_spec))), flush=True)
    return
  unknown = [c for c in FLAGS.configs if c not in CONFIGS]
  if unknown:
    raise app.UsageError(f'unknown --configs {unknown}; known: {list(CONFIGS)}')
  work_dir = pathlib.Path(FLAGS.work_dir)
  work_dir.mkdir(parents=True, exist_ok=True)
  precision = fast_precision()
  rows = []
  for name in FLAGS.configs:
    rows.append(run_config(name, precision, work_dir))
    print_table(rows[-1])
  if len(rows) > 1:
    for row in rows:
      print_table(row)
  if FLAGS.json:
    for row in rows:
      print(json.dumps(row, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
