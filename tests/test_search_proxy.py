"""The search's proxy tasks (nasfpn_tf.search.proxy) and rewards; the proxy gate is
test_search_proxy_gate.py's."""
import json
import math
import os
import pathlib
import subprocess
import sys

import gin
import numpy as np
import pytest
import tensorflow as tf

import training_helpers
from nasfpn_tf import config
from nasfpn_tf.data import synthetic
from nasfpn_tf.data import tfexample
from nasfpn_tf.search import feature_cache
from nasfpn_tf.search import heldout
from nasfpn_tf.search import proxy
from nasfpn_tf.search import rewards
from nasfpn_tf.search import trials

NUM_IMAGES, NUM_HELDOUT = 24, 8
TINY_CPU = training_helpers.TINY_MODEL + [
    f'CpuProxyCache.num_images = {NUM_IMAGES}', f'CpuProxyCache.num_heldout = {NUM_HELDOUT}',
    'CpuProxyCache.pretrain_steps = 2', 'CpuProxyCache.pretrain_filters = 16',
    'CpuProxyCache.pretrain_batch_size = 2', 'CpuProxy.train_steps = 4',
    'CpuProxy.batch_size = 2', 'CpuProxy.warmup_steps = 1', 'CpuProxy.eval_batch_size = 4']


@pytest.fixture(scope='module')
def cpu_work_dir(tmp_path_factory):
  """A work dir whose tiny CPU-proxy cache the first trial (seed 0) built."""
  work_dir = str(tmp_path_factory.mktemp('cpu_proxy'))
  result = proxy.run_trial('nasfpn', 'cpu', seed=0, work_dir=work_dir, gin_bindings=TINY_CPU)
  return work_dir, result


def test_the_search_offers_every_training_proxy_and_the_synthetic_one():
  # trials.PROXIES (what --proxy takes; trials does not import TensorFlow) against the proxies
  # this module trains with their gin files.
  assert set(trials.PROXIES) == set(proxy.PROXIES) | {'synthetic'}
  assert set(proxy.OWN_SPLIT) <= set(proxy.PROXIES)
  for gin_file in proxy.PROXIES.values():
    assert (config.GIN_CONFIGS_DIR / gin_file).is_file(), gin_file


def test_cpu_trial_measures_ap_flops_and_params(cpu_work_dir):
  _, result = cpu_work_dir
  assert 0.0 <= result.ap <= 1.0 and 0.0 <= result.ap50 <= 1.0
  assert result.flops > 0 and result.params > 0 and result.steps == 4
  assert math.isfinite(result.final_loss) and result.seconds > 0
  assert math.isfinite(result.heldout_loss) and result.heldout_loss > 0
  assert set(result.to_dict()) == {'ap', 'ap50', 'flops', 'params', 'seconds', 'steps',
                                   'final_loss', 'heldout_loss', 'phases'}
  # Where the trial's seconds went: each phase measured, together within the whole call's.
  assert set(result.phases) == {'build', 'train', 'evaluate', 'count'}
  assert all(value > 0 for value in result.phases.values())
  assert sum(result.phases.values()) <= result.seconds + 0.05  # each phase rounded to 0.01 s


def test_cache_is_reused_and_a_seed_replays(cpu_work_dir, monkeypatch):
  work_dir, first = cpu_work_dir
  folder = training_helpers.proxy_cache_folder(work_dir)
  mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob('*') if p.is_file()}

  def no_rebuild(*args):
    raise AssertionError('the cache was built again')

  monkeypatch.setattr(feature_cache, '_build', no_rebuild)
  feature_cache.load.cache_clear()  # read from disk, as a new worker process does
  again = proxy.run_trial('nasfpn', 'cpu', seed=0, work_dir=work_dir, gin_bindings=TINY_CPU)
  assert (again.ap, again.ap50, again.final_loss) == (first.ap, first.ap50, first.final_loss)
  assert {p: p.stat().st_mtime_ns for p in folder.rglob('*') if p.is_file()} == mtimes
  other = proxy.run_trial('fpn', 'cpu', seed=1, work_dir=work_dir, gin_bindings=TINY_CPU)
  assert other.final_loss != first.final_loss and other.flops != first.flops


def test_intermediate_reports_evaluate_without_changing_the_training(cpu_work_dir):
  """The CPU proxy's reports for ASHA: the held-out result after steps 1 and 3 of 4, with the
  model's FLOPs; the training they interrupt ends where the trial without them ended."""
  work_dir, first = cpu_work_dir
  reports = []
  result = proxy.run_trial('nasfpn', 'cpu', seed=0, work_dir=work_dir, gin_bindings=TINY_CPU,
                           report_steps=[1, 3], report=lambda *args: reports.append(args))
  assert (result.ap, result.ap50, result.final_loss, result.heldout_loss) == (
      first.ap, first.ap50, first.final_loss, first.heldout_loss)
  assert [step for step, _ in reports] == [1, 3]
  for step, report in reports:
    assert report['steps'] == step and report['flops'] == first.flops > 0
    assert math.isfinite(report['heldout_loss']) and 0.0 <= report['ap'] <= 1.0
  # The reports' evaluations count as evaluation, not training: the final result's evaluate
  # phase holds all three (each report's, so far), its train phase only the steps.
  evaluations = [report['phases']['evaluate'] for _, report in reports]
  assert 0 < evaluations[0] < evaluations[1] < result.phases['evaluate']
  trainings = [report['phases']['train'] for _, report in reports]
  assert 0 < trainings[0] <= trainings[1] <= result.phases['train']
  assert result.phases['train'] + result.phases['evaluate'] <= result.seconds + 0.02
  # Three more steps of training moved the held-out loss, as two more moved it again.
  assert len({reports[0][1]['heldout_loss'], reports[1][1]['heldout_loss'],
              result.heldout_loss}) == 3
  with pytest.raises(ValueError, match=r'report steps \[4\] are not in 1..3.*CpuProxy.train_steps'):
    proxy.run_trial('nasfpn', 'cpu', work_dir=work_dir, gin_bindings=TINY_CPU,
                    report_steps=[4], report=print)
  with pytest.raises(ValueError, match='--proxy_seeds=1, not --proxy=cpu and --proxy_seeds=2'):
    proxy.run_trial('nasfpn', 'cpu', work_dir=work_dir, gin_bindings=TINY_CPU, num_seeds=2,
                    report_steps=[1], report=print)


def test_the_head_starts_from_the_pretraining_one_where_it_is_that_head(cpu_work_dir):
  """CpuProxy.pretrained_head: None (default) loads the cache's head where the trial's head has
  its shapes (4 convs of CpuProxyCache.pretrain_filters = 16), not where it differs (TINY_CPU's
  1-conv head); False never; True, where it differs, names the bindings."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from nasfpn_tf.search import cpu_proxy  # pylint: disable=g-import-not-at-top
  folder = proxy.prepare('cpu', cpu_work_dir[0], TINY_CPU)
  task = cpu_proxy.CpuSearchProxy.from_gin(folder)
  assert task.settings.pretrained_head is None
  cached = task.cache['head']
  pretraining_head = {'block_specs': 'nasfpn', 'head_num_convs': 4}

  def head_is_cached(t, candidate):
    weights = t.new_model(candidate, seed=3).head.get_weights()
    return len(weights) == len(cached) and all(
        np.array_equal(w, c) for w, c in zip(weights, cached))

  def with_setting(value):
    return cpu_proxy.CpuSearchProxy(task.cache, task.model_arguments,
                                    dataclasses.replace(task.settings, pretrained_head=value),
                                    task.loss_fn)

  assert head_is_cached(task, pretraining_head)
  assert not head_is_cached(task, {'block_specs': 'nasfpn'})  # 1 conv: its initialisation
  assert not head_is_cached(with_setting(False), pretraining_head)
  assert head_is_cached(with_setting(True), pretraining_head)
  with pytest.raises(ValueError, match='needs the pretraining head: build_retinanet.head_num_'):
    with_setting(True).new_model({'block_specs': 'nasfpn'}, seed=3)


def test_heldout_split_is_carved_from_training_images(cpu_work_dir):
  folder = training_helpers.proxy_cache_folder(cpu_work_dir[0])
  records = str(folder / 'records')
  train_ids = heldout.records_image_ids(heldout.record_pattern(records, heldout.TRAIN_PREFIX))
  heldout_ids = heldout.records_image_ids(heldout.record_pattern(records, heldout.HELDOUT_PREFIX))
  assert len(heldout_ids) == NUM_HELDOUT and len(train_ids) == NUM_IMAGES - NUM_HELDOUT
  assert not set(train_ids) & set(heldout_ids)
  assert set(train_ids) | set(heldout_ids) == set(range(1, NUM_IMAGES + 1))
  # The reward is computed on exactly the held-out records' images ...
  cached = feature_cache.load(str(folder))['heldout']['labels']['source_id']
  assert sorted(int(s) for s in cached) == sorted(heldout_ids)
  # ... which are images of the generator's train split (image id i is its index i - 1).
  record = next(iter(tf.data.TFRecordDataset(
      heldout.record_pattern(records, heldout.HELDOUT_PREFIX).replace('*', '00000-of-00001'))))
  example = tfexample.decode_example(record)
  index = int(example['source_id'].numpy()) - 1
  pixels = example['image'].numpy().astype(np.float32)
  for split, close in (('train', True), ('val', False)):
    rendered = synthetic.render(0, split, index, image_size=128)[0].astype(np.float32)
    same_size = rendered.shape == pixels.shape
    assert (same_size and np.abs(rendered - pixels).mean() < 12.0) == close  # JPEG vs other


def test_carve_keeps_annotations_with_their_images(tmp_path):
  images = [{'id': i, 'file_name': f'{i}.jpg', 'height': 8, 'width': 8} for i in range(1, 11)]
  annotations = [{'id': 100 + i, 'image_id': i, 'category_id': 1, 'bbox': [0, 0, 2, 2],
                  'area': 4, 'iscrowd': 0} for i in range(1, 11)]
  source = tmp_path / 'instances.json'
  source.write_text(json.dumps({'images': images, 'annotations': annotations,
                                'categories': [{'id': 1, 'name': 'a'}]}))
  paths = heldout.carve(str(source), str(tmp_path / 'out'), num_heldout=3, seed=5)
  splits = {k: json.loads(pathlib.Path(v).read_text()) for k, v in paths.items()}
  ids = {k: {im['id'] for im in s['images']} for k, s in splits.items()}
  assert len(ids[heldout.HELDOUT_PREFIX]) == 3 and len(ids[heldout.TRAIN_PREFIX]) == 7
  assert ids[heldout.HELDOUT_PREFIX] | ids[heldout.TRAIN_PREFIX] == set(range(1, 11))
  for split, data in splits.items():
    assert {a['image_id'] for a in data['annotations']} == ids[split]
    assert data['categories'] == [{'id': 1, 'name': 'a'}]
  again = heldout.carve(str(source), str(tmp_path / 'again'), num_heldout=3, seed=5)
  assert json.loads(pathlib.Path(again[heldout.HELDOUT_PREFIX]).read_text()) == splits[
      heldout.HELDOUT_PREFIX]
  with pytest.raises(ValueError, match='num_heldout=10.*has 10 images'):
    heldout.carve(str(source), str(tmp_path / 'bad'), num_heldout=10)


def test_bad_specs_and_a_config_that_does_not_build_are_named(cpu_work_dir):
  work_dir, _ = cpu_work_dir
  with pytest.raises(ValueError, match=r'block_specs .*do not build a P3-P7.*cell 0'):
    proxy.run_trial([[4, 'sum', [1, 9], False]], 'cpu', work_dir=work_dir,
                    gin_bindings=TINY_CPU)
  broken = TINY_CPU + ['build_retinanet.num_repeats = 0']
  with pytest.raises(ValueError, match=r"proxy 'cpu' does not build under gin files "
                     r"\['search_proxy_cpu.gin'\].*num_repeats = 0.*num_repeats must be >= 1"):
    proxy.run_trial('fpn', 'cpu', work_dir=work_dir, gin_bindings=broken)
  with pytest.raises(ValueError, match="unknown proxy 'tpu'"):
    proxy.run_trial('fpn', 'tpu', work_dir=work_dir)
  with pytest.raises(ValueError, match="proxy 'paper' trains on COCO records: pass data_dir"):
    proxy.run_trial('fpn', 'paper', work_dir=work_dir)


def test_paper_proxy_runs_a_few_steps_end_to_end(tmp_path):
  raw = tmp_path / 'raw'
  synthetic.generate(raw, num_train=12, num_val=0, image_size=96, seed=0)
  data_dir = str(tmp_path / 'records')
  heldout.make_proxy_records(str(raw / 'annotations' / 'instances_train.json'),
                             str(raw / 'train'), data_dir, num_heldout=4, num_threads=2)
  bindings = training_helpers.TINY_MODEL + [
      'RetinaNetTrainer.train_steps = 2',
      'RetinaNetTrainer.global_batch_size = 2', 'RetinaNetTrainer.checkpoint_every_steps = 2',
      'RetinaNetTrainer.log_every_steps = 1', 'RetinaNetTrainer.eval_batch_size = 2',
      'StepDecayWithWarmup.warmup_steps = 1']
  work_dir = tmp_path / 'work'
  result = proxy.run_trial('nasfpn', 'paper', seed=0, work_dir=str(work_dir),
                           gin_bindings=bindings, data_dir=data_dir)
  assert 0.0 <= result.ap <= 1.0 and result.steps == 2 and result.final_loss is None
  assert result.flops > 0 and result.params > 0
  assert not list((work_dir / 'paper_trials').iterdir())  # the trial's model dir is gone
  assert gin.query_parameter('StepDecayWithWarmup.base_learning_rate') == 0.08


def test_configure_threads_before_tensorflow_runs_and_refused_after():
  script = (
      'from nasfpn_tf.search import proxy\n'
      'import tensorflow as tf\n'
      'proxy.configure_threads(1)\n'
      'tf.constant(1.0) + 1.0\n'
      'proxy.configure_threads(1)\n'  # already so: fine
      'print(tf.config.threading.get_intra_op_parallelism_threads(),\n'
      '      tf.config.threading.get_inter_op_parallelism_threads())\n'
      'try:\n'
      '  proxy.configure_threads(2)\n'
      'except RuntimeError as e:\n'
      '  print("refused:", e)\n')
  env = dict(os.environ, PYTHONPATH=str(training_helpers.REPO), TF_CPP_MIN_LOG_LEVEL='3')
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env,
                       check=True, cwd=training_helpers.REPO,
                       timeout=training_helpers.SUBPROCESS_TIMEOUT).stdout.splitlines()
  assert out[0] == '1 1'
  assert 'configure_threads(2): TensorFlow already runs with 1 intra-op' in out[1]
  assert 'first thing in the worker' in out[1]


def test_rewards_by_hand():
  result = proxy.TrialResult(ap=0.4, ap50=0.6, flops=2_000_000_000, params=1, seconds=1.0,
                             steps=1, final_loss=0.5)
  assert rewards.reward(result) == 0.4
  assert rewards.reward(result, 'ap_flops', target_flops=1e9) == pytest.approx(
      0.4 * 2.0**-0.07)
  assert rewards.reward(result.to_dict(), 'ap_flops', target_flops=4e9,
                        flops_weight=-0.5) == pytest.approx(0.4 * 0.5**-0.5)
  config.parse_gin([], ['reward.flops_weight = -1.0'])
  assert rewards.reward(result, 'ap_flops', target_flops=1e9) == pytest.approx(0.2)
  with pytest.raises(ValueError, match="'ap_flops' needs a FLOPs budget: pass --target_flops"):
    rewards.reward(result, 'ap_flops')
  with pytest.raises(ValueError, match="unknown reward 'latency'"):
    rewards.reward(result, 'latency')
  with pytest.raises(ValueError, match='--target_flops must be > 0'):
    rewards.reward(result, 'ap_flops', target_flops=0)
