"""Shared test setup: quiet TensorFlow, deterministic ops and fixed seeds, and the coco128 sample
when present."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import gin  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import training_helpers  # noqa: E402
from nasfpn_tf.data import create_coco_tfrecord, synthetic  # noqa: E402

# Seeds alone do not replay training: the training pipeline's parallel map and interleave
# (deterministic=False) order examples by thread timing.
tf.config.experimental.enable_op_determinism()


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef):
  """A module or session fixture is built before the autouse seeding below and by whichever
  test needs it first: seeding it too makes its models replay whatever ran before."""
  if fixturedef.scope != 'function':
    tf_keras.utils.set_random_seed(0)


@pytest.fixture(autouse=True)
def _seed_and_clean_gin():
  """Every test starts from seed 0 in Python's `random`, numpy and TensorFlow (tf_keras
  initializers draw their seeds from `random`), so it replays whatever ran before it on its
  xdist worker; gin bindings do not leak from one test into the next."""
  tf_keras.utils.set_random_seed(0)
  yield
  gin.clear_config()


@pytest.fixture
def coco128_dir():
  """The coco128 sample; skips when absent, fails under CI=true (see coco128_dir_or_skip)."""
  return training_helpers.coco128_dir_or_skip()


@pytest.fixture(scope='session')
def synthetic_records(tmp_path_factory):
  """8 train / 4 val synthetic shapes images (72-120 px) as TFRecords, converted once."""
  root = tmp_path_factory.mktemp('synthetic')
  synthetic.generate(root / 'raw', num_train=8, num_val=4, image_size=96, seed=0)
  for split in ('train', 'val'):
    create_coco_tfrecord.convert(str(root / 'raw' / 'annotations' / f'instances_{split}.json'),
                                 str(root / 'raw' / split), str(root / split), num_threads=2)
  return {'train': str(root / 'train-*.tfrecord'), 'val': str(root / 'val-*.tfrecord'),
          'val_json': str(root / 'raw' / 'annotations' / 'instances_val.json')}
