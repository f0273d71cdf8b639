"""The NAS-FPN search space (paper §3.1) as a sequence of masked decisions.

A pyramid of `num_cells` merging cells over levels min..max. Each cell takes four decisions, in
order: its first input among the candidates so far (the L pyramid inputs, then the earlier
cells' outputs), its second input among the rest, its output level, its binary op
(`block_specs.OPS`). Intermediate cells never output min_level (the finest). The last L cells
are the outputs; the controller predicts the order of their levels as picks without
replacement, one in each output cell's level decision (the last one is forced).

Every step has a vocabulary of at most `max_options` actions (input steps: candidate indices;
level steps: level - min_level; op steps: index in OPS) and a validity mask. A step's mask is a
fixed mask (`static_masks`) minus the actions of the earlier steps it excludes (`exclusions`: the
second input excludes the first, an output level excludes the earlier output levels), so an RNN
controller can use one fixed vocabulary and compute every mask from the actions so far. Pure
Python and numpy: the search driver loads it without TensorFlow.
"""
import dataclasses
import functools
import math
from typing import Dict, NamedTuple, Sequence, Tuple

import numpy as np

from nasfpn_tf.decoders import block_specs as specs_lib

# The decisions of one cell, in the order the controller takes them.
FIELDS = ('input0', 'input1', 'level', 'op')

# Ops whose result depends on which input comes first when both are at the same level:
# `GlobalPoolingCell` gates by the coarser input, and by the first one on ties. Every other
# pairing of inputs builds the same network in either order.
ORDER_SENSITIVE_AT_SAME_LEVEL = frozenset({'global_pooling'})


class Step(NamedTuple):
  cell: int
  field: str  # one of FIELDS


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Pyramids of `num_cells` merging cells over levels min_level..max_level (paper: 7, 3, 7)."""
  num_cells: int = 7
  min_level: int = 3
  max_level: int = 7

  NAME = 'nasfpn'  # --space
  DETECTOR = 'retinanet'  # the detector its proxy trains (`build_retinanet.detector`)

  def __post_init__(self):
    if self.max_level <= self.min_level:
      raise ValueError(f'SearchSpace needs min_level < max_level, got {self.min_level}..'
                       f'{self.max_level}.')
    if self.num_cells < self.num_levels:
      raise ValueError(f'SearchSpace num_cells={self.num_cells} is fewer than the '
                       f'{self.num_levels} output cells of levels {self.min_level}..'
                       f'{self.max_level}.')

  @property
  def num_levels(self) -> int:
    return self.max_level - self.min_level + 1

  @property
  def first_output_cell(self) -> int:
    """The last `num_levels` cells are the outputs."""
    return self.num_cells - self.num_levels

  @property
  def num_decisions(self) -> int:
    return len(FIELDS) * self.num_cells

  @property
  def max_options(self) -> int:
    """The fixed vocabulary size: the most actions any step has."""
    return max(self.num_levels + self.num_cells - 1, self.num_levels, len(specs_lib.OPS))

  @functools.cached_property
  def steps(self) -> Tuple[Step, ...]:
    return tuple(Step(cell, field) for cell in range(self.num_cells) for field in FIELDS)

  @functools.cached_property
  def static_masks(self) -> np.ndarray:
    """[num_decisions, max_options] bool: the actions a step allows whatever came before."""
    masks = np.zeros([self.num_decisions, self.max_options], bool)
    for t, (cell, field) in enumerate(self.steps):
      if field in ('input0', 'input1'):
        masks[t, :self.num_levels + cell] = True
      elif field == 'level':
        masks[t, :self.num_levels] = True
        masks[t, 0] = cell >= self.first_output_cell  # intermediate cells never output min_level
      else:
        masks[t, :len(specs_lib.OPS)] = True
    masks.flags.writeable = False
    return masks

  @functools.cached_property
  def exclusions(self) -> np.ndarray:
    """[num_decisions, num_decisions] bool: step t may not repeat the action of step j."""
    excluded = np.zeros([self.num_decisions, self.num_decisions], bool)
    output_levels = [t for t, (cell, field) in enumerate(self.steps)
                     if field == 'level' and cell >= self.first_output_cell]
    for t, (cell, field) in enumerate(self.steps):
      if field == 'input1':
        excluded[t, self.steps.index(Step(cell, 'input0'))] = True
      if t in output_levels:
        excluded[t, output_levels[:output_levels.index(t)]] = True
    excluded.flags.writeable = False
    return excluded

  def options(self, previous_actions: Sequence[int]) -> np.ndarray:
    """[max_options] bool: the valid actions of step len(previous_actions)."""
    t = len(previous_actions)
    mask = self.static_masks[t].copy()
    for j in np.flatnonzero(self.exclusions[t]):
      mask[previous_actions[j]] = False
    return mask

  def sample_actions(self, rng: np.random.Generator) -> Tuple[int, ...]:
    """A decision sequence, each decision uniform over its valid options."""
    actions = []
    for _ in range(self.num_decisions):
      actions.append(int(rng.choice(np.flatnonzero(self.options(actions)))))
    return tuple(actions)

  def sample(self, rng: np.random.Generator) -> Tuple[specs_lib.BlockSpec, ...]:
    return self.decode(self.sample_actions(rng))

  def decode(self, actions: Sequence[int]) -> Tuple[specs_lib.BlockSpec, ...]:
    """The block specs a decision sequence builds; ValueError naming the first invalid step."""
    actions = tuple(int(a) for a in actions)
    self._check(actions)
    specs = []
    for cell in range(self.num_cells):
      input0, input1, level, op = actions[len(FIELDS) * cell:len(FIELDS) * (cell + 1)]
      specs.append(specs_lib.BlockSpec(self.min_level + level, specs_lib.OPS[op],
                                       (input0, input1), cell >= self.first_output_cell))
    return tuple(specs)

  def encode(self, block_specs: specs_lib.SpecLike) -> Tuple[int, ...]:
    """The decision sequence of a spec (a name in `block_specs.SPECS` or rows); the inverse of
    `decode`. ValueError naming the cell when the spec is outside the space."""
    specs = specs_lib.resolve(block_specs, self.min_level, self.max_level)
    if len(specs) != self.num_cells:
      raise ValueError(f'The spec has {len(specs)} cells; {self!r} has '
                       f'{self.num_cells}.')
    actions = []
    for cell, spec in enumerate(specs):
      if len(spec.inputs) != 2:
        raise ValueError(f'cell {cell} {tuple(spec)}: needs exactly two inputs.')
      if spec.op not in specs_lib.OPS:
        raise ValueError(f'cell {cell} {tuple(spec)}: unknown op {spec.op!r}; ops are '
                         f'{list(specs_lib.OPS)}.')
      if spec.is_output != (cell >= self.first_output_cell):
        raise ValueError(
            f'cell {cell} {tuple(spec)}: in {self!r} the last {self.num_levels} cells '
            f'(from cell {self.first_output_cell}) are the output cells, and only they.')
      actions += [*spec.inputs, spec.level - self.min_level, specs_lib.OPS.index(spec.op)]
    self._check(tuple(actions))
    return tuple(actions)

  def contains(self, block_specs: specs_lib.SpecLike) -> bool:
    try:
      self.encode(block_specs)
    except ValueError:
      return False
    return True

  def key(self, block_specs: specs_lib.SpecLike) -> str:
    """A canonical string of the spec: the same for every spec that builds the same network by
    swapping a cell's two inputs (kept in order for same-level global pooling, whose first
    input is the gate). Raises ValueError for a spec outside the space.

    Input order is all there is to canonicalize cell by cell: every cell of a spec in this space
    reaches an output (intermediate cells come before every output cell, and one that nothing
    has read is added to its level's output as a dangling feature). Specs with different keys
    can still build isomorphic networks, e.g. two independent cells listed in the other order.
    """
    specs = self.decode(self.encode(block_specs))
    wiring = specs_lib.wiring(specs, self.min_level, self.max_level)
    cells = []
    for cell in wiring.cells:
      inputs = cell.inputs
      same_level = cell.source_levels[0] == cell.source_levels[1]
      if not (same_level and cell.op in ORDER_SENSITIVE_AT_SAME_LEVEL):
        inputs = tuple(sorted(inputs))
      cells.append(f'{cell.level}:{cell.op}:{inputs[0]},{inputs[1]}')
    return '/'.join(cells)

  def parse_key(self, key: str) -> Tuple[specs_lib.BlockSpec, ...]:
    """The block specs of a `key` ('level:op:input,input' per cell, joined by '/'), e.g. one
    copied from a journal or docs/search.md; the inverse of `key` up to its canonical input
    order. ValueError naming the cell that does not parse or the key that is not canonical."""
    cells = key.split('/')
    if len(cells) != self.num_cells:
      raise ValueError(f'The key {key!r} has {len(cells)} cells; {self!r} has {self.num_cells}.')
    specs = []
    for cell, text in enumerate(cells):
      try:
        level, op, inputs = text.split(':')
        input0, input1 = (int(i) for i in inputs.split(','))
        specs.append(specs_lib.BlockSpec(int(level), op, (input0, input1),
                                         cell >= self.first_output_cell))
      except ValueError as e:
        raise ValueError(f"cell {cell} {text!r} of the key {key!r} is not "
                         f"'level:op:input,input' ({e}).") from e
    specs = tuple(specs)
    canonical = self.key(specs)  # ValueError naming the cell outside the space
    if canonical != key:
      raise ValueError(f'The key {key!r} is not canonical; the same pyramid is {canonical!r}.')
    return specs

  def size(self) -> int:
    """The number of distinct decision sequences: the product of each step's number of options,
    which does not depend on the earlier actions."""
    return math.prod(int(np.sum(self.options(self._sample_prefix(t))))
                     for t in range(self.num_decisions))

  def num_keys(self) -> int:
    """The number of distinct keys: decision sequences up to input order (see `key`)."""

    @functools.lru_cache(maxsize=None)
    def count(cell: int, level_counts: Tuple[int, ...], used_outputs: frozenset) -> int:
      """Keys of cells cell..end, given how many candidates each level has so far and which
      output levels are taken: a cell's canonical input pairs depend only on those counts."""
      if cell == self.num_cells:
        return 1
      unordered = math.comb(sum(level_counts), 2)
      same_level = sum(math.comb(n, 2) for n in level_counts)
      pairs = sum(unordered + (same_level if op in ORDER_SENSITIVE_AT_SAME_LEVEL else 0)
                  for op in specs_lib.OPS)
      is_output = cell >= self.first_output_cell
      levels = ([i for i in range(self.num_levels) if i not in used_outputs] if is_output
                else range(1, self.num_levels))
      return pairs * sum(
          count(cell + 1, tuple(n + (i == level) for i, n in enumerate(level_counts)),
                used_outputs | {level} if is_output else used_outputs)
          for level in levels)

    return count(0, (1,) * self.num_levels, frozenset())

  def spec_config(self, block_specs: specs_lib.SpecLike):
    """A spec of the space as JSON-ready rows (a journal line's `block_specs`)."""
    return specs_lib.to_config(specs_lib.resolve(block_specs, self.min_level, self.max_level))

  def model_arguments(self, block_specs: specs_lib.SpecLike) -> Dict[str, object]:
    """The `build_retinanet` arguments that build a spec of the space into the proxy's model."""
    return {'block_specs': self.spec_config(block_specs)}

  def config(self) -> Dict[str, int]:
    """The fields (no name: a search dir recorded before other spaces existed reads the same)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_config(cls, config: Dict[str, int]) -> 'SearchSpace':
    return cls(**config)

  def _sample_prefix(self, t: int) -> Tuple[int, ...]:
    """Any valid first t actions: the count of options of a step does not depend on which."""
    actions = []
    for _ in range(t):
      actions.append(int(np.flatnonzero(self.options(actions))[0]))
    return tuple(actions)

  def _check(self, actions: Tuple[int, ...]) -> None:
    """ValueError naming the first step whose action its options do not allow (the message of
    the space's `_invalid_message`). The NAS-FCOS spaces share it."""
    if len(actions) != self.num_decisions:
      raise ValueError(f'{self!r} takes {self.num_decisions} decisions, got '
                       f'{len(actions)}.')
    for t, action in enumerate(actions):
      mask = self.options(actions[:t])
      if not (0 <= action < self.max_options and mask[action]):
        raise ValueError(self._invalid_message(t, action, mask))

  def _invalid_message(self, t: int, action: int, mask: np.ndarray) -> str:
    cell, field = self.steps[t]
    valid = np.flatnonzero(mask).tolist()
    if field == 'level':
      why = ('an output cell takes a level no earlier output cell took'
             if cell >= self.first_output_cell else
             f'an intermediate cell never outputs min_level {self.min_level}')
      if not 0 <= action <= self.max_level - self.min_level:
        why = f'the levels are {self.min_level}..{self.max_level}'
      return (f'cell {cell}: level {self.min_level + action} is not allowed: {why}; valid '
              f'levels: {[self.min_level + v for v in valid]}.')
    if field == 'op':
      return f'cell {cell}: op index {action} is not one of {list(specs_lib.OPS)}.'
    why = ('inputs are the candidates so far' if field == 'input0' else
           'the second input is another candidate so far than the first')
    return f'cell {cell}: {field} {action} is not allowed: {why}; valid: {valid}.'


def spaces() -> Dict[str, type]:
  """The search spaces by their --space name: NAS-FPN's and NAS-FCOS's two."""
  from nasfpn_tf.search import nasfcos_space  # pylint: disable=g-import-not-at-top  (imports us)
  return {SearchSpace.NAME: SearchSpace, **nasfcos_space.SPACES}


def from_config(config: Dict[str, object]):
  """The space of a `config()` of any space: NAS-FCOS's name theirs under 'space'; a config
  without one is NAS-FPN's."""
  config = dict(config)
  name = config.get('space', SearchSpace.NAME)
  known = spaces()
  if name not in known:
    raise ValueError(f'Unknown search space {name!r} in {config!r}; spaces are {sorted(known)}.')
  if name == SearchSpace.NAME:
    config.pop('space', None)
  return known[name].from_config(config)
