"""Walking the graphs of functional Keras models (TFM's and ours) and pairing their weights.

Shared by the TF Model Garden conversions (`tfm_nasfpn`, `tfm`): layers are found through the
nodes of the functional graph (which layer made a tensor, which layers read it), and every pair
(our variable, TFM value) is checked by shape before anything is assigned.
"""
import tensorflow as tf
import tf_keras

CONVS = (tf_keras.layers.Conv2D, tf_keras.layers.SeparableConv2D)
BN = tf_keras.layers.BatchNormalization


def producer(tensor):
  """The layer whose call made the symbolic `tensor`."""
  return tensor._keras_history.layer  # pylint: disable=protected-access


def input_of(layer) -> list:
  """The symbolic inputs of a layer's first call (the call that built the functional model)."""
  return layer.inbound_nodes[0].keras_inputs


def output_of(layer):
  return tf.nest.flatten(layer.inbound_nodes[0].outputs)[0]


def consumer_nodes(tensor) -> list:
  """The nodes (layer calls) reading `tensor`, in call order."""
  return [node for node in producer(tensor).outbound_nodes
          if any(x is tensor for x in node.keras_inputs)]


def consumers(tensor) -> list:
  """Layers called on `tensor`, in call order."""
  return [node.layer for node in consumer_nodes(tensor)]


def walk_back(tensor, stops):
  """The stop tensors `tensor` is computed from, in order of first use, and the ops on the way
  (op symbols, else layer class names). Raises ValueError at a layer with weights."""
  sources, ops, seen = [], set(), set()

  def visit(x):
    if id(x) in seen:
      return
    seen.add(id(x))
    if id(x) in stops:
      sources.append(x)
      return
    layer = producer(x)
    if layer.weights:
      raise ValueError(f'TFM layer {layer.name} with weights lies inside a cell; the pyramid '
                       'has no such layer.')
    ops.add(getattr(layer, 'symbol', type(layer).__name__))
    node = layer.inbound_nodes[x._keras_history.node_index]  # pylint: disable=protected-access
    for parent in node.keras_inputs:
      visit(parent)

  visit(tensor)
  return sources, ops


def checked(pairs, name, src_name):
  """`pairs` (our variable, TFM value), after checking that every shape agrees."""
  for dst, src in pairs:
    if dst.shape != src.shape:
      raise ValueError(f'{name}: {dst.name} has shape {dst.shape}, but TFM {src_name} '
                       f'gives {src.shape}.')
  return pairs


def conv_pairs(src, dst, name):
  """(our variable, TFM value) for kernels and bias; a TFM 1x1 separable projection is folded
  into our 1x1 conv."""
  if isinstance(src, tf_keras.layers.SeparableConv2D):
    if isinstance(dst, tf_keras.layers.SeparableConv2D):
      pairs = [(dst.depthwise_kernel, src.depthwise_kernel),
               (dst.pointwise_kernel, src.pointwise_kernel)]
    elif src.kernel_size == (1, 1) and src.depth_multiplier == 1:
      # depthwise (1, 1, C, 1) scales each input channel before pointwise (1, 1, C, F).
      pairs = [(dst.kernel, src.depthwise_kernel * src.pointwise_kernel)]
    else:
      raise ValueError(f'{name}: TFM {src.name} is separable, {dst.name} is not.')
  elif isinstance(dst, tf_keras.layers.SeparableConv2D):
    raise ValueError(f'{name}: {dst.name} is separable, TFM {src.name} is not.')
  else:
    pairs = [(dst.kernel, src.kernel)]
  return checked(pairs + [(dst.bias, src.bias)], name, src.name)


def bn_pairs(src, dst, name):
  """(our variable, TFM variable) for a batch norm's parameters and moving statistics."""
  return checked([(dst.gamma, src.gamma), (dst.beta, src.beta),
                  (dst.moving_mean, src.moving_mean),
                  (dst.moving_variance, src.moving_variance)], name, src.name)


def weight_pairs(ours, theirs, name):
  """(our variable, TFM variable) of two weight lists laid out alike, checked by shape and kind."""
  if len(ours) != len(theirs):
    raise ValueError(f'{name}: {len(ours)} weights here, {len(theirs)} in the TFM model.')
  kind = lambda variable: variable.name.split('/')[-1]  # e.g. 'kernel:0', 'moving_mean:0'
  for dst, src in zip(ours, theirs):
    if dst.shape != src.shape or kind(dst) != kind(src):
      raise ValueError(f'{name}: {dst.name} {dst.shape} has no counterpart in TFM '
                       f'{src.name} {src.shape}.')
  return list(zip(ours, theirs))
