"""AmoebaNet-D: its cells against the published tables (ops and hidden-state wiring, as built),
params of a tiny variant against a hand count, output strides and shapes, use as a backbone."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from nasfpn_tf.models import amoebanet, backbones
from nasfpn_tf.models.retinanet import RetinaNet

# The authors' model_specs.py, 'amoeba_net_d' (Real et al. 2019, AmoebaNet-D): per step, (left op,
# left hidden state, right op, right hidden state); states 0, 1 are the cell's inputs, step k
# makes state 2 + k.
NORMAL_STEPS = [
    ('1x1', 1, 'max_pool_3x3', 1),
    ('none', 1, '1x7_7x1', 0),
    ('1x1', 0, '1x7_7x1', 0),
    ('max_pool_3x3', 2, 'none', 2),
    ('avg_pool_3x3', 1, '1x1', 5),
]
REDUCTION_STEPS = [
    ('max_pool_2x2', 0, 'max_pool_3x3', 0),
    ('none', 2, '3x3', 1),
    ('1x7_7x1', 2, 'max_pool_3x3', 2),
    ('none', 3, 'max_pool_2x2', 1),
    ('avg_pool_3x3', 2, '1x1', 3),
]
# The states no step reads: the cell's output is their concatenation.
NORMAL_OUTPUT_STATES = [0, 3, 4, 6]
REDUCTION_OUTPUT_STATES = [4, 5, 6]

# The layer that shows an op was built, where its name is not the op's.
OP_LAYERS = {'1x1': '1x1/conv', '1x7_7x1': '7x1'}

TINY = dict(num_cells=3, reduction_size=16)  # one normal cell per stack, F = 16.


@pytest.fixture(scope='module')
def tiny():
  tf_keras.utils.set_random_seed(0)
  return amoebanet.build_amoebanet_d([64, 96, 3], **TINY)


def steps(spec):
  return [(spec.operations[2 * k], spec.hiddenstate_indices[2 * k], spec.operations[2 * k + 1],
           spec.hiddenstate_indices[2 * k + 1]) for k in range(5)]


def test_cell_tables_are_the_published_ones():
  assert steps(amoebanet.NORMAL_CELL) == NORMAL_STEPS
  assert steps(amoebanet.REDUCTION_CELL) == REDUCTION_STEPS
  for spec, outputs in ((amoebanet.NORMAL_CELL, NORMAL_OUTPUT_STATES),
                        (amoebanet.REDUCTION_CELL, REDUCTION_OUTPUT_STATES)):
    assert [i for i, used in enumerate(spec.used_hiddenstates) if not used] == outputs
    assert spec.num_outputs == len(outputs)
  assert amoebanet.reduction_cell_indices(12) == (4, 8)  # the authors' 12-cell schedule
  assert amoebanet.reduction_cell_indices(15) == (5, 10)


def _producer(layer):
  """The one layer feeding `layer` (whose first input is what an op reads)."""
  inbound = layer._inbound_nodes[0].inbound_layers  # pylint: disable=protected-access
  return inbound[0] if isinstance(inbound, list) else inbound


def _state_read(model, cell, step, side, add_input):
  """The layer making the hidden state that op `side` of `step` reads: walk back from the
  Add's input through the op's own layers (named cell/comb_iter_step/side/...)."""
  prefix = f'{cell}/comb_iter_{step}/{side}/'
  layer = add_input
  while layer.name.startswith(prefix):
    layer = _producer(layer)
  return layer.name


def _state_names(model, cell):
  """Hidden states 0..6 of a built cell by the name of the layer making each."""
  names = {layer.name for layer in model.layers}
  previous = [name for name in (f'{cell}/prev/final_path_bn', f'{cell}/prev_1x1/bn')
              if name in names]
  return [f'{cell}/beginning/bn', *previous] + [f'{cell}/comb_iter_{k}/combine' for k in range(5)]


@pytest.mark.parametrize('cell,expected_steps,outputs', [
    ('cell_1', NORMAL_STEPS, NORMAL_OUTPUT_STATES),
    ('reduction_cell_0', REDUCTION_STEPS, REDUCTION_OUTPUT_STATES),
    ('cell_stem_1', REDUCTION_STEPS, REDUCTION_OUTPUT_STATES),
])
def test_built_cells_wire_the_published_ops_and_states(tiny, cell, expected_steps, outputs):
  states = _state_names(tiny, cell)
  assert len(states) == 7
  for step, (left_op, left, right_op, right) in enumerate(expected_steps):
    add = tiny.get_layer(f'{cell}/comb_iter_{step}/combine')
    inbound = add._inbound_nodes[0].inbound_layers  # pylint: disable=protected-access
    for side, op, state, add_input in (('left', left_op, left, inbound[0]),
                                       ('right', right_op, right, inbound[1])):
      assert _state_read(tiny, cell, step, side, add_input) == states[state], (step, side)
      if op != 'none':  # 'none' is the identity on these F-channel states: no layer at all.
        tiny.get_layer(f'{cell}/comb_iter_{step}/{side}/{OP_LAYERS.get(op, op)}')
  concat = tiny.get_layer(f'{cell}/cell_output')
  inbound = concat._inbound_nodes[0].inbound_layers  # pylint: disable=protected-access
  assert [layer.name for layer in inbound] == [states[i] for i in outputs]


def test_reduction_cells_stride_only_their_inputs(tiny):
  pool = tiny.get_layer('reduction_cell_0/comb_iter_0/left/max_pool_2x2')  # reads state 0
  assert pool.pool_size == (2, 2) and pool.strides == (2, 2)
  conv = tiny.get_layer('reduction_cell_0/comb_iter_1/right/3x3')  # reads state 1
  assert conv.kernel_size == (3, 3) and conv.strides == (2, 2)
  pool = tiny.get_layer('reduction_cell_0/comb_iter_2/right/max_pool_3x3')  # reads state 2
  assert pool.strides == (1, 1)
  conv = tiny.get_layer('cell_1/comb_iter_1/right/7x1')
  assert conv.kernel_size == (7, 1) and conv.strides == (1, 1)


def _op_params(op, filters):
  """Weights of one op on an F-channel state: convs without bias, BN with 4 per channel; the
  conv ops are ReLU-1x1-BN to F/4, the conv at F/4, BN, ReLU-1x1-BN back to F."""
  bottleneck = filters // 4
  bn = lambda channels: 4 * channels  # noqa: E731
  if op == '1x1':
    return filters * filters + bn(filters)
  if op == '3x3':
    middle = 9 * bottleneck ** 2 + bn(bottleneck)
  elif op == '1x7_7x1':
    middle = 2 * (7 * bottleneck ** 2 + bn(bottleneck))
  else:  # pools and the identity
    return 0
  return (filters * bottleneck + bn(bottleneck)) + middle + (bottleneck * filters + bn(filters))


def _cell_params(steps_table, input_channels, previous_channels, filters):
  """A cell: the ReLU-1x1-BN on its input and on its previous input (a factorized reduction, two
  1x1 convs to F/2 and a BN, has the same weights), then its ops."""
  ops = [op for left_op, _, right_op, _ in steps_table for op in (left_op, right_op)]
  return ((input_channels + previous_channels) * filters + 2 * 4 * filters
          + sum(_op_params(op, filters) for op in ops))


def _weights_of(model, prefix):
  return sum(w.shape.num_elements() for w in model.weights if w.name.startswith(prefix))


def test_cell_params_match_a_hand_count(tiny):
  f = TINY['reduction_size']
  # cell_1 (2F filters) reads reduction_cell_0 (3 * 2F channels) and cell_0 (4F, stride 8).
  assert _weights_of(tiny, 'cell_1/') == _cell_params(NORMAL_STEPS, 6 * f, 4 * f, 2 * f)
  # reduction_cell_0 (2F filters) reads cell_0 (4F) and cell_stem_1 (3 * F/2).
  assert _weights_of(tiny, 'reduction_cell_0/') == _cell_params(REDUCTION_STEPS, 4 * f,
                                                                3 * f // 2, 2 * f)


def test_tiny_network_params_match_a_hand_count(tiny):
  f = TINY['reduction_size']
  stem = 3 * 3 * 3 * 32 + 4 * 32
  # cell_stem_0 (F/4 filters) has no earlier cell: its state 1 is its raw 32-channel input, so
  # the 3x3 op on state 1 has a 32-channel bottleneck input and the 2x2 pool on it a 1x1 conv + BN.
  stem_0 = (_cell_params(REDUCTION_STEPS, 32, 0, f // 4) - 4 * (f // 4)
            + (32 - f // 4) * (f // 16) + 32 * (f // 4) + 4 * (f // 4))
  # (table, input channels, previous input's channels, filters) of the cells after it.
  cells = [(REDUCTION_STEPS, 3 * f // 4, 32, f // 2),  # cell_stem_1
           (NORMAL_STEPS, 3 * f // 2, 3 * f // 4, f),  # cell_0
           (REDUCTION_STEPS, 4 * f, 3 * f // 2, 2 * f),
           (NORMAL_STEPS, 6 * f, 4 * f, 2 * f),  # cell_1
           (REDUCTION_STEPS, 8 * f, 6 * f, 4 * f),
           (NORMAL_STEPS, 12 * f, 8 * f, 4 * f)]  # cell_2
  assert tiny.count_params() == stem + stem_0 + sum(_cell_params(*cell) for cell in cells)


def test_output_strides_and_shapes(tiny):
  f = TINY['reduction_size']
  expected = {'3': [None, 8, 12, 4 * f], '4': [None, 4, 6, 8 * f], '5': [None, 2, 3, 16 * f]}
  assert {k: v.as_list() for k, v in tiny.output_specs.items()} == expected
  outputs = tiny(tf.random.uniform([2, 64, 96, 3]), training=False)
  assert {k: v.shape.as_list() for k, v in outputs.items()} == {
      k: [2, *v[1:]] for k, v in expected.items()}
  assert all(np.isfinite(v.numpy()).all() for v in outputs.values())


def test_bad_sizes_name_the_binding():
  with pytest.raises(ValueError, match='build_retinanet.image_size'):
    amoebanet.build_amoebanet_d([80, 64, 3], **TINY)
  with pytest.raises(ValueError, match='num_cells=2'):
    amoebanet.build_amoebanet_d([64, 64, 3], num_cells=2, reduction_size=8)


def test_retinanet_takes_it_by_name(monkeypatch):
  assert 'amoebanet_d' in backbones.BACKBONES
  # pylint: disable-next=protected-access
  monkeypatch.setitem(backbones._AMOEBANETS, 'amoebanet_d', TINY)
  tf_keras.utils.set_random_seed(0)
  model = RetinaNet(image_size=(64, 64), num_classes=3, backbone='amoebanet_d', max_level=6,
                    block_specs='fpn', num_filters=8, num_repeats=1, head_num_convs=1,
                    head_num_filters=8)
  assert model.backbone.name == 'amoebanet_d'
  outputs = model(tf.random.uniform([1, 64, 64, 3], maxval=255.0), training=False)
  assert {k: v.shape.as_list() for k, v in outputs['box_outputs'].items()} == {
      str(level): [1, 64 // 2 ** level, 64 // 2 ** level, 36] for level in range(3, 7)}
