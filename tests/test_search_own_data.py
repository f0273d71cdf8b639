"""The CPU proxy on the user's own records (coco128, COCO's class ids), its rewards (held-out loss,
several seeds) and the errors that name bad input before any trial."""
import ast
import collections
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import training_helpers
from nasfpn_tf import config
from nasfpn_tf.data import create_coco_tfrecord
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.decoders import block_specs as block_specs_lib
from nasfpn_tf.evaluation import evaluate
from nasfpn_tf.models import backbones
from nasfpn_tf.models import factory
from nasfpn_tf.models.losses import RetinaNetLoss
from nasfpn_tf.search import configurables
from nasfpn_tf.search import cpu_proxy
from nasfpn_tf.search import cache_inputs
from nasfpn_tf.search import feature_cache
from nasfpn_tf.search import heldout
from nasfpn_tf.search import proxy
from nasfpn_tf.search import rewards
from nasfpn_tf.search import runner
from nasfpn_tf.search import trials
from nasfpn_tf.search.journal import Journal
from nasfpn_tf.search.space import SearchSpace
from nasfpn_tf.search import search_dir as search_dir_lib

NUM_IMAGES, NUM_HELDOUT = 24, 8
TINY_STEPS = ['CpuProxyCache.pretrain_steps = 2', 'CpuProxyCache.pretrain_filters = 16',
              'CpuProxyCache.pretrain_batch_size = 2', 'CpuProxy.train_steps = 4',
              'CpuProxy.batch_size = 2', 'CpuProxy.warmup_steps = 1',
              # 3 held-out batches (3, 3, 2 images): the held-out loss must not depend on them.
              'CpuProxy.eval_batch_size = 3']
TINY = training_helpers.TINY_NETWORK + TINY_STEPS + [
    f'CpuProxyCache.num_images = {NUM_IMAGES}', f'CpuProxyCache.num_heldout = {NUM_HELDOUT}']


@pytest.fixture(scope='module')
def coco_records(tmp_path_factory):
  """{'data_dir': converter records of 24 coco128 images in 2 shards, 'json': their COCO json}."""
  coco128 = training_helpers.coco128_dir_or_skip()
  root = tmp_path_factory.mktemp('coco_records')
  annotations = training_helpers.coco_subset(root, coco128, NUM_IMAGES)
  summary = create_coco_tfrecord.convert(annotations, str(coco128 / 'train2017'),
                                         str(root / 'data' / 'train'), num_shards=2,
                                         num_threads=2)
  assert summary['images_written'] == NUM_IMAGES and not summary['skipped_boxes'], summary
  return {'data_dir': str(root / 'data'), 'json': annotations}


@pytest.fixture(scope='module')
def coco_proxy(coco_records, tmp_path_factory):
  """A work dir whose proxy cache on the coco records the first trial (seed 0) built, and that
  trial's result."""
  work_dir = str(tmp_path_factory.mktemp('coco_proxy'))
  result = proxy.run_trial('nasfpn', 'cpu', seed=0, work_dir=work_dir, gin_bindings=TINY,
                           data_dir=coco_records['data_dir'])
  return work_dir, result


def _json_classes(annotations_file):
  """{image id: sorted category ids of its annotations}."""
  with open(annotations_file, encoding='utf-8') as f:
    data = json.load(f)
  classes = collections.defaultdict(list)
  for annotation in data['annotations']:
    classes[annotation['image_id']].append(annotation['category_id'])
  return {image['id']: sorted(classes[image['id']]) for image in data['images']}


def test_cache_holds_the_real_images_split_with_the_users_class_ids(coco_records, coco_proxy):
  folder = training_helpers.proxy_cache_folder(coco_proxy[0])
  info = json.loads((folder / feature_cache.CACHE_FILE).read_text())
  assert info['images'] == {'train': NUM_IMAGES - NUM_HELDOUT, 'heldout': NUM_HELDOUT}
  assert info['data_dir'] == coco_records['data_dir']
  # num_classes from the label map: COCO ids go up to 90.
  assert info['key']['model']['num_classes'] == 91
  assert [name for name, _, _ in info['key']['data']['records']] == [
      'train-00000-of-00002.tfrecord', 'train-00001-of-00002.tfrecord']
  expected = _json_classes(coco_records['json'])
  cache = feature_cache.load(str(folder))
  records = str(folder / 'records')
  train_ids = heldout.records_image_ids(heldout.record_pattern(records, heldout.TRAIN_PREFIX))
  heldout_ids = heldout.records_image_ids(heldout.record_pattern(records,
                                                                 heldout.HELDOUT_PREFIX))
  assert sorted(train_ids + heldout_ids) == sorted(expected)  # a split of the user's images
  assert not set(train_ids) & set(heldout_ids)
  # The held-out ground truth is each image's own annotations, COCO ids kept.
  truth = cache['heldout']['labels']
  for i, source_id in enumerate(truth['source_id'].numpy()):
    count = int(truth['groundtruths']['num_instances'][i])
    classes = sorted(truth['groundtruths']['classes'][i, :count].numpy().tolist())
    assert classes == expected[int(source_id)]
  # Training anchors are labeled with the training images' ids, beyond the synthetic 1..9.
  positive = set()
  for targets in cache['train']['labels']['cls_targets'].values():
    positive |= set(np.unique(targets.numpy()).tolist()) - {-1}
  train_classes = {c for image in train_ids for c in expected[image]}
  assert positive <= train_classes and max(positive) > 10
  # The held-out anchor labels (for the held-out loss) are in the held-out features' order.
  assert set(cache['heldout']['targets']) == {'cls_targets', 'box_targets', 'cls_weights',
                                              'box_weights'}
  assert len(cache['heldout']['targets']['box_weights']) == NUM_HELDOUT


def test_a_trial_trains_on_the_users_images(coco_proxy):
  _, result = coco_proxy
  assert result.steps == 4 and 0.0 <= result.ap <= 1.0
  assert np.isfinite(result.final_loss) and np.isfinite(result.heldout_loss)
  assert result.heldout_loss > 0 and result.flops > 0 and not result.seeds


def test_a_trial_parses_gin_once_and_never_rebinds_it(coco_records, coco_proxy, monkeypatch):
  work_dir, _ = coco_proxy
  parses = []
  real_parse = config.parse_gin
  monkeypatch.setattr(config, 'parse_gin', lambda *a, **k: (parses.append(a), real_parse(*a, **k)))

  def no_binding(*args, **kwargs):
    raise AssertionError(f'a trial bound gin: {args}')

  monkeypatch.setattr(gin, 'bind_parameter', no_binding)
  result = proxy.run_trial('fpn', 'cpu', seed=1, work_dir=work_dir, gin_bindings=TINY,
                           data_dir=coco_records['data_dir'])
  assert len(parses) == 1 and np.isfinite(result.heldout_loss)
  # The parse put the label map's num_classes before the user's bindings (which would win).
  assert parses[0][1][0] == 'build_retinanet.num_classes = 91'


def test_neg_loss_is_the_loss_on_all_heldout_images_at_once(coco_records, coco_proxy,
                                                           monkeypatch):
  """The held-out loss equals the loss on all held-out images at once, and the detections that
  the same forward pass gives are those of a detection pass of their own."""
  folder = proxy.prepare('cpu', coco_proxy[0], TINY, data_dir=coco_records['data_dir'])
  task = cpu_proxy.CpuSearchProxy.from_gin(folder)
  model = task.new_model(
      {'block_specs': block_specs_lib.to_config(block_specs_lib.resolve('fpn', 3, 7))}, seed=3)
  net, _, _ = task.train(model, seed=3)
  # Scores of 0.9 from the class biases: detections to score (the tiny training finds none).
  model.head.classifier.bias.assign(tf.fill(model.head.classifier.bias.shape, 2.2))
  scored = []  # the detections evaluate_detector scores, batch by batch

  def recording(detect_fn, dataset):
    def detect(inputs):
      scored.append({k: np.asarray(v) for k, v in detect_fn(inputs).items()})
      return scored[-1]
    return real_evaluate_detector(detect, dataset)

  real_evaluate_detector = evaluate.evaluate_detector
  monkeypatch.setattr(evaluate, 'evaluate_detector', recording)
  measured = task.evaluate(model, net)  # 3 held-out batches
  # The same trained layers on the 8 held-out images as one batch, the loss called directly.
  heldout_split = task.cache['heldout']
  outputs = net({k: tf.cast(v, tf.float32) for k, v in heldout_split['features'].items()},
                training=False)
  targets = heldout_split['targets']
  labels = {'cls_targets': {k: tf.cast(v, tf.int32) for k, v in targets['cls_targets'].items()},
            'box_targets': {k: tf.cast(v, tf.float32) for k, v in targets['box_targets'].items()},
            'cls_weights': tf.cast(targets['cls_weights'], tf.float32),
            'box_weights': tf.cast(targets['box_weights'], tf.float32)}
  direct = RetinaNetLoss(num_classes=91)(outputs, labels)
  assert measured['heldout_loss'] == pytest.approx(float(direct['total_loss']), rel=1e-4)
  assert measured['heldout_cls_loss'] == pytest.approx(float(direct['cls_loss']), rel=1e-4)
  assert measured['heldout_box_loss'] == pytest.approx(float(direct['box_loss']), rel=1e-4)
  assert float(tf.reduce_sum(labels['box_weights'])) > 0  # positives: the box loss counts
  assert rewards.reward(measured, 'neg_loss') == -measured['heldout_loss']
  # The detections of that pass: the model's post-processing on the raw outputs, batch by batch
  # (scores tie closely here: the same batches keep NMS's order).
  @tf.function
  def detect(features):
    raw = net({k: tf.cast(v, tf.float32) for k, v in features.items()}, training=False)
    return model.detection_generator(raw['cls_outputs'], raw['box_outputs'], model.anchor_boxes)

  size = task.settings.eval_batch_size
  alone = [detect({k: v[start:start + size] for k, v in heldout_split['features'].items()})
           for start in range(0, 8, size)]
  assert len(scored) == len(alone) == 3 and int(np.sum(alone[0]['num_detections'])) > 0
  for key in ('num_detections', 'detection_classes', 'detection_scores', 'detection_boxes'):
    np.testing.assert_allclose(np.concatenate([batch[key] for batch in scored]),
                               np.concatenate([batch[key] for batch in alone]),
                               rtol=1e-5, atol=1e-5, err_msg=key)


def test_proxy_seeds_journal_each_seed_and_reward_their_mean(coco_records, coco_proxy, tmp_path,
                                                            monkeypatch):
  work_dir, _ = coco_proxy
  # TensorFlow's thread pools are this process's already (a Ray worker sets them first).
  monkeypatch.setattr(proxy, 'configure_threads', lambda num_threads: None)
  settings = runner.SearchSettings(
      search_dir=str(tmp_path / 'search'), algorithm='random', num_trials=1, proxy='cpu',
      reward='neg_loss', space=SearchSpace(), seed=4, gin_bindings=tuple(TINY),
      data_dir=coco_records['data_dir'], proxy_seeds=2, proxy_dir=work_dir)
  runner.check_search_dir(settings)
  searcher = runner.ControllerSearcher(settings, log=lambda message: None)
  trial_config = searcher.suggest('t0')
  assert trial_config['proxy_seeds'] == 2
  result = trials._run_proxy(trial_config)  # what the Ray trial runs
  searcher.complete('t0', {'result_json': json.dumps(result), 'reused': False, 'seconds': 1.0},
                    error=False)
  (record,) = [json.loads(line) for line in
               (tmp_path / 'search' / search_dir_lib.TRIALS_FILE).read_text().splitlines()]
  seeds = record['result']['seeds']
  assert [s['seed'] for s in seeds] == [4, 5]
  assert record['reward'] == pytest.approx(-np.mean([s['heldout_loss'] for s in seeds]))
  assert record['result']['ap'] == pytest.approx(np.mean([s['ap'] for s in seeds]))
  assert seeds[0]['heldout_loss'] != seeds[1]['heldout_loss']
  # The second seed's result is a one-seed trial with that seed, replayed.
  alone = proxy.run_trial(trial_config['block_specs'], 'cpu', seed=5, work_dir=work_dir,
                          gin_bindings=TINY, data_dir=coco_records['data_dir'])
  assert (alone.ap, alone.final_loss, alone.heldout_loss) == (
      seeds[1]['ap'], seeds[1]['final_loss'], seeds[1]['heldout_loss'])


def _copy_records(source: str, target: pathlib.Path, keep=None) -> str:
  target.mkdir(parents=True)
  for path in sorted(pathlib.Path(source).iterdir()):
    if keep is None or keep(path.name):
      shutil.copy(path, target / path.name)
  return str(target)


def test_bad_input_is_named_before_any_trial(coco_records, tmp_path):
  data_dir = coco_records['data_dir']

  def prepare(bindings, **kwargs):
    return proxy.prepare('cpu', str(tmp_path / 'work'), bindings, **kwargs)

  # Too few images for the split (200 of the default 1200 held out: 4 of 24).
  with pytest.raises(ValueError, match=r'24 images are too few .*holds out 4 of 24 \('
                     r'CpuProxyCache.num_heldout = 200 of CpuProxyCache.num_images = 1200\)'):
    prepare(training_helpers.TINY_NETWORK + ['CpuProxyCache.num_heldout = 200'],
            data_dir=data_dir)
  assert not [p for p in (tmp_path / 'work' / feature_cache.CACHES_DIR).iterdir() if p.is_dir()]
  # No records, a file that is no TFRecord, a record that is no tf.Example.
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match=r'--data_dir=.*empty: no records .*train-\*\.tfrecord'):
    prepare(TINY, data_dir=str(empty))
  broken = _copy_records(data_dir, tmp_path / 'broken')
  (tmp_path / 'broken' / 'train-zz.tfrecord').write_bytes(b'not a record at all')
  with pytest.raises(ValueError, match=r'record file .*broken/train-zz\.tfrecord does not parse'):
    prepare(TINY, data_dir=broken)
  other = _copy_records(data_dir, tmp_path / 'not_examples')
  with tf.io.TFRecordWriter(str(tmp_path / 'not_examples' / 'train-zz.tfrecord')) as writer:
    writer.write(b'a record, but no tf.Example')
  with pytest.raises(ValueError, match=r'record file .*not_examples/train-zz\.tfrecord does not '
                     r'parse .*\(record 1'):
    prepare(TINY, data_dir=other)
  # num_classes bound below the label map's ids.
  with pytest.raises(ValueError, match=r'build_retinanet.num_classes = 10 is bound, but the label '
                     r'map .*train-label_map.json has category id 90'):
    prepare(TINY + ['build_retinanet.num_classes = 10'], data_dir=data_dir)
  # Checkpoints: none there; one whose backbone does not fit (MobileNetV2, the proxy's ResNet-10).
  with pytest.raises(ValueError, match=r'--backbone_checkpoint=.*nowhere: .*no checkpoint'):
    prepare(TINY, data_dir=data_dir, backbone_checkpoint=str(tmp_path / 'nowhere'))
  configurables.parse_gin(['search_proxy_cpu.gin'], training_helpers.TINY_NETWORK + [
      "build_retinanet.backbone = 'mobilenetv2'"])
  tf.train.Checkpoint(model=factory.build_retinanet()).save(str(tmp_path / 'mnv2' / 'ckpt'))
  with pytest.raises(ValueError, match=r"(?s)--backbone_checkpoint=.*mnv2 does not fit the proxy's "
                     r"backbone \(build_retinanet.backbone = 'resnet10'\): .*nothing was loaded.*"
                     r'shape \[96\] in the checkpoint, \[64\] in the model'):
    prepare(TINY, data_dir=data_dir, backbone_checkpoint=str(tmp_path / 'mnv2'))
  # The wrong reward for a proxy, and the search refuses all of it before it records anything.
  with pytest.raises(ValueError, match=r"reward 'neg_loss' .*only --proxy=cpu measures"):
    rewards.check('neg_loss', proxy='paper')
  settings = runner.SearchSettings(search_dir=str(tmp_path / 'search'), proxy='cpu',
                                   gin_bindings=tuple(TINY), data_dir=broken,
                                   proxy_dir=str(tmp_path / 'work'))
  with pytest.raises(ValueError, match='does not parse'):
    runner.run_search(settings)
  assert not (tmp_path / 'search' / search_dir_lib.IDENTITY_FILE).exists()


def test_the_cache_key_holds_the_data_and_the_checkpoint_by_content(coco_records, tmp_path):
  data_dir = coco_records['data_dir']
  memo = str(tmp_path / 'memo')
  configurables.parse_gin(['search_proxy_cpu.gin'], TINY)
  settings = feature_cache.CpuProxyCache()

  def path(data=None, backbone=None):
    return feature_cache.cache_path('w', feature_cache.cache_key(settings, data, backbone))

  mine = cache_inputs.data_fingerprint(data_dir, memo)
  copied = cache_inputs.data_fingerprint(_copy_records(data_dir, tmp_path / 'copy'), memo)
  fewer = cache_inputs.data_fingerprint(
      _copy_records(data_dir, tmp_path / 'fewer', keep=lambda n: '00001-of' not in n), memo)
  # One byte changed in the middle, the size kept.
  edited_dir = _copy_records(data_dir, tmp_path / 'edited')
  shard = pathlib.Path(edited_dir) / 'train-00000-of-00002.tfrecord'
  content = bytearray(shard.read_bytes())
  content[len(content) // 2] ^= 1
  shard.write_bytes(bytes(content))
  edited = cache_inputs.data_fingerprint(edited_dir, memo)
  assert path(mine) == path(copied)  # the content counts, not where it lies
  assert len({path(), path(mine), path(fewer), path(edited)}) == 4
  assert 'data' not in feature_cache.cache_key(settings)  # the synthetic key stays as it was
  checkpoints = []
  for seed in (0, 1):
    tf_keras.utils.set_random_seed(seed)
    prefix = tf.train.Checkpoint(v=tf.Variable(tf.random.normal([3]))).write(
        str(tmp_path / f'ckpt{seed}' / 'ckpt'))
    checkpoints.append(cache_inputs.checkpoint_fingerprint(prefix, memo))
  assert len({path(mine), path(mine, checkpoints[0]), path(mine, checkpoints[1])}) == 3


@pytest.mark.parametrize('kind', ['model_dir', 'tfm_imagenet'])
def test_a_backbone_checkpoint_gives_the_cached_features(coco_records, tmp_path, kind):
  """The cached features are the checkpoint backbone's (a nasfpn_tf model dir's, or one written
  as TFM writes ImageNet ones); nothing is pretrained and there is no pretraining head."""
  configurables.parse_gin(['search_proxy_cpu.gin'], TINY + ['build_retinanet.num_classes = 91'])
  tf_keras.utils.set_random_seed(7)
  model = factory.build_retinanet()
  if kind == 'model_dir':
    tf.train.Checkpoint(model=model).save(str(tmp_path / 'model_dir' / 'ckpt'))
    checkpoint, backbone = str(tmp_path / 'model_dir'), model.backbone
  else:
    backbone, checkpoint = training_helpers.write_tfm_backbone_checkpoint(
        'resnet10', tmp_path / 'imagenet' / 'ckpt', image_size=model.image_size[0])
  folder = proxy.prepare('cpu', str(tmp_path / 'work'), TINY, data_dir=coco_records['data_dir'],
                         backbone_checkpoint=checkpoint)
  info = json.loads((pathlib.Path(folder) / feature_cache.CACHE_FILE).read_text())
  assert info['pretrain_heldout_ap'] is None and 'backbone_checkpoint' in info['key']
  assert not any((pathlib.Path(folder) / name).exists() for name in ('pretrain',
                                                                     feature_cache.HEAD_FILE))
  cache = feature_cache.load(folder)
  pattern = heldout.record_pattern(str(pathlib.Path(folder) / 'records'), heldout.HELDOUT_PREFIX)
  images, _ = next(iter(input_pipeline.build_eval_dataset(pattern, NUM_HELDOUT,
                                                          model.get_config())))
  expected = backbone(backbones.ImageNormalization()(images), training=False)
  for level, features in cache['heldout']['features'].items():
    want = expected[str(level)].numpy()
    assert np.allclose(features.numpy().astype(np.float32), want, rtol=1e-2,
                       atol=1e-2 * np.abs(want).max())
  with pytest.raises(ValueError, match='pretrained_head = True needs the pretraining head'):
    cpu_proxy.CpuSearchProxy(cache, {}, dataclasses.replace(cpu_proxy.CpuProxy(),
                                                            pretrained_head=True), None)


def test_a_resume_with_other_data_is_refused_and_old_records_resume(tmp_path):
  base = runner.SearchSettings(search_dir=str(tmp_path), proxy='cpu', data_dir='/data/mine')
  runner.check_search_dir(base)
  runner.check_search_dir(base)
  for change in ({'data_dir': '/data/other'}, {'backbone_checkpoint': '/ckpt/r50'},
                 {'proxy_seeds': 2}):
    name = next(iter(change))
    with pytest.raises(ValueError, match=rf'holds another search .*{name}: recorded'):
      runner.check_search_dir(dataclasses.replace(base, **change))
  # A search.json written before these settings existed resumes with their defaults.
  recorded = json.loads((tmp_path / search_dir_lib.IDENTITY_FILE).read_text())
  for name in ('data_dir', 'backbone_checkpoint', 'proxy_seeds'):
    del recorded[name]
  (tmp_path / search_dir_lib.IDENTITY_FILE).write_text(json.dumps(recorded))
  runner.check_search_dir(dataclasses.replace(base, data_dir=None))
  with pytest.raises(ValueError, match='data_dir: recorded None'):
    runner.check_search_dir(base)


def test_rewards_of_several_seeds_by_hand():
  seeds = [{'seed': 0, 'ap': 0.2, 'flops': 2e9, 'heldout_loss': 1.5},
           {'seed': 1, 'ap': 0.4, 'flops': 2e9, 'heldout_loss': 0.5}]
  result = {'ap': 0.3, 'flops': 2e9, 'heldout_loss': 1.0, 'seeds': seeds}
  assert rewards.reward(result, 'neg_loss') == pytest.approx(-1.0)
  assert rewards.reward(result, 'ap') == pytest.approx(0.3)
  assert rewards.reward(result, 'ap_flops', target_flops=1e9) == pytest.approx(
      0.5 * (0.2 + 0.4) * 2.0**-0.07)
  with pytest.raises(ValueError, match="'neg_loss': the trial measured no held-out loss"):
    rewards.reward({'ap': 0.3, 'flops': 1.0, 'heldout_loss': None}, 'neg_loss')
  one = proxy.TrialResult(ap=0.2, ap50=0.3, flops=5, params=6, seconds=1.0, steps=4,
                          final_loss=1.0, heldout_loss=2.0,
                          phases={'build': 0.1, 'train': 0.5, 'evaluate': 0.2, 'count': 0.1})
  two = dataclasses.replace(one, ap=0.4, final_loss=3.0, heldout_loss=4.0, seconds=2.0,
                            phases={'build': 0.2, 'train': 1.0, 'evaluate': 0.4, 'count': 0.3})
  mean = proxy.TrialResult.mean_of([one, two], [7, 8], seconds=3.5)
  assert (mean.ap, mean.final_loss, mean.heldout_loss, mean.seconds) == pytest.approx(
      (0.3, 2.0, 3.0, 3.5))
  # The seeds' phases add up: the call spent them all.
  assert mean.phases == pytest.approx({'build': 0.3, 'train': 1.5, 'evaluate': 0.6,
                                       'count': 0.4})
  assert [s['seed'] for s in mean.to_dict()['seeds']] == [7, 8]
  assert mean.to_dict()['seeds'][1]['heldout_loss'] == 4.0
  assert proxy.TrialResult.mean_of([one], [7], seconds=9.0) == dataclasses.replace(one,
                                                                                  seconds=9.0)


def test_config_imports_nothing_of_the_search():
  """config.py registers the lower layers' names; the search registers its own
  (search/configurables.py), so no import runs from config back into the search."""
  tree = ast.parse(pathlib.Path(config.__file__).read_text())
  imported = [node.module for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module]
  assert imported and not [m for m in imported if m.startswith('nasfpn_tf.search')]
  configurables.parse_gin([], ['CpuProxy.train_steps = 7', 'PPOController.batch_size = 3',
                               'CpuProxyCache.num_images = 5', 'reward.flops_weight = -1.0'])
  assert cpu_proxy.CpuProxy().train_steps == 7


def test_a_search_on_the_users_records_resumes_after_kill_minus_9(coco_records, coco_proxy,
                                                                   tmp_path):
  """The whole command on Ray: killed (driver, Ray and workers at once) after its first journal
  line, the same command finishes the search, keeping what was journaled; the cache of the same
  data and settings (built by the fixture) is found by content, not rebuilt."""
  work_dir, _ = coco_proxy
  caches = sorted(p.name for p in (pathlib.Path(work_dir) / feature_cache.CACHES_DIR).iterdir())
  search_dir = tmp_path / 'search'
  command = [sys.executable, '-m', 'nasfpn_tf.search', f'--search_dir={search_dir}',
             '--algorithm=random', '--proxy=cpu', '--num_trials=3', '--reward=neg_loss',
             f'--data_dir={coco_records["data_dir"]}', f'--proxy_dir={work_dir}',
             '--cpus_per_trial=2', *(f'--gin_bindings={b}' for b in TINY)]
  env = dict(os.environ, RAY_USAGE_STATS_ENABLED='0')
  journal = Journal(search_dir / search_dir_lib.TRIALS_FILE)

  with training_helpers.own_session(command, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) as search:
    deadline = time.monotonic() + training_helpers.SUBPROCESS_TIMEOUT
    while not journal.read() and search.poll() is None and time.monotonic() < deadline:
      time.sleep(0.5)
    assert search.poll() is None, 'the search ended before it could be killed'
    assert journal.read(), 'no trial was journaled in time'
    os.killpg(search.pid, signal.SIGKILL)
  before = journal.read()
  assert 1 <= len(before) < 3, 'the kill must land mid-search'
  with training_helpers.own_session(command, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) as search:
    output, _ = search.communicate(timeout=training_helpers.SUBPROCESS_TIMEOUT)
    assert search.returncode == 0, output[-3000:]
  records = journal.read()
  assert [r['trial'] for r in records] == [0, 1, 2] and records[:len(before)] == before
  assert f'Resuming {search_dir}: {len(before)} samples done' in output
  for record in records:
    assert record['result']['steps'] == 4
    assert record['reward'] == -record['result']['heldout_loss']  # --reward=neg_loss
  assert sorted(p.name for p in (pathlib.Path(work_dir) / feature_cache.CACHES_DIR).iterdir()) \
      == caches
  recorded = json.loads((search_dir / search_dir_lib.IDENTITY_FILE).read_text())
  assert recorded['data_dir'] == coco_records['data_dir'] and recorded['reward'] == 'neg_loss'
