"""Searching the NAS-FCOS spaces (--space=nasfcos_fpn|nasfcos_head) with the search engine:
controllers, journal, resuming, the CPU proxy training FCOS with NAS-FCOS's negative held-out
loss as the reward, and progressive search (the head on a fixed pyramid)."""
import math
import pathlib

import gin
import numpy as np
import pytest
import tensorflow as tf

import training_helpers
from nasfpn_tf.decoders import nasfcos_specs
from nasfpn_tf.models.losses import FCOSLoss
from nasfpn_tf.search import cpu_proxy, progressive, proxy, rewards, runner
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.search import space as space_lib
from nasfpn_tf.search.journal import Journal
from nasfpn_tf.search.nasfcos_space import NASFCOSFPNSpace, NASFCOSHeadSpace

# FCOS on TINY_MODEL (GroupNorm groups that divide its 16 filters), its CPU proxy tiny: 16
# training and 8 held-out images, an unpretrained frozen backbone, 4 training steps.
TINY_FCOS_CPU = training_helpers.TINY_MODEL + [
    'build_retinanet.fcos_norm_groups = 8', 'CpuProxyCache.num_images = 24',
    'CpuProxyCache.num_heldout = 8', 'CpuProxyCache.pretrain_steps = 0',
    'CpuProxyCache.pretrain_filters = 16', 'CpuProxy.train_steps = 4', 'CpuProxy.batch_size = 2',
    'CpuProxy.warmup_steps = 1', 'CpuProxy.eval_batch_size = 3']
# Cheap candidates: a pyramid of skips (only the adapters and the concatenations' 1x1s convolve)
# and a head of one 1x1 conv.
SKIP_PYRAMID = ('weighted_sum:3:skip,3:skip/concat:2:skip,4:skip/weighted_sum:1:skip,5:skip/'
                'concat:3:skip,5:skip/weighted_sum:2:skip,6:skip/weighted_sum:1:skip,6:skip/'
                'concat:1:skip,2:skip')
CHEAP_HEAD = '0:conv_1x1,skip,skip,skip,skip,skip'


def _settings(tmp_path, space, name='search', **overrides):
  values = dict(search_dir=str(tmp_path / name), algorithm='random', num_trials=12,
                proxy='synthetic', space=space, seed=1)
  values.update(overrides)
  return runner.SearchSettings(**values)


def _search(settings, result_fn=None):
  runner.check_search_dir(settings)
  searcher = runner.ControllerSearcher(settings, log=lambda line: None)
  training_helpers.drive_in_process(searcher, result_fn=result_fn)
  return Journal(pathlib.Path(settings.search_dir, search_dir_lib.TRIALS_FILE)).read()


def test_space_flags_and_keys():
  fpn = progressive.make_space('nasfcos_fpn')
  assert fpn == NASFCOSFPNSpace(num_cells=7, read_c2=False)
  assert not fpn.static_masks[[0, 1]][:, 0].any()  # C2 is never an input
  assert fpn.size() == math.prod([n * n * 50 for n in (3, 4, 5, 6, 7, 7, 7)])  # C3.. so far
  sample = fpn.sample(np.random.default_rng(0))
  assert fpn.key(fpn.key(sample)) == fpn.key(sample)  # a key encodes as its spec
  assert fpn.key(progressive.resolve_fixed_pyramid(fpn.key(sample))) == fpn.key(sample)
  head = progressive.make_space('nasfcos_head')
  assert head.pyramid == nasfcos_specs.NASFCOS_FPN  # the published pyramid by default
  assert head.encode(head.key('nasfcos_head')) == head.encode('nasfcos_head')
  assert space_lib.from_config(head.config()) == head
  assert space_lib.from_config(fpn.config()) == fpn
  assert space_lib.from_config(space_lib.SearchSpace().config()) == space_lib.SearchSpace()
  assert progressive.DEFAULT_REWARDS == {'nasfpn': 'ap', 'nasfcos_fpn': 'neg_loss',
                                         'nasfcos_head': 'neg_loss'}


def test_bad_flag_values_are_named(tmp_path):
  with pytest.raises(ValueError, match="--space='nasfcos' is not one of"):
    progressive.make_space('nasfcos')
  with pytest.raises(ValueError, match='--fixed_pyramid=.*needs --space=nasfcos_head, not '
                     '--space=nasfcos_fpn'):
    progressive.make_space('nasfcos_fpn', fixed_pyramid='nasfcos_fpn')
  with pytest.raises(ValueError, match='--min_level and --max_level are the NAS-FPN'):
    progressive.make_space('nasfcos_head', levels_given=True)
  with pytest.raises(ValueError, match="--fixed_pyramid=fpn is no search dir, key or name"):
    progressive.make_space('nasfcos_head', fixed_pyramid='fpn')
  reads_c2 = SKIP_PYRAMID.replace('weighted_sum:3:skip,3:skip', 'weighted_sum:0:skip,3:skip')
  with pytest.raises(ValueError, match=r'--fixed_pyramid=.*cell 0: input0 0 is not allowed '
                     r'\(C2: read_c2=False'):
    progressive.make_space('nasfcos_head', fixed_pyramid=reads_c2)
  with pytest.raises(ValueError, match=r"--fixed_pyramid=.*cell 1 'concat:2:skip' of the key"):
    progressive.make_space('nasfcos_head', fixed_pyramid='weighted_sum:3:skip,3:skip/concat:2:skip')
  nasfpn_dir = tmp_path / 'nasfpn_search'
  runner.check_search_dir(_settings(tmp_path, space_lib.SearchSpace(), 'nasfpn_search'))
  with pytest.raises(ValueError, match='holds a search in --space=nasfpn, not '
                     '--space=nasfcos_fpn'):
    progressive.make_space('nasfcos_head', fixed_pyramid=str(nasfpn_dir))
  with pytest.raises(ValueError, match='holds no search'):
    progressive.make_space('nasfcos_head', fixed_pyramid=str(tmp_path))
  runner.check_search_dir(_settings(tmp_path, progressive.make_space('nasfcos_fpn'), 'empty'))
  with pytest.raises(ValueError, match='has no trial that trained to the end yet'):
    progressive.make_space('nasfcos_head', fixed_pyramid=str(tmp_path / 'empty'))
  with pytest.raises(ValueError, match="reward 'neg_loss' .*only --proxy=cpu"):
    runner.run_search(_settings(tmp_path, NASFCOSHeadSpace(), reward='neg_loss'))


@pytest.mark.parametrize('space_name', ['nasfcos_fpn', 'nasfcos_head'])
@pytest.mark.parametrize('algorithm', ['random', 'ppo', 'evolution'])
def test_search_in_a_nasfcos_space(tmp_path, space_name, algorithm):
  """Random search, PPO (updated every 4 rewards) and evolution (mutants once 4 came back) in
  each space, the synthetic proxy: the journal's specs are the space's, keyed by it; best.gin
  binds FCOS with the best."""
  gin.bind_parameter('PPOController.batch_size', 4)
  gin.bind_parameter('EvolutionController.population_size', 4)
  gin.bind_parameter('EvolutionController.tournament_size', 2)
  space = progressive.make_space(space_name, fixed_pyramid=(
      SKIP_PYRAMID if space_name == 'nasfcos_head' else None))
  settings = _settings(tmp_path, space, algorithm=algorithm)
  records = _search(settings)
  assert [r['trial'] for r in records] == list(range(12))
  for record in records:
    assert space.contains(record['block_specs'])
    assert record['key'] == space.key(record['block_specs'])
    assert space.decode(record['actions']) == space.decode(space.encode(record['block_specs']))
  assert len({r['key'] for r in records}) > 1
  best = max(records, key=lambda r: r['reward'])
  text = pathlib.Path(settings.search_dir, search_dir_lib.BEST_GIN).read_text()
  assert f"# key {best['key']}" in text
  gin.parse_config(text)
  assert gin.query_parameter('build_retinanet.detector') == 'fcos'
  assert gin.query_parameter('build_retinanet.decoder') == 'nasfcos_fpn'
  if space_name == 'nasfcos_fpn':
    assert gin.query_parameter('build_retinanet.block_specs') == best['block_specs']
  else:
    assert gin.query_parameter('build_retinanet.fcos_head_spec') == best['block_specs']
    assert gin.query_parameter('build_retinanet.block_specs') == nasfcos_specs.to_config(
        progressive.resolve_fixed_pyramid(SKIP_PYRAMID))
  state = runner.ControllerSearcher(settings, log=lambda line: None).controller.state()
  if algorithm == 'ppo':  # 12 rewards: 3 updates set the baseline
    assert state['baseline'] is not None
  if algorithm == 'evolution':  # the last 4 samples, mutants of the population
    assert [actions for actions, _ in state['population']] == [
        tuple(r['actions']) for r in records[-4:]]


def test_a_resumed_search_in_another_space_is_refused(tmp_path):
  fpn = progressive.make_space('nasfcos_fpn')
  runner.check_search_dir(_settings(tmp_path, fpn))
  with pytest.raises(ValueError, match=r"holds another search .*space_name: recorded "
                     r"'nasfcos_fpn', asked 'nasfcos_head'"):
    runner.check_search_dir(_settings(tmp_path, NASFCOSHeadSpace()))
  with pytest.raises(ValueError, match="space_name: recorded 'nasfcos_fpn', asked 'nasfpn'"):
    runner.check_search_dir(_settings(tmp_path, space_lib.SearchSpace()))
  runner.check_search_dir(_settings(tmp_path, fpn, num_trials=40))  # extending it is fine
  runner.check_search_dir(_settings(tmp_path, NASFCOSHeadSpace(), 'head'))
  with pytest.raises(ValueError, match=r"space: recorded .*'pyramid'"):  # another fixed pyramid
    runner.check_search_dir(_settings(tmp_path, NASFCOSHeadSpace(pyramid=(
        progressive.resolve_fixed_pyramid(SKIP_PYRAMID))), 'head'))


@pytest.fixture(scope='module')
def work_dir(tmp_path_factory):
  """The CPU proxy's work dir, shared: its FCOS cache is built once."""
  return str(tmp_path_factory.mktemp('nasfcos_proxy'))


def test_progressive_search_on_the_cpu_proxy(tmp_path, monkeypatch, work_dir):
  """The pyramid search, then the head search on the pyramid it found, both on the CPU proxy
  (FCOS on cached features; one cheap trial each, the controllers' samples are the tests'
  above): each reward is the trial's negative held-out loss, and the head trial's model is
  built on the fixed pyramid."""
  built = []
  build_model = cpu_proxy.build_model
  monkeypatch.setattr(cpu_proxy, 'build_model', lambda *args: built.append(
      build_model(*args)) or built[-1])

  def train_on_cpu(space, specs):
    return proxy.run_trial(specs, 'cpu', seed=0, work_dir=work_dir,
                           gin_bindings=TINY_FCOS_CPU, space=space).to_dict()

  fpn = progressive.make_space('nasfcos_fpn')
  settings = _settings(tmp_path, fpn, 'fpn_search', num_trials=1, reward='neg_loss',
                       proxy='cpu', init_block_specs=SKIP_PYRAMID)
  found, = _search(settings, train_on_cpu)
  assert found['key'] == SKIP_PYRAMID  # the init table first
  assert found['reward'] == -found['result']['heldout_loss'] < 0
  config = built[0].get_config()
  assert config['block_specs'] == found['block_specs'] == fpn.spec_config(SKIP_PYRAMID)
  assert (config['detector'], config['decoder']) == ('fcos', 'nasfcos_fpn')
  assert 'fcos_head_spec' not in config  # FCOS's own head

  head = progressive.make_space('nasfcos_head', fixed_pyramid=str(tmp_path / 'fpn_search'))
  assert nasfcos_specs.to_config(head.pyramid) == found['block_specs']
  built.clear()
  settings = _settings(tmp_path, head, 'head_search', num_trials=1, reward='neg_loss',
                       proxy='cpu', init_block_specs=CHEAP_HEAD)
  head_record, = _search(settings, train_on_cpu)
  config = built[0].get_config()
  assert config['block_specs'] == found['block_specs']  # the fixed pyramid
  assert config['fcos_head_spec'] == head_record['block_specs'] == [
      ['conv_1x1'] + ['skip'] * 5, 0]
  assert head_record['reward'] == rewards.reward(head_record['result'], 'neg_loss') == \
      -head_record['result']['heldout_loss']
  drawings = list((tmp_path / 'head_search' / search_dir_lib.ARCHITECTURES_DIR).glob('*.png'))
  assert len(drawings) == 1 and drawings[0].read_bytes()[:4] == b'\x89PNG'


def test_fcos_heldout_loss_is_the_loss_on_all_heldout_images_at_once(work_dir):
  """FCOS's box term is divided by the centerness sum, not the positives: the held-out loss,
  computed 3 images at a time, equals FCOSLoss on the 8 images at once."""
  space = progressive.make_space('nasfcos_fpn')
  folder = proxy.prepare('cpu', work_dir, TINY_FCOS_CPU, space=space)
  task = cpu_proxy.CpuSearchProxy.from_gin(folder)
  assert isinstance(task.loss_fn, FCOSLoss)
  model = task.new_model(space.model_arguments(SKIP_PYRAMID), seed=2)
  net = cpu_proxy.feature_network(model)
  _, measured = cpu_proxy.evaluate_heldout(model, net, task.cache['heldout'], task.loss_fn,
                                           batch_size=3)
  features = {k: tf.cast(v, tf.float32) for k, v in task.cache['heldout']['features'].items()}
  labels = cpu_proxy._as_loss_labels(task.cache['heldout']['targets'])  # pylint: disable=protected-access
  direct = task.loss_fn(net(features, training=False), labels)
  for term in ('cls_loss', 'box_loss', 'centerness_loss'):
    assert measured[f'heldout_{term}'] == pytest.approx(float(direct[term]), rel=1e-4)
  assert measured['heldout_loss'] == pytest.approx(float(direct['total_loss']), rel=1e-4)
  assert float(direct['box_loss']) > 0  # positives: the box term counts
