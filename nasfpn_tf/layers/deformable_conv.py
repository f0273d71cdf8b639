"""Modulated deformable convolution (DCNv2, Zhu, Hu, Lin, Dai, CVPR 2019) on NHWC features.

TensorFlow and Keras have no deformable convolution (tensorflow-addons' was never merged); NAS-FCOS
uses it in almost every pyramid cell. This one is written with ops that TFLite runs as built-ins
(FLOOR, CAST, comparisons, GATHER, MUL, SUM, FULLY_CONNECTED; no Flex), on tensors of rank 4 at
most apart from the gather's output, with every shape static except the batch when the input's
height, width and channels are known.

Semantics are torchvision's `deform_conv2d` and mmcv's `modulated_deform_conv2d`, channels last.
For output position (ho, wo), kernel tap k = i * kw + j and deformable (offset) group g:

  y = ho * stride_h - pad_top  + i * dilation_h + offsets[b, ho, wo, 2 * (g * K + k)]
  x = wo * stride_w - pad_left + j * dilation_w + offsets[b, ho, wo, 2 * (g * K + k) + 1]
  column[b, ho, wo, k, c] = masks[b, ho, wo, g * K + k] * bilinear(inputs[b, :, :, c], y, x)
  output[b, ho, wo, f] = sum_{k, c} column[b, ho, wo, k, c] * kernel[i, j, c, f] + bias[f]

with K = kh * kw, channel c in group g = c // (C / deformable_groups), offsets as (dy, dx) pairs,
and `bilinear` zero outside the image: each of the four neighbouring pixels that lies outside
contributes 0 (so a point at y <= -1, y >= H, x <= -1 or x >= W samples 0). Padding is
TensorFlow's: 'same' gives ceil(H / stride) rows and puts the odd padding row at the bottom
(PyTorch pads `padding` rows on both sides: the same for stride 1 and odd kernels, as NAS-FCOS
uses; for stride 2 on even sizes PyTorch's grid starts one row higher). At zero offsets and unit
masks the result is `tf.nn.conv2d` with the same padding, strides and dilation.
"""
import tensorflow as tf
import tf_keras

from nasfpn_tf.layers import common


def _pair(value, name):
  """(a, b) from an int or a pair of positive ints; ValueError naming `name` otherwise."""
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
    raise ValueError(f'{name} must be a positive int or a pair of them, got {value!r}.')
  return pair


def _padding(padding):
  padding = padding.lower() if isinstance(padding, str) else padding
  if padding not in ('same', 'valid'):
    raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}.")
  return padding


def _dim(x, axis):
  """The static size of `x` along `axis` when known, else a scalar int32 tensor."""
  size = x.shape[axis]
  return size if size is not None else tf.shape(x)[axis]


def _output_size_and_pad(size, kernel, stride, dilation, padding):
  """(output size, padding before) along one axis, as tf.nn.conv2d computes them."""
  span = (kernel - 1) * dilation + 1
  if padding == 'valid':
    return (size - span) // stride + 1, 0
  out = (size + stride - 1) // stride
  total = (out - 1) * stride + span - size
  total = max(total, 0) if isinstance(total, int) else tf.maximum(total, 0)
  return out, total // 2


def deform_output_shape(input_shape, filters, kernel_size, strides=1, padding='same',
                        dilation_rate=1):
  """[B, Ho, Wo, filters] of a deformable (or plain) conv on NHWC `input_shape` (None kept)."""
  (kh, kw), (sh, sw) = _pair(kernel_size, 'kernel_size'), _pair(strides, 'strides')
  dh, dw = _pair(dilation_rate, 'dilation_rate')
  padding = _padding(padding)
  input_shape = tf.TensorShape(input_shape).as_list()
  spatial = []
  for size, k, s, d in ((input_shape[1], kh, sh, dh), (input_shape[2], kw, sw, dw)):
    spatial.append(None if size is None else _output_size_and_pad(size, k, s, d, padding)[0])
  return tf.TensorShape([input_shape[0], *spatial, filters])


def _check_last_dims(tensor, name, expected):
  """ValueError naming `name` unless `tensor` is [B, Ho, Wo, C] with known dims as expected."""
  shape = tensor.shape
  if shape.rank != 4 or any(
      want is not None and got is not None and want != got
      for got, want in zip(shape.as_list(), expected)):
    raise ValueError(f'{name} must have shape {expected} (None: any), got {shape}.')


def deform_conv2d(inputs, offsets, masks, kernel, bias=None, strides=1, padding='same',
                  dilation_rate=1, deformable_groups=1):
  """Modulated deformable 2-D convolution with explicit offsets and masks (module docstring).

  Args:
    inputs: [B, H, W, C] features; their dtype is the compute dtype (float16, bfloat16, float32,
      float64). C must be known.
    offsets: [B, Ho, Wo, 2 * deformable_groups * kh * kw], (dy, dx) per group and tap, in input
      pixels, added to the regular grid. Any float dtype: sampling positions are computed in
      float32 (float64 for float64 inputs), so half-precision offsets lose nothing more.
    masks: [B, Ho, Wo, deformable_groups * kh * kw] modulation scalars (DCNv2's sigmoid output;
      any values are accepted), or None for unmodulated deformable convolution (DCNv1).
    kernel: [kh, kw, C, filters], Keras's Conv2D layout.
    bias: optional [filters].
    strides, dilation_rate: ints or (h, w) pairs.
    padding: 'same' or 'valid', as tf.nn.conv2d.
    deformable_groups: input channels split into this many contiguous groups, each with its own
      offsets and masks.

  Returns:
    [B, Ho, Wo, filters] in the inputs' dtype.

  Raises:
    ValueError: naming the argument whose shape or value does not fit.
  """
  inputs = tf.convert_to_tensor(inputs)
  dtype = inputs.dtype
  if not dtype.is_floating:
    raise ValueError(f'inputs must be floating point, got {dtype.name}.')
  if inputs.shape.rank != 4 or inputs.shape[-1] is None:
    raise ValueError(f'inputs must be [B, H, W, C] with C known, got {inputs.shape}.')
  kernel = tf.convert_to_tensor(kernel)
  if kernel.shape.rank != 4 or None in kernel.shape.as_list():
    raise ValueError(f'kernel must be [kh, kw, C, filters] with known dims, got {kernel.shape}.')
  kh, kw, kernel_channels, filters = kernel.shape.as_list()
  channels = inputs.shape[-1]
  if kernel_channels != channels:
    raise ValueError(f'kernel has {kernel_channels} input channels, inputs have {channels}.')
  if not isinstance(deformable_groups, int) or deformable_groups < 1 or (
      channels % deformable_groups):
    raise ValueError(f'deformable_groups must be a positive int dividing the {channels} input '
                     f'channels, got {deformable_groups!r}.')
  (sh, sw), (dh, dw) = _pair(strides, 'strides'), _pair(dilation_rate, 'dilation_rate')
  padding = _padding(padding)
  groups, taps = deformable_groups, kh * kw
  group_channels = channels // groups

  batch, height, width = _dim(inputs, 0), _dim(inputs, 1), _dim(inputs, 2)
  out_h, pad_top = _output_size_and_pad(height, kh, sh, dh, padding)
  out_w, pad_left = _output_size_and_pad(width, kw, sw, dw, padding)
  static = lambda v: v if isinstance(v, int) else None
  offsets = tf.convert_to_tensor(offsets)
  _check_last_dims(offsets, 'offsets',
                   [inputs.shape[0], static(out_h), static(out_w), 2 * groups * taps])
  if masks is not None:
    masks = tf.convert_to_tensor(masks)
    _check_last_dims(masks, 'masks',
                     [inputs.shape[0], static(out_h), static(out_w), groups * taps])
  if bias is not None:
    bias = tf.convert_to_tensor(bias)
    if bias.shape.as_list() != [filters]:
      raise ValueError(f'bias must be [{filters}], got {bias.shape}.')

  pos_dtype = tf.float64 if dtype == tf.float64 else tf.float32
  positions = out_h * out_w
  # Offsets and masks to [B, P, K * G] in the columns' (tap, group) order.
  offsets = tf.cast(offsets, pos_dtype)
  if groups > 1:
    offsets = tf.transpose(tf.reshape(offsets, [-1, groups, taps, 2]), [0, 2, 1, 3])
  offsets = tf.reshape(offsets, [-1, positions, taps * groups, 2])
  if masks is not None:
    masks = tf.cast(masks, pos_dtype)
    if groups > 1:
      masks = tf.transpose(tf.reshape(masks, [-1, groups, taps]), [0, 2, 1])
    masks = tf.reshape(masks, [-1, positions, taps * groups, 1])

  # The regular grid: [1, P, 1] output positions plus [1, 1, K * G] kernel taps.
  grid_y = tf.range(out_h) * sh - pad_top
  grid_x = tf.range(out_w) * sw - pad_left
  grid_y = tf.reshape(tf.tile(grid_y[:, None], [1, out_w]), [1, positions, 1])
  grid_x = tf.reshape(tf.tile(grid_x[None, :], [out_h, 1]), [1, positions, 1])
  tap_y = [i * dh for i in range(kh) for _ in range(kw) for _ in range(groups)]
  tap_x = [j * dw for _ in range(kh) for j in range(kw) for _ in range(groups)]
  tap_y = tf.constant(tap_y, pos_dtype, shape=[1, 1, taps * groups])
  tap_x = tf.constant(tap_x, pos_dtype, shape=[1, 1, taps * groups])
  # Points far outside sample 0 whatever their exact place: clamping them keeps the int32 cast
  # defined (and changes no value or gradient inside the image).
  height_f, width_f = tf.cast(height, pos_dtype), tf.cast(width, pos_dtype)
  y = tf.clip_by_value(tf.cast(grid_y, pos_dtype) + tap_y + offsets[..., 0], -2.0, height_f + 1.0)
  x = tf.clip_by_value(tf.cast(grid_x, pos_dtype) + tap_x + offsets[..., 1], -2.0, width_f + 1.0)
  y0, x0 = tf.floor(y), tf.floor(x)
  fy, fx = y - y0, x - x0
  y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)

  def corner(yi, xi, weight):
    """The flat row of the corner (clamped into the image) and its weight (0 outside)."""
    inside = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
    row = tf.clip_by_value(yi, 0, height - 1) * width + tf.clip_by_value(xi, 0, width - 1)
    return row, weight * tf.cast(inside, pos_dtype)

  corners = [corner(y0, x0, (1 - fy) * (1 - fx)), corner(y0, x0 + 1, (1 - fy) * fx),
             corner(y0 + 1, x0, fy * (1 - fx)), corner(y0 + 1, x0 + 1, fy * fx)]
  rows = tf.stack([row for row, _ in corners], axis=-1)  # [B, P, K * G, 4]
  weights = tf.stack([weight for _, weight in corners], axis=-1)
  weights = weights if masks is None else weights * masks
  # Rows of the image of each (batch, group): flat = [B * G * H * W, C / G].
  image_base = tf.reshape(tf.range(batch * groups) * (height * width), [-1, 1, groups, 1])
  rows = tf.reshape(rows, [-1, positions * taps, groups, 4]) + image_base
  if groups > 1:
    flat = tf.transpose(tf.reshape(inputs, [-1, height * width, groups, group_channels]),
                        [0, 2, 1, 3])
  else:
    flat = inputs
  flat = tf.reshape(flat, [-1, group_channels])
  sampled = tf.gather(flat, tf.reshape(rows, [-1, 4]))  # [B * P * K * G, 4, C / G]
  weights = tf.cast(tf.reshape(weights, [-1, 4, 1]), dtype)
  columns = tf.reduce_sum(sampled * weights, axis=1)  # [B * P * K * G, C / G]
  # (tap, group, channel in group) is Keras's kernel order (tap, channel).
  columns = tf.reshape(columns, [-1, taps * channels])
  outputs = tf.matmul(columns, tf.reshape(tf.cast(kernel, dtype), [taps * channels, filters]))
  if bias is not None:
    outputs = outputs + tf.cast(bias, dtype)
  return tf.reshape(outputs, [-1, out_h, out_w, filters])


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class DeformableConv2D(tf_keras.layers.Layer):
  """DCNv2 that predicts its own offsets and masks, as mmcv's `ModulatedDeformConv2dPack`.

  A plain conv `conv_offset` (the same kernel size, strides, dilation and padding as the
  deformable conv, with bias) maps the input to 3 * G * kh * kw channels: the first 2 * G * kh * kw
  are the offsets ((dy, dx) pairs, `deform_conv2d`'s layout), the rest pass through a sigmoid to
  give the masks. `conv_offset` starts at zero (weights and bias), so an untrained layer samples
  the regular grid with every mask at sigmoid(0) = 0.5: it computes 0.5 * conv(inputs) + bias,
  as mmcv's layer does (DCNv2's paper also initialises the masks at 0.5).

  Like Keras's Conv2D, strides > 1 and dilation_rate > 1 cannot be combined (deform_conv2d
  can). Under a mixed-precision policy the convolutions run in the compute dtype; sampling positions
  are computed in float32.
  """

  def __init__(self, filters, kernel_size=3, strides=1, padding='same', dilation_rate=1,
               deformable_groups=1, use_bias=True, kernel_initializer=None,
               bias_initializer='zeros', kernel_regularizer=None, bias_regularizer=None,
               **kwargs):
    super().__init__(**kwargs)
    if not isinstance(filters, int) or filters < 1:
      raise ValueError(f'filters must be a positive int, got {filters!r}.')
    if not isinstance(deformable_groups, int) or deformable_groups < 1:
      raise ValueError(f'deformable_groups must be a positive int, got {deformable_groups!r}.')
    self.filters = filters
    self.kernel_size = _pair(kernel_size, 'kernel_size')
    self.strides = _pair(strides, 'strides')
    self.padding = _padding(padding)
    self.dilation_rate = _pair(dilation_rate, 'dilation_rate')
    if max(self.strides) > 1 and max(self.dilation_rate) > 1:
      # As Keras's Conv2D, which predicts the offsets (deform_conv2d itself takes both).
      raise ValueError(f'strides > 1 together with dilation_rate > 1 is not supported, got '
                       f'strides={self.strides}, dilation_rate={self.dilation_rate}.')
    self.deformable_groups = deformable_groups
    self.use_bias = use_bias
    self.kernel_initializer = tf_keras.initializers.get(
        kernel_initializer or common.conv_kwargs()['kernel_initializer'])
    self.bias_initializer = tf_keras.initializers.get(bias_initializer)
    self.kernel_regularizer = tf_keras.regularizers.get(kernel_regularizer)
    self.bias_regularizer = tf_keras.regularizers.get(bias_regularizer)
    taps = self.kernel_size[0] * self.kernel_size[1]
    self.conv_offset = tf_keras.layers.Conv2D(
        3 * deformable_groups * taps, self.kernel_size, strides=self.strides,
        padding=self.padding, dilation_rate=self.dilation_rate, use_bias=True,
        kernel_initializer='zeros', bias_initializer='zeros', name='conv_offset')

  def build(self, input_shape):
    input_shape = tf.TensorShape(input_shape)
    channels = input_shape[-1]
    if input_shape.rank != 4 or channels is None:
      raise ValueError(f'{self.name}: inputs must be [B, H, W, C] with C known, got '
                       f'{input_shape}.')
    if channels % self.deformable_groups:
      raise ValueError(f'{self.name}: deformable_groups={self.deformable_groups} does not '
                       f'divide the {channels} input channels.')
    self.kernel = self.add_weight(
        'kernel', shape=[*self.kernel_size, channels, self.filters],
        initializer=self.kernel_initializer, regularizer=self.kernel_regularizer)
    self.bias = (self.add_weight('bias', shape=[self.filters], initializer=self.bias_initializer,
                                 regularizer=self.bias_regularizer)
                 if self.use_bias else None)
    with tf.name_scope(self.conv_offset.name):
      self.conv_offset.build(input_shape)
    super().build(input_shape)

  def offsets_and_masks(self, inputs):
    """(offsets [B, Ho, Wo, 2GK], masks [B, Ho, Wo, GK]) predicted from `inputs`."""
    predicted = self.conv_offset(inputs)
    split = 2 * self.deformable_groups * self.kernel_size[0] * self.kernel_size[1]
    return predicted[..., :split], tf.sigmoid(predicted[..., split:])

  def call(self, inputs):
    offsets, masks = self.offsets_and_masks(inputs)
    return deform_conv2d(inputs, offsets, masks, self.kernel, self.bias, strides=self.strides,
                         padding=self.padding, dilation_rate=self.dilation_rate,
                         deformable_groups=self.deformable_groups)

  def compute_output_shape(self, input_shape):
    return deform_output_shape(input_shape, self.filters, self.kernel_size, self.strides,
                               self.padding, self.dilation_rate)

  def get_config(self):
    return {**super().get_config(), 'filters': self.filters,
            'kernel_size': self.kernel_size, 'strides': self.strides, 'padding': self.padding,
            'dilation_rate': self.dilation_rate, 'deformable_groups': self.deformable_groups,
            'use_bias': self.use_bias,
            'kernel_initializer': tf_keras.initializers.serialize(self.kernel_initializer),
            'bias_initializer': tf_keras.initializers.serialize(self.bias_initializer),
            **common.serialize_regularizers(self.kernel_regularizer, self.bias_regularizer)}
