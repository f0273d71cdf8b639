"""Parameter and FLOP counts measured the way the NAS-FPN paper's Table 1 reports them.

FLOPs come from the TF profiler on the frozen inference graph (training=False, batch 1, a fixed
input shape), so they are what the graph executes, not a formula kept in sync by hand. The
profiler counts 2 FLOPs per multiply-add for Conv2D, DepthwiseConv2dNative and MatMul (the
paper's convention), 1 per output element for element-wise ops such as BiasAdd, AddV2 and Mul, the
kernel area per output for MaxPool; BatchNorm (FusedBatchNormV3), ReLU, Sigmoid and reduce-max
count 0.
"""
import contextlib
import logging
import os
import sys
import tempfile
from typing import Callable, Sequence, Union

import tensorflow as tf
import tf_keras
from tensorflow.python.framework import convert_to_constants
from tensorflow.python.framework import ops as tf_ops  # The FLOP stats registry is not public.

ModelOrFn = Union[tf_keras.Model, Callable[[tf.Tensor], object]]


@contextlib.contextmanager
def _quiet_stderr():
  """Holds back what TF's C++ and Python layers write to stderr; replays it if the body fails.

  Freezing runs a Grappler session that logs from C++ (fd 2, which TF_CPP_MIN_LOG_LEVEL does not
  silence in TF 2.20) and the profiler's FLOP functions log deprecation warnings.
  """
  sys.stderr.flush()
  saved_fd = os.dup(2)
  tf_logger = tf.get_logger()
  saved_level = tf_logger.level
  with tempfile.TemporaryFile(mode='w+b') as captured:
    os.dup2(captured.fileno(), 2)
    tf_logger.setLevel(logging.ERROR)
    try:
      yield
    except BaseException:
      sys.stderr.flush()
      captured.seek(0)
      os.write(saved_fd, captured.read())
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved_fd, 2)
      os.close(saved_fd)
      tf_logger.setLevel(saved_level)


def frozen_inference_graph(model: ModelOrFn, input_shape: Sequence[int],
                           dtype: tf.DType = tf.float32) -> tf.Graph:
  """The graph of `model` on one input of `input_shape` (no batch dim), variables as constants.

  A Keras model is called with training=False; any other callable is called on the input alone
  (pass a lambda to profile a part of a model, e.g. the backbone followed by the pyramid).
  """
  if isinstance(model, tf_keras.Model):
    call = lambda images: model(images, training=False)  # noqa: E731
  else:
    call = model
  signature = [tf.TensorSpec([1, *input_shape], dtype)]
  concrete = tf.function(call, input_signature=signature).get_concrete_function()
  graph_def = convert_to_constants.convert_variables_to_constants_v2(concrete).graph.as_graph_def()
  graph = tf.Graph()
  with graph.as_default():
    tf.graph_util.import_graph_def(graph_def, name='')
  return graph


def count_flops(model_fn_or_keras_model: ModelOrFn, input_shape: Sequence[int],
                dtype: tf.DType = tf.float32) -> int:
  """FLOPs of one forward pass at batch 1, by the TF profiler on the frozen inference graph.

  Args:
    model_fn_or_keras_model: a tf_keras model (run with training=False) or a callable mapping an
      input batch to outputs.
    input_shape: one example's shape without the batch dim, e.g. (640, 640, 3).
    dtype: the input dtype.

  Raises:
    ValueError: if an op that has a FLOP count lacks a static shape, since its FLOPs would be
      silently left out.
  """
  profiler = tf.compat.v1.profiler
  options = profiler.ProfileOptionBuilder(
      profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build()
  with _quiet_stderr():
    graph = frozen_inference_graph(model_fn_or_keras_model, input_shape, dtype)
    profile = profiler.profile(graph=graph, cmd='op', options=options)
    missing = _ops_missing_shapes(graph)
  if missing:
    raise ValueError(f'FLOPs unknown for {len(missing)} ops with incomplete static shapes, '
                     f'e.g. {missing[:5]}')
  return profile.total_float_ops


def _ops_missing_shapes(graph: tf.Graph) -> list:
  """Ops the profiler could not count, found the way the profiler's logger finds them."""
  missing = []
  for op in graph.get_operations():
    try:
      tf_ops.get_stats_for_node_def(graph, op.node_def, 'flops')
    except ValueError:
      missing.append(op.name)
  return missing


def count_params(model: tf_keras.Model) -> int:
  """All floating-point weights, trainable or not, each shared weight once.

  BN moving statistics count, as in Keras' count_params and in TF Model Garden's figure for its
  R-50 NAS-FPN (60,178,967), the one the paper's 60.3M is checked against. Integer state (the
  step counter of each DropBlock) is not a parameter.
  """
  unique = {id(weight): weight for weight in model.weights if weight.dtype.is_floating}
  return sum(weight.shape.num_elements() for weight in unique.values())
