"""The NAS-FCOS search spaces, pyramid (§3.2.1) and head (§3.2.2-3.2.3), with
`space.SearchSpace`'s interface (keys, `contains`, masks for the controllers, samples that
always build).

`NASFCOSHeadSpace` is the released code's head space (see `nasfcos_specs.HEAD_OPS`).
`NASFCOSFPNSpace`:

`num_cells` basic blocks (paper: 7). Each cell takes five decisions, in order: its first input
and its second input among the pool so far (C2..C5 as 0..3, then the earlier cells; the same
entry twice is allowed, as the published pyramid's first cells read C5 twice), the unary op on
each (`nasfcos_specs.OPS`, the released code's indices) and the aggregation (`AGGS`).

Every sample builds: the builder needs three cells that no later cell reads (the released code
rejects a sampled architecture with fewer, its `judge`). Here the static masks keep the last
three cells unread: a cell among the last three never reads an earlier one of them. So the last
three cells are P5, P4, P3 as the paper's text says, and the released code's reading ("the last
three unconsumed cells") agrees with it on every sample. The published pyramid is in the space.
The released search would also sample architectures outside it (e.g. the last cell reading the
one before it, when two earlier cells stay unread); they are left out so that masks that depend
on no earlier action, as the LSTM controller needs, can keep every sample buildable.

`read_c2=False` masks C2 off every input step: the package's backbones give C3-C5, so the search
(`python -m nasfpn_tf.search --space=nasfcos_fpn`) samples pyramids that do not read it.

The proxy trains a space's samples in FCOS (`DETECTOR`): a pyramid sample with FCOS's own head,
a head sample on the space's fixed `pyramid` (progressive search, NAS-FCOS §3.3: the pyramid is
searched first, then the head with the found pyramid fixed; `progressive`).

Pure Python and numpy: the search driver loads it without TensorFlow.
"""
import dataclasses
import functools
import math
from typing import Dict, Tuple

import numpy as np

from nasfpn_tf.decoders import nasfcos_specs as specs_lib
from nasfpn_tf.search.space import SearchSpace, Step

FIELDS = ('input0', 'input1', 'op0', 'op1', 'agg')
NUM_OUTPUT_CELLS = len(specs_lib.CELL_OUTPUT_LEVELS)


class _Space:
  """What both NAS-FCOS spaces derive from their `encode`, `static_masks`, `_invalid_message`
  and dataclass fields: membership, size, the config round trip (`{'space': NAME, **fields}`),
  and `SearchSpace`'s sampling and checks (no step excludes an earlier action here)."""

  DETECTOR = 'fcos'

  options = SearchSpace.options
  sample_actions = SearchSpace.sample_actions
  sample = SearchSpace.sample
  _check = SearchSpace._check  # pylint: disable=protected-access

  @functools.cached_property
  def exclusions(self) -> np.ndarray:
    """[num_decisions, num_decisions] bool: none."""
    excluded = np.zeros([self.num_decisions, self.num_decisions], bool)
    excluded.flags.writeable = False
    return excluded

  def contains(self, spec) -> bool:
    try:
      self.encode(spec)
    except ValueError:
      return False
    return True

  def size(self) -> int:
    """The number of distinct decision sequences."""
    return math.prod(int(mask.sum()) for mask in self.static_masks)

  def config(self) -> Dict[str, object]:
    return {'space': self.NAME, **dataclasses.asdict(self)}

  @classmethod
  def from_config(cls, config: Dict[str, object]):
    config = dict(config)
    if config.pop('space', cls.NAME) != cls.NAME:
      raise ValueError(f'Not a {cls.NAME} space config: {config!r}.')
    return cls(**config)


@dataclasses.dataclass(frozen=True)
class NASFCOSFPNSpace(_Space):
  """NAS-FCOS pyramids of `num_cells` basic blocks over the pool C2..C5 (paper: 7); with
  `read_c2=False`, over C3..C5 (C2 keeps its index 0, never read)."""
  num_cells: int = 7
  read_c2: bool = True

  NAME = 'nasfcos_fpn'

  def __post_init__(self):
    if self.num_cells < NUM_OUTPUT_CELLS:
      raise ValueError(f'NASFCOSFPNSpace num_cells={self.num_cells} is fewer than the '
                       f'{NUM_OUTPUT_CELLS} cells that give P3-P5.')

  @property
  def pool_size(self) -> int:
    return len(specs_lib.POOL_LEVELS)

  @property
  def first_output_cell(self) -> int:
    return self.num_cells - NUM_OUTPUT_CELLS

  @property
  def num_decisions(self) -> int:
    return len(FIELDS) * self.num_cells

  @property
  def max_options(self) -> int:
    return max(self.pool_size + self.num_cells - 1, len(specs_lib.OPS), len(specs_lib.AGGS))

  @functools.cached_property
  def steps(self) -> Tuple[Step, ...]:
    return tuple(Step(cell, field) for cell in range(self.num_cells) for field in FIELDS)

  def _readable(self, cell: int) -> range:
    """The pool entries cell `cell` may read: everything so far (from C3 without `read_c2`),
    but an output cell (one of the last three) none of the earlier output cells."""
    first = 0 if self.read_c2 else 1
    if cell >= self.first_output_cell:
      return range(first, self.pool_size + self.first_output_cell)
    return range(first, self.pool_size + cell)

  @functools.cached_property
  def static_masks(self) -> np.ndarray:
    """[num_decisions, max_options] bool: the actions of each step."""
    masks = np.zeros([self.num_decisions, self.max_options], bool)
    for t, (cell, field) in enumerate(self.steps):
      if field in ('input0', 'input1'):
        masks[t, list(self._readable(cell))] = True
      elif field in ('op0', 'op1'):
        masks[t, :len(specs_lib.OPS)] = True
      else:
        masks[t, :len(specs_lib.AGGS)] = True
    masks.flags.writeable = False
    return masks

  def decode(self, actions) -> Tuple[specs_lib.CellSpec, ...]:
    """The cell specs of a decision sequence; ValueError naming the first invalid step."""
    actions = tuple(int(a) for a in actions)
    self._check(actions)
    n = len(FIELDS)
    return tuple(
        specs_lib.CellSpec((a[0], a[1]), (specs_lib.OPS[a[2]], specs_lib.OPS[a[3]]),
                           specs_lib.AGGS[a[4]])
        for a in (actions[n * cell:n * (cell + 1)] for cell in range(self.num_cells)))

  def encode(self, block_specs: specs_lib.SpecLike) -> Tuple[int, ...]:
    """The decision sequence of a spec (a name in `nasfcos_specs.SPECS`, rows or a `key`), the
    inverse of `decode`; ValueError naming the cell when the spec is outside the space."""
    specs = (parse_key(block_specs) if isinstance(block_specs, str) and ':' in block_specs
             else specs_lib.resolve(block_specs))
    if len(specs) != self.num_cells:
      raise ValueError(f'The spec has {len(specs)} cells; {self!r} has {self.num_cells}.')
    actions = []
    for cell, spec in enumerate(specs):
      specs_lib._check_cell(cell, spec)  # pylint: disable=protected-access
      actions += [*spec.inputs, *(specs_lib.OPS.index(op) for op in spec.ops),
                  specs_lib.AGGS.index(spec.agg)]
    self._check(tuple(actions))
    return tuple(actions)

  def key(self, block_specs: specs_lib.SpecLike) -> str:
    """A canonical string of the spec, the same for the two orders of a cell's (input, op)
    branches: cells 'agg:input:op,input:op' joined by '/' (`parse_key` reads it back).
    Swapping the branches builds the same network up to a relabelling of weights (the weighted
    sum's a and b; the grouped 1x1 of a concatenation gives its channel halves the other way
    round, which later layers absorb)."""
    specs = self.decode(self.encode(block_specs))
    cells = []
    for spec in specs:
      branches = sorted(zip(spec.inputs, spec.ops))
      cells.append(f'{spec.agg}:' + ','.join(f'{i}:{op}' for i, op in branches))
    return '/'.join(cells)

  def spec_config(self, block_specs: specs_lib.SpecLike):
    return specs_lib.to_config(self.decode(self.encode(block_specs)))

  def model_arguments(self, block_specs: specs_lib.SpecLike) -> Dict[str, object]:
    """The pyramid in FCOS with FCOS's own head (the proxy's `head_num_convs` convs)."""
    return {'decoder': self.NAME, 'block_specs': self.spec_config(block_specs)}

  def _invalid_message(self, t: int, action: int, mask: np.ndarray) -> str:
    cell, field = self.steps[t]
    why = ''
    if field.startswith('input') and cell >= self.first_output_cell:
      why = (f' (cells {self.first_output_cell}..{self.num_cells - 1} give P5, P4, P3 and '
             'read none of each other)')
    if field.startswith('input') and action == 0 and not self.read_c2:
      why = ' (C2: read_c2=False, the package\'s backbones give C3-C5)'
    return (f'cell {cell}: {field} {action} is not allowed{why}; valid: '
            f'{np.flatnonzero(mask).tolist()}.')


def parse_key(key: str) -> Tuple[specs_lib.CellSpec, ...]:
  """The cell specs of a `NASFCOSFPNSpace.key` ('agg:input:op,input:op' per cell, joined by
  '/'); ValueError naming the cell that does not parse."""
  cells = []
  for k, cell in enumerate(key.split('/')):
    try:
      agg, branches = cell.split(':', 1)
      (input0, op0), (input1, op1) = (branch.split(':') for branch in branches.split(','))
      cells.append(specs_lib.CellSpec((int(input0), int(input1)), (op0, op1), agg))
    except ValueError as e:
      raise ValueError(f'cell {k} {cell!r} of the key {key!r} is not '
                       f"'agg:input:op,input:op' ({e}).") from e
  return tuple(cells)


HEAD_FIELDS = ('unshared',) + tuple(f'op{i}' for i in range(specs_lib.NUM_HEAD_LAYERS))


@dataclasses.dataclass(frozen=True)
class NASFCOSHeadSpace(_Space):
  """NAS-FCOS heads as the released code searches them (`MicroHead_v2`): how many leading layers
  have per-level weights (0..num_layers, the released config's first entry), then one op of
  `nasfcos_specs.HEAD_OPS` per layer. Every sequence builds. The proxy trains each head on the
  fixed `pyramid` (a name in `nasfcos_specs.SPECS` or rows; default the published one), the
  second step of NAS-FCOS's progressive search."""
  num_layers: int = specs_lib.NUM_HEAD_LAYERS
  pyramid: Tuple[specs_lib.CellSpec, ...] = 'nasfcos_fpn'

  NAME = 'nasfcos_head'

  def __post_init__(self):
    if self.num_layers < 1:
      raise ValueError(f'NASFCOSHeadSpace num_layers={self.num_layers} must be >= 1.')
    pyramid = specs_lib.resolve(self.pyramid)
    specs_lib.validate(pyramid)
    object.__setattr__(self, 'pyramid', pyramid)  # hashable and equal whatever the form given

  @property
  def num_decisions(self) -> int:
    return 1 + self.num_layers

  @property
  def max_options(self) -> int:
    return max(self.num_layers + 1, len(specs_lib.HEAD_OPS))

  @functools.cached_property
  def steps(self) -> Tuple[Step, ...]:
    return (Step(0, 'unshared'),) + tuple(Step(i, 'op') for i in range(self.num_layers))

  @functools.cached_property
  def static_masks(self) -> np.ndarray:
    masks = np.zeros([self.num_decisions, self.max_options], bool)
    masks[0, :self.num_layers + 1] = True
    masks[1:, :len(specs_lib.HEAD_OPS)] = True
    masks.flags.writeable = False
    return masks

  def decode(self, actions) -> specs_lib.HeadSpec:
    actions = tuple(int(a) for a in actions)
    self._check(actions)
    return specs_lib.HeadSpec(tuple(specs_lib.HEAD_OPS[a] for a in actions[1:]), actions[0])

  def encode(self, spec) -> Tuple[int, ...]:
    """The decision sequence of a head spec (a name in `nasfcos_specs.HEAD_SPECS`, (ops,
    unshared) or a `key`); ValueError naming the layer when it is outside the space."""
    if isinstance(spec, str) and ':' in spec:  # a key: 'unshared:op,op,...'
      unshared, ops = spec.split(':', 1)
      if not unshared.isdigit():
        raise ValueError(f"The head key {spec!r} is not 'unshared:op,op,...'.")
      spec = (ops.split(','), int(unshared))
    spec = specs_lib.resolve_head(spec)
    if len(spec.ops) != self.num_layers:
      raise ValueError(f'The head spec has {len(spec.ops)} layers; {self!r} has '
                       f'{self.num_layers}.')
    specs_lib.validate_head(spec)
    actions = (spec.unshared, *(specs_lib.HEAD_OPS.index(op) for op in spec.ops))
    self._check(actions)
    return actions

  def key(self, spec) -> str:
    """'unshared:op,op,...': the ops and the effective number of unshared layers (per-level
    copies of weightless `skip` layers after the last unshared layer with weights change
    nothing); `encode` reads it back."""
    spec = self.decode(self.encode(spec))
    weighted = [i for i, op in enumerate(spec.ops[:spec.unshared]) if op != 'skip']
    unshared = weighted[-1] + 1 if weighted else 0
    return f'{unshared}:' + ','.join(spec.ops)

  def spec_config(self, spec):
    spec = self.decode(self.encode(spec))
    return [list(spec.ops), spec.unshared]

  def model_arguments(self, spec) -> Dict[str, object]:
    """The head on the fixed pyramid, in FCOS."""
    return {'decoder': NASFCOSFPNSpace.NAME, 'block_specs': specs_lib.to_config(self.pyramid),
            'fcos_head_spec': self.spec_config(spec)}

  def config(self) -> Dict[str, object]:
    return {'space': self.NAME, 'num_layers': self.num_layers,
            'pyramid': specs_lib.to_config(self.pyramid)}

  def _invalid_message(self, t: int, action: int, mask: np.ndarray) -> str:
    step = self.steps[t]
    where = 'head unshared' if step.field == 'unshared' else f'head layer {step.cell}'
    return f'{where}: action {action} is not allowed; valid: {np.flatnonzero(mask).tolist()}.'


# The spaces by the name a search's --space flag gives (with NAS-FPN's: `space.spaces`).
SPACES = {NASFCOSFPNSpace.NAME: NASFCOSFPNSpace, NASFCOSHeadSpace.NAME: NASFCOSHeadSpace}
