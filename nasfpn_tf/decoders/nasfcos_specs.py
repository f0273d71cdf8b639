"""NAS-FCOS pyramids as data: lists of basic-block specs read by one builder (`NASFCOSFPN`).

NAS-FCOS (Wang et al., CVPR 2020, §3.2.1) builds its pyramid from 7 basic blocks ("cells"). The
sampling pool starts as the backbone features C2..C5 (indices 0..3); cell k reads two pool
entries `inputs`, applies one unary op from `OPS` to each, merges the two by `agg` (one of
`AGGS`) and appends its output as index 4 + k. A cell's output is at the finer of its inputs'
levels (the coarser result is upsampled bilinearly, as the released code's `resize`).

The outputs follow the authors' released code (`MicroDecoder_v2`, Lausannen/NAS-FCOS), which
differs from the paper's text:
- P3, P4, P5 are the last three cells that no later cell reads ("unconsumed"), the LAST one
  giving P3, the one before it P4, the one before that P5 (the paper: "the last three basic
  block outputs {x5, x6, x7} as {p3, p4, p5}");
- every other unconsumed cell is resized to each of them and added (paper eq. 1), then each
  output is resized bilinearly to its level's size;
- a spec with fewer than three unconsumed cells cannot build (the released code's `judge`).

Names and their order are the released code's (`genotypes.OP_NAMES`, `AGG_NAMES`), so an action
index of the authors' configs is an index here. Plain data, no TensorFlow.
"""
import dataclasses
from typing import Dict, NamedTuple, Sequence, Tuple, Union

# Unary ops (paper Table 1), in the released code's order.
OPS = ('sep_conv_3x3', 'sep_conv_3x3_dil3', 'sep_conv_5x5_dil6', 'skip', 'deform_conv_3x3')
# Aggregations: learned per-channel weighted sum ('psum') or concatenation + 1x1 ('cat').
AGGS = ('weighted_sum', 'concat')
# The levels of the sampling pool's backbone features C2..C5 (indices 0..3).
POOL_LEVELS = (2, 3, 4, 5)
# The levels the cells give, finest first: P3 from the last unconsumed cell, P4, P5.
CELL_OUTPUT_LEVELS = (3, 4, 5)


class CellSpec(NamedTuple):
  inputs: Tuple[int, int]   # two pool indices (may be equal)
  ops: Tuple[str, str]      # one of OPS for each input
  agg: str                  # one of AGGS


def _cell(inputs, ops, agg):
  return CellSpec(tuple(inputs), tuple(OPS[op] for op in ops), AGGS[agg])


# The published NAS-FCOS pyramid: `SEARCH.DECODER.CONFIG` of the authors' configs/search/
# R_50_NAS_densebox.yaml (the same for and MobileNetV2), rows
# [input0, input1, op0, op1, agg] as action indices: every cell concatenates; deformable 3x3 on 12
# of the 14 branches (paper Fig. 4). C2 is never read.
NASFCOS_FPN = tuple(_cell(row[:2], row[2:4], row[4]) for row in (
    (3, 3, 4, 4, 1),   # 4: C5, C5
    (3, 3, 4, 4, 1),   # 5: C5, C5
    (4, 3, 4, 3, 1),   # 6: cell 4, C5 (skip) -- unconsumed, added to P3-P5
    (1, 3, 4, 3, 1),   # 7: C3, C5 (skip)
    (5, 3, 4, 4, 1),   # 8: cell 5, C5 -> P5
    (4, 7, 4, 4, 1),   # 9: cell 4, cell 7 -> P4
    (7, 2, 4, 4, 1),   # 10: cell 7, C4 -> P3
))

SPECS = {'nasfcos_fpn': NASFCOS_FPN}

SpecLike = Union[str, Sequence[Sequence]]


def resolve(specs: SpecLike) -> Tuple[CellSpec, ...]:
  """A spec from its name in `SPECS` or from rows ((in0, in1), (op0, op1), agg) or dicts."""
  if isinstance(specs, str):
    if specs not in SPECS:
      raise ValueError(f'Unknown NAS-FCOS pyramid spec {specs!r}; known specs: {sorted(SPECS)}.')
    return SPECS[specs]
  cells = []
  for k, row in enumerate(specs):
    if isinstance(row, dict):
      row = (row['inputs'], row['ops'], row['agg'])
    if len(row) != 3 or len(row[0]) != 2 or len(row[1]) != 2:
      raise ValueError(f'cell {k}: a NAS-FCOS cell spec is ((input0, input1), (op0, op1), agg), '
                       f'got {row!r}.')
    cells.append(CellSpec(tuple(int(i) for i in row[0]), tuple(str(o) for o in row[1]),
                          str(row[2])))
  return tuple(cells)


def to_config(specs: Sequence[CellSpec]):
  """JSON-friendly rows, the inverse of `resolve`."""
  return [[list(s.inputs), list(s.ops), s.agg] for s in specs]


@dataclasses.dataclass(frozen=True)
class CellWiring:
  """One cell as built."""
  index: int                       # its pool index: len(POOL_LEVELS) + k
  level: int                       # its output level: the finer input's
  inputs: Tuple[int, int]
  input_levels: Tuple[int, int]
  ops: Tuple[str, str]
  agg: str


@dataclasses.dataclass(frozen=True)
class Wiring:
  """A spec's cells, the pool index of each cell output level and the extra (added) cells."""
  cells: Tuple[CellWiring, ...]
  outputs: Dict[int, int]    # {3: pool index, 4: ..., 5: ...}
  extras: Tuple[int, ...]    # the other unconsumed cells, added to every output
  read_pool_inputs: Tuple[int, ...]  # backbone pool indices some cell reads


def wiring(specs: Sequence[CellSpec]) -> Wiring:
  """How `specs` wires the pyramid (the released code's reading); ValueError naming the cell at
  fault."""
  if not specs:
    raise ValueError('A NAS-FCOS pyramid spec needs at least one cell.')
  levels = list(POOL_LEVELS)
  unconsumed, read, cells = [], set(), []
  for k, spec in enumerate(specs):
    _check_cell(k, spec)
    for index in spec.inputs:
      read.add(index)
      if index in unconsumed:
        unconsumed.remove(index)
    index = len(levels)
    input_levels = tuple(levels[i] for i in spec.inputs)
    cells.append(CellWiring(index=index, level=min(input_levels), inputs=tuple(spec.inputs),
                            input_levels=input_levels, ops=tuple(spec.ops), agg=spec.agg))
    levels.append(min(input_levels))
    unconsumed.append(index)
  num_outputs = len(CELL_OUTPUT_LEVELS)
  if len(unconsumed) < num_outputs:
    names = [f'cell {i - len(POOL_LEVELS)}' for i in unconsumed]
    raise ValueError(
        f'Only {len(unconsumed)} cells ({", ".join(names)}) are read by no later cell; the '
        f'pyramid takes P3-P5 from the last {num_outputs} such cells (the released code rejects '
        'the spec too): let fewer cells read the last cells.')
  last = unconsumed[-num_outputs:]
  outputs = {level: index for level, index in zip(CELL_OUTPUT_LEVELS, reversed(last))}
  return Wiring(cells=tuple(cells), outputs=outputs, extras=tuple(unconsumed[:-num_outputs]),
                read_pool_inputs=tuple(sorted(i for i in read if i < len(POOL_LEVELS))))


def validate(specs: Sequence[CellSpec]) -> None:
  """Raises ValueError naming the cell at fault when `specs` cannot build."""
  wiring(specs)


def _check_cell(k: int, spec: CellSpec) -> None:
  where = f'cell {k} {tuple(spec)}'
  if len(spec.inputs) != 2 or len(spec.ops) != 2:
    raise ValueError(f'{where}: needs exactly two inputs and two ops.')
  for op in spec.ops:
    if op not in OPS:
      raise ValueError(f'{where}: unknown op {op!r}; ops are {list(OPS)}.')
  if spec.agg not in AGGS:
    raise ValueError(f'{where}: unknown aggregation {spec.agg!r}; aggregations are {list(AGGS)}.')
  available = len(POOL_LEVELS) + k
  for index in spec.inputs:
    if not 0 <= index < available:
      raise ValueError(
          f'{where}: input {index} does not exist yet; cell {k} can read pool entries '
          f'0..{available - 1} (C2..C5 as 0..3' + (f', cells 0..{k - 1} as 4..{available - 1})'
                                                   if k else ')') + '.')


# ---------------------------------------------------------------- the head (paper §3.2.2-3.2.3)
# The released head (`MicroHead_v2`) is a sequence of NUM_HEAD_LAYERS ops per tower (class and
# box towers alike), each with GroupNorm(32) and ReLU, not the paper's cells with aggregation
# (§3.2.2, Fig. 3); the first `unshared` layers have their own weights at each level, the rest
# are shared by all levels (§3.2.3). Names in the released order (`genotypes.HEAD_OP_NAMES`).
HEAD_OPS = ('conv_1x1', 'conv_3x3', 'sep_conv_3x3', 'sep_conv_3x3_dil3', 'skip',
            'deform_conv_3x3')
NUM_HEAD_LAYERS = 6


class HeadSpec(NamedTuple):
  ops: Tuple[str, ...]   # NUM_HEAD_LAYERS names of HEAD_OPS, input first
  unshared: int          # leading layers with per-level weights, 0..len(ops)


# The published head: `[0], [5, 1, 5, 0, 4, 4]` after the pyramid rows of the authors'
# configs/search/R_50_NAS_head.yaml: every layer shared; deformable 3x3, conv 3x3, deformable 3x3,
# conv 1x1, skip, skip.
NASFCOS_HEAD = HeadSpec(tuple(HEAD_OPS[i] for i in (5, 1, 5, 0, 4, 4)), 0)

HEAD_SPECS = {'nasfcos_head': NASFCOS_HEAD}


def resolve_head(spec) -> HeadSpec:
  """A head spec from its name in `HEAD_SPECS`, a HeadSpec, [ops, unshared] or a dict."""
  if isinstance(spec, str):
    if spec not in HEAD_SPECS:
      raise ValueError(f'Unknown NAS-FCOS head spec {spec!r}; known: {sorted(HEAD_SPECS)}.')
    return HEAD_SPECS[spec]
  if isinstance(spec, dict):
    spec = (spec['ops'], spec['unshared'])
  if len(spec) != 2:
    raise ValueError(f'A NAS-FCOS head spec is (ops, unshared), got {spec!r}.')
  return HeadSpec(tuple(str(op) for op in spec[0]), int(spec[1]))


def validate_head(spec: HeadSpec) -> None:
  """Raises ValueError naming the layer at fault."""
  for i, op in enumerate(spec.ops):
    if op not in HEAD_OPS:
      raise ValueError(f'head layer {i}: unknown op {op!r}; head ops are {list(HEAD_OPS)}.')
  if not 0 <= spec.unshared <= len(spec.ops):
    raise ValueError(f'head: unshared={spec.unshared} is outside 0..{len(spec.ops)}, the '
                     'number of layers.')
