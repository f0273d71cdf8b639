"""deform_conv2d and DeformableConv2D (DCNv2) against a loop-by-loop NumPy reference, plain
convolution at zero offsets, numerical gradients, config / SavedModel round trips, TFLite with
built-in ops only, and argument errors."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import training_helpers
from nasfpn_tf.export import tflite_runtime
from nasfpn_tf.layers.deformable_conv import DeformableConv2D, deform_conv2d


# ---------------------------------------------------------------- numpy reference

def np_bilinear(image, y, x):
  """torchvision's / mmcv's bilinear sample of image [H, W, C] at (y, x); zero outside."""
  height, width = image.shape[:2]
  if y <= -1 or y >= height or x <= -1 or x >= width:
    return np.zeros(image.shape[2])
  y0, x0 = int(np.floor(y)), int(np.floor(x))
  value = np.zeros(image.shape[2])
  for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
    for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
      if 0 <= yi < height and 0 <= xi < width:
        value += wy * wx * image[yi, xi]
  return value


def np_same_pad(size, kernel, stride, dilation):
  """(output size, padding before) of TF 'SAME'."""
  out = -(-size // stride)
  return out, max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0) // 2


def np_deform_conv2d(x, offsets, masks, kernel, bias, stride, dilation, groups, padding='same'):
  """DCNv2 by direct loops, in float64 (offsets [..., 2GK] as (dy, dx) pairs, group-major)."""
  x, offsets, masks, kernel = (np.asarray(a, np.float64) for a in (x, offsets, masks, kernel))
  batch, height, width, channels = x.shape
  kh, kw, _, filters = kernel.shape
  if padding == 'same':
    out_h, top = np_same_pad(height, kh, stride, dilation)
    out_w, left = np_same_pad(width, kw, stride, dilation)
  else:
    out_h, top = (height - (kh - 1) * dilation - 1) // stride + 1, 0
    out_w, left = (width - (kw - 1) * dilation - 1) // stride + 1, 0
  group_channels = channels // groups
  out = np.zeros((batch, out_h, out_w, filters))
  for b in range(batch):
    for ho in range(out_h):
      for wo in range(out_w):
        column = np.zeros((kh, kw, channels))
        for g in range(groups):
          image = x[b, :, :, g * group_channels:(g + 1) * group_channels]
          for i in range(kh):
            for j in range(kw):
              k = g * kh * kw + i * kw + j
              y = ho * stride - top + i * dilation + offsets[b, ho, wo, 2 * k]
              xx = wo * stride - left + j * dilation + offsets[b, ho, wo, 2 * k + 1]
              column[i, j, g * group_channels:(g + 1) * group_channels] = (
                  masks[b, ho, wo, k] * np_bilinear(image, y, xx))
        out[b, ho, wo] = np.einsum('ijc,ijcf->f', column, kernel)
  return out + (0 if bias is None else bias)


def random_case(seed, batch=2, hw=(7, 6), channels=4, filters=3, kernel=3, stride=1, dilation=1,
                groups=1, padding='same', far=True):
  """Inputs, offsets (fractional, some far outside the image), masks in [0, 1], kernel, bias."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, *hw, channels)).astype(np.float32)
  if padding == 'same':
    out_h, out_w = (-(-s // stride) for s in hw)
  else:
    out_h, out_w = ((s - (kernel - 1) * dilation - 1) // stride + 1 for s in hw)
  taps = groups * kernel * kernel
  offsets = rng.uniform(-2.5, 2.5, (batch, out_h, out_w, 2 * taps))
  if far:
    far_out = rng.random(offsets.shape) < 0.1
    offsets[far_out] = rng.choice([-1, 1], far_out.sum()) * rng.uniform(8, 1e4, far_out.sum())
  masks = rng.uniform(0, 1, (batch, out_h, out_w, taps))
  w = rng.standard_normal((kernel, kernel, channels, filters)).astype(np.float32)
  bias = rng.standard_normal(filters).astype(np.float32)
  return x, offsets.astype(np.float32), masks.astype(np.float32), w, bias


# ---------------------------------------------------------------- functional core

@pytest.mark.parametrize('stride,dilation,groups,hw,padding', [
    (1, 1, 1, (7, 6), 'same'),
    (2, 1, 1, (7, 6), 'same'),   # odd / even sizes: the 'same' padding row at the bottom or none
    (1, 2, 1, (7, 6), 'same'),
    (2, 1, 2, (8, 9), 'same'),
    (1, 1, 2, (6, 6), 'same'),
    (1, 2, 2, (9, 8), 'valid'),
])
def test_deform_conv2d_matches_numpy_reference(stride, dilation, groups, hw, padding):
  x, offsets, masks, kernel, bias = random_case(1, hw=hw, stride=stride, dilation=dilation,
                                                groups=groups, padding=padding)
  out = deform_conv2d(x, offsets, masks, kernel, bias, strides=stride, padding=padding,
                      dilation_rate=dilation, deformable_groups=groups).numpy()
  expected = np_deform_conv2d(x, offsets, masks, kernel, bias, stride, dilation, groups, padding)
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_numpy_reference_samples_zero_far_outside_and_bilinear_inside():
  """The reference itself, by hand: a constant image, a point between four pixels, the border."""
  image = np.arange(12, dtype=np.float64).reshape(3, 4, 1)
  assert np_bilinear(image, 0.5, 1.25)[0] == pytest.approx(0.5 * (1.25 + 5.25))
  assert np_bilinear(image, -0.5, 1.0)[0] == pytest.approx(0.5 * image[0, 1, 0])
  assert np_bilinear(image, 2.0, 3.0)[0] == 11.0
  assert np_bilinear(image, -1.0, 0.0)[0] == 0.0 and np_bilinear(image, 0.0, 4.0)[0] == 0.0


def test_offsets_move_the_sampled_point_by_hand():
  """A 1x1 kernel of weight 1: the output is the input sampled at (ho + dy, wo + dx) * mask."""
  x = np.arange(20, dtype=np.float32).reshape(1, 4, 5, 1)
  offsets = np.zeros((1, 4, 5, 2), np.float32)
  offsets[0, 1, 1] = [0.5, 1.5]   # (1.5, 2.5): mean of x[1:3, 2:4] = (7 + 8 + 12 + 13) / 4
  offsets[0, 0, 1] = [-0.5, 0.0]  # (-0.5, 1): half of x[0, 1] (the row above is zero)
  offsets[0, 3, 4] = [0.0, 1.0]   # (3, 5): outside, 0
  masks = np.ones((1, 4, 5, 1), np.float32)
  masks[0, 1, 1] = 0.5
  out = deform_conv2d(x, offsets, masks, np.ones((1, 1, 1, 1), np.float32)).numpy()[0, :, :, 0]
  expected = x[0, :, :, 0].copy()
  expected[1, 1], expected[0, 1], expected[3, 4] = 0.5 * 10.0, 0.5, 0.0
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize('stride,dilation,groups,kernel,hw', [
    (1, 1, 1, 3, (8, 7)), (2, 1, 2, 3, (8, 7)), (2, 1, 1, 3, (9, 10)), (1, 2, 2, 3, (9, 9)),
    (1, 1, 1, 5, (6, 6)), (2, 3, 1, 3, (11, 12)),
])
def test_zero_offsets_unit_masks_equal_plain_conv(stride, dilation, groups, kernel, hw):
  x, offsets, masks, w, bias = random_case(2, hw=hw, channels=4, filters=5, kernel=kernel,
                                           stride=stride, dilation=dilation, groups=groups)
  out = deform_conv2d(x, np.zeros_like(offsets), np.ones_like(masks), w, bias, strides=stride,
                      dilation_rate=dilation, deformable_groups=groups).numpy()
  expected = (tf.nn.conv2d(x, w, strides=stride, padding='SAME', dilations=dilation) + bias)
  np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_no_masks_is_unit_masks():
  """masks=None: unmodulated deformable convolution (DCNv1)."""
  x, offsets, masks, w, bias = random_case(13, stride=2, groups=2)
  out = deform_conv2d(x, offsets, None, w, bias, strides=2, deformable_groups=2).numpy()
  expected = np_deform_conv2d(x, offsets, np.ones_like(masks), w, bias, 2, 1, 2)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_integer_offsets_shift_like_a_plain_conv_on_a_shifted_image():
  """An offset of (+1, -2) everywhere moves every window by (1, -2): a plain conv over the
  zero-padded image, read one row down and two columns left."""
  x, offsets, masks, w, _ = random_case(3, hw=(8, 8))
  offsets = np.tile(np.array([1.0, -2.0], np.float32), offsets.shape[-1] // 2)
  offsets = np.broadcast_to(offsets, masks.shape[:3] + (offsets.size,))
  out = deform_conv2d(x, offsets, np.ones_like(masks), w).numpy()
  padded = np.pad(x, [(0, 0), (4, 4), (4, 4), (0, 0)])
  full = tf.nn.conv2d(padded, w, strides=1, padding='VALID').numpy()
  # Output (ho, wo)'s window starts at (ho - 1 + 1, wo - 1 - 2) = full[ho + 4, wo + 1].
  expected = full[:, 4:12, 1:9]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize('groups,stride', [(1, 1), (2, 2)])
def test_gradients_match_numerical(groups, stride):
  """Inputs, offsets, masks and kernel, float64; offsets keep their fractional parts in
  [0.2, 0.8] and include points past the border, where bilinear sampling is smooth."""
  rng = np.random.default_rng(4)
  x, _, masks, kernel, bias = random_case(4, batch=1, hw=(4, 5), channels=2, filters=2,
                                          stride=stride, groups=groups, far=False)
  whole = rng.integers(-2, 2, (1, *masks.shape[1:3], 2 * masks.shape[-1]))
  offsets = whole + rng.uniform(0.2, 0.8, whole.shape)
  offsets[0, 0, 0, :4] = [0.4, 0.3, 3.4, 5.5]  # at stride 1 half outside, then wholly outside
  args = dict(strides=stride, deformable_groups=groups)
  values = [np.asarray(a, np.float64) for a in (x, offsets, masks, kernel)]

  def conv(index):
    @tf.function
    def f(value):
      inputs = list(values)
      inputs[index] = value
      return deform_conv2d(*inputs, tf.constant(bias, tf.float64), **args)
    return f

  for index, name in enumerate(['inputs', 'offsets', 'masks', 'kernel']):
    theoretical, numerical = tf.test.compute_gradient(conv(index), [values[index]], delta=1e-4)
    assert np.abs(theoretical[0]).max() > 0, name
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-7,
                               err_msg=name)


# ---------------------------------------------------------------- the layer

def _randomize(layer, seed):
  """Random weights, including `conv_offset`'s: kernels of unit gain (activations keep the
  scale of unit normal inputs), offsets of one or two pixels, masks spread around 0.5."""
  rng = np.random.default_rng(seed)
  weights = []
  for w in layer.weights:
    fan_in = np.prod(w.shape[:-1]) if len(w.shape) > 1 else 1
    scale = (1.5 if 'conv_offset' in w.name else 1.0) / np.sqrt(fan_in)
    weights.append((scale * rng.standard_normal(w.shape)).astype(np.float32))
  layer.set_weights(weights)


def test_layer_at_init_is_half_a_plain_conv_plus_bias():
  """conv_offset starts at zero: no offsets, masks sigmoid(0) = 0.5 (mmcv's Pack layer)."""
  x = random_case(5, hw=(9, 8))[0]
  layer = DeformableConv2D(6, 3, strides=2, deformable_groups=2, bias_initializer='ones',
                           name='dcn')
  out = layer(x).numpy()
  assert [w.name.split('/')[-2:] for w in layer.weights] == [
      ['dcn', 'kernel:0'], ['dcn', 'bias:0'],
      ['conv_offset', 'kernel:0'], ['conv_offset', 'bias:0']]
  assert layer.conv_offset.kernel.shape == (3, 3, 4, 3 * 2 * 9)
  assert not layer.conv_offset.kernel.numpy().any() and not layer.conv_offset.bias.numpy().any()
  expected = 0.5 * tf.nn.conv2d(x, layer.kernel, strides=2, padding='SAME').numpy() + 1.0
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_layer_splits_its_offset_conv_like_mmcv():
  """The first 2GK channels of conv_offset are the offsets, the last GK the mask logits."""
  x = random_case(6, hw=(6, 7))[0]
  layer = DeformableConv2D(3, 3, deformable_groups=2)
  layer.build(x.shape)
  _randomize(layer, 6)
  predicted = layer.conv_offset(x).numpy()
  masks = 1.0 / (1.0 + np.exp(-predicted[..., 36:]))
  expected = np_deform_conv2d(x, predicted[..., :36], masks, layer.kernel.numpy(),
                              layer.bias.numpy(), 1, 1, 2)
  np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-4, atol=1e-4)
  assert tuple(layer.compute_output_shape(x.shape)) == expected.shape


def test_layer_config_round_trip():
  layer = DeformableConv2D(5, (3, 5), strides=(2, 1), deformable_groups=2,
                           use_bias=False, kernel_regularizer=tf_keras.regularizers.L2(1e-4),
                           name='dcn')
  x = random_case(7, hw=(9, 10))[0]
  layer.build(x.shape)
  _randomize(layer, 7)
  config = layer.get_config()
  clone = DeformableConv2D.from_config(config)
  assert clone.get_config() == config
  clone.build(x.shape)
  clone.set_weights(layer.get_weights())
  np.testing.assert_array_equal(clone(x).numpy(), layer(x).numpy())
  assert len(clone.losses) == 1 and clone.bias is None
  deserialized = tf_keras.layers.deserialize(tf_keras.layers.serialize(layer))
  assert isinstance(deserialized, DeformableConv2D)


def _small_model(seed, batch_size=None):
  inputs = tf_keras.Input((10, 9, 8), batch_size=batch_size)
  x = DeformableConv2D(8, 3, deformable_groups=2, name='dcn1')(inputs)
  x = tf_keras.layers.ReLU()(x)
  x = DeformableConv2D(8, 3, dilation_rate=2, name='dcn2')(x)
  x = DeformableConv2D(4, 3, strides=2, name='dcn3')(x)
  model = tf_keras.Model(inputs, x)
  for layer in model.layers:
    if isinstance(layer, DeformableConv2D):
      _randomize(layer, seed)
  return model


def test_saved_model_round_trip(tmp_path):
  model = _small_model(8)
  x = random_case(8, batch=2, hw=(10, 9), channels=8)[0]
  expected = model(x).numpy()
  assert np.abs(expected).max() > 0
  model.save(str(tmp_path / 'saved'), save_format='tf')
  reloaded = tf_keras.models.load_model(str(tmp_path / 'saved'))
  assert isinstance(reloaded.get_layer('dcn1'), DeformableConv2D)
  np.testing.assert_allclose(reloaded(x).numpy(), expected, rtol=1e-6, atol=1e-6)
  served = tf.saved_model.load(str(tmp_path / 'saved'))
  out = served.signatures['serving_default'](tf.constant(x))
  np.testing.assert_allclose(list(out.values())[0].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_tflite_builtin_ops_only_matches_keras():
  model = _small_model(9, batch_size=1)
  converter = tf.lite.TFLiteConverter.from_keras_model(model)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  content = converter.convert()
  op_names = {op['op_name'] for op in tflite_runtime.op_details(content)}
  assert 'GATHER' in op_names
  assert not any(name.startswith('Flex') or name == 'CUSTOM' for name in op_names), op_names
  interpreter = tflite_runtime.interpreter(model_content=content)
  (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
  x = random_case(9, batch=1, hw=(10, 9), channels=8)[0]
  interpreter.set_tensor(inp['index'], x)
  interpreter.invoke()
  np.testing.assert_allclose(interpreter.get_tensor(out['index']), model(x).numpy(),
                             rtol=1e-5, atol=1e-5)


@training_helpers.HALF_PRECISION_HELD_BACK
def test_mixed_precision_computes_in_bfloat16_near_float32():
  x = random_case(10, hw=(8, 8))[0]
  layer = DeformableConv2D(6, 3, deformable_groups=2)
  layer.build(x.shape)
  _randomize(layer, 10)
  expected = layer(x).numpy()
  mixed = DeformableConv2D(6, 3, deformable_groups=2, dtype='mixed_bfloat16')
  mixed.build(x.shape)
  mixed.set_weights(layer.get_weights())
  out = mixed(x)
  assert out.dtype == tf.bfloat16 and mixed.kernel.dtype == tf.float32
  scale = np.abs(expected).max()
  np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected, rtol=0,
                             atol=0.03 * scale)


def test_dynamic_spatial_shape_gives_the_static_result():
  x, offsets, masks, kernel, bias = random_case(11, hw=(7, 8), stride=2, groups=2)
  expected = deform_conv2d(x, offsets, masks, kernel, bias, strides=2,
                           deformable_groups=2).numpy()
  spec = lambda a: tf.TensorSpec([None, None, None, a.shape[-1]], tf.float32)
  f = tf.function(lambda *a: deform_conv2d(*a, strides=2, deformable_groups=2),
                  input_signature=[spec(x), spec(offsets), spec(masks)] + [
                      tf.TensorSpec(kernel.shape), tf.TensorSpec(bias.shape)])
  np.testing.assert_allclose(f(x, offsets, masks, kernel, bias).numpy(), expected,
                             rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- errors

def test_bad_arguments_name_themselves():
  x, offsets, masks, kernel, _ = random_case(12, hw=(6, 6), channels=4)
  with pytest.raises(ValueError, match='deformable_groups'):
    deform_conv2d(x, offsets, masks, kernel, deformable_groups=3)
  with pytest.raises(ValueError, match='offsets'):
    deform_conv2d(x, offsets[..., :-2], masks, kernel)
  with pytest.raises(ValueError, match='offsets'):
    deform_conv2d(x, offsets, masks, kernel, strides=2)  # offsets at stride 1's 6x6
  with pytest.raises(ValueError, match='masks'):
    deform_conv2d(x, offsets, masks[..., :-1], kernel)
  with pytest.raises(ValueError, match='kernel'):
    deform_conv2d(x, offsets, masks, kernel[:, :, :3])
  with pytest.raises(ValueError, match='bias'):
    deform_conv2d(x, offsets, masks, kernel, bias=np.zeros(2, np.float32))
  with pytest.raises(ValueError, match='padding'):
    deform_conv2d(x, offsets, masks, kernel, padding='causal')
  with pytest.raises(ValueError, match='strides'):
    deform_conv2d(x, offsets, masks, kernel, strides=0)
  with pytest.raises(ValueError, match='deformable_groups'):
    DeformableConv2D(4, deformable_groups=3)(x)
  with pytest.raises(ValueError, match='filters'):
    DeformableConv2D(0)
  with pytest.raises(ValueError, match='dilation_rate'):
    DeformableConv2D(4, dilation_rate=(1, 2, 3))
  with pytest.raises(ValueError, match='strides.*dilation_rate'):
    DeformableConv2D(4, strides=2, dilation_rate=2)
