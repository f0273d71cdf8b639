"""Input pipelines: shapes, labels against TFM's AnchorLabeler, flip, jitter, eval round trip."""
import numpy as np
import pytest
import tensorflow as tf
from official.vision.ops import anchor, box_ops

from nasfpn_tf.data import input_pipeline
from nasfpn_tf.data.tfexample import encode_example
from nasfpn_tf.models import geometry
from nasfpn_tf.models.factory import build_retinanet
from nasfpn_tf.models.geometry import ModelGeometry
from nasfpn_tf.models.losses import RetinaNetLoss
from training_helpers import TINY_MODEL_CONFIG

NO_AUGMENTATION = dict(aug_scale_min=1.0, aug_scale_max=1.0, flip_prob=0.0)

# (height, width, [(normalized box, class, is_crowd)]): sizes that need scaling up and down.
IMAGES = [
    (96, 160, [((0.1, 0.05, 0.6, 0.4), 1, False), ((0.3, 0.5, 0.9, 0.95), 3, False),
               ((0.0, 0.0, 0.5, 0.5), 5, True)]),
    (200, 120, [((0.2, 0.2, 0.7, 0.9), 7, False)]),
    (128, 128, [((0.25, 0.25, 0.75, 0.75), 9, False), ((0.05, 0.6, 0.3, 0.95), 1, False)]),
    (64, 100, []),
]


def _example(source_id, height, width, objects):
  """A JPEG with a bright left half, so a horizontal flip shows in the pixels."""
  pixels = np.full((height, width, 3), 40, np.uint8)
  pixels[:, :width // 2] = 220
  boxes = [o[0] for o in objects]
  areas = [(b[2] - b[0]) * height * (b[3] - b[1]) * width for b in boxes]
  return encode_example(tf.io.encode_jpeg(pixels).numpy(), height, width, source_id,
                        f'{source_id}.jpg', boxes, [o[1] for o in objects],
                        [f'c{o[1]}' for o in objects], [o[2] for o in objects], areas)


def _write(path, examples):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for example in examples:
      writer.write(example)
  return str(path)


@pytest.fixture
def records(tmp_path):
  """Two shards holding IMAGES (source ids 1..4)."""
  examples = [_example(i + 1, *spec) for i, spec in enumerate(IMAGES)]
  _write(tmp_path / 'data-00000-of-00002.tfrecord', examples[:2])
  _write(tmp_path / 'data-00001-of-00002.tfrecord', examples[2:])
  return str(tmp_path / 'data-*.tfrecord')


@pytest.fixture
def first_image(tmp_path):
  """A single record of IMAGES[0] (which holds a crowd box), so train output is that image."""
  return _write(tmp_path / 'one.tfrecord', [_example(1, *IMAGES[0])])


def _expected_labels(height, width, objects, flip=False):
  """TFM AnchorLabeler on the image's non-crowd boxes scaled to fit 128x128, computed directly."""
  scale = min(128 / height, 128 / width)
  scaled = np.round(np.array([height, width]) * scale)
  y_scale, x_scale = scaled / [height, width]
  boxes = np.array([o[0] for o in objects if not o[2]], np.float32).reshape(-1, 4)
  if flip:
    boxes = np.stack([boxes[:, 0], 1 - boxes[:, 3], boxes[:, 2], 1 - boxes[:, 1]], axis=1)
  boxes = boxes * [height * y_scale, width * x_scale, height * y_scale, width * x_scale]
  classes = np.array([o[1] for o in objects if not o[2]], np.int32).reshape(-1, 1)
  anchors = anchor.Anchor(3, 7, 3, [0.5, 1.0, 2.0], 4.0, [128, 128]).multilevel_boxes
  labeler = anchor.AnchorLabeler(match_threshold=0.5, unmatched_threshold=0.5)
  cls_targets, box_targets, _, cls_weights, box_weights = labeler.label_anchors(
      anchors, tf.constant(boxes, tf.float32), tf.constant(classes))
  return cls_targets, box_targets, cls_weights, box_weights


def _assert_labels_equal(labels, expected):
  cls_targets, box_targets, cls_weights, box_weights = expected
  for level in cls_targets:
    np.testing.assert_array_equal(labels['cls_targets'][level][0], cls_targets[level])
    np.testing.assert_allclose(labels['box_targets'][level][0], box_targets[level], atol=1e-4)
  np.testing.assert_array_equal(labels['cls_weights'][0], cls_weights)
  np.testing.assert_array_equal(labels['box_weights'][0], box_weights)


def test_train_batch_shapes(records):
  dataset = input_pipeline.build_train_dataset(records, 2, TINY_MODEL_CONFIG)
  images, labels = next(iter(dataset))
  assert images.shape == (2, 128, 128, 3) and images.dtype == tf.float32
  assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255.0
  num_anchors = 0
  for level in range(3, 8):
    size = 128 // 2**level
    assert labels['cls_targets'][str(level)].shape == (2, size, size, 9)
    assert labels['cls_targets'][str(level)].dtype == tf.int32
    assert labels['box_targets'][str(level)].shape == (2, size, size, 36)
    num_anchors += size * size * 9
  assert labels['cls_weights'].shape == (2, num_anchors)
  assert labels['box_weights'].shape == (2, num_anchors)
  assert labels['image_info'].shape == (2, 4, 2)


def test_train_labels_match_anchor_labeler_without_crowd(first_image):
  dataset = input_pipeline.build_train_dataset(first_image, 1, TINY_MODEL_CONFIG,
                                               **NO_AUGMENTATION)
  _, labels = next(iter(dataset))
  _assert_labels_equal(labels, _expected_labels(*IMAGES[0]))
  assert 0 < float(tf.reduce_sum(labels['box_weights']))


def test_train_example_parser_is_the_pipelines_step(first_image):
  """One ordered pass with the public parser gives the labels the pipeline gives (the search
  caches them so)."""
  parse = input_pipeline.train_example_parser(TINY_MODEL_CONFIG, **NO_AUGMENTATION)
  image, labels = parse(next(iter(tf.data.TFRecordDataset(first_image))))
  assert image.shape == (128, 128, 3)
  _assert_labels_equal(tf.nest.map_structure(lambda t: t[None], labels),
                       _expected_labels(*IMAGES[0]))


def test_forced_flip_mirrors_image_and_boxes(first_image):
  flipped = input_pipeline.build_train_dataset(
      first_image, 1, TINY_MODEL_CONFIG, **dict(NO_AUGMENTATION, flip_prob=1.0))
  plain = input_pipeline.build_train_dataset(first_image, 1, TINY_MODEL_CONFIG, **NO_AUGMENTATION)
  (flipped_image, labels), (plain_image, _) = next(iter(flipped)), next(iter(plain))
  _assert_labels_equal(labels, _expected_labels(*IMAGES[0], flip=True))
  info = labels['image_info'][0].numpy()
  content_height, content_width = np.round(info[0] * info[2]).astype(int)
  np.testing.assert_allclose(flipped_image[0, :content_height, :content_width],
                             plain_image[0, :content_height, content_width - 1::-1], atol=1e-3)


def test_jitter_keeps_size_and_boxes_inside(records):
  dataset = input_pipeline.build_train_dataset(records, 4, TINY_MODEL_CONFIG, aug_scale_min=0.5,
                                               aug_scale_max=1.5)
  anchors = ModelGeometry.from_config(TINY_MODEL_CONFIG).anchor_boxes()
  flat_anchors = tf.concat([tf.reshape(anchors[str(l)], [-1, 4]) for l in range(3, 8)], 0)
  scales_seen, positives_seen = set(), 0
  for images, labels in dataset.take(3):
    assert images.shape == (4, 128, 128, 3)
    info = labels['image_info'].numpy()
    fit = np.min(128 / info[:, 0], axis=1)
    scales = info[:, 2, 0] / fit
    assert np.all((scales > 0.5 - 0.02) & (scales < 1.5 + 0.02))
    scales_seen.update(np.round(scales, 2))
    targets = tf.concat([tf.reshape(labels['box_targets'][str(l)], [4, -1, 4])
                         for l in range(3, 8)], 1)
    for i in range(4):
      positive = labels['box_weights'][i] > 0
      positives_seen += int(tf.reduce_sum(tf.cast(positive, tf.int32)))
      boxes = box_ops.decode_boxes(tf.boolean_mask(targets[i], positive),
                                   tf.boolean_mask(flat_anchors, positive)).numpy()
      assert np.all(boxes >= -1e-3) and np.all(boxes <= 128 + 1e-3)
      assert np.all(boxes[:, 2:] > boxes[:, :2])
  assert len(scales_seen) > 1
  assert positives_seen > 0  # the box checks above ran on something


def test_eval_image_info_groundtruth_and_round_trip(records):
  dataset = input_pipeline.build_eval_dataset(records, 3, TINY_MODEL_CONFIG, max_num_instances=5)
  seen = set()
  for images, labels in dataset:
    assert images.shape[1:] == (128, 128, 3)
    info = labels['image_info'].numpy()
    truth = labels['groundtruths']
    for i, source_id in enumerate(labels['source_id'].numpy()):
      height, width, objects = IMAGES[int(source_id) - 1]
      seen.add(int(source_id))
      scale = min(128 / height, 128 / width)
      np.testing.assert_allclose(info[i, 0], [height, width])
      np.testing.assert_allclose(info[i, 1], [128, 128])
      np.testing.assert_allclose(info[i, 0] * info[i, 2],
                                 np.round(np.array([height, width]) * scale), atol=1e-3)
      np.testing.assert_allclose(info[i, 2], scale, rtol=0.02)
      np.testing.assert_allclose(info[i, 3], [0, 0])
      assert (truth['height'][i], truth['width'][i]) == (height, width)
      count = len(objects)
      assert truth['num_instances'][i] == count
      expected = np.array([o[0] for o in objects]).reshape(-1, 4) * [height, width, height, width]
      np.testing.assert_allclose(truth['boxes'][i, :count], expected, atol=1e-3)
      assert np.all(truth['boxes'][i, count:].numpy() == -1)
      assert truth['classes'][i, :count].numpy().tolist() == [o[1] for o in objects]
      assert truth['is_crowd'][i, :count].numpy().tolist() == [o[2] for o in objects]
    # Ground truth as the model sees it (input pixels), mapped back: the original boxes.
    scale, offset = info[:, 2:3], info[:, 3:4]
    in_input = truth['boxes'].numpy() * np.tile(scale, 2) - np.tile(offset, 2)
    restored = geometry.to_original_image(in_input, info).numpy()
    valid = truth['boxes'].numpy() >= 0
    np.testing.assert_allclose(restored[valid], truth['boxes'].numpy()[valid], atol=1.0)
  assert seen == {1, 2, 3, 4}


def test_eval_truncates_extra_instances_with_a_warning(records, capfd):
  dataset = input_pipeline.build_eval_dataset(records, 4, TINY_MODEL_CONFIG, max_num_instances=2)
  _, labels = next(iter(dataset))
  assert labels['groundtruths']['boxes'].shape == (4, 2, 4)
  assert max(labels['groundtruths']['num_instances'].numpy()) == 2
  assert 'has 3 ground-truth objects; evaluation keeps the first 2' in capfd.readouterr().err


def test_input_context_shards_and_splits_batch(records):
  contexts = [tf.distribute.InputContext(2, i, num_replicas_in_sync=2) for i in range(2)]
  shards = []
  for context in contexts:
    dataset = input_pipeline.build_eval_dataset(records, 4, TINY_MODEL_CONFIG,
                                                input_context=context)
    batches = list(dataset)
    assert all(images.shape[0] <= 2 for images, _ in batches)
    shards.append({int(s) for _, labels in batches for s in labels['source_id'].numpy()})
  assert not shards[0] & shards[1] and shards[0] | shards[1] == {1, 2, 3, 4}
  train = input_pipeline.build_train_dataset(records, 4, TINY_MODEL_CONFIG,
                                             input_context=contexts[0])
  assert next(iter(train))[0].shape[0] == 2


def test_no_matching_files(tmp_path):
  pattern = str(tmp_path / 'missing-*.tfrecord')
  with pytest.raises(ValueError, match='no files match.*missing-'):
    input_pipeline.build_train_dataset(pattern, 2, TINY_MODEL_CONFIG)


def test_empty_dataset(tmp_path):
  pattern = _write(tmp_path / 'empty.tfrecord', [])
  with pytest.raises(ValueError, match='empty dataset.*empty.tfrecord'):
    input_pipeline.build_eval_dataset(pattern, 2, TINY_MODEL_CONFIG)


def test_image_size_must_divide_by_top_level_stride(records):
  config = dict(TINY_MODEL_CONFIG, image_size=[96, 128])
  with pytest.raises(ValueError, match='multiple of 2\\^max_level = 128'):
    input_pipeline.build_train_dataset(records, 2, config)


@pytest.mark.parametrize('build', [input_pipeline.build_train_dataset,
                                   input_pipeline.build_eval_dataset])
def test_class_id_at_or_above_num_classes_fails(records, build):
  dataset = build(records, 4, dict(TINY_MODEL_CONFIG, num_classes=8))
  with pytest.raises(tf.errors.InvalidArgumentError, match='num_classes = 8'):
    for _ in dataset.take(2):
      pass


def test_labels_fit_a_built_model_and_its_loss(records):
  model = build_retinanet(image_size=(128, 128), num_classes=10, backbone='mobilenetv2',
                          num_filters=16, num_repeats=1, head_num_convs=1, head_num_filters=16)
  for level, boxes in model.anchor_boxes.items():
    np.testing.assert_array_equal(
        ModelGeometry.from_config(model.get_config()).anchor_boxes()[level], boxes)
  images, labels = next(iter(input_pipeline.build_train_dataset(records, 2, model.get_config())))
  losses = RetinaNetLoss(num_classes=10)(model(images, training=True), labels)
  assert np.isfinite(losses['total_loss'].numpy())
