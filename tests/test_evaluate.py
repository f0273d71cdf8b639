"""evaluation.evaluate_detector: the one loop over an eval dataset (the trainer's evaluation,
with perfect detections scoring AP 1, is in tests/test_trainer.py)."""
import pytest
import tensorflow as tf

from nasfpn_tf.data import input_pipeline
from nasfpn_tf.evaluation import evaluate
from training_helpers import TINY_MODEL_CONFIG


def _nothing_detected(images):
  batch = tf.shape(images)[0]
  return {'detection_boxes': tf.zeros([batch, 5, 4]), 'detection_scores': tf.zeros([batch, 5]),
          'detection_classes': tf.zeros([batch, 5], tf.int32),
          'num_detections': tf.zeros([batch], tf.int32)}


def _eval_dataset(records, batch_size=2):
  return input_pipeline.build_eval_dataset(records['val'], batch_size, TINY_MODEL_CONFIG)


def test_counts_images_and_stops_after_max_batches(synthetic_records):
  everything = evaluate.evaluate_detector(_nothing_detected, _eval_dataset(synthetic_records))
  first = evaluate.evaluate_detector(_nothing_detected, _eval_dataset(synthetic_records),
                                     max_batches=1)
  assert (everything.num_images, first.num_images) == (4, 2)
  assert everything.metrics['AP'] == 0.0 and everything.seconds > 0


def test_an_empty_dataset_is_an_error(synthetic_records):
  with pytest.raises(ValueError, match='yielded no images'):
    evaluate.evaluate_detector(_nothing_detected, _eval_dataset(synthetic_records).take(0))


def test_images_may_be_a_nest_of_batch_first_tensors(synthetic_records):
  """The search evaluates on cached backbone features: a dict per batch, counted by its batch."""
  features = _eval_dataset(synthetic_records).map(
      lambda images, labels: ({'3': images[:, ::8, ::8], '4': images[:, ::16, ::16]}, labels))
  result = evaluate.evaluate_detector(lambda f: _nothing_detected(f['3']), features)
  assert result.num_images == 4
