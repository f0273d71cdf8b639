r"""How often does a bfloat16 convolution's input gradient come back NaN? Conv2D against
`layers.common.PaddedOutputConv2D`, side by side, on this CPU.

  .venv/bin/python experiments/bfloat16_conv_nan.py                        # 819 filters
  .venv/bin/python experiments/bfloat16_conv_nan.py --filters=819,818,720 --calls=3000

Per filter count and layer: `--calls` times, a tensor of NaNs the size of the gradient is made and
freed (memory a kernel reading out of bounds may meet), then the gradient of a 3x3 convolution
(64 input channels, `--size` px, batch 8, mixed_bfloat16) to its input, with a fresh upstream
gradient; the calls whose gradient holds a NaN or Inf are counted. Both layers share their
weights, and the first call's gradients are compared (they must agree to bfloat16 rounding).
Prints a table and last one JSON line (cpu, rows). RetinaNet's class predictor on COCO has
9 x 91 = 819 filters; on TF 2.20 and an AVX512-BF16 Zen 5, a few calls in a thousand of the plain
Conv2D return NaN for one image (docs/precision.md).
"""
import json
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tf_keras

from nasfpn_tf.layers import common
from nasfpn_tf.training import precision

_FILTERS = flags.DEFINE_list('filters', ['819'], 'Output channel counts to try.')
_CALLS = flags.DEFINE_integer('calls', 2000, 'Gradient calls per filter count and layer.')
_SIZE = flags.DEFINE_integer('size', 2, 'Height and width of the feature map (P7 at 256 px: 2).')
_SEED = flags.DEFINE_integer('seed', 0, 'Weight and gradient seed.')
BATCH, CHANNELS = 8, 64


def input_gradient(layer):
  # Eager, op by op: the pattern of allocations in which the fault was reproduced.
  def gradient(x, upstream):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x)
    return tape.gradient(y, x, output_gradients=tf.cast(upstream, y.dtype))
  return gradient


def count_nans(filters, calls, size):
  """{layer: calls whose input gradient was not finite}, and the first call's max difference."""
  shape = [BATCH, size, size, CHANNELS]
  layers = {'Conv2D': tf_keras.layers.Conv2D(filters, 3, padding='same'),
            'PaddedOutputConv2D': common.PaddedOutputConv2D(filters, 3, padding='same')}
  for layer in layers.values():
    layer.build(shape)
  layers['PaddedOutputConv2D'].set_weights(layers['Conv2D'].get_weights())
  gradients = {name: input_gradient(layer) for name, layer in layers.items()}
  x, upstream = tf.random.normal(shape), tf.random.normal(shape[:3] + [filters])
  first = {name: g(x, upstream).numpy() for name, g in gradients.items()}
  counts = {}
  for name, gradient in gradients.items():
    bad = 0
    for _ in range(calls):
      junk = tf.fill(shape, tf.constant(float('nan'), tf.bfloat16)) + tf.constant(0, tf.bfloat16)
      del junk
      upstream = tf.cast(tf.random.normal(shape[:3] + [filters]), tf.bfloat16)
      g = gradient(x, upstream)
      bad += int(not np.isfinite(g.numpy()).all())
    counts[name] = bad
  return counts, float(np.nanmax(np.abs(first['Conv2D'] - first['PaddedOutputConv2D'])))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf_keras.utils.set_random_seed(_SEED.value)
  tf_keras.mixed_precision.set_global_policy('mixed_bfloat16')
  cpu = {'model': precision.cpu_name(),
         'bfloat16_hardware': precision.bfloat16_hardware(precision.cpu_flags())}
  print(f'CPU: {cpu["model"]}; bfloat16 hardware: {cpu["bfloat16_hardware"] or "none (emulated)"}')
  print(f'{"filters":>8s} {"Conv2D":>12s} {"PaddedOutputConv2D":>20s} {"first diff":>11s} '
        f'{"s":>5s}')
  rows = []
  for filters in (int(f) for f in _FILTERS.value):
    start = time.perf_counter()
    counts, diff = count_nans(filters, _CALLS.value, _SIZE.value)
    rows.append(dict(filters=filters, calls=_CALLS.value, size=_SIZE.value, nan_calls=counts,
                     first_call_max_difference=diff))
    print(f'{filters:8d} {counts["Conv2D"]:5d}/{_CALLS.value:<6d} '
          f'{counts["PaddedOutputConv2D"]:11d}/{_CALLS.value:<8d} {diff:11.2e} '
          f'{time.perf_counter() - start:5.0f}', flush=True)
  print(json.dumps({'cpu': cpu, 'rows': rows}), flush=True)


if __name__ == '__main__':
  app.run(main)
