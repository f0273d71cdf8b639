"""The cost of DCNv2 (nasfpn_tf.layers.deformable_conv) against a plain 3x3 convolution.

For each NHWC shape, three float32 ops with C -> C channels, 3x3, stride 1, 'same', are timed
side by side in the same process, taking turns repeat by repeat (so load from other processes
falls on all alike):
  conv      tf_keras Conv2D (the baseline);
  deform    deform_conv2d with fixed random offsets (about a pixel) and masks: the sampling and
            the matmul alone;
  layer     DeformableConv2D, which also predicts its offsets and masks with a 3x3 conv of
            27 channels (random weights, so the offsets are not zero).
Each is a tf.function, timed forward and forward + backward (gradients of the sum of the output
with respect to the input and every weight, and for `deform` the offsets and masks too), after
warm-up; the median of --repeats runs is printed with its ratio to `conv`.

  python experiments/deformable_conv_cost.py
  python experiments/deformable_conv_cost.py --shapes=1x64x64x64 --repeats=21
"""
import os
import statistics
import time

import numpy as np
import tensorflow as tf
import tf_keras
from absl import app, flags

from nasfpn_tf.layers.deformable_conv import DeformableConv2D, deform_conv2d
from nasfpn_tf.training import precision

flags.DEFINE_list('shapes', ['1x64x64x64', '8x32x32x256'], 'NHWC input shapes, BxHxWxC.')
flags.DEFINE_integer('repeats', 11, 'Timed runs of each op and pass (median printed).')
flags.DEFINE_integer('warmup', 2, 'Untimed runs first.')
FLAGS = flags.FLAGS


def _ops(shape, seed=0):
  """{name: (forward, forward_backward)} tf.functions on one fixed input of `shape`."""
  batch, height, width, channels = shape
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.standard_normal(shape), tf.float32)
  conv = tf_keras.layers.Conv2D(channels, 3, padding='same')
  layer = DeformableConv2D(channels, 3)
  conv.build(shape)
  layer.build(shape)
  # Offsets of about a pixel from the offset conv (it starts at zero).
  fan_in = 9 * channels
  layer.conv_offset.kernel.assign(
      rng.standard_normal(layer.conv_offset.kernel.shape) / np.sqrt(fan_in))
  kernel, bias = layer.kernel, layer.bias
  offsets = tf.Variable(rng.uniform(-1.5, 1.5, (batch, height, width, 18)), dtype=tf.float32)
  masks = tf.Variable(rng.uniform(0, 1, (batch, height, width, 9)), dtype=tf.float32)

  def core(inputs):
    return deform_conv2d(inputs, offsets, masks, kernel, bias)

  def pair(fn, variables):
    forward = tf.function(lambda: tf.reduce_sum(fn(x)))

    @tf.function
    def forward_backward():
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(fn(x))
      return tape.gradient(loss, [x, *variables])
    return forward, forward_backward

  return {'conv': pair(conv, conv.trainable_weights),
          'deform': pair(core, [kernel, bias, offsets, masks]),
          'layer': pair(layer, layer.trainable_weights)}


def _time(fn):
  start = time.perf_counter()
  result = fn()
  # Bring the values back: the time includes the whole computation.
  tf.nest.map_structure(lambda t: t.numpy(), result)
  return time.perf_counter() - start


def measure(shape, repeats, warmup):
  """{(op, pass): median seconds} with the ops taking turns."""
  ops = _ops(shape)
  runs = {(name, kind): [] for name in ops for kind in ('forward', 'forward+backward')}
  for index in range(warmup + repeats):
    for name, (forward, forward_backward) in ops.items():
      for kind, fn in (('forward', forward), ('forward+backward', forward_backward)):
        elapsed = _time(fn)
        if index >= warmup:
          runs[(name, kind)].append(elapsed)
  return {key: statistics.median(values) for key, values in runs.items()}


def main(argv):
  del argv
  print(f'# DCNv2 cost vs a plain 3x3 conv: {precision.cpu_name()}, {len(os.sched_getaffinity(0))} '
        f'CPUs, TF {tf.__version__}, float32, median of {FLAGS.repeats} (after '
        f'{FLAGS.warmup} warm-up)\n')
  print('| input (NHWC), C->C 3x3 | pass | conv ms | deform_conv2d ms (x conv) '
        '| DeformableConv2D ms (x conv) |')
  print('|---|---|---|---|---|')
  for text in FLAGS.shapes:
    shape = tuple(int(v) for v in text.lower().split('x'))
    if len(shape) != 4:
      raise app.UsageError(f'--shapes: BxHxWxC expected, got {text!r}.')
    medians = measure(shape, FLAGS.repeats, FLAGS.warmup)
    for kind in ('forward', 'forward+backward'):
      base = medians[('conv', kind)]
      cells = [f'{1e3 * medians[(name, kind)]:.1f} ({medians[(name, kind)] / base:.1f}x)'
               for name in ('deform', 'layer')]
      print(f'| {text} | {kind} | {1e3 * base:.1f} | {cells[0]} | {cells[1]} |', flush=True)


if __name__ == '__main__':
  app.run(main)
