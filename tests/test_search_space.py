"""The search space: decisions and masks, decode/encode, keys, sizes, and that samples build."""

import numpy as np
import pytest

from nasfpn_tf.decoders import NASFPN
from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.search.space import SearchSpace, Step

NASFPN_KEY = ('4:global_pooling:1,3/4:sum:1,5/3:sum:0,6/4:sum:6,7/5:global_pooling:7,8/'
              '7:global_pooling:6,9/6:global_pooling:9,10')
FPN_KEY = '6:sum:3,4/5:sum:2,5/4:sum:1,6/3:sum:0,7/7:sum:4,5'


TINY_INPUTS = {'3': [None, 32, 32, 4], '4': [None, 16, 16, 4], '5': [None, 8, 8, 4]}


def tiny_pyramid(specs):
  """A 1-repeat, 8-filter pyramid of `specs` on 32x32 P3 features, and features to run it on."""
  rng = np.random.default_rng(0)
  features = {k: rng.standard_normal([1, *v[1:]]).astype(np.float32)
              for k, v in TINY_INPUTS.items()}
  return NASFPN(TINY_INPUTS, block_specs=specs, num_filters=8, num_repeats=1), features


def test_the_papers_tables_are_in_their_spaces_with_stable_keys():
  space = SearchSpace()
  assert space.contains('nasfpn') and space.contains(specs_lib.NASFPN)
  # Per cell: input0, input1, level - 3, op index (0 sum, 1 global_pooling).
  assert space.encode('nasfpn') == (1, 3, 1, 1, 1, 5, 1, 0, 0, 6, 0, 0, 6, 7, 1, 0,
                                    7, 8, 2, 1, 6, 9, 4, 1, 9, 10, 3, 1)
  assert space.decode(space.encode('nasfpn')) == specs_lib.NASFPN
  assert space.key(specs_lib.NASFPN) == NASFPN_KEY
  fpn_space = SearchSpace(num_cells=5)
  assert fpn_space.key(specs_lib.fpn()) == FPN_KEY
  assert fpn_space.decode(fpn_space.encode('fpn')) == specs_lib.fpn()
  assert not space.contains('fpn') and not fpn_space.contains('nasfpn')


def test_decisions_and_their_masks():
  space = SearchSpace()
  assert space.num_decisions == 28 and space.max_options == 11
  assert space.steps[:5] == (Step(0, 'input0'), Step(0, 'input1'), Step(0, 'level'),
                             Step(0, 'op'), Step(1, 'input0'))
  valid = lambda previous: np.flatnonzero(space.options(previous)).tolist()
  nasfpn = space.encode('nasfpn')
  assert valid(()) == [0, 1, 2, 3, 4]                 # cell 0 reads the 5 inputs
  assert valid(nasfpn[:1]) == [0, 2, 3, 4]            # ... its second input is another one
  assert valid(nasfpn[:2]) == [1, 2, 3, 4]            # an intermediate cell is never P3
  assert valid(nasfpn[:3]) == [0, 1]                  # sum, global_pooling
  assert valid(nasfpn[:4]) == [0, 1, 2, 3, 4, 5]      # cell 1 may read cell 0 too
  assert valid(nasfpn[:10]) == [0, 1, 2, 3, 4]        # the first output cell: any level
  assert valid(nasfpn[:14]) == [1, 2, 3, 4]           # the next: not P3 again
  assert valid(nasfpn[:26]) == [3]                    # the last output level is forced
  assert space.options(nasfpn[:26]).shape == (11,)


def test_samples_validate_round_trip_and_have_stable_keys():
  space = SearchSpace()
  rng = np.random.default_rng(0)
  keys = set()
  for _ in range(1000):
    actions = space.sample_actions(rng)
    specs = space.decode(actions)
    specs_lib.validate(specs, 3, 7)
    assert all(spec.level > 3 for spec in specs[:2])
    assert sorted(spec.level for spec in specs[2:]) == [3, 4, 5, 6, 7]
    assert space.encode(specs) == actions and space.contains(specs)
    assert space.key(specs_lib.to_config(specs)) == space.key(specs)
    # No dead cell (what lets `key` canonicalize cell by cell): each one reaches an output.
    wiring = specs_lib.wiring(specs, 3, 7)
    reached = set(wiring.outputs.values())
    for cell in reversed(wiring.cells):
      reached |= set(cell.sources) if cell.candidate in reached else set()
    assert reached >= {cell.candidate for cell in wiring.cells}
    keys.add(space.key(specs))
  assert len(keys) == 1000


def test_samples_build_with_the_pyramid_builder():
  rng = np.random.default_rng(1)
  for space in (SearchSpace(), SearchSpace(num_cells=5), SearchSpace(num_cells=9)):
    specs = space.sample(rng)
    model, features = tiny_pyramid(specs)
    outputs = model(features, training=False)
    assert {level: tuple(out.shape) for level, out in outputs.items()} == {
        str(level): (1, 32 // 2**(level - 3), 32 // 2**(level - 3), 8) for level in range(3, 8)}
    assert model.block_specs == specs


def swap_inputs(specs, cell, op=None):
  spec = specs[cell]
  swapped = spec._replace(inputs=spec.inputs[::-1], op=op or spec.op)
  return specs[:cell] + (swapped,) + specs[cell + 1:]


@pytest.mark.parametrize('cell,op,same_network', [
    (0, None, True),               # global pooling of P4 and P6: the coarser gates either way
    (1, None, True),               # sum of two P4 features
    (1, 'global_pooling', False),  # global pooling of two P4 features: the first one gates
])
def test_input_swapped_duplicates_share_a_key_unless_they_build_another_network(
    cell, op, same_network):
  space = SearchSpace()
  specs = swap_inputs(specs_lib.NASFPN, cell, op) if op else specs_lib.NASFPN
  swapped = swap_inputs(specs, cell)
  assert space.contains(swapped)
  assert (space.key(swapped) == space.key(specs)) == same_network
  model, features = tiny_pyramid(specs)
  swapped_model, _ = tiny_pyramid(swapped)
  swapped_model.set_weights(model.get_weights())
  outputs = model(features, training=False)
  swapped_outputs = swapped_model(features, training=False)
  same = all(np.allclose(outputs[level], swapped_outputs[level], atol=1e-5) for level in outputs)
  assert same == same_network


@pytest.mark.parametrize('change,match', [
    (lambda s: s[:6], 'The spec has 6 cells; SearchSpace.*has 7'),
    (lambda s: (s[0]._replace(level=3),) + s[1:], 'level 3 is not allowed: an intermediate cell '
                                                  'never outputs min_level 3'),
    (lambda s: s[:6] + (s[6]._replace(level=5),), 'level 5 is not allowed: an output cell takes '
                                                  'a level no earlier'),
    (lambda s: (s[0]._replace(is_output=True),) + s[1:], 'the last 5 cells'),
    (lambda s: (s[0]._replace(inputs=(1, 1)),) + s[1:], 'input1 1 is not allowed'),
    (lambda s: (s[0]._replace(inputs=(1, 5)),) + s[1:], 'input1 5 is not allowed'),
    (lambda s: (s[0]._replace(op='avg'),) + s[1:], "unknown op 'avg'"),
])
def test_tables_outside_the_space_are_rejected_naming_why(change, match):
  space = SearchSpace()
  outside = change(specs_lib.NASFPN)
  assert not space.contains(outside)
  with pytest.raises(ValueError, match=match):
    space.encode(outside)
  with pytest.raises(ValueError, match=match.split(':')[0]):
    space.key(outside)


def test_decode_rejects_invalid_decisions():
  space = SearchSpace()
  with pytest.raises(ValueError, match='takes 28 decisions, got 3'):
    space.decode((0, 1, 1))
  with pytest.raises(ValueError,
                     match=r'cell 0: input0 7 is not allowed.*valid: \[0, 1, 2, 3, 4\]'):
    space.decode((7,) + space.encode('nasfpn')[1:])


def enumerate_actions(space, prefix=()):
  if len(prefix) == space.num_decisions:
    yield prefix
    return
  for action in np.flatnonzero(space.options(prefix)):
    yield from enumerate_actions(space, prefix + (int(action),))


def test_size_and_number_of_keys_match_an_enumeration():
  space = SearchSpace(num_cells=3, min_level=3, max_level=4)
  sequences = list(enumerate_actions(space))
  # (2*1 pairs * 1 level * 2 ops) * (3*2 * 2 * 2) * (4*3 * 1 * 2)
  assert space.size() == len(sequences) == 2304
  assert space.num_keys() == len({space.key(space.decode(a)) for a in sequences})


def test_size_of_the_papers_space():
  # prod over cells of (L + k)(L + k - 1) pairs, 2 ops, 4 levels for each of the 2 intermediate
  # cells, 5! output orders.
  assert SearchSpace().size() == 247_210_809_753_600_000
  assert SearchSpace().num_keys() == 2_753_359_098_024_960
  assert SearchSpace(num_cells=5).size() == 390_168_576_000


def test_config_round_trip_and_bad_spaces():
  space = SearchSpace(num_cells=9, min_level=3, max_level=6)
  assert SearchSpace.from_config(space.config()) == space
  assert space.config() == {'num_cells': 9, 'min_level': 3, 'max_level': 6}
  assert len({SearchSpace(), SearchSpace(7, 3, 7)}) == 1
  with pytest.raises(ValueError, match='num_cells=4 is fewer than the 5 output cells'):
    SearchSpace(num_cells=4)
  with pytest.raises(ValueError, match='min_level < max_level'):
    SearchSpace(min_level=5, max_level=5)


# Every registered table, with the levels it is built on (FPN on both of its uses).
REGISTERED_LEVELS = {'nasfpn': [(3, 7)], 'nasfpn_lite': [(3, 6)], 'fpn': [(3, 7), (3, 6)]}


@pytest.mark.parametrize('name,min_level,max_level', [
    (name, *levels) for name, uses in REGISTERED_LEVELS.items() for levels in uses])
def test_every_registered_table_obeys_the_search_space_rules(name, min_level, max_level):
  """§3.1: no intermediate cell outputs the finest level, the last L cells are the outputs, one
  per level; `SearchSpace.encode` checks each rule and names the cell that breaks one."""
  assert sorted(REGISTERED_LEVELS) == sorted(specs_lib.SPECS)
  specs = specs_lib.resolve(name, min_level, max_level)
  space = SearchSpace(num_cells=len(specs), min_level=min_level, max_level=max_level)
  assert space.decode(space.encode(specs)) == specs


def test_a_key_parses_back_to_its_pyramid_and_a_bad_key_is_named():
  space = SearchSpace()
  assert space.parse_key(NASFPN_KEY) == specs_lib.NASFPN
  assert SearchSpace(num_cells=5).parse_key(FPN_KEY) == specs_lib.fpn()
  rng = np.random.default_rng(2)
  for _ in range(200):
    specs = space.sample(rng)
    assert space.key(space.parse_key(space.key(specs))) == space.key(specs)
  with pytest.raises(ValueError, match=r"has 5 cells; SearchSpace\(num_cells=7"):
    space.parse_key(FPN_KEY)
  with pytest.raises(ValueError, match=r"cell 1 '4:sum:1' of the key .* is not 'level:op:"):
    space.parse_key(NASFPN_KEY.replace('4:sum:1,5', '4:sum:1'))
  with pytest.raises(ValueError, match='unknown op'):
    space.parse_key(NASFPN_KEY.replace('4:sum:1,5', '4:max:1,5'))
  # The same pyramid with cell 1's inputs swapped: not the canonical spelling.
  with pytest.raises(ValueError, match=r"not canonical; the same pyramid is '4:global_pooling"):
    space.parse_key(NASFPN_KEY.replace('4:sum:1,5', '4:sum:5,1'))
