"""What the test files share: tiny-model gin bindings, readers of what training writes, the
matching of one detector's detections against another's, the loading of experiment scripts, the
lookup of the coco128 sample, and a search driven without Ray."""
import contextlib
import importlib.util
import io
import json
import os
import pathlib

import numpy as np
import pytest
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_bindings(records, **trainer):
  """Gin bindings of a tiny NAS-FPN RetinaNet (ResNet-10, 16 filters, 128 px) on `records`;
  `trainer` overrides RetinaNetTrainer bindings (values as Python literals)."""
  trainer = {'train_steps': 4, 'global_batch_size': 2, 'checkpoint_every_steps': 2,
             'log_every_steps': 2, 'eval_batch_size': 2, **trainer}
  return [
      'build_retinanet.image_size = (128, 128)',
      'build_retinanet.num_classes = 10',  # synthetic ids 1..9
      "build_retinanet.backbone = 'resnet10'",
      'build_retinanet.num_filters = 16',
      'build_retinanet.num_repeats = 1',
      'build_retinanet.head_num_convs = 1',
      'build_retinanet.head_num_filters = 16',
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


def drive_in_process(searcher, num_parallel=3, stop_after=None):
  """Drives a search's `ControllerSearcher` as Ray Tune would, `num_parallel` trials at a time,
  with the synthetic proxy in this process; stops (as a kill would) after `stop_after`
  completions."""
  # pylint: disable=g-import-not-at-top
  from nasfpn_tf.search.trials import synthetic_result
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
    result = synthetic_result(searcher.settings.space, config['block_specs'])
    searcher.results.put(config['key'], result)
    searcher.complete(trial_id, {'result_json': json.dumps(result), 'reused': False,
                                 'seconds': 0.1}, False)
    completions += 1


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
