"""The NASFPN pyramid builder: shapes, specs, serialization, dangling rule, validation."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from nasfpn_tf.decoders import NASFPN, SPECS
from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.layers import MERGING_CELLS
import training_helpers
from training_helpers import global_policy, merging_cells


def input_specs(batch=None, c3=(32, 48), channels=(8, 16, 24)):
  h, w = c3
  return {str(level): [batch, h // 2**i, w // 2**i, ch]
          for i, (level, ch) in enumerate(zip((3, 4, 5), channels))}


def random_inputs(specs, batch=1, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal([batch, *v[1:]]).astype(np.float32) for k, v in specs.items()}


@pytest.mark.parametrize('spec,min_level,max_level,separable', [
    ('nasfpn', 3, 7, False),
    ('fpn', 3, 7, False),
    ('fpn', 3, 6, False),
    ('nasfpn_lite', 3, 6, True),
])
def test_output_shapes_per_spec(spec, min_level, max_level, separable):
  specs = input_specs(c3=(32, 48))  # non-square
  model = NASFPN(specs, min_level=min_level, max_level=max_level, block_specs=spec,
                 num_filters=16, num_repeats=1, use_separable_conv=separable)
  outputs = model(random_inputs(specs, batch=2))
  assert sorted(outputs) == [str(level) for level in range(min_level, max_level + 1)]
  for level in range(min_level, max_level + 1):
    stride = 2**(level - 3)
    assert outputs[str(level)].shape == (2, 32 // stride, 48 // stride, 16)
    assert tuple(model.output_specs[str(level)]) == (None, 32 // stride, 48 // stride, 16)
  num_cells = len(specs_lib.resolve(spec, min_level, max_level))
  cells = merging_cells(model)
  assert len(cells) == num_cells
  conv_type = tf_keras.layers.SeparableConv2D if separable else tf_keras.layers.Conv2D
  assert all(type(cell.conv) is conv_type for cell in cells)


def test_fpn_spec_is_top_down():
  spec = specs_lib.fpn(3, 7)
  # One output cell per level; levels 6..3 read the cell of the level above.
  assert sorted(s.level for s in spec) == [3, 4, 5, 6, 7]
  assert all(s.is_output and s.op == 'sum' for s in spec)
  assert spec[0] == specs_lib.BlockSpec(6, 'sum', (3, 4), True)
  assert spec[1] == specs_lib.BlockSpec(5, 'sum', (2, 5), True)
  assert spec[-1] == specs_lib.BlockSpec(7, 'sum', (4, 5), True)


def test_batch_dimension_is_independent():
  specs = input_specs(c3=(32, 32))
  model = NASFPN(specs, num_filters=16, num_repeats=1)
  inputs = random_inputs(specs, batch=3)
  batched = model(inputs, training=False)
  single = model({k: v[1:2] for k, v in inputs.items()}, training=False)
  for level in single:
    np.testing.assert_allclose(batched[level][1:2].numpy(), single[level].numpy(),
                               rtol=1e-4, atol=1e-4)


def test_config_round_trip_same_structure_and_outputs():
  specs = input_specs()
  model = NASFPN(specs, num_filters=16, num_repeats=2, dropblock_keep_prob=0.9,
                 kernel_regularizer=tf_keras.regularizers.L2(1e-4))
  clone = NASFPN.from_config(model.get_config())
  assert clone.get_config() == model.get_config()
  assert clone.count_params() == model.count_params()
  assert [layer.name for layer in clone.layers] == [layer.name for layer in model.layers]
  assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]
  inputs = random_inputs(specs)
  before = clone(inputs, training=False)
  assert not np.allclose(before['3'].numpy(), model(inputs, training=False)['3'].numpy())
  clone.set_weights(model.get_weights())
  a, b = model(inputs, training=False), clone(inputs, training=False)
  for level in a:
    np.testing.assert_allclose(a[level].numpy(), b[level].numpy(), rtol=1e-6, atol=1e-6)


def test_save_keras_and_reload(tmp_path):
  specs = input_specs()
  model = NASFPN(specs, block_specs='nasfpn_lite', max_level=6, use_separable_conv=True,
                 num_filters=16, num_repeats=1, dropblock_keep_prob=0.9)
  inputs = random_inputs(specs)
  expected = model(inputs, training=False)
  path = str(tmp_path / 'pyramid.keras')
  model.save(path)
  loaded = tf_keras.models.load_model(path)
  assert isinstance(loaded, NASFPN)
  assert loaded.count_params() == model.count_params()
  got = loaded(inputs, training=False)
  assert sorted(got) == sorted(expected)
  for level in expected:
    np.testing.assert_allclose(got[level].numpy(), expected[level].numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('repeats', [1, 2])
def test_no_weight_sharing_across_repeats(repeats):
  specs = input_specs()
  model = NASFPN(specs, num_filters=16, num_repeats=repeats)
  cells = merging_cells(model)
  assert len(cells) == repeats * len(SPECS['nasfpn'])
  kernels = [w for w in model.trainable_weights if w.name.endswith('conv/kernel:0')
             and '_cell' in w.name]
  assert len(kernels) == repeats * len(SPECS['nasfpn'])
  assert len({id(k) for k in kernels}) == len(kernels)
  assert len({id(cell.conv.kernel) for cell in cells}) == len(cells)


def test_dangling_rule_on_the_7_cell_spec():
  model = NASFPN(input_specs(), num_filters=16, num_repeats=2)
  cells = merging_cells(model)
  for repeat in range(2):
    rows = cells[repeat * 7:(repeat + 1) * 7]
    levels = [cell.input_levels for cell in rows]
    # cells 0-3 and 6 read exactly their two spec inputs
    assert levels[0] == [4, 6] and levels[1] == [4, 4] and levels[2] == [3, 4]
    assert levels[3] == [4, 3] and levels[6] == [5, 7]
    # P5 output: cell2 (P3), cell3 (P4) + dangling input P5; P7 output: cell1, cell4 + input P7
    assert levels[4] == [3, 4, 5]
    assert levels[5] == [4, 5, 7]
    assert [cell.output_level for cell in rows] == [4, 4, 3, 4, 5, 7, 6]


def test_dangling_inputs_are_the_pyramid_inputs():
  """The extra input of the P5 / P7 output cells is the pyramid input P5 / P7 itself."""
  model = NASFPN(input_specs(), num_filters=16, num_repeats=1)
  def sources(name):
    layers = model.get_layer(name).inbound_nodes[0].inbound_layers
    return [layer.name for layer in layers]
  assert sources('repeat0_cell4_global_pooling_p5') == [
      'repeat0_cell2_sum_p3', 'repeat0_cell3_sum_p4', 'p5_lateral']
  assert sources('repeat0_cell5_global_pooling_p7') == [
      'repeat0_cell1_sum_p4', 'repeat0_cell4_global_pooling_p5', 'p7_from_p6']
  assert sources('repeat0_cell6_global_pooling_p6') == [
      'repeat0_cell4_global_pooling_p5', 'repeat0_cell5_global_pooling_p7']


def test_every_op_of_the_specs_has_a_merging_cell():
  """`block_specs.OPS` names the ops; the layers' registry must build exactly those."""
  assert sorted(MERGING_CELLS) == sorted(specs_lib.OPS)


@pytest.mark.parametrize('rows,match', [
    ([(4, 'sum', (1, 5), False)], r'cell 0 .*input 5 does not exist yet'),
    ([(4, 'sum', (1, 3), False), (8, 'sum', (0, 5), True)], r'cell 1 .*level 8 is outside'),
    ([(2, 'sum', (1, 3), True)], r'cell 0 .*level 2 is outside'),
    ([(4, 'avg', (1, 3), True)], r"cell 0 .*unknown op 'avg'"),
    ([(4, 'sum', (1, 2, 3), True)], r'cell 0 .*exactly two inputs'),
    ([(4, 'sum', (1,), True)], r'cell 0 .*exactly two inputs'),
    ([(4, 'sum', (1, 3))], r'cell 0: a block spec is'),
    (list(specs_lib.fpn(3, 7)) + [(4, 'sum', (0, 5), True)],
     r'Level 4 is produced twice, by output cells \[2, 5\]'),
    (list(specs_lib.fpn(3, 6)), r'No output cell produces level 7'),
    ([], r'at least one cell'),
])
def test_bad_specs_raise_value_error_naming_the_cell(rows, match):
  with pytest.raises(ValueError, match=match):
    NASFPN(input_specs(), block_specs=rows, num_filters=8, num_repeats=1)


def test_bad_spec_name_and_levels_and_repeats():
  with pytest.raises(ValueError, match="Unknown block spec 'nope'"):
    NASFPN(input_specs(), block_specs='nope', num_filters=8, num_repeats=1)
  with pytest.raises(ValueError, match='min_level 6 is above max_level 5'):
    NASFPN(input_specs(), min_level=6, max_level=5, num_filters=8, num_repeats=1)
  with pytest.raises(ValueError, match='num_repeats'):
    NASFPN(input_specs(), num_filters=8, num_repeats=0)


def test_non_divisible_input_size_raises():
  specs = input_specs(c3=(20, 24))
  with pytest.raises(ValueError, match=r"'3' has height 20.*2\^max_level = 128"):
    NASFPN(specs, num_filters=8, num_repeats=1)
  # The same size is fine when the pyramid stops at level 5 (20 divides by 2^(5-3)).
  NASFPN(specs, max_level=5, block_specs='fpn', num_filters=8, num_repeats=1)


def test_missing_min_level_input_raises():
  specs = input_specs()
  del specs['3']
  with pytest.raises(ValueError, match='lack level 3'):
    NASFPN(specs, num_filters=8, num_repeats=1)


def test_rows_as_dicts_and_tuples_build_the_same_pyramid():
  rows = [dict(level=s.level, op=s.op, inputs=list(s.inputs), is_output=s.is_output)
          for s in SPECS['nasfpn']]
  a = NASFPN(input_specs(), block_specs=rows, num_filters=8, num_repeats=1)
  b = NASFPN(input_specs(), block_specs='nasfpn', num_filters=8, num_repeats=1)
  assert a.block_specs == b.block_specs == SPECS['nasfpn']
  assert a.count_params() == b.count_params()


def test_r50_shaped_param_count_matches_model_garden():
  from official.vision.modeling.decoders import nasfpn as mg_nasfpn
  specs = {'3': [None, 16, 16, 512], '4': [None, 8, 8, 1024], '5': [None, 4, 4, 2048]}
  ours = NASFPN(specs, num_filters=256, num_repeats=7)
  theirs = mg_nasfpn.NASFPN({k: tf.TensorShape(v) for k, v in specs.items()},
                            num_filters=256, num_repeats=7)
  # Hand count: 3 laterals (1x1 conv + bias + BN) and 7 x 7 cells (3x3 conv + bias + BN).
  laterals = sum(c * 256 + 256 + 4 * 256 for c in (512, 1024, 2048))
  cells = 7 * 7 * (3 * 3 * 256 * 256 + 256 + 4 * 256)
  assert ours.count_params() == laterals + cells == theirs.count_params() == 29_885_440


@training_helpers.HALF_PRECISION_HELD_BACK
def test_mixed_float16_outputs():
  specs = input_specs()
  with global_policy('mixed_float16'):
    model = NASFPN(specs, num_filters=16, num_repeats=1, dropblock_keep_prob=0.9)
    outputs = model(random_inputs(specs), training=True)
  assert all(out.dtype == tf.float16 for out in outputs.values())
  assert all(np.isfinite(out.numpy()).all() for out in outputs.values())


def test_inconsistent_input_sizes_name_the_level():
  with pytest.raises(ValueError, match="Input feature '4' has height 16, but level 3 has 16"):
    NASFPN({'3': [None, 16, 16, 8], '4': [None, 16, 8, 8], '5': [None, 4, 4, 8]}, max_level=5,
           num_filters=8, block_specs='fpn', num_repeats=1)
