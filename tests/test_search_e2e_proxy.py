"""The end-to-end proxy (proxy='e2e'): the demo's detector trained whole for a short schedule on
the CPU proxy's cache (its split of the embedded synthetic images or of the user's records), from
its pretrained backbone or a checkpoint's, rewarded by held-out AP; and the errors that name bad
input before any trial."""
import os

import gin
import pytest
import tensorflow as tf

import training_helpers
from nasfpn_tf.data import create_coco_tfrecord
from nasfpn_tf.models import factory
from nasfpn_tf.search import configurables
from nasfpn_tf.search import feature_cache
from nasfpn_tf.search import heldout
from nasfpn_tf.search import proxy
from nasfpn_tf.search import rewards
from nasfpn_tf.search import runner

SPLIT = ['CpuProxyCache.num_images = 16', 'CpuProxyCache.num_heldout = 8']
PRETRAIN = ['CpuProxyCache.pretrain_steps = 1', 'CpuProxyCache.pretrain_filters = 16',
            'CpuProxyCache.pretrain_batch_size = 2']
TINY_E2E = training_helpers.TINY_MODEL + SPLIT + PRETRAIN + [
    'TRAIN_STEPS = 2', 'CosineDecayWithWarmup.warmup_steps = 1',
    'RetinaNetTrainer.global_batch_size = 2', 'RetinaNetTrainer.checkpoint_every_steps = 2',
    'RetinaNetTrainer.log_every_steps = 1', 'RetinaNetTrainer.eval_batch_size = 4']


def _split_ids(folder):
  return {split: heldout.records_image_ids(heldout.record_pattern(str(folder), split))
          for split in heldout.SPLITS}


def test_e2e_trial_trains_the_demo_detector_from_the_cpu_proxys_backbone(tmp_path, capsys):
  work_dir = tmp_path / 'work'
  result = proxy.run_trial('nasfpn', 'e2e', seed=0, work_dir=str(work_dir),
                           gin_bindings=TINY_E2E)
  assert 0.0 <= result.ap <= 1.0 and 0.0 <= result.ap50 <= 1.0
  assert result.steps == 2 and result.final_loss is None
  assert result.flops > 0 and result.params > 0
  # The demo's recipe (demo.gin, included), cut to TRAIN_STEPS.
  assert gin.query_parameter('%TRAIN_STEPS') == 2
  assert gin.query_parameter('CosineDecayWithWarmup.base_learning_rate') == 0.04
  assert gin.query_parameter('RetinaNetTrainer.global_batch_size') == 2
  assert not list((work_dir / 'e2e_trials').iterdir())  # the trial's model dir is gone
  # On the CPU proxy's cache: its split records, and its pretrained backbone to start from.
  folder = training_helpers.proxy_cache_folder(work_dir)
  ids = _split_ids(folder / feature_cache.RECORDS)
  assert len(ids[heldout.TRAIN_PREFIX]) == 8 and len(ids[heldout.HELDOUT_PREFIX]) == 8
  assert not set(ids[heldout.TRAIN_PREFIX]) & set(ids[heldout.HELDOUT_PREFIX])
  pretrained = feature_cache.pretrained_backbone(str(folder))
  assert pretrained == str(folder / feature_cache.PRETRAIN)
  assert f'Initialized the backbone from {pretrained}/ckpt-1.' in capsys.readouterr().out
  # A second trial (another architecture and seed) starts from the same cache, built once.
  stamp = {p.name: p.stat().st_mtime_ns for p in (folder / feature_cache.RECORDS).iterdir()}
  again = proxy.run_trial('fpn', 'e2e', seed=1, work_dir=str(work_dir), gin_bindings=TINY_E2E)
  assert again.steps == 2 and again.flops != result.flops
  assert training_helpers.proxy_cache_folder(work_dir) == folder
  assert {p.name: p.stat().st_mtime_ns
          for p in (folder / feature_cache.RECORDS).iterdir()} == stamp
  assert f'Initialized the backbone from {pretrained}/ckpt-1.' in capsys.readouterr().out
  # Without pretraining (pretrain_steps 0) the backbone starts at its random initialisation.
  assert feature_cache.pretrained_backbone(str(tmp_path)) is None
  proxy.run_trial('nasfpn', 'e2e', seed=0, work_dir=str(tmp_path / 'scratch'),
                  gin_bindings=TINY_E2E + ['CpuProxyCache.pretrain_steps = 0'])
  assert 'Initialized the backbone' not in capsys.readouterr().out


def test_e2e_proxy_on_the_users_records_keeps_their_classes(tmp_path, capsys):
  coco128 = training_helpers.coco128_dir_or_skip()
  annotations = training_helpers.coco_subset(tmp_path, coco128, 24)
  data_dir = tmp_path / 'data'
  create_coco_tfrecord.convert(annotations, str(coco128 / 'train2017'), str(data_dir / 'train'),
                               num_shards=2, num_threads=2)
  bindings = [b for b in TINY_E2E if 'num_classes' not in b and 'CpuProxyCache.num' not in b]
  bindings += ['CpuProxyCache.num_images = 24', 'CpuProxyCache.num_heldout = 8']
  # From a backbone checkpoint (a model dir of the same backbone) instead of the pretraining.
  configurables.parse_gin(['search_proxy_e2e.gin'], bindings)
  checkpoint = str(tmp_path / 'backbone' / 'ckpt')
  tf.train.Checkpoint(model=factory.build_retinanet()).save(checkpoint)
  result = proxy.run_trial('nasfpn', 'e2e', seed=0, work_dir=str(tmp_path / 'work'),
                           gin_bindings=bindings, data_dir=str(data_dir),
                           backbone_checkpoint=checkpoint + '-1')
  assert result.steps == 2 and 0.0 <= result.ap <= 1.0
  assert f'Initialized the backbone from {checkpoint}-1.' in capsys.readouterr().out
  assert gin.query_parameter('build_retinanet.num_classes') == 91  # the label map's ids + 1
  ids = _split_ids(training_helpers.proxy_cache_folder(tmp_path / 'work') / feature_cache.RECORDS)
  assert len(ids[heldout.HELDOUT_PREFIX]) == 8 and len(ids[heldout.TRAIN_PREFIX]) == 16
  coco_ids = set(heldout.records_image_ids(os.path.join(str(data_dir), 'train-*.tfrecord')))
  assert set(ids[heldout.HELDOUT_PREFIX]) | set(ids[heldout.TRAIN_PREFIX]) == coco_ids
  # Too few of them for the split: named before anything is written.
  with pytest.raises(ValueError, match=r'24 images are too few .*holds out 4 of 24 \('
                     r'CpuProxyCache.num_heldout = 200 of CpuProxyCache.num_images = 1200\)'):
    proxy.prepare('e2e', str(tmp_path / 'few'), training_helpers.TINY_NETWORK
                  + ['CpuProxyCache.num_heldout = 200'], data_dir=str(data_dir))
  assert not [p for p in (tmp_path / 'few' / feature_cache.CACHES_DIR).iterdir() if p.is_dir()]


def test_e2e_proxy_refuses_what_it_cannot_do(tmp_path):
  with pytest.raises(ValueError, match=r'--backbone_checkpoint is for --proxy=cpu or e2e; '
                     r'--proxy=paper trains the whole model from scratch'):
    proxy.prepare('paper', str(tmp_path), [], backbone_checkpoint=str(tmp_path))
  with pytest.raises(ValueError, match=r"reward 'neg_loss' .*only --proxy=cpu measures"):
    rewards.check('neg_loss', proxy='e2e')
  with pytest.raises(ValueError, match=r'--scheduler=asha.*--proxy=e2e does not make'):
    runner.run_search(runner.SearchSettings(search_dir=str(tmp_path / 'search'), proxy='e2e',
                                            scheduler='asha'))
  with pytest.raises(ValueError, match=r"gin binding 'RetinaNetTrainer.train_step = 2'"):
    proxy.prepare('e2e', str(tmp_path), ['RetinaNetTrainer.train_step = 2'])
