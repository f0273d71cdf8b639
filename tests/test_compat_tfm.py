"""TFM NASFPN decoders converted by `pyramid_from_tfm` compute what TFM computes."""
import pytest
import tensorflow as tf
import tf_keras
from official.vision.modeling.decoders import nasfpn as tfm_nasfpn

from nasfpn_tf.compat.tfm_nasfpn import block_specs_from_tfm, load_tfm_weights, pyramid_from_tfm
from nasfpn_tf.decoders import NASFPN, block_specs
from training_helpers import merging_cells

# C3 16x32 (a 128x256 image): non-square, and divisible down to P7 (1x2).
SMALL_BACKBONE = {'3': [None, 16, 32, 32], '4': [None, 8, 16, 64], '5': [None, 4, 8, 128]}
# Features read by the cells of one repeat of the paper's spec: 2 per cell, and the dangling P5
# and P7 (added to the output cells at their level).
NASFPN_CELL_INPUTS = 7 * 2 + 2


def tfm_specs(specs):
  """TFM's spec rows for ours ('global_pooling' is TFM's 'attention')."""
  ops = {'global_pooling': 'attention', 'sum': 'sum'}
  return tfm_nasfpn.build_block_specs(
      [(s.level, ops[s.op], s.inputs, s.is_output) for s in specs])


def random_tfm(input_specs=None, **kwargs):
  """A TFM NASFPN with random biases and BN parameters and statistics, so BN is no identity.

  The moving statistics are set near each BN's batch statistics, keeping features O(1) through
  the repeats (float32 round-off then stays far below the tolerance).
  """
  input_specs = {k: tf.TensorShape(v) for k, v in (input_specs or SMALL_BACKBONE).items()}
  decoder = tfm_nasfpn.NASFPN(input_specs, **kwargs)
  bns = [layer for layer in decoder.layers
         if isinstance(layer, tf_keras.layers.BatchNormalization)]
  for layer in decoder.layers:
    if getattr(layer, 'bias', None) is not None:
      layer.bias.assign(tf.random.normal(layer.bias.shape, stddev=0.1))
  momenta = [bn.momentum for bn in bns]
  for bn in bns:
    bn.momentum = 0.0  # One training step then sets the moving statistics to the batch's.
  decoder(features(input_specs), training=True)
  for bn, momentum in zip(bns, momenta):
    bn.momentum = momentum
    std = tf.sqrt(bn.moving_variance)
    bn.moving_mean.assign_add(tf.random.normal(std.shape, stddev=0.2) * std)
    bn.moving_variance.assign(bn.moving_variance * tf.random.uniform(std.shape, 0.8, 2.0))
    bn.gamma.assign(tf.random.uniform(bn.gamma.shape, 0.5, 1.0))
    bn.beta.assign(tf.random.normal(bn.beta.shape, stddev=0.2))
  return decoder


def features(input_specs, batch=3):
  return {level: tf.random.normal([batch, *shape[1:]]) for level, shape in input_specs.items()}


def assert_same_outputs(tfm_decoder, pyramid, input_specs, atol=1e-4):
  inputs = features(input_specs)
  expected = tfm_decoder(inputs, training=False)
  got = pyramid(inputs, training=False)
  assert sorted(got) == sorted(expected)
  for level in expected:
    assert got[level].shape == expected[level].shape
    diff = float(tf.reduce_max(tf.abs(got[level] - expected[level])))
    assert diff <= atol, f'level {level}: max abs diff {diff}'


@pytest.mark.parametrize('num_repeats', range(1, 8))
def test_default_nasfpn_matches_tfm(num_repeats):
  decoder = random_tfm(num_repeats=num_repeats)
  pyramid = pyramid_from_tfm(decoder)
  assert isinstance(pyramid, NASFPN)
  assert pyramid.block_specs == block_specs.NASFPN
  assert pyramid.get_config()['merge_filters'] is None
  assert not any(resampler.conv for cell in merging_cells(pyramid) for resampler in cell.resamplers)
  assert pyramid.count_params() == decoder.count_params()
  assert_same_outputs(decoder, pyramid, SMALL_BACKBONE)


# TFM merges cell inputs at 256 channels: with other num_filters each cell input has a 1x1 conv
# + BN, our resamplers' (merge_filters=256).
@pytest.mark.parametrize('num_repeats,num_filters',
                         [(1, 32), (3, 32), (7, 32), (1, 64), (3, 64), (7, 64), (1, 128)])
def test_other_num_filters_match_tfm(num_repeats, num_filters):
  decoder = random_tfm(num_repeats=num_repeats, num_filters=num_filters)
  pyramid = pyramid_from_tfm(decoder)
  assert pyramid.get_config()['merge_filters'] == 256
  resamplers = [resampler for cell in merging_cells(pyramid) for resampler in cell.resamplers]
  assert len(resamplers) == NASFPN_CELL_INPUTS * num_repeats
  assert all(resampler.conv.kernel.shape == (1, 1, num_filters, 256)
             for resampler in resamplers)
  assert pyramid.count_params() == decoder.count_params()
  assert_same_outputs(decoder, pyramid, SMALL_BACKBONE)


@pytest.mark.parametrize('num_filters,num_repeats', [(256, 2), (64, 1)])
def test_backbone_levels_at_num_filters_and_above_min_level(num_filters, num_repeats):
  """C4 already has num_filters channels (no lateral projection: with 64, TFM's cells project
  the backbone feature itself); C6 comes from the backbone; C2 is unused."""
  input_specs = {'2': [None, 64, 32, 16], '3': [None, 32, 16, 32],
                 '4': [None, 16, 8, num_filters], '5': [None, 8, 4, 128], '6': [None, 4, 2, 8]}
  decoder = random_tfm(input_specs, num_repeats=num_repeats, num_filters=num_filters)
  pyramid = pyramid_from_tfm(decoder)
  assert pyramid.get_layer('p4_lateral').conv is None
  assert pyramid.get_layer('p6_lateral').conv is not None
  assert pyramid.count_params() == decoder.count_params()
  assert_same_outputs(decoder, pyramid, input_specs)


def test_separable_lite_spec_other_levels_and_settings():
  """NAS-FPN-Lite on P3-P6, separable, swish, another epsilon and momentum."""
  decoder = random_tfm(min_level=3, max_level=6, block_specs=tfm_specs(block_specs.NASFPN_LITE),
                       num_repeats=2, use_separable_conv=True, activation='swish',
                       norm_epsilon=1e-4, norm_momentum=0.9)
  pyramid = pyramid_from_tfm(decoder)
  config = pyramid.get_config()
  assert (config['use_separable_conv'], config['activation'], config['norm_epsilon'],
          config['norm_momentum']) == (True, 'swish', 1e-4, 0.9)
  assert pyramid.block_specs == block_specs.NASFPN_LITE
  # TFM projects the inputs with 1x1 separable convs, folded here into plain 1x1 convs: the
  # per-channel depthwise scales are the only parameters ours lacks.
  depthwise = sum(shape[-1] for shape in SMALL_BACKBONE.values())
  assert decoder.count_params() - pyramid.count_params() == depthwise
  assert_same_outputs(decoder, pyramid, SMALL_BACKBONE)


def test_separable_other_num_filters_matches_tfm():
  """Separable at 48 filters: TFM's 1x1 separable projections of the cell inputs to 256 are
  folded into our resamplers' plain 1x1 convs too."""
  num_repeats, num_filters = 1, 48
  decoder = random_tfm(num_repeats=num_repeats, num_filters=num_filters,
                       use_separable_conv=True)
  pyramid = pyramid_from_tfm(decoder)
  assert pyramid.get_config()['merge_filters'] == 256
  # One depthwise scale per input channel of every 1x1 projection: the laterals' (C3-C5), and
  # the cell inputs' (num_filters each).
  lateral = sum(shape[-1] for shape in SMALL_BACKBONE.values())
  cell_inputs = NASFPN_CELL_INPUTS * num_repeats * num_filters
  assert decoder.count_params() - pyramid.count_params() == lateral + cell_inputs
  assert_same_outputs(decoder, pyramid, SMALL_BACKBONE)


def test_block_specs_from_tfm_renames_attention():
  assert block_specs_from_tfm(tfm_nasfpn.build_block_specs()) == block_specs.NASFPN


def test_spec_whose_outputs_are_not_the_last_cells_is_refused():
  specs = list(block_specs.fpn(3, 7)) + [block_specs.BlockSpec(6, 'sum', (3, 4), False)]
  decoder = tfm_nasfpn.NASFPN({k: tf.TensorShape(v) for k, v in SMALL_BACKBONE.items()},
                              block_specs=tfm_specs(specs), num_repeats=1)
  with pytest.raises(ValueError, match='TFM outputs the last 5 cells'):
    pyramid_from_tfm(decoder)


def test_mismatched_copies_raise():
  decoder = random_tfm(num_repeats=1)
  wider_c3 = dict(SMALL_BACKBONE, **{'3': [None, 16, 32, 48]})
  with pytest.raises(ValueError, match=r'p3_lateral: .*kernel.* has shape \(1, 1, 48, 256\)'):
    load_tfm_weights(NASFPN(wider_c3, num_repeats=1), decoder)
  with pytest.raises(ValueError, match='repeat0_cell0_sum_p6: 0 TFM cells'):
    load_tfm_weights(NASFPN(SMALL_BACKBONE, block_specs='fpn', num_repeats=1), decoder)
  with pytest.raises(ValueError, match='TFM layers without a counterpart'):
    load_tfm_weights(NASFPN(SMALL_BACKBONE, num_repeats=1), random_tfm(num_repeats=2))
  with pytest.raises(ValueError, match=r'repeat0_cell0_global_pooling_p4/resample\d_from_l\d: '
                     r'projection .* merge_filters=256'):
    load_tfm_weights(NASFPN(SMALL_BACKBONE, num_filters=64, num_repeats=1),  # Merges at 64.
                     tfm_nasfpn.NASFPN({k: tf.TensorShape(v) for k, v in SMALL_BACKBONE.items()},
                                       num_filters=64, num_repeats=1))
