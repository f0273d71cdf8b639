"""`block_specs.wiring`, the one reading of a spec, against hand-worked tables; no TensorFlow."""
import dataclasses

import pytest

from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.decoders.block_specs import BlockSpec, CellWiring, Wiring, wiring



def table(spec_wiring):
  """Rows (candidate, level, op, inputs, dangling, source_levels, is_output), one per cell."""
  return [dataclasses.astuple(cell) for cell in spec_wiring.cells]


def test_nasfpn_wiring_adds_the_p5_and_p7_inputs_to_their_outputs():
  # Candidates 0..4 are P3..P7, cell k is 5 + k (facts: the authors' block table).
  assert wiring(specs_lib.NASFPN, 3, 7) == Wiring(
      cells=(
          CellWiring(5, 4, 'global_pooling', (1, 3), (), (4, 6), False),
          CellWiring(6, 4, 'sum', (1, 5), (), (4, 4), False),
          CellWiring(7, 3, 'sum', (0, 6), (), (3, 4), True),
          CellWiring(8, 4, 'sum', (6, 7), (), (4, 3), True),
          CellWiring(9, 5, 'global_pooling', (7, 8), (2,), (3, 4, 5), True),   # + input P5
          CellWiring(10, 7, 'global_pooling', (6, 9), (4,), (4, 5, 7), True),  # + input P7
          CellWiring(11, 6, 'global_pooling', (9, 10), (), (5, 7), True),
      ),
      outputs={3: 7, 4: 8, 5: 9, 6: 11, 7: 10})
  assert wiring(specs_lib.NASFPN, 3, 7).cells[4].sources == (7, 8, 2)


def test_fpn_wiring_is_top_down_with_nothing_dangling():
  assert table(wiring(specs_lib.fpn(3, 7), 3, 7)) == [
      (5, 6, 'sum', (3, 4), (), (6, 7), True),
      (6, 5, 'sum', (2, 5), (), (5, 6), True),
      (7, 4, 'sum', (1, 6), (), (4, 5), True),
      (8, 3, 'sum', (0, 7), (), (3, 4), True),
      (9, 7, 'sum', (4, 5), (), (7, 6), True),
  ]
  assert wiring(specs_lib.fpn(3, 7), 3, 7).outputs == {3: 8, 4: 7, 5: 6, 6: 5, 7: 9}


def test_nasfpn_lite_wiring_reads_every_candidate_so_nothing_dangles():
  # Candidates 0..3 are P3..P6, cell k is 4 + k.
  assert table(wiring(specs_lib.NASFPN_LITE, 3, 6)) == [
      (4, 5, 'global_pooling', (2, 3), (), (5, 6), False),
      (5, 4, 'global_pooling', (1, 4), (), (4, 5), False),
      (6, 4, 'sum', (0, 5), (), (3, 4), False),
      (7, 4, 'sum', (5, 6), (), (4, 4), False),
      (8, 5, 'sum', (4, 7), (), (5, 4), False),
      (9, 6, 'global_pooling', (3, 8), (), (6, 5), False),
      (10, 4, 'global_pooling', (8, 7), (), (5, 4), False),
      (11, 4, 'sum', (6, 10), (), (4, 4), False),
      (12, 6, 'sum', (9, 10), (), (6, 4), False),
      (13, 4, 'global_pooling', (12, 11), (), (6, 4), False),
      (14, 4, 'sum', (11, 13), (), (4, 4), False),
      (15, 3, 'sum', (0, 14), (), (3, 4), True),
      (16, 4, 'sum', (14, 15), (), (4, 3), True),
      (17, 5, 'global_pooling', (8, 16), (), (5, 4), True),
      (18, 6, 'global_pooling', (12, 17), (), (6, 5), True),
  ]
  assert wiring(specs_lib.NASFPN_LITE, 3, 6).outputs == {3: 15, 4: 16, 5: 17, 6: 18}


def test_an_output_cell_takes_every_unread_candidate_at_its_level_in_index_order():
  # P3..P5 are 0..2. Cell 0 (candidate 3) at P5 is never read, nor is the P5 input.
  spec = (BlockSpec(5, 'sum', (0, 1), False),
          BlockSpec(3, 'sum', (0, 1), True),
          BlockSpec(4, 'sum', (1, 4), True),
          BlockSpec(5, 'global_pooling', (4, 5), True))
  p5_output = wiring(spec, 3, 5).cells[3]
  assert p5_output.dangling == (2, 3)
  assert p5_output.sources == (4, 5, 2, 3)
  assert p5_output.source_levels == (3, 4, 5, 5)


def test_dangling_means_unread_so_far_as_in_the_authors_code():
  # The P3 input is unread when the P3 output cell is built, so it is added there, even though
  # a later cell reads it too. An intermediate cell is never given dangling features.
  spec = (BlockSpec(4, 'sum', (1, 2), False),
          BlockSpec(3, 'sum', (1, 3), True),
          BlockSpec(4, 'sum', (0, 3), True),
          BlockSpec(5, 'sum', (4, 5), True))
  assert [cell.dangling for cell in wiring(spec, 3, 5).cells] == [(), (0,), (), ()]


def test_validate_raises_as_wiring_does_naming_the_cell():
  # Every bad-spec message is checked through the builder in test_decoders.py.
  unknown_op = specs_lib.NASFPN[:6] + (BlockSpec(6, 'avg', (9, 10), True),)
  match = r"cell 6 \(6, 'avg', \(9, 10\), True\): unknown op 'avg'; ops are \['global_pooling'"
  for check in (wiring, specs_lib.validate):
    with pytest.raises(ValueError, match=match):
      check(unknown_op, 3, 7)
  assert specs_lib.validate(specs_lib.NASFPN, 3, 7) is None
