"""Shared test setup: quiet TensorFlow, fixed seeds, and the coco128 sample when present."""
import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
  tf.random.set_seed(0)


@pytest.fixture
def coco128_dir():
  """The coco128 sample ($NASFPN_COCO128 or ../shared/data/coco128); skips when absent."""
  path = pathlib.Path(os.environ.get('NASFPN_COCO128', REPO.parent / 'shared' / 'data' / 'coco128'))
  if not (path / 'annotations' / 'instances_train2017.json').exists():
    pytest.skip(f'coco128 not found at {path} (set $NASFPN_COCO128 to a folder with train2017/ '
                'and annotations/instances_train2017.json)')
  return path
