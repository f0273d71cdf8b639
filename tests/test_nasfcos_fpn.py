"""The NAS-FCOS pyramid: its spec table, wiring, cells against numpy, builder, and search space."""
import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from nasfpn_tf.decoders import nasfcos_specs as specs_lib
from nasfpn_tf.decoders.nasfcos_fpn import NASFCOSFPN
from nasfpn_tf.layers.nasfcos_cell import NASFCOSCell
from nasfpn_tf.search.nasfcos_space import NASFCOSFPNSpace
from training_helpers import HALF_PRECISION_HELD_BACK

FILTERS = 8
SIZE = 128  # C2 is SIZE/4 square; P7 is 1x1


def features(seed=0, batch=1):
  rng = np.random.default_rng(seed)
  return {str(level): tf.constant(rng.normal(size=[batch, SIZE // 2**level, SIZE // 2**level,
                                                   4 * level]), tf.float32)
          for level in specs_lib.POOL_LEVELS}


def input_specs():
  return {level: [None, *x.shape[1:]] for level, x in features().items()}


def np_upsample_bilinear(x, scale=2):
  """Bilinear upsampling by `scale` with half-pixel centres (PyTorch align_corners=False)."""
  def axis(x, ax):
    n = x.shape[ax]
    src = (np.arange(scale * n) + 0.5) / scale - 0.5
    src = np.clip(src, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (src - lo).reshape([-1 if a == ax else 1 for a in range(x.ndim)])
    return np.take(x, lo, axis=ax) * (1 - w) + np.take(x, hi, axis=ax) * w
  return axis(axis(x, 1), 2)


# ---------------------------------------------------------------- spec table and wiring

def test_published_wiring_follows_released_code():
  """Cells 4..10 by hand: 6, 8, 9, 10 are unread; the last (10) gives P3, 9 P4, 8 P5, 6 is added
  to each; a cell's level is its finer input's; C2 (0) is never read."""
  wiring = specs_lib.wiring(specs_lib.NASFCOS_FPN)
  assert wiring.outputs == {3: 10, 4: 9, 5: 8}
  assert wiring.extras == (6,)
  assert wiring.read_pool_inputs == (1, 2, 3)
  assert [cell.level for cell in wiring.cells] == [5, 5, 5, 3, 5, 3, 3]
  assert sum(op == 'deform_conv_3x3' for cell in wiring.cells for op in cell.ops) == 12
  assert {cell.agg for cell in wiring.cells} == {'concat'}
  assert specs_lib.resolve(specs_lib.to_config(specs_lib.NASFCOS_FPN)) == specs_lib.NASFCOS_FPN


@pytest.mark.parametrize('row, match', [
    (((1, 3), ('sep_conv_3x3', 'conv_7x7'), 'concat'), r"cell 3 .*unknown op 'conv_7x7'"),
    (((1, 8), ('skip', 'skip'), 'concat'), r'cell 3 .*input 8 does not exist yet.*0\.\.6'),
    (((-1, 2), ('skip', 'skip'), 'concat'), r'cell 3 .*input -1 does not exist'),
    (((1, 3), ('skip', 'skip'), 'max'), r"cell 3 .*unknown aggregation 'max'"),
])
def test_bad_cell_is_named(row, match):
  specs = list(specs_lib.to_config(specs_lib.NASFCOS_FPN))
  specs[3] = row
  with pytest.raises(ValueError, match=match):
    specs_lib.validate(specs_lib.resolve(specs))
  with pytest.raises(ValueError, match=match):
    NASFCOSFPN(input_specs(), block_specs=specs)


def test_too_few_unconsumed_cells_names_them():
  chain = [((3, 3), ('skip', 'skip'), 'weighted_sum')] + [
      ((4 + k, 1), ('skip', 'skip'), 'weighted_sum') for k in range(4)]
  with pytest.raises(ValueError, match=r'Only 1 cells \(cell 4\) are read by no later cell'):
    specs_lib.validate(specs_lib.resolve(chain))
  with pytest.raises(ValueError, match="Unknown NAS-FCOS pyramid spec 'nasfpn'"):
    specs_lib.resolve('nasfpn')


# ---------------------------------------------------------------- the cell against numpy

def test_weighted_sum_cell_upsamples_coarser_input():
  rng = np.random.default_rng(1)
  fine = rng.normal(size=[2, 8, 6, FILTERS]).astype(np.float32)
  coarse = rng.normal(size=[2, 4, 3, FILTERS]).astype(np.float32)
  cell = NASFCOSCell([5, 4], ['skip', 'skip'], 'weighted_sum', FILTERS)
  out = cell([tf.constant(coarse), tf.constant(fine)])
  a = rng.normal(size=FILTERS).astype(np.float32)
  b = rng.normal(size=FILTERS).astype(np.float32)
  cell.set_weights([a, b])
  out = cell([tf.constant(coarse), tf.constant(fine)]).numpy()
  np.testing.assert_allclose(out, a * np_upsample_bilinear(coarse) + b * fine, atol=1e-5)
  assert cell.compute_output_shape([coarse.shape, fine.shape]) == out.shape


def test_concat_cell_is_bn_relu_grouped_1x1():
  """Output channel g = k[g, 0] * z[2g] + k[g, 1] * z[2g + 1] of z = relu(BN(concat[x, y]))."""
  rng = np.random.default_rng(2)
  x, y = (rng.normal(size=[1, 4, 4, FILTERS]).astype(np.float32) for _ in range(2))
  cell = NASFCOSCell([4, 4], ['skip', 'skip'], 'concat', FILTERS, norm_epsilon=1e-3)
  cell([tf.constant(x), tf.constant(y)])
  gamma, beta = rng.uniform(0.5, 2, 2 * FILTERS), rng.normal(size=2 * FILTERS)
  mean, var = rng.normal(size=2 * FILTERS), rng.uniform(0.5, 2, 2 * FILTERS)
  kernel = rng.normal(size=[FILTERS, 2])
  weights = {'gamma': gamma, 'beta': beta, 'moving_mean': mean, 'moving_variance': var,
             'agg_kernel': kernel}
  cell.set_weights([weights[w.name.split('/')[-1].split(':')[0]] for w in cell.weights])
  out = cell([tf.constant(x), tf.constant(y)], training=False).numpy()
  z = np.concatenate([x, y], -1)
  z = np.maximum((z - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0)
  np.testing.assert_allclose(out, (z.reshape(1, 4, 4, FILTERS, 2) * kernel).sum(-1), atol=1e-4)


def test_cell_rejects_wrong_channels():
  cell = NASFCOSCell([3, 3], ['skip', 'sep_conv_3x3'], 'concat', FILTERS, name='c')
  with pytest.raises(ValueError, match='c: input 1 has 4 channels'):
    cell([tf.zeros([1, 4, 4, FILTERS]), tf.zeros([1, 4, 4, 4])])


# ---------------------------------------------------------------- the builder

@pytest.fixture(scope='module')
def published():
  return NASFCOSFPN(input_specs(), block_specs='nasfcos_fpn', num_filters=FILTERS)


def test_published_output_shapes_and_round_trip(published, tmp_path):
  feats = {k: v for k, v in features().items() if k in published.input}
  out = published(feats, training=False)
  assert {k: v.shape.as_list() for k, v in out.items()} == {
      str(level): [1, SIZE // 2**level, SIZE // 2**level, FILTERS] for level in range(3, 8)}
  assert published.output_specs['6'].as_list() == [None, SIZE // 64, SIZE // 64, FILTERS]
  # C2 is read by no cell: not an input, so backbones that stop at C3 (build_backbone) fit.
  assert sorted(published.input) == ['3', '4', '5']
  clone = tf_keras.utils.deserialize_keras_object(tf_keras.utils.serialize_keras_object(published))
  assert isinstance(clone, NASFCOSFPN) and clone.get_config() == published.get_config()
  clone.set_weights(published.get_weights())
  for level, x in clone(feats, training=False).items():
    np.testing.assert_allclose(x.numpy(), out[level].numpy(), atol=1e-5)
  published.save(tmp_path / 'pyramid.keras')
  loaded = tf_keras.models.load_model(tmp_path / 'pyramid.keras')
  for level, x in loaded(feats, training=False).items():
    np.testing.assert_array_equal(x.numpy(), out[level].numpy())


def test_released_output_rule_by_hand(published):
  """P4 = bilinear resize of (cell 9 + cell 6 brought to cell 9's size in one 4x step) to
  C4's size."""
  feats = {k: v for k, v in features(3).items() if k in published.input}
  probe = tf_keras.Model(published.input, [published.get_layer(name).output for name in (
      'cell5_concat_p3', 'cell2_concat_p5')] + [published.outputs[1]])
  cell9, cell6, p4 = (t.numpy() for t in probe(feats, training=False))
  summed = cell9 + np_upsample_bilinear(cell6, 4)
  expected = tf.image.resize(summed, p4.shape[1:3], 'bilinear').numpy()
  np.testing.assert_allclose(p4, expected, atol=1e-4)
  # Downsampling by 2 with half-pixel centres averages 2x2 blocks.
  blocks = summed.reshape(1, SIZE // 16, 2, SIZE // 16, 2, FILTERS)
  np.testing.assert_allclose(expected, blocks.mean((2, 4)), atol=1e-5)


def test_levels_are_checked():
  with pytest.raises(ValueError, match='lack \\[3\\]'):
    NASFCOSFPN({k: v for k, v in input_specs().items() if k != '3'})
  reads_c2 = specs_lib.to_config(specs_lib.NASFCOS_FPN)
  reads_c2[0][0] = [0, 3]
  with pytest.raises(ValueError, match='reads backbone levels \\[2, 3, 4, 5\\].* lack \\[2\\]'):
    NASFCOSFPN({k: v for k, v in input_specs().items() if k != '2'}, block_specs=reads_c2)
  with pytest.raises(ValueError, match='max_level in 5..7'):
    NASFCOSFPN(input_specs(), max_level=8)


# ---------------------------------------------------------------- the search space

def test_space_contains_published_and_round_trips():
  space = NASFCOSFPNSpace()
  actions = space.encode('nasfcos_fpn')
  assert actions[:5] == (3, 3, 4, 4, 1)  # the authors' first row, as action indices
  assert space.decode(actions) == specs_lib.NASFCOS_FPN
  assert space.contains(specs_lib.NASFCOS_FPN)
  assert NASFCOSFPNSpace.from_config(space.config()) == space
  assert space.static_masks.shape == (35, 10)
  # inputs 4 + 3 + ... per cell, 5 ops twice, 2 aggs; the last three cells read 0..7.
  assert space.size() == math.prod([n * n * 25 * 2 for n in (4, 5, 6, 7, 8, 8, 8)])


def test_space_key_ignores_branch_order_and_rejects_named_cell():
  space = NASFCOSFPNSpace()
  swapped = specs_lib.to_config(specs_lib.NASFCOS_FPN)
  swapped[2] = [[3, 4], ['skip', 'deform_conv_3x3'], 'concat']
  assert space.key(swapped) == space.key('nasfcos_fpn')
  bad = specs_lib.to_config(specs_lib.NASFCOS_FPN)
  bad[6] = [[9, 2], ['skip', 'skip'], 'concat']  # the last cell reads P4's cell
  with pytest.raises(ValueError, match=r'cell 6: input0 9 is not allowed \(cells 4..6 give'):
    space.encode(bad)
  assert not space.contains(bad)
  bad[6] = [[7, 2], ['skip', 'dil_conv'], 'concat']
  with pytest.raises(ValueError, match="cell 6 .*unknown op 'dil_conv'"):
    space.encode(bad)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_space_samples_build(seed):
  space = NASFCOSFPNSpace()
  specs = space.sample(np.random.default_rng(seed))
  assert space.decode(space.encode(specs)) == specs
  wiring = specs_lib.wiring(specs)
  last = [cell.index for cell in wiring.cells[-3:]]
  assert wiring.outputs == {3: last[2], 4: last[1], 5: last[0]}
  model = NASFCOSFPN(input_specs(), block_specs=specs, num_filters=FILTERS, max_level=6)
  out = model(features(seed), training=False)
  assert sorted(out) == ['3', '4', '5', '6']
  for level, x in out.items():
    assert x.shape.as_list() == [1, SIZE // 2**int(level), SIZE // 2**int(level), FILTERS]
    assert np.isfinite(x.numpy()).all()


def test_drawing(tmp_path):
  # pylint: disable-next=import-outside-toplevel
  from nasfpn_tf.visualization.nasfcos_architecture import draw_nasfcos_spec
  path = tmp_path / 'nasfcos.png'
  draw_nasfcos_spec('nasfcos_fpn', str(path))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  bad = specs_lib.to_config(specs_lib.NASFCOS_FPN)
  bad[5][0] = [4, 12]
  with pytest.raises(ValueError, match='cell 5 .*input 12 does not exist'):
    draw_nasfcos_spec(bad, str(tmp_path / 'bad.png'))
  assert not (tmp_path / 'bad.png').exists()


@HALF_PRECISION_HELD_BACK
def test_mixed_precision_and_every_weight_trains():
  """Under mixed_bfloat16 the outputs are bfloat16 and a loss reaches every trainable weight
  (each op, both aggregations, the adapt convs and P6-P7)."""
  from training_helpers import global_policy  # pylint: disable=import-outside-toplevel
  rows = [[[3, 3], ['sep_conv_5x5_dil6', 'sep_conv_3x3_dil3'], 'weighted_sum'],
          [[1, 4], ['deform_conv_3x3', 'skip'], 'concat'],
          [[2, 3], ['sep_conv_3x3', 'skip'], 'weighted_sum'],
          [[1, 2], ['skip', 'skip'], 'concat']]
  with global_policy('mixed_bfloat16'):
    model = NASFCOSFPN(input_specs(), block_specs=rows, num_filters=FILTERS)
    feats = {k: v for k, v in features(4).items() if k in model.input}
    with tf.GradientTape() as tape:
      out = model(feats, training=True)
      loss = sum(tf.reduce_sum(tf.cast(x, tf.float32)**2) for x in out.values())
  assert {x.dtype for x in out.values()} == {tf.bfloat16}
  grads = tape.gradient(loss, model.trainable_weights)
  assert len(grads) == 41
  assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)
