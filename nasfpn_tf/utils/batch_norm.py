"""Batch-norm statistics for untrained models that are timed or exported as if trained."""
from typing import Any

import tf_keras


def calibrate_batch_norm(model: tf_keras.Model, images: Any) -> None:
  """Gives every batch norm of `model` the mean and variance of its input on `images`.

  Randomly initialised, the BNs' unit moving variance does not match their inputs: activations
  grow layer after layer (a std of ~1e13 at the outputs of a 7@64 pyramid), so scores saturate
  at 0 or 1 and timings, NMS work and int8 calibration stop resembling a trained model's. After
  one training-mode pass with momentum 0, each BN outputs roughly zero mean and unit variance,
  as in a trained model. Momentums are restored; no weight other than the statistics changes.
  """
  layers = [layer for layer in model.submodules
            if isinstance(layer, tf_keras.layers.BatchNormalization)]
  momentums = [layer.momentum for layer in layers]
  try:
    for layer in layers:
      layer.momentum = 0.0
    model(images, training=True)
  finally:
    for layer, momentum in zip(layers, momentums):
      layer.momentum = momentum
