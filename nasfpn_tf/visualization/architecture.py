"""Draws a pyramid spec as a graph in the manner of the NAS-FPN paper's Figure 7.

One row per pyramid level (resolution decreasing upward, P{min} at the bottom), the pyramid
inputs in the left column as green circles, then the cells left to right in spec order, output
cells red. Solid arrows are the cells' two chosen inputs; dashed arrows are the dangling
features the builder adds to an output cell, as `block_specs.wiring` finds them.

Used by `experiments/draw_architecture.py` (the docs' figures) and by the architecture search
(a drawing each time its best architecture improves).
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from nasfpn_tf.decoders.block_specs import BlockSpec, SpecLike, resolve, wiring

INPUT_COLOR = '#4caf50'
OUTPUT_COLOR = '#e53935'
CELL_COLOR = '#eeeeee'
EDGE_COLOR = '#455a64'
DANGLING_COLOR = '#1e88e5'
OP_LABELS = {'sum': 'sum', 'global_pooling': 'GP'}
NODE_SIZE = 1100  # scatter marker area in pt^2: a circle of radius ~16.6 pt.
NODE_RADIUS_PT = NODE_SIZE ** 0.5 / 2
BRACKET_PT = 38  # How far above its row a same-level arrow detours round nodes in its way.


class Edge(NamedTuple):
  src: int   # candidate index: 0..L-1 the pyramid inputs, L+k cell k.
  dst: int   # candidate index of the reading cell.
  kind: str  # 'input' (one of the cell's two chosen inputs) or 'dangling'.


def spec_edges(spec: Sequence[BlockSpec], min_level: int, max_level: int) -> List[Edge]:
  """The drawing's edges: the builder's wiring, so the figure shows what is built.

  Raises the ValueError of `block_specs.wiring` for a spec that cannot build.
  """
  edges = []
  for cell in wiring(spec, min_level, max_level).cells:
    edges += [Edge(index, cell.candidate, 'input') for index in cell.inputs]
    edges += [Edge(index, cell.candidate, 'dangling') for index in cell.dangling]
  return edges


def node_positions(spec: Sequence[BlockSpec], min_level: int,
                   max_level: int) -> List[Tuple[int, int]]:
  """(column, level) per candidate: inputs in column 0, cell k in column k + 1."""
  inputs = [(0, level) for level in range(min_level, max_level + 1)]
  return inputs + [(k + 1, cell.level) for k, cell in enumerate(spec)]


def _connection(src: Tuple[int, int], dst: Tuple[int, int], positions) -> str:
  """Matplotlib connection style for an arrow that must not pass through other nodes.

  A straight line when nothing is in its way; a rounded bracket over the row for a same-level
  arrow skipping nodes; a gentle arc for a slanted one.
  """
  (x0, y0), (x1, y1) = src, dst
  # A node is in the way if it lies strictly between the ends within ~0.35 rows of the line.
  blocked = any(
      x0 < x < x1 and abs((y - y0) * (x1 - x0) - (y1 - y0) * (x - x0)) < 0.35 * (x1 - x0)
      for x, y in positions)
  if not blocked:
    return 'arc3,rad=0'
  if y0 == y1:
    return f'arc,angleA=90,angleB=90,armA={BRACKET_PT},armB={BRACKET_PT},rad=8'
  return f'arc3,rad={0.25 if y1 > y0 else -0.25}'


def _node_key(color: str, label: str) -> Line2D:
  return Line2D([], [], marker='o', ls='', ms=10, mfc=color, mec='#37474f', label=label)


def draw_spec(spec: SpecLike, min_level: int, max_level: int, path: str,
              title: Optional[str] = None) -> None:
  """Validates `spec` (a name in SPECS or rows) for levels min..max and writes its graph PNG.

  Raises the ValueError of `block_specs.wiring` first, so an unbuildable spec is never drawn.
  """
  spec = resolve(spec, min_level, max_level)
  edges = spec_edges(spec, min_level, max_level)
  num_inputs = max_level - min_level + 1
  positions = node_positions(spec, min_level, max_level)
  num_columns = len(spec) + 1
  # A bare Figure (no pyplot): no global backend or figure registry to set or clean up.
  fig = Figure(figsize=(1.5 + 0.9 * num_columns, 1.6 + 0.95 * num_inputs))
  ax = fig.subplots()

  for src, dst, kind in edges:
    dangling = kind == 'dangling'
    ax.annotate(
        '', xy=positions[dst], xytext=positions[src],
        arrowprops=dict(
            arrowstyle='-|>', mutation_scale=11, lw=1.6 if dangling else 1.1,
            color=DANGLING_COLOR if dangling else EDGE_COLOR, linestyle='--' if dangling else '-',
            shrinkA=NODE_RADIUS_PT, shrinkB=NODE_RADIUS_PT + 1,
            connectionstyle=_connection(positions[src], positions[dst], positions)),
        zorder=1)

  for index, (x, level) in enumerate(positions):
    if index < num_inputs:
      color, label, text_color = INPUT_COLOR, f'P{level}', 'white'
    else:
      cell = spec[index - num_inputs]
      color = OUTPUT_COLOR if cell.is_output else CELL_COLOR
      label = OP_LABELS.get(cell.op, cell.op)
      text_color = 'white' if cell.is_output else 'black'
    ax.scatter([x], [level], s=NODE_SIZE, c=color, edgecolors='#37474f', linewidths=1.2,
               zorder=2)
    ax.text(x, level, label, ha='center', va='center', fontsize=9, fontweight='bold',
            color=text_color, zorder=3)

  ax.set_xlim(-0.7, num_columns - 0.3)
  ax.set_ylim(min_level - 0.7, max_level + 0.7)
  ax.set_yticks(range(min_level, max_level + 1))
  ax.set_yticklabels([f'P{level}\n(1/{2 ** level})' for level in range(min_level, max_level + 1)])
  ax.set_xticks(range(num_columns))
  ax.set_xticklabels(['inputs'] + [f'cell {k}' for k in range(len(spec))], fontsize=8)
  ax.tick_params(length=0)
  for side in ('top', 'right', 'bottom', 'left'):
    ax.spines[side].set_visible(False)
  ax.set_title(title or f'{len(spec)}-cell pyramid network, P{min_level}-P{max_level}')
  legend = [_node_key(INPUT_COLOR, 'input')]
  if not all(cell.is_output for cell in spec):
    legend.append(_node_key(CELL_COLOR, 'intermediate cell'))
  legend += [_node_key(OUTPUT_COLOR, 'output cell'),
             Line2D([], [], color=EDGE_COLOR, label='cell input')]
  if any(edge.kind == 'dangling' for edge in edges):
    legend.append(Line2D([], [], color=DANGLING_COLOR, ls='--', lw=1.6,
                         label='dangling feature (added to output)'))
  ax.legend(handles=legend, loc='upper center', bbox_to_anchor=(0.5, -0.1), ncol=len(legend),
            frameon=False, fontsize=8, handletextpad=0.4, columnspacing=1.2)
  fig.text(0.99, 0.01, 'sum: sum cell   GP: global-pooling cell', ha='right', fontsize=7,
           color='#616161')
  fig.tight_layout()
  fig.savefig(path, dpi=130)
