"""What the test files share: tiny-model gin bindings and model config, a tiny model trained a few
steps, readers of what training writes, the matching of one detector's detections against
another's, a SavedModel served in a fresh process, the loading of experiment scripts, the lookup
of the coco128 sample, a search driven without Ray, a mixed-precision policy set for one block,
the deadline of every subprocess a test starts, and free ports for a server a test starts."""
import contextlib
import importlib.util
import io
import json
import os
import pathlib
import pickle
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parents[1]

# The deadline of every subprocess a test starts: a backstop against a hung child, not a speed
# check. A fresh Python that imports TensorFlow and builds or trains a tiny model takes 10-60 s
# alone; beside another test worker and a CPU-bound process on a 2-core machine, several
# minutes. A test that must be faster says so by measuring in experiments/, never here.
SUBPROCESS_TIMEOUT = 1200

# The tiny network of the suite: 128 px, a 16-filter NAS-FPN stacked once, a 1-conv head; the
# backbone and class count left to the caller (e.g. a search proxy's gin, a dataset's label map).
TINY_NETWORK = [
    'build_retinanet.image_size = (128, 128)',
    'build_retinanet.num_filters = 16',
    'build_retinanet.num_repeats = 1',
    'build_retinanet.head_num_convs = 1',
    'build_retinanet.head_num_filters = 16',
]
# The tiny model of the suite: TINY_NETWORK on ResNet-10 with 10 classes (synthetic ids 1..9).
TINY_MODEL = TINY_NETWORK + ['build_retinanet.num_classes = 10',
                             "build_retinanet.backbone = 'resnet10'"]

# What the input pipelines and the evaluation read of TINY_MODEL's model config (its geometry).
TINY_MODEL_CONFIG = {'image_size': [128, 128], 'num_classes': 10, 'min_level': 3, 'max_level': 7,
                     'anchor_num_scales': 3, 'anchor_aspect_ratios': [0.5, 1.0, 2.0],
                     'anchor_size': 4.0}


def tiny_bindings(records, **trainer):
  """Gin bindings of TINY_MODEL (with L2 weight decay) trained and evaluated on `records`;
  `trainer` overrides RetinaNetTrainer bindings (values as Python literals)."""
  trainer = {'train_steps': 4, 'global_batch_size': 2, 'checkpoint_every_steps': 2,
             'log_every_steps': 2, 'eval_batch_size': 2, **trainer}
  return TINY_MODEL + [
      'build_retinanet.l2_weight_decay = 1e-4',
      f"build_train_dataset.file_pattern = '{records['train']}'",
      f"build_eval_dataset.file_pattern = '{records['val']}'",
      'RetinaNetTrainer.learning_rate = @StepDecayWithWarmup()',
      'StepDecayWithWarmup.base_learning_rate = 0.01',
      'StepDecayWithWarmup.boundary_steps = [100]',
      'StepDecayWithWarmup.warmup_steps = 2',
      'StepDecayWithWarmup.warmup_learning_rate = 0.001',
  ] + [f'RetinaNetTrainer.{name} = {value!r}' for name, value in trainer.items()]


def spread_scores(model, seed=0):
  """Redraws the classifier kernel 10^4 times wider than TFM's init (stddev 1e-5), so an
  untrained model's scores spread over (0, 1) instead of tying at the 0.01 prior to 1e-7: which
  boxes make the top k then follows from the model, not from float rounding."""
  kernel = model.head.classifier.kernel
  kernel.assign(tf.random.stateless_normal(kernel.shape, [seed, 0], stddev=0.1, dtype=kernel.dtype))


def train_tiny_model(records, model_dir, bindings=(), mode='train', **trainer):
  """TINY_MODEL plus `bindings`, its classifier drawn wide (`spread_scores`: an untrained model's
  scores spread, so there are detections to compare), trained 2 steps (or `trainer`'s
  train_steps) on `records` through the trainer in `mode` (train, or train_and_eval), writing
  `model_dir`. Returns (the trainer, what it printed)."""
  # pylint: disable=import-outside-toplevel
  from nasfpn_tf import config
  from nasfpn_tf.training import trainer as trainer_lib
  config.parse_gin([], tiny_bindings(records, **{'train_steps': 2, **trainer}) + list(bindings))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    trained = trainer_lib.RetinaNetTrainer(str(model_dir), tf.distribute.get_strategy(),
                                           mode=mode)
    spread_scores(trained.model)
    trained.run()
  return trained, printed.getvalue()


def read_scalars(log_dir):
  """{tag: {step: value}} of the TensorBoard scalars under `log_dir`."""
  scalars = {}
  for path in sorted(pathlib.Path(log_dir).glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return scalars


def checkpoint_step(path):
  """The optimizer iteration count stored in checkpoint `path`."""
  reader = tf.train.load_checkpoint(path)
  keys = [k for k in reader.get_variable_to_shape_map()
          if k.startswith('optimizer/') and '/_iterations/' in k]
  assert len(keys) == 1, keys
  return int(reader.get_tensor(keys[0]))


def pairwise_iou(a, b):
  """[N, 4] x [M, 4] boxes (ymin, xmin, ymax, xmax) -> [N, M] IoU; 0 where both have no area."""
  low = np.maximum(a[:, None, :2], b[None, :, :2])
  high = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(high - low, 0, None), axis=-1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=-1)  # noqa: E731
  union = area(a)[:, None] + area(b)[None] - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_detections(expected, actual, image=0, min_iou=0.95, score_tolerance=0.02):
  """Greedy one-to-one matching of image `image`'s detections in `expected`'s score order: same
  class, box IoU >= `min_iou` or corners within 0.5 px (a box clipped to the image border may
  have no area), score within `score_tolerance`. Returns (unmatched expected indices, unmatched
  actual indices)."""
  n = int(expected['num_detections'][image])
  m = int(actual['num_detections'][image])
  a = expected['detection_boxes'][image, :n]
  b = actual['detection_boxes'][image, :m]
  same_box = (pairwise_iou(a, b) >= min_iou) | (np.abs(a[:, None] - b[None]).max(-1) <= 0.5)
  ok = (same_box
        & (expected['detection_classes'][image, :n, None]
           == actual['detection_classes'][image, None, :m])
        & (np.abs(expected['detection_scores'][image, :n, None]
                  - actual['detection_scores'][image, None, :m]) <= score_tolerance))
  free = np.ones(m, bool)
  missing = []
  for i in range(n):
    candidates = np.where(ok[i] & free)[0]
    if len(candidates):
      free[candidates[0]] = False
    else:
      missing.append(i)
  return missing, list(np.where(free)[0])


def load_experiment(name):
  """The module of `experiments/<name>.py` (a script directory, not a package)."""
  path = REPO / 'experiments' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def coco128_dir_or_skip():
  """The coco128 sample ($NASFPN_COCO128, else ../shared/data/coco128); skips the test when it
  is absent, but fails it when $CI is 'true': a CI run without the sample must not pass by
  skipping every test that reads real images."""
  path = pathlib.Path(os.environ.get('NASFPN_COCO128', REPO.parent / 'shared' / 'data' / 'coco128'))
  if not (path / 'annotations' / 'instances_train2017.json').exists():
    message = (f'coco128 not found at {path} (set $NASFPN_COCO128 to a folder with train2017/ '
               'and annotations/instances_train2017.json)')
    if os.environ.get('CI') == 'true':
      pytest.fail(f'{message}; CI=true, where its tests must run, not skip', pytrace=False)
    pytest.skip(message)
  return path


def drive_in_process(searcher, num_parallel=3, stop_after=None, result_fn=None):
  """Drives a search's `ControllerSearcher` as Ray Tune would, `num_parallel` trials at a time,
  with the synthetic proxy in this process (or `result_fn(space, block_specs)`, the proxy's
  result dict); stops (as a kill would) after `stop_after` completions."""
  # pylint: disable=g-import-not-at-top
  from nasfpn_tf.search.trials import synthetic_result
  result_fn = result_fn or synthetic_result
  in_flight, next_id, completions = [], 0, 0
  while True:
    while len(in_flight) < num_parallel:
      config = searcher.suggest(f't{next_id}')
      next_id += 1
      if config is None:
        break
      in_flight.append((f't{next_id - 1}', config))
    if not in_flight or completions == stop_after:
      return
    trial_id, config = in_flight.pop(0)
    result = result_fn(searcher.settings.space, config['block_specs'])
    searcher.results.put(config['key'], result)
    searcher.complete(trial_id, {'result_json': json.dumps(result), 'reused': False,
                                 'seconds': 0.1}, False)
    completions += 1



def run_synthetic_search(search_dir, algorithm, num_trials, space, **settings):
  """A search on the synthetic proxy in `search_dir`, driven in this process
  (`drive_in_process`); its `SearchSettings` (`settings`: any other fields, e.g. seed)."""
  from nasfpn_tf.search import runner  # pylint: disable=g-import-not-at-top
  settings = runner.SearchSettings(search_dir=str(search_dir), algorithm=algorithm,
                                   num_trials=num_trials, proxy='synthetic', space=space,
                                   **settings)
  runner.check_search_dir(settings)
  drive_in_process(runner.ControllerSearcher(settings, log=lambda line: None))
  return settings

def coco_subset(root: pathlib.Path, coco128: pathlib.Path, num_images: int) -> str:
  """The first `num_images` coco128 images (by id) with their annotations and COCO's 80
  categories, as a COCO json under `root`."""
  with open(coco128 / 'annotations' / 'instances_train2017.json', encoding='utf-8') as f:
    data = json.load(f)
  images = sorted(data['images'], key=lambda image: image['id'])[:num_images]
  ids = {image['id'] for image in images}
  data['images'] = images
  data['annotations'] = [a for a in data['annotations'] if a['image_id'] in ids]
  path = root / 'instances.json'
  path.write_text(json.dumps(data))
  return str(path)


def proxy_cache_folder(work_dir) -> pathlib.Path:
  """The one CPU proxy cache folder in `work_dir` (asserting no other and no staging left)."""
  from nasfpn_tf.search import feature_cache  # pylint: disable=import-outside-toplevel
  folders = [p for p in (pathlib.Path(work_dir) / feature_cache.CACHES_DIR).iterdir()
             if p.is_dir()]
  assert len(folders) == 1, folders  # one complete folder, no staging left
  return folders[0]


def write_tfm_backbone_checkpoint(name, prefix, image_size=128):
  """A TF Model Garden backbone ('resnet10', 'resnet18', 'mobilenetv2') written as TFM's ImageNet
  backbone checkpoints are, `tf.train.Checkpoint(backbone=...)`; returns (backbone, path)."""
  # pylint: disable=g-import-not-at-top
  import tf_keras
  from official.vision.modeling.backbones import mobilenet, resnet
  specs = tf_keras.layers.InputSpec(shape=[None, image_size, image_size, 3])
  if name.startswith('resnet'):
    backbone = resnet.ResNet(model_id=int(name[len('resnet'):]), input_specs=specs)
  else:
    backbone = mobilenet.MobileNet(model_id='MobileNetV2', input_specs=specs)
  # Batch-norm statistics away from their 0 / 1 start, so that loading them shows.
  for variable in backbone.non_trainable_variables:
    variable.assign(tf.random.uniform(variable.shape, 0.5, 1.5))
  return backbone, tf.train.Checkpoint(backbone=backbone).write(str(prefix))


def run_main(*args) -> str:
  """`nasfpn_tf.main` in-process with these command-line flags; returns what it printed."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from nasfpn_tf import main  # pylint: disable=import-outside-toplevel  (defines main's flags)
  flags.FLAGS.unparse_flags()
  try:
    with contextlib.redirect_stdout(io.StringIO()) as out:
      main.main(flags.FLAGS(['main.py', *args]))
  finally:
    flags.FLAGS.unparse_flags()
  return out.getvalue()


@contextlib.contextmanager
def global_policy(name):
  """tf_keras's global mixed-precision policy is `name` inside the block and the previous one
  after it, also when the block raises: later tests' models never inherit it."""
  import tf_keras  # pylint: disable=import-outside-toplevel
  previous = tf_keras.mixed_precision.global_policy()
  tf_keras.mixed_precision.set_global_policy(name)
  try:
    yield
  finally:
    tf_keras.mixed_precision.set_global_policy(previous)


def records_and_encoded_images(file_pattern):
  """The serialized tf.Examples of the TFRecords matching `file_pattern` (files in name order),
  and each one's encoded image bytes (the JPEG the conversion stored)."""
  from nasfpn_tf.data import tfexample  # pylint: disable=import-outside-toplevel
  examples = [record.numpy() for record in
              tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(file_pattern)))]
  encoded = [tf.train.Example.FromString(example).features.feature[tfexample.ENCODED]
             .bytes_list.value[0] for example in examples]
  return examples, encoded


# Runs in a fresh Python: loads the SavedModel, records each signature's inputs, then makes the
# pickled calls in order; an InvalidArgumentError is kept as its message.
_SERVE = r'''
import pickle, sys
import tensorflow as tf

export_dir, calls_path, outputs_path = sys.argv[1:]
with open(calls_path, 'rb') as f:
  calls = pickle.load(f)
signatures = tf.saved_model.load(export_dir).signatures
out = {'inputs': {name: {key: (spec.dtype.name, spec.shape.as_list())
                         for key, spec in function.structured_input_signature[1].items()}
                  for name, function in signatures.items()}}
for label, name, kwargs in calls:
  try:
    outputs = signatures[name](**{key: tf.constant(value) for key, value in kwargs.items()})
    out[label] = {key: value.numpy() for key, value in outputs.items()}
  except tf.errors.InvalidArgumentError as e:
    out[label] = e.message
with open(outputs_path, 'wb') as f:
  pickle.dump(out, f)
'''


def serve_in_fresh_process(export_dir, calls, work_dir, may_fail=()):
  """The SavedModel at `export_dir` loaded in a fresh Python (nothing of this process's graphs
  or Keras objects in reach) and called as `calls` say, in order: (label, signature name,
  {input name: value}). Returns {'inputs': {signature: {input: (dtype name, shape)}}, label:
  {output: array}}; a call whose label is in `may_fail` gives its InvalidArgumentError's message
  instead, any other call's error fails the test."""
  work_dir = pathlib.Path(work_dir)
  with open(work_dir / 'calls.pkl', 'wb') as f:
    pickle.dump(list(calls), f)
  subprocess.run([sys.executable, '-c', _SERVE, str(export_dir), str(work_dir / 'calls.pkl'),
                  str(work_dir / 'outputs.pkl')], check=True, cwd=REPO,
                 timeout=SUBPROCESS_TIMEOUT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  with open(work_dir / 'outputs.pkl', 'rb') as f:
    outputs = pickle.load(f)
  for label, name, _ in calls:
    if label not in may_fail:
      assert isinstance(outputs[label], dict), f'{name} ({label}) failed: {outputs[label]}'
  return outputs


def keras_detections(detect, size, images):
  """The eval path, one image at a time: eval preprocessing, `detect`, to_original_image."""
  # pylint: disable=import-outside-toplevel
  from official.vision.ops import preprocess_ops
  from nasfpn_tf.models import geometry
  outputs = []
  for image in images:
    inputs, image_info = preprocess_ops.resize_and_crop_image(tf.constant(image), size,
                                                              padded_size=size)
    detections = detect(inputs[None])
    detections['detection_boxes'] = geometry.to_original_image(
        detections['detection_boxes'], image_info[None])
    outputs.append({key: value.numpy() for key, value in detections.items()})
  return {key: np.concatenate([o[key] for o in outputs]) for key in outputs[0]}


def assert_same_detections(actual, expected, what):
  """Per image: as many detections, each expected one matched by its own actual one
  (`match_detections`)."""
  np.testing.assert_array_equal(actual['num_detections'], expected['num_detections'], what)
  for i, count in enumerate(expected['num_detections']):
    assert count > 0, f'{what}: image {i} has no detections to compare'
    missing, _ = match_detections(expected, actual, i)
    assert not missing, (f'{what}: image {i}: no match for classes '
                         f'{expected["detection_classes"][i, missing]} scores '
                         f'{expected["detection_scores"][i, missing]} boxes '
                         f'{expected["detection_boxes"][i, missing]}')


@contextlib.contextmanager
def saved_figures():
  """Inside the block, every matplotlib Figure saved (`Figure.savefig`, which pyplot's savefig
  calls too) is appended to the list it yields, so a test can read what a drawing plotted."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  figures = []
  original = Figure.savefig

  def savefig(figure, *args, **kwargs):
    figures.append(figure)
    return original(figure, *args, **kwargs)

  Figure.savefig = savefig
  try:
    yield figures
  finally:
    Figure.savefig = original


def read_png(path, min_colors=8):
  """The PNG at `path` decoded to an [H, W, channels] uint8 array; fails unless it is a PNG and
  shows a drawing: at least `min_colors` distinct colours (a blank or one-colour image has 1)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(path) as image:
    assert image.format == 'PNG', (path, image.format)
    pixels = np.asarray(image.convert('RGB'))
  colors = len(np.unique(pixels.reshape(-1, 3), axis=0))
  assert colors >= min_colors, f'{path} looks blank: {colors} distinct colours'
  return pixels


def plotted_lines(ax):
  """The (x, y) data of every line of a matplotlib Axes that has data, as float arrays."""
  return [(np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
          for line in ax.get_lines() if len(line.get_xdata())]


def merging_cells(model):
  """The MergingCell layers of a pyramid network (ours or its TFM twin), in build order."""
  from nasfpn_tf.layers import MergingCell  # pylint: disable=import-outside-toplevel
  return [layer for layer in model.layers if isinstance(layer, MergingCell)]


class PortTaken(Exception):
  """Raised by the `start` of `start_on_free_ports` when another process took one of its ports
  (`port_taken` of the server's output says so)."""


def port_taken(output):
  """Whether a server's output says it could not bind its port (gRPC, Ray, Python all print
  'Address already in use')."""
  return 'address already in use' in (output or '').lower()


def start_on_free_ports(start, count=1, attempts=3):
  """`start(ports)` with `count` distinct TCP ports that were free an instant before; returns
  what it returns.

  The ports are bound together (port 0 on every interface: they differ, and no other process can
  take them meanwhile) and released just before `start`, which must bind them itself (a server
  that takes its ports from a list given in advance, as TF_CONFIG). Another process may still
  take one in that instant: a `start` that finds a port taken raises `PortTaken` and is called
  again with new ports, up to `attempts` times.
  """
  for attempt in range(attempts):
    with contextlib.ExitStack() as held:
      sockets = [held.enter_context(socket.socket()) for _ in range(count)]
      for s in sockets:
        s.bind(('', 0))
      ports = [s.getsockname()[1] for s in sockets]
    try:
      return start(ports)
    except PortTaken:
      if attempt == attempts - 1:
        raise
  raise AssertionError('unreachable')


@contextlib.contextmanager
def own_session(command, env=None, **kwargs):
  """Runs `command` (Popen keyword arguments in `kwargs`) from the repository in a session of its
  own, so that what it starts (Ray's daemons and workers) stays in its process group, and kills
  the whole group after: a test never leaves, nor kills, another test's processes."""
  process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, **kwargs)
  try:
    yield process
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# oneDNN held below AVX512-BF16 by ONEDNN_MAX_CPU_ISA (the AVX2 emulation of docs/precision.md)
# on a CPU whose own flags have bfloat16 hardware: TensorFlow still routes float16/bfloat16 ops to
# oneDNN by the real flags, and oneDNN then has no kernel for them ("could not create a primitive
# descriptor", or a segfault in a bfloat16 matmul). An artefact of the emulation: on a real
# AVX2-only CPU TensorFlow does not route them there.
HALF_PRECISION_HELD_BACK = pytest.mark.skipif(
    os.environ.get('ONEDNN_MAX_CPU_ISA', '').upper() in {
        'SSE41', 'AVX', 'AVX2', 'AVX2_VNNI', 'AVX512_CORE', 'AVX512_CORE_VNNI'},
    reason='ONEDNN_MAX_CPU_ISA holds oneDNN below AVX512-BF16 on a CPU with bfloat16 hardware: '
           'no float16/bfloat16 kernels (training_helpers.HALF_PRECISION_HELD_BACK)')
