"""The end-to-end proxy (proxy='e2e'): the demo's detector trained whole, backbone included, for a
short schedule on the CPU proxy's split of the same images (the embedded synthetic ones or the
user's records), rewarded by held-out AP; and the errors that name bad input before any trial."""
import os
import pathlib

import gin
import pytest

import training_helpers
from test_search_own_data import _coco_subset  # the same 24 coco128 images
from nasfpn_tf.data import create_coco_tfrecord
from nasfpn_tf.search import feature_cache
from nasfpn_tf.search import heldout
from nasfpn_tf.search import proxy
from nasfpn_tf.search import rewards
from nasfpn_tf.search import runner

SPLIT = ['CpuProxyCache.num_images = 16', 'CpuProxyCache.num_heldout = 8']
TINY_E2E = training_helpers.TINY_MODEL + SPLIT + [
    'TRAIN_STEPS = 2', 'CosineDecayWithWarmup.warmup_steps = 1',
    'RetinaNetTrainer.global_batch_size = 2', 'RetinaNetTrainer.checkpoint_every_steps = 2',
    'RetinaNetTrainer.log_every_steps = 1', 'RetinaNetTrainer.eval_batch_size = 4']
TINY_CPU = training_helpers.TINY_MODEL + SPLIT + [
    'CpuProxyCache.pretrain_steps = 1', 'CpuProxyCache.pretrain_filters = 16',
    'CpuProxyCache.pretrain_batch_size = 2']


def _records_folder(work_dir) -> pathlib.Path:
  folders = [p for p in (pathlib.Path(work_dir) / feature_cache.RECORDS_DIR).iterdir()
             if p.is_dir()]
  assert len(folders) == 1, folders  # one complete folder, no staging left
  return folders[0]


def _split_ids(folder):
  return {split: heldout.records_image_ids(heldout.record_pattern(str(folder), split))
          for split in heldout.SPLITS}


def test_e2e_trial_trains_the_demo_detector_on_the_cpu_proxys_split(tmp_path):
  work_dir = tmp_path / 'work'
  result = proxy.run_trial('nasfpn', 'e2e', seed=0, work_dir=str(work_dir),
                           gin_bindings=TINY_E2E, num_threads=1)
  assert 0.0 <= result.ap <= 1.0 and 0.0 <= result.ap50 <= 1.0
  assert result.steps == 2 and result.final_loss is None
  assert result.flops > 0 and result.params > 0
  # The demo's recipe (demo.gin, included), cut to TRAIN_STEPS.
  assert gin.query_parameter('%TRAIN_STEPS') == 2
  assert gin.query_parameter('CosineDecayWithWarmup.base_learning_rate') == 0.04
  assert gin.query_parameter('RetinaNetTrainer.global_batch_size') == 2
  assert not list((work_dir / 'e2e_trials').iterdir())  # the trial's model dir is gone
  folder = _records_folder(work_dir)
  ids = _split_ids(folder)
  assert len(ids[heldout.TRAIN_PREFIX]) == 8 and len(ids[heldout.HELDOUT_PREFIX]) == 8
  assert not set(ids[heldout.TRAIN_PREFIX]) & set(ids[heldout.HELDOUT_PREFIX])
  # The same images, held out alike, as the CPU proxy's cache of the same settings.
  cache = proxy.prepare('cpu', str(tmp_path / 'cpu'), TINY_CPU)
  assert _split_ids(pathlib.Path(cache) / 'records') == ids
  # A second trial (another architecture and seed) trains on the records the first one made.
  stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
  again = proxy.run_trial('fpn', 'e2e', seed=1, work_dir=str(work_dir), gin_bindings=TINY_E2E,
                          num_threads=1)
  assert again.steps == 2 and again.flops != result.flops
  assert _records_folder(work_dir) == folder
  assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
  # Another split is another folder.
  proxy.prepare('e2e', str(work_dir), TINY_E2E + ['CpuProxyCache.data_seed = 1'])
  assert len([p for p in (work_dir / feature_cache.RECORDS_DIR).iterdir() if p.is_dir()]) == 2


def test_e2e_proxy_on_the_users_records_keeps_their_classes(tmp_path):
  coco128 = training_helpers.coco128_dir_or_skip()
  annotations = _coco_subset(tmp_path, coco128, 24)
  data_dir = tmp_path / 'data'
  create_coco_tfrecord.convert(annotations, str(coco128 / 'train2017'), str(data_dir / 'train'),
                               num_shards=2, num_threads=2)
  bindings = [b for b in TINY_E2E if 'num_classes' not in b and 'CpuProxyCache' not in b]
  bindings += ['CpuProxyCache.num_images = 24', 'CpuProxyCache.num_heldout = 8']
  result = proxy.run_trial('nasfpn', 'e2e', seed=0, work_dir=str(tmp_path / 'work'),
                           gin_bindings=bindings, data_dir=str(data_dir), num_threads=1)
  assert result.steps == 2 and 0.0 <= result.ap <= 1.0
  assert gin.query_parameter('build_retinanet.num_classes') == 91  # the label map's ids + 1
  ids = _split_ids(_records_folder(tmp_path / 'work'))
  assert len(ids[heldout.HELDOUT_PREFIX]) == 8 and len(ids[heldout.TRAIN_PREFIX]) == 16
  coco_ids = set(heldout.records_image_ids(os.path.join(str(data_dir), 'train-*.tfrecord')))
  assert set(ids[heldout.HELDOUT_PREFIX]) | set(ids[heldout.TRAIN_PREFIX]) == coco_ids
  # Too few of them for the split: named before anything is written.
  with pytest.raises(ValueError, match=r'24 images are too few .*holds out 4 of 24 \('
                     r'CpuProxyCache.num_heldout = 200 of CpuProxyCache.num_images = 1200\)'):
    proxy.prepare('e2e', str(tmp_path / 'few'), training_helpers.TINY_NETWORK
                  + ['CpuProxyCache.num_heldout = 200'], data_dir=str(data_dir))
  assert not list((tmp_path / 'few' / feature_cache.RECORDS_DIR).glob('*/'))


def test_e2e_proxy_refuses_what_it_cannot_do(tmp_path):
  with pytest.raises(ValueError, match=r"--backbone_checkpoint is the CPU proxy's; --proxy=e2e "
                     r'trains the whole model'):
    proxy.prepare('e2e', str(tmp_path), TINY_E2E, backbone_checkpoint=str(tmp_path))
  with pytest.raises(ValueError, match=r"reward 'neg_loss' .*only --proxy=cpu measures"):
    rewards.check('neg_loss', proxy='e2e')
  with pytest.raises(ValueError, match=r'--scheduler=asha.*--proxy=cpu'):
    runner.run_search(runner.SearchSettings(search_dir=str(tmp_path / 'search'), proxy='e2e',
                                            scheduler='asha'))
  with pytest.raises(ValueError, match=r"gin binding 'RetinaNetTrainer.train_step = 2'"):
    proxy.prepare('e2e', str(tmp_path), ['RetinaNetTrainer.train_step = 2'])
