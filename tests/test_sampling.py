"""Class-balanced and repeat-factor sampling (build_train_dataset.sampling) on coco128's real class
statistics: the per-class image frequency after sampling against the formulas computed here from
the COCO json, the stream realizing each pass's draw, determinism per seed, tf.distribute."""
import collections
import json

import numpy as np
import pytest
import tensorflow as tf

from nasfpn_tf.data import create_coco_tfrecord
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.data import sampling
from nasfpn_tf.data import tfexample
from training_helpers import coco128_dir_or_skip, TINY_MODEL_CONFIG

# coco128: every class is in at least 1 of the 128 images (f(c) >= 0.0078), so LVIS's t = 0.001
# repeats nothing; t = 0.1 repeats the classes in fewer than 13 images.
THRESHOLD = 0.1
EPOCHS = 600


@pytest.fixture(scope='module')
def coco128(tmp_path_factory):
  """coco128 as 2 TFRecord shards; per record (in sampling's numbering): source id; and the
  json's own statistics: {source id: non-crowd class set}, {class: non-crowd boxes}."""
  coco128_dir = coco128_dir_or_skip()
  root = tmp_path_factory.mktemp('coco128_sampling')
  annotations = coco128_dir / 'annotations' / 'instances_train2017.json'
  summary = create_coco_tfrecord.convert(str(annotations), str(coco128_dir / 'train2017'),
                                         str(root / 'train'), num_shards=2, num_threads=2)
  files = summary['shards']
  source_ids = [tf.io.parse_single_example(record, {tfexample.SOURCE_ID: tf.io.FixedLenFeature(
      (), tf.string)})[tfexample.SOURCE_ID].numpy().decode() for record in
      tf.data.TFRecordDataset(sorted(files))]
  data = json.loads(annotations.read_text())
  classes = {str(image['id']): set() for image in data['images']}
  boxes = collections.Counter()
  for annotation in data['annotations']:
    if not annotation.get('iscrowd'):
      classes[str(annotation['image_id'])].add(annotation['category_id'])
      boxes[annotation['category_id']] += 1
  return files, source_ids, classes, boxes


def formula_repeats(source_ids, classes, boxes, mode):
  """m_i from the json: the seed's weights normalized to a mean of 1, or LVIS's factors."""
  image_classes = [classes[s] for s in source_ids]
  if mode == 'class_balanced':
    total, num_classes = sum(boxes.values()), len(boxes)
    weights = np.array([np.mean([total / (num_classes * boxes[c]) for c in cs]) if cs else 1.0
                        for cs in image_classes])
    return weights / weights.mean()
  frequency = collections.Counter(c for cs in image_classes for c in cs)
  n = len(image_classes)
  factor = {c: max(1.0, np.sqrt(THRESHOLD / (k / n))) for c, k in frequency.items()}
  return np.array([max([factor[c] for c in cs], default=1.0) for cs in image_classes])


def per_class(values, source_ids, classes):
  """{class: sum of `values` over the images holding it}."""
  sums = collections.Counter()
  for value, source_id in zip(values, source_ids):
    for c in classes[source_id]:
      sums[c] += value
  return sums


def _threshold(mode):
  return THRESHOLD if mode == 'repeat_factor' else None


def _source_ids(dataset, count):
  return collections.Counter(
      tf.train.Example.FromString(record).features.feature[tfexample.SOURCE_ID]
      .bytes_list.value[0].decode() for record in dataset.take(count).as_numpy_iterator())


@pytest.mark.parametrize('mode', ['class_balanced', 'repeat_factor'])
def test_per_class_image_frequency_follows_the_formula(coco128, mode):
  files, source_ids, classes, boxes = coco128
  record_classes = sampling.read_record_classes(sorted(files))
  repeats = sampling.expected_repeats(record_classes, mode, _threshold(mode))
  np.testing.assert_allclose(repeats, formula_repeats(source_ids, classes, boxes, mode),
                             rtol=1e-12)
  expected = per_class(repeats, source_ids, classes)
  # Sampled: the mean over EPOCHS passes of each class's images drawn, within 4 standard errors
  # of the expected (each image's draw is floor(m) + a coin of frac(m)).
  drawn = sum(sampling.epoch_counts(repeats, 7, e).numpy() for e in range(EPOCHS))
  sampled = per_class(drawn / EPOCHS, source_ids, classes)
  variance = per_class((repeats % 1) * (1 - repeats % 1), source_ids, classes)
  for c in boxes:
    assert abs(sampled[c] - expected[c]) <= 4 * np.sqrt(variance[c] / EPOCHS) + 1e-9, c
  # Rare classes gain: the classes in at most 2 images appear about twice as often or more (on
  # average: a rare class in an image of common ones can lose under 'class_balanced'), and the
  # per-class frequencies spread less (coefficient of variation).
  uniform = per_class(np.ones(len(source_ids)), source_ids, classes)
  rare = [c for c in uniform if uniform[c] <= 2]
  assert np.mean([sampled[c] / uniform[c] for c in rare]) > 1.5
  variation = lambda frequency: np.std(list(frequency.values())) / np.mean(  # noqa: E731
      list(frequency.values()))
  assert variation(sampled) < 0.97 * variation(uniform)
  if mode == 'class_balanced':  # the epoch keeps its size; the most common class loses
    assert drawn.sum() / EPOCHS == pytest.approx(len(source_ids), rel=0.01)
    commonest = max(uniform, key=lambda c: uniform[c])
    assert sampled[commonest] < uniform[commonest]


@pytest.mark.parametrize('mode', ['class_balanced', 'repeat_factor'])
def test_the_stream_draws_each_pass_as_epoch_counts_says(coco128, mode):
  files, source_ids, _, _ = coco128
  record_classes = sampling.read_record_classes(sorted(files))
  repeats = sampling.expected_repeats(record_classes, mode, _threshold(mode))
  first, second = (sampling.epoch_counts(repeats, 3, e).numpy() for e in (0, 1))
  expected = [collections.Counter({source_ids[i]: int(n) for i, n in enumerate(counts) if n})
              for counts in (first, second)]
  stream = sampling.sampled_records(files, mode, seed=3, repeat_threshold=_threshold(mode))
  assert _source_ids(stream, int(first.sum())) == expected[0]
  assert _source_ids(stream.skip(int(first.sum())), int(second.sum())) == expected[1]
  # With tf.distribute: 2 pipelines split the files, 3 the records; together, the same draw.
  shard_of_record = np.searchsorted(record_classes.offsets, np.arange(len(first)), 'right') - 1
  for num_pipelines, owner in ((2, shard_of_record % 2), (3, np.arange(len(first)) % 3)):
    union = collections.Counter()
    for pipeline_id in range(num_pipelines):
      context = tf.distribute.InputContext(num_pipelines, pipeline_id, 1)
      mine = sampling.sampled_records(files, mode, context, seed=3,
                                      repeat_threshold=_threshold(mode))
      union += _source_ids(mine, int(first[owner == pipeline_id].sum()))
    assert union == expected[0], num_pipelines


def test_the_draw_is_fixed_by_the_seed(coco128):
  files, _, _, _ = coco128
  repeats = sampling.expected_repeats(sampling.read_record_classes(sorted(files)),
                                      'class_balanced')
  draw = lambda seed, epoch: sampling.epoch_counts(repeats, seed, epoch).numpy()  # noqa: E731
  np.testing.assert_array_equal(draw(5, 2), draw(5, 2))
  assert not np.array_equal(draw(5, 2), draw(6, 2))
  assert not np.array_equal(draw(5, 2), draw(5, 3))
  assert set(np.unique(draw(5, 2) - np.floor(repeats))) <= {0, 1}


@pytest.mark.parametrize('bindings,message', [
    ({'sampling': 'balanced'}, r"build_train_dataset.sampling = 'balanced' is not one of"),
    ({'sampling': 'repeat_factor', 'repeat_threshold': 0.0}, 'repeat_threshold = 0.0: give'),
    ({'sampling': 'repeat_factor', 'repeat_threshold': 2}, 'repeat_threshold = 2: give'),
    ({'sampling': 'class_balanced', 'repeat_threshold': 0.01},
     "applies to sampling = 'repeat_factor' only"),
    ({'sampling': 'class_balanced', 'sampling_seed': -1}, 'sampling_seed = -1'),
])
def test_bad_bindings_are_named(synthetic_records, bindings, message):
  with pytest.raises(ValueError, match=message):
    input_pipeline.build_train_dataset(synthetic_records['train'], 2, TINY_MODEL_CONFIG,
                                       **bindings)


def test_train_dataset_with_sampling_yields_batches(synthetic_records):
  dataset = input_pipeline.build_train_dataset(synthetic_records['train'], 2, TINY_MODEL_CONFIG,
                                               sampling='repeat_factor', repeat_threshold=1.0,
                                               shuffle_buffer_size=16)
  images, labels = next(iter(dataset))
  assert images.shape == (2, 128, 128, 3)
  assert labels['cls_weights'].shape[0] == 2
