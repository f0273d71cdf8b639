"""Pyramid architectures as data: lists of merging-cell specs read by one builder.

A spec is a list of `BlockSpec(level, op, inputs, is_output)`. The candidates start as the
pyramid inputs P{min_level}..P{max_level} (indices 0..L-1); cell k appends its output as index
L+k. `inputs` are two candidate indices, `op` one of `OPS`, and the cells with `is_output` give
the pyramid's outputs, one per level. `wiring` is the one reading of a spec, shared by the builder,
the validation and the drawing. Plain data, no TensorFlow: a search can import it cheaply.
"""
import dataclasses
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

# The binary ops of the search space (paper §3.1), by name; `nasfpn_tf.layers.MERGING_CELLS`
# maps each to its Keras cell.
OPS = ('sum', 'global_pooling')


class BlockSpec(NamedTuple):
  level: int
  op: str
  inputs: Tuple[int, int]
  is_output: bool


# The 7-cell NAS-FPN of the paper (Fig. 6), the authors' table. Levels 3..7.
NASFPN = (
    BlockSpec(4, 'global_pooling', (1, 3), False),
    BlockSpec(4, 'sum', (1, 5), False),
    BlockSpec(3, 'sum', (0, 6), True),
    BlockSpec(4, 'sum', (6, 7), True),
    BlockSpec(5, 'global_pooling', (7, 8), True),
    BlockSpec(7, 'global_pooling', (6, 9), True),
    BlockSpec(6, 'global_pooling', (9, 10), True),
)


def fpn(min_level: int = 3, max_level: int = 7) -> Tuple[BlockSpec, ...]:
  """Vanilla FPN (paper Fig. 7a) in the same search space, for levels min_level..max_level.

  The top-down pathway: from the second-highest level down, each output merges its lateral input
  with the upsampled output of the level above. The top level, with nothing above it, merges its
  input with the max-pooled output of the level below, so each level's output is one cell (with
  R-50 @256 on P3-P7 this gives FPN R-50's 34.0M params of Table 1).
  """
  num_levels = max_level - min_level + 1
  cells = [BlockSpec(max_level - 1, 'sum', (num_levels - 2, num_levels - 1), True)]
  for level in range(max_level - 2, min_level - 1, -1):
    cells.append(BlockSpec(level, 'sum', (level - min_level, num_levels + len(cells) - 1), True))
  cells.append(BlockSpec(max_level, 'sum', (num_levels - 1, num_levels), True))
  return tuple(cells)


# NAS-FPNLite, levels 3..6: ours. The paper's 15-cell table was never published. This one is
# hand-built in its search space (§3.1: no intermediate cell outputs P3, the last 4 cells are the
# outputs) from the traits the paper reports of the searched cells (Fig. 7): a top-down pass where
# coarse features gate finer ones by global pooling (cells 0-1), a bottom-up pass that brings the
# P3 input up (2-5), a second top-down pass (6-10), then one output cell per level built on the
# newest features, P3 first from the P3 input (11-14). Every candidate is read, so nothing dangles.
# It has the paper's 15 cells, and its level mix (1 cell at P3, 8 at P4, 3 at P5, 3 at P6) puts
# MobileNetV2 3@48 and 7@64 within 5% of Table 1's FLOPs and params (experiments/model_table.py).
NASFPN_LITE = (
    BlockSpec(5, 'global_pooling', (2, 3), False),   # 4: P5 gated by P6
    BlockSpec(4, 'global_pooling', (1, 4), False),   # 5: P4 gated by cell 0
    BlockSpec(4, 'sum', (0, 5), False),              # 6: bottom-up: the P3 input pooled to P4
    BlockSpec(4, 'sum', (5, 6), False),              # 7
    BlockSpec(5, 'sum', (4, 7), False),              # 8
    BlockSpec(6, 'global_pooling', (3, 8), False),   # 9
    BlockSpec(4, 'global_pooling', (8, 7), False),   # 10: top-down again
    BlockSpec(4, 'sum', (6, 10), False),             # 11
    BlockSpec(6, 'sum', (9, 10), False),             # 12
    BlockSpec(4, 'global_pooling', (12, 11), False), # 13
    BlockSpec(4, 'sum', (11, 13), False),            # 14
    BlockSpec(3, 'sum', (0, 14), True),              # 15: P3 out
    BlockSpec(4, 'sum', (14, 15), True),             # 16: P4 out
    BlockSpec(5, 'global_pooling', (8, 16), True),   # 17: P5 out
    BlockSpec(6, 'global_pooling', (12, 17), True),  # 18: P6 out
)

# Names usable in gin and configs: fixed tables (levels as written) or, for the regular FPN,
# a function of (min_level, max_level).
SPECS = {'nasfpn': NASFPN, 'nasfpn_lite': NASFPN_LITE, 'fpn': fpn}

SpecLike = Union[str, Sequence[Sequence]]


def resolve(block_specs: SpecLike, min_level: int = 3,
            max_level: int = 7) -> Tuple[BlockSpec, ...]:
  """A spec from its name in `SPECS` or from rows (level, op, (in0, in1), is_output)."""
  if isinstance(block_specs, str):
    if block_specs not in SPECS:
      raise ValueError(f'Unknown block spec {block_specs!r}; known specs: {sorted(SPECS)}.')
    spec = SPECS[block_specs]
    return spec(min_level, max_level) if callable(spec) else spec
  specs = []
  for i, row in enumerate(block_specs):
    if isinstance(row, dict):
      row = (row['level'], row['op'], row['inputs'], row['is_output'])
    if len(row) != 4:
      raise ValueError(f'cell {i}: a block spec is (level, op, (input0, input1), is_output), '
                       f'got {row!r}.')
    level, op, inputs, is_output = row
    specs.append(BlockSpec(int(level), str(op), tuple(int(j) for j in inputs), bool(is_output)))
  return tuple(specs)


def resolve_pyramids(pyramids: Sequence[Optional[SpecLike]], block_specs: SpecLike,
                     num_repeats: int, min_level: int, max_level: int,
                     where: str = 'pyramids') -> Tuple[Tuple[BlockSpec, ...], ...]:
  """The spec of each repeat of a stack of pyramid networks, e.g. ['fpn', 'nasfpn', 'nasfpn']:
  an entry is a name in `SPECS`, rows, or None for `block_specs` (what a search samples). Each
  is validated for levels min..max; ValueError naming `where` (the binding) and the entry."""
  if isinstance(pyramids, (str, bytes)) or not isinstance(pyramids, Sequence):
    raise ValueError(f'{where} = {pyramids!r}: give a list, one spec per repeat (a name in '
                     f'{sorted(SPECS)}, rows, or None for block_specs).')
  if len(pyramids) != num_repeats:
    raise ValueError(f'{where} has {len(pyramids)} entries, but num_repeats = {num_repeats}: '
                     'give one spec per repeat.')
  resolved = []
  for i, entry in enumerate(pyramids):
    name = 'block_specs' if entry is None else entry
    try:
      specs = resolve(block_specs if entry is None else entry, min_level, max_level)
      validate(specs, min_level, max_level)
    except (ValueError, TypeError, KeyError, IndexError) as e:
      raise ValueError(f'{where}[{i}] = {name!r} does not build a P{min_level}-P{max_level} '
                       f'pyramid: {e}') from e
    resolved.append(specs)
  return tuple(resolved)


def pyramids_to_config(pyramids: Sequence[Optional[SpecLike]]):
  """JSON-friendly entries: names and None kept, rows as `to_config` writes them."""
  return [entry if entry is None or isinstance(entry, str) else to_config(resolve(entry))
          for entry in pyramids]


def to_config(specs: Sequence[BlockSpec]):
  """JSON-friendly rows, the inverse of `resolve`."""
  return [[s.level, s.op, list(s.inputs), s.is_output] for s in specs]


@dataclasses.dataclass(frozen=True)
class CellWiring:
  """One cell as built: the candidates it reads and the candidate it adds."""
  candidate: int                 # the index its output gets among the candidates: L + k
  level: int                     # its output level
  op: str                        # one of OPS
  inputs: Tuple[int, int]        # the two candidates the spec picks
  dangling: Tuple[int, ...]      # unread same-level candidates added to an output cell
  source_levels: Tuple[int, ...]  # the levels of `sources`, in their order
  is_output: bool

  @property
  def sources(self) -> Tuple[int, ...]:
    """Every candidate the cell merges: its two inputs, then the dangling ones."""
    return self.inputs + self.dangling


@dataclasses.dataclass(frozen=True)
class Wiring:
  """A spec wired over levels min..max: its cells in order and the candidate of each output."""
  cells: Tuple[CellWiring, ...]
  outputs: Dict[int, int]  # {level: candidate index of the output cell for that level}


def wiring(specs: Sequence[BlockSpec], min_level: int, max_level: int) -> Wiring:
  """How `specs` wires a min..max pyramid; raises ValueError naming the cell at fault.

  Dangling features, as in the authors' code: an output cell also merges every earlier
  candidate at its level that no cell has read so far (the 7-cell spec adds the P5 input into
  output P5 and the P7 input into output P7).
  """
  if min_level > max_level:
    raise ValueError(f'min_level {min_level} is above max_level {max_level}.')
  if not specs:
    raise ValueError('A block spec needs at least one cell.')
  levels = list(range(min_level, max_level + 1))
  reads = [0] * len(levels)
  cells = []
  for k, spec in enumerate(specs):
    _check_cell(k, spec, min_level, max_level)
    inputs = tuple(spec.inputs)
    for index in inputs:
      reads[index] += 1
    dangling = ()
    if spec.is_output:
      dangling = tuple(index for index, (level, count) in enumerate(zip(levels, reads))
                       if count == 0 and level == spec.level)
      for index in dangling:
        reads[index] += 1
    cells.append(CellWiring(
        candidate=len(levels), level=spec.level, op=spec.op, inputs=inputs, dangling=dangling,
        source_levels=tuple(levels[index] for index in inputs + dangling),
        is_output=spec.is_output))
    levels.append(spec.level)
    reads.append(0)
  return Wiring(cells=tuple(cells), outputs=_output_candidates(cells, min_level, max_level))


def validate(specs: Sequence[BlockSpec], min_level: int, max_level: int) -> None:
  """Raises ValueError naming the cell at fault when `specs` cannot build a min..max pyramid.

  The checks are `wiring`'s, which reads the spec in the same pass; this drops its result.
  """
  wiring(specs, min_level, max_level)


def _check_cell(k: int, spec: BlockSpec, min_level: int, max_level: int) -> None:
  """Cell k's own row: a known op, a level in range, two inputs that exist before it."""
  where = f'cell {k} {tuple(spec)}'
  if spec.op not in OPS:
    raise ValueError(f'{where}: unknown op {spec.op!r}; ops are {sorted(OPS)}.')
  if not min_level <= spec.level <= max_level:
    raise ValueError(f'{where}: level {spec.level} is outside min_level..max_level = '
                     f'{min_level}..{max_level}.')
  if len(spec.inputs) != 2:
    raise ValueError(f'{where}: needs exactly two inputs, got {len(spec.inputs)}.')
  num_inputs = max_level - min_level + 1
  available = num_inputs + k
  for index in spec.inputs:
    if not 0 <= index < available:
      raise ValueError(
          f'{where}: input {index} does not exist yet; cell {k} can read candidates '
          f'0..{available - 1} (the {num_inputs} pyramid inputs P{min_level}..P{max_level}'
          + (f' and cells 0..{k - 1})' if k else ')') + '.')


def _output_candidates(cells: Sequence[CellWiring], min_level: int,
                       max_level: int) -> Dict[int, int]:
  """{level: candidate} of the output cells; exactly one per level of min..max."""
  outputs = {}
  for level in range(min_level, max_level + 1):
    producers = [k for k, cell in enumerate(cells) if cell.is_output and cell.level == level]
    if not producers:
      raise ValueError(f'No output cell produces level {level}; a spec for levels '
                       f'{min_level}..{max_level} needs one output cell per level.')
    if len(producers) > 1:
      raise ValueError(f'Level {level} is produced twice, by output cells {producers}; '
                       'exactly one output cell per level is allowed.')
    outputs[level] = cells[producers[0]].candidate
  return outputs
