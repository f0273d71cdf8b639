"""The embedded demo dataset: valid COCO, deterministic, tight boxes, sizes for every level."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
import pytest

from nasfpn_tf.data import synthetic
from training_helpers import REPO, SUBPROCESS_TIMEOUT

CATEGORY_IDS = [1, 3, 5, 7, 9]


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  output_dir = tmp_path_factory.mktemp('shapes')
  return output_dir, synthetic.generate(output_dir, num_train=12, num_val=5, seed=0)


def _files(output_dir):
  return {p.relative_to(output_dir).as_posix(): p.read_bytes()
          for p in sorted(output_dir.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('split', synthetic.SPLITS)
def test_writes_valid_coco(dataset, split):
  output_dir, summary = dataset
  coco = COCO(str(output_dir / 'annotations' / f'instances_{split}.json'))
  # Non-contiguous ids on purpose: the pipeline must carry dataset ids end to end.
  assert coco.getCatIds() == CATEGORY_IDS
  assert len(coco.getImgIds()) == summary[split]['images'] == (12 if split == 'train' else 5)
  assert len(coco.getAnnIds()) == summary[split]['annotations']
  assert sum(summary[split]['per_class'].values()) == summary[split]['annotations']
  for image_id in coco.getImgIds():
    info = coco.loadImgs(image_id)[0]
    with Image.open(output_dir / split / info['file_name']) as image:
      assert image.size == (info['width'], info['height'])
      assert image.mode == 'RGB'
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    assert 1 <= len(annotations) <= synthetic.MAX_OBJECTS
    for ann in annotations:
      x, y, w, h = ann['bbox']
      assert 0 <= x and 0 <= y and x + w <= info['width'] and y + h <= info['height']
      assert w > 0 and h > 0 and ann['iscrowd'] == 0
      assert ann['category_id'] in CATEGORY_IDS
      assert 0 < ann['area'] <= w * h
      assert coco.annToMask(ann).sum() > 0  # the polygon rasterises


def test_json_matches_rendered_masks(dataset):
  output_dir, _ = dataset
  coco = COCO(str(output_dir / 'annotations' / 'instances_val.json'))
  for index, image_id in enumerate(coco.getImgIds()):
    _, objects = synthetic.render(0, 'val', index)
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    assert [a['category_id'] for a in annotations] == [o['category_id'] for o in objects]
    assert [a['bbox'] for a in annotations] == [o['bbox'] for o in objects]
    assert [a['area'] for a in annotations] == [o['mask'].sum() for o in objects]


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
  output_dir, _ = dataset
  synthetic.generate(tmp_path / 'again', num_train=12, num_val=5, seed=0)
  synthetic.generate(tmp_path / 'other', num_train=12, num_val=5, seed=1)
  reference, again, other = (_files(d) for d in (output_dir, tmp_path / 'again',
                                                   tmp_path / 'other'))
  assert again == reference
  assert other.keys() == reference.keys()
  assert all(other[name] != reference[name] for name in reference)


def test_two_processes_write_the_same_bytes(dataset, tmp_path):
  """make demo draws with --num_processes=2: the files must be those of one process."""
  output_dir, summary = dataset
  assert synthetic.generate(tmp_path, num_train=12, num_val=5, seed=0,
                            num_processes=2) == {**summary, 'output_dir': str(tmp_path)}
  assert _files(tmp_path) == _files(output_dir)
  with pytest.raises(ValueError, match='num_processes must be >= 1, got 0'):
    synthetic.generate(tmp_path / 'none', num_train=1, num_val=1, num_processes=0)


def test_the_generator_imports_no_tensorflow():
  """The generator needs none, and importing it (about 5 s of make demo's generate) is avoided."""
  code = 'import sys; import nasfpn_tf.data.synthetic; print("tensorflow" in sys.modules)'
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=True, cwd=REPO, timeout=SUBPROCESS_TIMEOUT)
  assert result.stdout.strip() == 'False'


def test_boxes_are_tight_around_visible_pixels():
  for index in range(30):
    image, objects = synthetic.render(3, 'train', index)
    height, width = image.shape[:2]
    covered = sum(o['mask'].astype(int) for o in objects)
    assert covered.max() <= 1  # each visible pixel belongs to one object only
    for obj in objects:
      mask = obj['mask']
      assert mask.shape == (height, width)
      rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
      assert obj['bbox'] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
      # The object was painted to stand out from what lies beneath: its pixels differ from the
      # background in the one-pixel frame just outside its box.
      x, y, w, h = obj['bbox']
      frame = np.zeros_like(mask)
      frame[max(0, y - 1):y + h + 1, max(0, x - 1):x + w + 1] = True
      frame[y:y + h, x:x + w] = False
      frame &= covered == 0
      if frame.sum() > 8:
        contrast = np.abs(image[frame].mean(0) - image[mask].mean(0)).max()
        assert contrast > 10, (index, obj['bbox'])


def test_sizes_span_pyramid_levels():
  sides = np.array([max(o['bbox'][2:]) for i in range(60)
                    for o in synthetic.render(0, 'train', i)[1]])
  # Objects for strides 8 (< 16 px) up to 64 (> 96 px) at image_size=256.
  assert sides.min() < 16 and sides.max() > 96
  assert np.mean(sides < 32) > 0.2 and np.mean(sides > 64) > 0.1


def test_image_sizes():
  fixed = {synthetic.render(0, 'train', i, image_size=128, vary_size=False)[0].shape
           for i in range(5)}
  assert fixed == {(128, 128, 3)}
  shapes = np.array([synthetic.render(0, 'train', i)[0].shape[:2] for i in range(20)])
  assert shapes.min() >= 0.75 * 256 and shapes.max() <= 1.25 * 256
  assert (shapes[:, 0] != shapes[:, 1]).any()


def test_cli_prints_summary(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'nasfpn_tf.data.synthetic', f'--output_dir={tmp_path}',
       '--num_train=3', '--num_val=2', '--seed=5', '--novary_size', '--image_size=96'],
      capture_output=True, text=True, check=True, cwd=REPO, timeout=SUBPROCESS_TIMEOUT)
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary['train']['images'] == 3 and summary['val']['images'] == 2
  assert sorted(summary['train']['per_class']) == sorted(c['name'] for c in synthetic.CATEGORIES)
  with Image.open(tmp_path / 'val' / '000000000002.jpg') as image:
    assert image.size == (96, 96)
