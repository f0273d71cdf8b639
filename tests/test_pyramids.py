"""Per-repeat pyramids (`build_retinanet.pyramids`, e.g. NAS-FPN behind FPN): each repeat builds
its own table with its own weights, the parameters add up part by part, the config round-trips
and the default model is what it was; bad bindings are named; a stack trains through the
trainer, exports to a SavedModel and a TFLite file that detect what the Keras model detects, and
is drawn; the search trains its samples behind a fixed FPN and records it."""
import json

import gin
import numpy as np
import pytest
import tensorflow as tf

from nasfpn_tf import config
from nasfpn_tf.data import tfexample
from nasfpn_tf.decoders import NASFPN
from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.export import tflite_runtime
from nasfpn_tf.export.saved_model import load_model
from nasfpn_tf.models import factory
from nasfpn_tf.models.retinanet import RetinaNet
from nasfpn_tf.search import configurables, feature_cache, progress, runner
from nasfpn_tf.search.space import SearchSpace
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.visualization.architecture import draw_pyramids
from training_helpers import TINY_MODEL, assert_same_detections, drive_in_process
from training_helpers import keras_detections, pairwise_iou, read_png, read_scalars
from training_helpers import records_and_encoded_images, run_main
from training_helpers import train_tiny_model

# Backbone features C3-C5 of a 128 px image, 8 channels: P6 and P7 are pooled from them.
FEATURES = {'3': [None, 16, 16, 8], '4': [None, 8, 8, 8], '5': [None, 4, 4, 8]}
TINY = dict(image_size=(128, 128), num_classes=10, backbone='resnet10', num_filters=16,
            head_num_convs=1, head_num_filters=16)


def _decoder(**kwargs):
  return NASFPN(FEATURES, num_filters=8, name='decoder', **kwargs)


def _cells(decoder, repeat):
  return [layer.name for layer in decoder.layers if layer.name.startswith(f'repeat{repeat}_')]


def test_each_repeat_builds_its_table_and_the_parameters_add_up():
  stack = _decoder(num_repeats=3, pyramids=['fpn', 'nasfpn', None])
  assert stack.repeat_specs == (specs_lib.fpn(), specs_lib.NASFPN, specs_lib.NASFPN)
  # FPN: one sum cell per level, top-down (P6 first, P7 last); NAS-FPN: the paper's 7 cells.
  assert _cells(stack, 0) == ['repeat0_cell0_sum_p6', 'repeat0_cell1_sum_p5',
                              'repeat0_cell2_sum_p4', 'repeat0_cell3_sum_p3',
                              'repeat0_cell4_sum_p7']
  assert _cells(stack, 1) == [name.replace('repeat2', 'repeat1') for name in _cells(stack, 2)]
  assert _cells(stack, 1)[0] == 'repeat1_cell0_global_pooling_p4' and len(_cells(stack, 1)) == 7
  # Inputs L, FPN F, NAS-FPN N: (L + F) + (L + 3N) - (L + N) = L + F + 2N.
  fpn, nas1, nas3 = (_decoder(block_specs=spec, num_repeats=n).count_params()
                     for spec, n in (('fpn', 1), ('nasfpn', 1), ('nasfpn', 3)))
  assert stack.count_params() == fpn + nas3 - nas1
  assert fpn < nas1  # the FPN repeat is the smaller one: the parts differ
  # Every repeat's outputs are a full pyramid P3-P7 of num_filters channels.
  assert {k: v.as_list() for k, v in stack.output_specs.items()} == {
      '3': [None, 16, 16, 8], '4': [None, 8, 8, 8], '5': [None, 4, 4, 8], '6': [None, 2, 2, 8],
      '7': [None, 1, 1, 8]}


def test_the_default_is_the_stack_of_one_table_as_before():
  default = _decoder(num_repeats=2)
  same = _decoder(num_repeats=2, pyramids=['nasfpn', 'nasfpn'])
  assert [w.name for w in default.weights] == [w.name for w in same.weights]
  assert 'pyramids' not in default.get_config() and default.block_specs == specs_lib.NASFPN
  assert same.get_config()['pyramids'] == ['nasfpn', 'nasfpn']
  model = RetinaNet(**TINY)
  assert 'pyramids' not in model.get_config()


def test_config_round_trip_and_early_exits():
  model = RetinaNet(num_repeats=2, block_specs=specs_lib.to_config(specs_lib.NASFPN),
                    pyramids=['fpn', None], **TINY)
  model_config = json.loads(json.dumps(model.get_config()))
  assert model_config['pyramids'] == ['fpn', None]
  assert model_config['block_specs'] == specs_lib.to_config(specs_lib.NASFPN)
  rebuilt = RetinaNet.from_config(model_config)
  assert rebuilt.get_config() == model.get_config()
  assert [(w.name, w.shape) for w in rebuilt.decoder.weights] == [
      (w.name, w.shape) for w in model.decoder.weights]
  assert [w.shape for w in rebuilt.weights] == [w.shape for w in model.weights]
  assert rebuilt.decoder.repeat_specs == (specs_lib.fpn(), specs_lib.NASFPN)
  rebuilt.set_weights(model.get_weights())
  images = tf.random.stateless_uniform([1, 128, 128, 3], [1, 2], maxval=255.0)
  np.testing.assert_allclose(rebuilt(images)['box_outputs']['3'],
                             model(images)['box_outputs']['3'], rtol=1e-5, atol=1e-5)
  # Exit 1 computes the FPN repeat alone: fewer convolutions, other outputs.
  early = model(images, num_repeats=1)['box_outputs']['3']
  assert early.shape == (1, 16, 16, 36)
  assert not np.allclose(early, model(images)['box_outputs']['3'])


@pytest.mark.parametrize('arguments,message', [
    (dict(num_repeats=2, pyramids=['fpn', 'fnp']),
     r"build_retinanet\.pyramids\[1\] = 'fnp' does not build a P3-P7 pyramid: Unknown block "
     r"spec 'fnp'"),
    (dict(num_repeats=3, pyramids=['fpn', 'nasfpn']),
     r'build_retinanet\.pyramids has 2 entries, but num_repeats = 3'),
    (dict(num_repeats=1, pyramids='fpn'), r"build_retinanet\.pyramids = 'fpn': give a list"),
    (dict(num_repeats=2, pyramids=['nasfpn_lite', 'nasfpn']),
     r"build_retinanet\.pyramids\[0\] = 'nasfpn_lite' does not build a P3-P7 pyramid: No "
     r'output cell produces level 7'),
    (dict(num_repeats=2, pyramids=['fpn', 'nasfpn'], block_specs='nasfpn_lite'),
     r"build_retinanet\.block_specs = 'nasfpn_lite' is unused: no entry of "
     r'build_retinanet\.pyramids'),
    (dict(num_repeats=2, pyramids=['fpn', None], decoder='nasfcos_fpn', detector='fcos'),
     r"build_retinanet\.pyramids needs build_retinanet\.decoder = 'nasfpn'"),
])
def test_bad_pyramids_are_named(arguments, message):
  with pytest.raises(ValueError, match=message):
    RetinaNet(**{**TINY, **arguments})


def test_a_gin_binding_builds_the_stack():
  config.parse_gin([], TINY_MODEL + ['build_retinanet.num_repeats = 2',
                                     "build_retinanet.pyramids = ['fpn', 'nasfpn']"])
  try:
    model = factory.build_retinanet()
  finally:
    gin.clear_config()
  assert model.decoder.repeat_specs == (specs_lib.fpn(), specs_lib.NASFPN)


def test_the_stack_is_drawn_one_panel_per_repeat(tmp_path):
  path = tmp_path / 'stack.png'
  draw_pyramids(['fpn', None], 3, 7, str(path), block_specs='nasfpn', title='stack')
  single = tmp_path / 'one.png'
  draw_pyramids(['fpn'], 3, 7, str(single))
  # Two panels stacked: about twice as tall as one.
  assert read_png(path).shape[0] > 1.8 * read_png(single).shape[0]
  with pytest.raises(ValueError, match=r"pyramids\[1\] = 'fnp'"):
    draw_pyramids(['fpn', 'fnp'], 3, 7, str(tmp_path / 'bad.png'))
  assert not (tmp_path / 'bad.png').exists()


STACK = ['build_retinanet.num_repeats = 2', "build_retinanet.pyramids = ['fpn', 'nasfpn']",
         # A near-untrained model: keep every candidate so there are detections to compare.
         'build_retinanet.pre_nms_score_threshold = 0.0', 'build_retinanet.max_detections = 20']


@pytest.fixture(scope='module')
def trained(synthetic_records, tmp_path_factory):
  """FPN then NAS-FPN, trained 2 steps through the trainer: the model dir."""
  model_dir = tmp_path_factory.mktemp('pyramids')
  train_tiny_model(synthetic_records, model_dir, STACK)
  return model_dir


def test_it_trains_and_the_model_dir_rebuilds_it(trained):
  losses = read_scalars(trained / 'train')['loss/total_loss']
  assert sorted(losses) == [2] and np.isfinite(losses[2])
  recorded = json.loads((trained / 'model_config.json').read_text())
  assert recorded['pyramids'] == ['fpn', 'nasfpn'] and recorded['num_repeats'] == 2
  model = load_model(str(trained))[0]
  assert model.decoder.repeat_specs == (specs_lib.fpn(), specs_lib.NASFPN)


def test_saved_model_and_tflite_detect_what_the_keras_model_detects(trained, synthetic_records,
                                                                    tmp_path):
  export_dir = tmp_path / 'export' / '1'
  run_main('--mode=export_saved_model', f'--model_dir={trained}', f'--export_dir={export_dir}')
  examples, _ = records_and_encoded_images(synthetic_records['val'])
  decoded = [tfexample.decode_example(record)['image'].numpy() for record in examples]
  images = np.stack([decoded[0], decoded[0][:, ::-1]])
  signature = tf.saved_model.load(str(export_dir)).signatures['serving_default']
  served = {k: v.numpy() for k, v in signature(images=tf.constant(images)).items()}
  model = load_model(str(trained))[0]
  size = model.image_size
  detect = tf.function(model.detect, input_signature=[tf.TensorSpec([None] + size + [3])])
  assert_same_detections(served, keras_detections(detect, size, images),
                         'serving_default')

  path = tmp_path / 'stack.tflite'
  run_main('--mode=export_tflite', f'--model_dir={trained}', f'--tflite_path={path}')
  detector = tflite_runtime.TFLiteDetector(model_path=str(path))
  image = tf.random.stateless_uniform([1] + size + [3], [5, 6], maxval=255.0)
  expected = {k: v.numpy() for k, v in model.detect(image).items()}
  actual = detector(image.numpy())
  assert actual['detection_classes'][0, 0] == expected['detection_classes'][0, 0]
  assert actual['detection_scores'][0, 0] == pytest.approx(
      expected['detection_scores'][0, 0], abs=1e-4)
  assert pairwise_iou(actual['detection_boxes'][0, :1],
                      expected['detection_boxes'][0, :1])[0, 0] > 0.95


# The search: 3-cell samples of P3-P5 behind a fixed FPN.
SPACE = SearchSpace(num_cells=3, min_level=3, max_level=5)


def _settings(tmp_path, **overrides):
  values = dict(search_dir=str(tmp_path / 'search'), algorithm='random', num_trials=6,
                proxy='synthetic', space=SPACE, seed=1, pyramids=('fpn', 'searched'))
  return runner.SearchSettings(**{**values, **overrides})


def test_the_search_trains_its_samples_behind_a_fixed_fpn_and_records_it(tmp_path):
  settings = _settings(tmp_path)
  runner.check_pyramids(settings)
  runner.check_search_dir(settings)
  searcher = runner.ControllerSearcher(settings, log=lambda line: None)
  trial = searcher.suggest('t0')
  assert trial['gin_bindings'] == ["build_retinanet.pyramids = ['fpn', None]",
                                   'build_retinanet.num_repeats = 2']
  # The trial's bindings build the sample behind the FPN.
  config.parse_gin([], TINY_MODEL + ['build_retinanet.min_level = 3',
                                     'build_retinanet.max_level = 5'] + trial['gin_bindings'])
  try:
    gin.bind_parameter('build_retinanet.block_specs', trial['block_specs'])
    model = factory.build_retinanet()
  finally:
    gin.clear_config()
  assert model.decoder.repeat_specs == (specs_lib.fpn(3, 5),
                                        specs_lib.resolve(trial['block_specs']))
  drive_in_process(searcher)
  records = [json.loads(line) for line in
             (tmp_path / 'search' / search_dir_lib.TRIALS_FILE).read_text().splitlines()]
  assert len(records) == 6 and all(r['pyramids'] == ['fpn', 'searched'] for r in records)
  assert json.loads((tmp_path / 'search' / search_dir_lib.IDENTITY_FILE).read_text())['pyramids'] == [
      'fpn', 'searched']
  best = (tmp_path / 'search' / search_dir_lib.BEST_GIN).read_text()
  assert "build_retinanet.pyramids = ['fpn', None]" in best
  assert list((tmp_path / 'search' / search_dir_lib.ARCHITECTURES_DIR).glob('*.png'))
  with pytest.raises(ValueError, match=r"pyramids: recorded \['fpn', 'searched'\], asked None"):
    runner.check_search_dir(_settings(tmp_path, pyramids=None))


@pytest.mark.parametrize('overrides,message', [
    (dict(pyramids=('fpn', 'fpn')), r"--pyramids=fpn,fpn: no entry is 'searched'"),
    (dict(pyramids=('fnp', 'searched')), r"--pyramids=fnp,searched: entry 0 'fnp' is neither"),
    (dict(pyramids=('nasfpn', 'searched')),
     r"--pyramids=nasfpn,searched: entry 0 'nasfpn' is neither 'searched' nor a table of "
     r'levels 3\.\.5'),
    (dict(gin_bindings=('build_retinanet.num_repeats = 3',)),
     r'--gin_bindings="build_retinanet\.num_repeats = 3" and --pyramids=fpn,searched both set'),
])
def test_bad_search_pyramids_are_named(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    runner.check_pyramids(_settings(tmp_path, **overrides))


def test_the_feature_cache_is_shared_with_and_without_a_fixed_fpn():
  keys = []
  for bindings in ([], progress.pyramid_bindings(('fpn', 'searched'))):
    configurables.parse_gin(['search_proxy_cpu.gin'], bindings)
    try:
      keys.append(feature_cache.cache_key(feature_cache.CpuProxyCache()))
    finally:
      gin.clear_config()
  assert keys[0] == keys[1] and 'pyramids' not in keys[0]['model']


def test_the_cpu_proxy_trains_a_sample_behind_the_fixed_fpn():
  """What a CPU-proxy trial builds and trains from the proxy's bindings and a sample: the
  sample stacked behind the FPN, as a pyramid-and-head network on backbone features."""
  from nasfpn_tf.search import cpu_proxy  # pylint: disable=import-outside-toplevel
  configurables.parse_gin([], TINY_MODEL + progress.pyramid_bindings(
      ('fpn', 'searched', 'searched')))
  try:  # the proxy's model arguments, as CpuSearchProxy.from_gin reads them
    arguments = {name: factory.model_argument(name) for name in factory.MODEL_ARGUMENTS}
    settings = cpu_proxy.CpuProxy()
  finally:
    gin.clear_config()
  sample = SearchSpace().sample(np.random.default_rng(0))
  model = cpu_proxy.build_model(settings, {**arguments,
                                           'block_specs': specs_lib.to_config(sample)})
  assert model.decoder.repeat_specs == (specs_lib.fpn(), sample, sample)
  net = cpu_proxy.feature_network(model)
  features = {level: tf.random.stateless_normal([1] + shape[1:], [int(level), 0])
              for level, shape in model.backbone.output_specs.items()}
  outputs = net(features, training=True)
  assert sorted(outputs['cls_outputs']) == ['3', '4', '5', '6', '7']
  assert np.isfinite(outputs['box_outputs']['3'].numpy()).all()
