"""Test-time augmentation (models/tta.py): flipped and scaled views map back by hand computation,
the views' candidates merge before one NMS, the identity view detects exactly as `detect` (off,
evaluation and predict run `detect` as before), evaluation and predict take it and agree, bad
flags are named, exports and other modes refuse it."""
import contextlib
import io
import json

import numpy as np
import pytest
import tensorflow as tf

from nasfpn_tf import config
from nasfpn_tf import predict
from nasfpn_tf.data import tfexample
from nasfpn_tf.models import tta
from nasfpn_tf.models.retinanet import RetinaNet
from nasfpn_tf.training import trainer as trainer_lib
from training_helpers import records_and_encoded_images, run_main, spread_scores
from training_helpers import tiny_bindings, TINY_MODEL_CONFIG

TINY = dict(TINY_MODEL_CONFIG, backbone='resnet10', num_filters=16, num_repeats=1,
            head_num_convs=1, head_num_filters=16)


def test_flip_images_and_boxes_by_hand():
  # Two 1-row images, 5 columns; content widths 3 and 5: only the content is mirrored.
  images = tf.constant([[[[1.], [2.], [3.], [0.], [0.]]], [[[1.], [2.], [3.], [4.], [5.]]]])
  flipped = tta.flip_images(images, tf.constant([3, 5]))
  np.testing.assert_array_equal(flipped[:, 0, :, 0], [[3, 2, 1, 0, 0], [5, 4, 3, 2, 1]])
  # A box spanning columns [0.5, 2) of content width 3 lies at [3 - 2, 3 - 0.5) = [1, 2.5).
  boxes = tf.constant([[[1.0, 0.5, 4.0, 2.0]], [[0.0, 1.0, 2.0, 5.0]]])
  mapped = tta.flip_boxes(boxes, tf.constant([3, 5]))
  np.testing.assert_array_equal(mapped, [[[1.0, 1.0, 4.0, 2.5]], [[0.0, 0.0, 2.0, 4.0]]])
  np.testing.assert_array_equal(tta.flip_boxes(mapped, tf.constant([3, 5])), boxes)
  # Content width: original width x scale of image_info, e.g. 300 px at 128/300 -> 128.
  info = tf.constant([[[200., 300.], [128., 128.], [128 / 300, 128 / 300], [0., 0.]],
                      [[100., 50.], [128., 128.], [1.0, 1.0], [0., 0.]]])
  np.testing.assert_array_equal(tta.content_widths(info, 128), [128, 50])
  # Scale 1.25 of 128 px: 160 px, padded to the next multiple of 2^7.
  assert tta.scaled_sizes((128, 96), 1.25, 128) == ((160, 120), (256, 128))


def _rectangle_detector(model, images):
  """Stands in for a model's candidates: the box of the pixels > 127 (channel 0) of each image,
  class 1, score 0.9 on 256 px inputs (the 2x views) and 0.6 on others."""
  mask = images[..., 0] > 127.0
  rows, columns = tf.reduce_any(mask, axis=2), tf.reduce_any(mask, axis=1)

  def span(on):
    size = tf.shape(on)[1]
    first = tf.argmax(tf.cast(on, tf.int32), axis=1, output_type=tf.int32)
    last = size - tf.argmax(tf.cast(on[:, ::-1], tf.int32), axis=1, output_type=tf.int32)
    return tf.cast(first, tf.float32), tf.cast(last, tf.float32)

  (ymin, ymax), (xmin, xmax) = span(rows), span(columns)
  boxes = tf.stack([ymin, xmin, ymax, xmax], axis=-1)[:, None]
  score = 0.9 if images.shape[1] == 256 else 0.6
  batch = tf.shape(images)[0]
  del model
  return boxes, tf.fill([batch, 1], score), tf.ones([batch, 1], tf.int32)


def test_views_map_back_exactly_and_merge_before_one_nms(monkeypatch):
  model = RetinaNet(**TINY)
  detector = tta.TTADetector(model, tta.TTAConfig((1.0, 2.0), flip=True))
  monkeypatch.setattr(tta, 'candidates', _rectangle_detector)
  # A 128 x 128 input whose content is 100 px wide (a 128 x 100 image at scale 1): rows [10, 30),
  # columns [20, 50) bright. Flipped in its content: columns [100 - 50, 100 - 20) = [50, 80),
  # mapped back as x -> 100 - x. At 2x, bilinear resizing (half-pixel centers) of the edge
  # between 0 and 255 gives 0.25 / 0.75 of 255 on the two output pixels there, so the bright
  # pixels are exactly [20, 60) x [40, 100), mapped back / 2.
  image = np.zeros([1, 128, 128, 3], np.float32)
  image[0, 10:30, 20:50] = 255.0
  info = tf.constant([[[128., 100.], [128., 128.], [1., 1.], [0., 0.]]])
  widths = tta.content_widths(info, 128)
  expected = [10.0, 20.0, 30.0, 50.0]
  for scale in (1.0, 2.0):
    for flipped in (False, True):
      boxes, _, _ = detector.view_candidates(tf.constant(image), widths, scale, flipped)
      np.testing.assert_array_equal(boxes[0, 0], expected, f'scale {scale}, flip {flipped}')
  # The flipped view really saw the object elsewhere: columns [50, 80).
  seen, _, _ = _rectangle_detector(None, tta.flip_images(tf.constant(image), widths))
  np.testing.assert_array_equal(seen[0, 0], [10.0, 50.0, 30.0, 80.0])
  # Merged before NMS: four candidates (one per view) of one object -> one detection, the best
  # view's score (a 2x view's 0.9, not the first view's 0.6).
  boxes, scores, _ = detector.merged_candidates(tf.constant(image), info)
  assert boxes.shape[1] == 4
  np.testing.assert_allclose(scores[0], [0.6, 0.6, 0.9, 0.9])
  detections = detector({'images': tf.constant(image), 'image_info': info})
  assert int(detections['num_detections'][0]) == 1
  np.testing.assert_array_equal(detections['detection_boxes'][0, 0], expected)
  np.testing.assert_allclose(detections['detection_scores'][0, 0], 0.9)
  assert int(detections['detection_classes'][0, 0]) == 1


@pytest.mark.parametrize('detector', ['retinanet', 'fcos'])
def test_identity_view_detects_as_detect_and_views_share_weights(detector):
  model = RetinaNet(**dict(TINY, detector=detector))
  spread_scores(model)
  images = tf.random.stateless_uniform([2, 128, 128, 3], [1, 2], maxval=255.0)
  info = tf.constant([[[128., 128.], [128., 128.], [1., 1.], [0., 0.]]] * 2)
  # One view at scale 1, unflipped: exactly model.detect (candidates + suppress = call).
  same = tta.TTADetector(model, tta.TTAConfig())(dict(images=images, image_info=info))
  expected = model.detect(images)
  for key, value in expected.items():
    np.testing.assert_array_equal(same[key], value, key)
  # The 1.5x view's model (256 px) has the model's weights, copied again by sync_weights.
  several = tta.TTADetector(model, tta.TTAConfig((1.0, 1.5), flip=True))
  (scaled,) = several._models.values()  # pylint: disable=protected-access
  assert scaled.image_size == [256, 256]
  spread_scores(model, seed=5)
  several.sync_weights()
  for mine, theirs in zip(model.get_weights(), scaled.get_weights()):
    np.testing.assert_array_equal(mine, theirs)
  detections = several(dict(images=images, image_info=info))
  count = int(detections['num_detections'][0])
  assert count > 0 and np.all(detections['detection_boxes'][0, :count] <= 128.0)


@pytest.mark.parametrize('value, message', [
    ('1.0,abc', "'abc' is not a scale factor"), ('0', "'0' is not a scale factor"),
    ('-1', "'-1' is not a scale factor"), ('nan', "'nan' is not a scale factor"),
    ('5', "'5' is not a scale factor"), ('', "'' is not a scale factor"),
    ('1.0,1', '1 is given twice')])
def test_bad_scales_are_named(value, message):
  with pytest.raises(ValueError, match=f'--tta_scales={value}: {message}'):
    tta.from_flags(value, False)


def test_flags_parse():
  assert tta.from_flags(None, False) is None
  assert tta.from_flags(None, True) == tta.TTAConfig((1.0,), True)
  config_ = tta.from_flags('1.0, 1.25', True)
  assert config_.views == [(1.0, False), (1.0, True), (1.25, False), (1.25, True)]


@pytest.fixture(scope='module')
def model_dir(synthetic_records, tmp_path_factory):
  """A tiny untrained model dir (scores spread)."""
  root = tmp_path_factory.mktemp('tta')
  config.parse_gin([], tiny_bindings(synthetic_records))
  trainer = trainer_lib.RetinaNetTrainer(str(root / 'model'), tf.distribute.get_strategy())
  spread_scores(trainer.model)
  trainer.checkpointer.save(0)
  return root / 'model'


def test_eval_and_predict_take_tta(model_dir, synthetic_records):
  views = tta.TTAConfig((1.0, 1.25), flip=True)
  config.parse_gin([], tiny_bindings(synthetic_records))
  trainer = trainer_lib.RetinaNetTrainer(str(model_dir), tf.distribute.get_strategy(),
                                         mode='eval', tta=views)
  with contextlib.redirect_stdout(io.StringIO()):
    assert 'AP' in trainer.evaluate()
  recorded = json.loads((model_dir / 'eval_metrics.json').read_text())
  assert recorded['tta'] == {'scales': [1.0, 1.25], 'flip': True}
  # Its first batch (the first val images): other detections than the model's own.
  batch, labels = next(iter(trainer._eval_dataset))  # pylint: disable=protected-access
  evaluated = trainer._detect(  # pylint: disable=protected-access
      {'images': batch, 'image_info': labels['image_info']})
  plain = trainer.model.detect(batch)
  assert not np.array_equal(evaluated['detection_scores'], plain['detection_scores'])
  # predict on the model dir with the same views: the evaluation's detections (in original
  # pixels there, input pixels here: the scores and classes compare).
  detect, _ = predict.load_detector(str(model_dir), tta=views)
  examples, _ = records_and_encoded_images(synthetic_records['val'])
  for i, example in enumerate(examples[:len(batch)]):
    mine = detect(tfexample.decode_example(example)['image'].numpy())
    count = int(evaluated['num_detections'][i])
    assert int(mine['num_detections'][0]) == count > 0
    np.testing.assert_allclose(mine['detection_scores'][0, :count],
                               evaluated['detection_scores'][i, :count], atol=1e-4)


def test_exports_and_other_modes_refuse_tta(tmp_path):
  (tmp_path / 'saved_model.pb').write_bytes(b'')  # refused before anything is read
  with pytest.raises(ValueError, match='is an export.*needs the model dir'):
    predict.load_detector(str(tmp_path), tta=tta.TTAConfig(flip=True))
  fake = tmp_path / 'model.tflite'
  fake.write_bytes(b'')
  with pytest.raises(ValueError, match='is an export'):
    predict.load_detector(str(fake), tta=tta.TTAConfig((1.0, 2.0)))
  with pytest.raises(SystemExit, match='--tta_scales / --tta_flip are for --mode=eval or '
                     'train_and_eval .*not --mode=export_tflite'):
    run_main('--mode=export_tflite', f'--model_dir={tmp_path}', '--tta_flip')
  with pytest.raises(SystemExit, match="--tta_scales=1,x: 'x' is not a scale factor"):
    run_main('--mode=eval', f'--model_dir={tmp_path}', '--tta_scales=1,x')
