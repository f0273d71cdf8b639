"""Draws a pyramid spec as a graph in the manner of the NAS-FPN paper's Figure 7.

One row per pyramid level (resolution decreasing upward, P{min} at the bottom), the pyramid
inputs in the left column as green circles, then the cells left to right in spec order, output
cells red. Solid arrows are the cells' two chosen inputs; dashed arrows are the dangling
features the builder adds to an output cell, as `block_specs.wiring` finds them.

`draw_pyramids` draws a stack of different pyramid networks (`build_retinanet.pyramids`, e.g.
NAS-FPN behind FPN), one panel per repeat.

Used by `experiments/draw_architecture.py` (the docs' figures) and by the architecture search
(a drawing each time its best architecture improves).
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from nasfpn_tf.decoders.block_specs import BlockSpec, SpecLike, resolve, resolve_pyramids
from nasfpn_tf.decoders.block_specs import wiring

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
  spec_edges(spec, min_level, max_level)
  # A bare Figure (no pyplot): no global backend or figure registry to set or clean up.
  fig = Figure(figsize=_panel_size(spec, min_level, max_level))
  _draw_panel(fig.subplots(), spec, min_level, max_level,
              title or f'{len(spec)}-cell pyramid network, P{min_level}-P{max_level}')
  _finish(fig, path)


def draw_pyramids(pyramids: Sequence[Optional[SpecLike]], min_level: int, max_level: int,
                  path: str, block_specs: SpecLike = 'nasfpn',
                  title: Optional[str] = None) -> None:
  """A stack of pyramid networks (`build_retinanet.pyramids`, e.g. ['fpn', 'nasfpn']), one
  panel per repeat from the first (top) to the last (bottom), each panel's inputs the previous
  repeat's outputs; entries None draw `block_specs`. Validates the whole stack first
  (`block_specs.resolve_pyramids`), so an unbuildable one is never drawn."""
  specs = resolve_pyramids(pyramids, block_specs, len(pyramids), min_level, max_level)
  sizes = [_panel_size(spec, min_level, max_level) for spec in specs]
  fig = Figure(figsize=(max(w for w, _ in sizes), sum(h for _, h in sizes) + 0.4))
  axes = fig.subplots(len(specs), 1, squeeze=False,
                      gridspec_kw={'height_ratios': [h for _, h in sizes]})[:, 0]
  for k, (ax, spec, entry) in enumerate(zip(axes, specs, pyramids)):
    name = entry if isinstance(entry, str) else (
        f'block_specs {block_specs!r}' if entry is None and isinstance(block_specs, str) else
        'block_specs' if entry is None else 'rows')
    inputs = 'backbone' if k == 0 else f'repeat {k - 1}'
    _draw_panel(ax, spec, min_level, max_level,
                f'repeat {k}: {name}, {len(spec)} cells (inputs: {inputs} outputs)',
                input_label='P' if k == 0 else 'in')
  height = fig.get_figheight()
  if title:
    fig.suptitle(title, fontweight='bold')
  # Room for the title on top and the key at the bottom (inches as figure fractions).
  _finish(fig, path, rect=(0, 0.25 / height, 1, 1 - (0.45 if title else 0.1) / height))


def _panel_size(spec, min_level: int, max_level: int) -> Tuple[float, float]:
  return 1.5 + 0.9 * (len(spec) + 1), 1.6 + 0.95 * (max_level - min_level + 1)


def _finish(fig: Figure, path: str, rect=None) -> None:
  fig.text(0.99, 0.01, 'sum: sum cell   GP: global-pooling cell', ha='right', fontsize=7,
           color='#616161')
  fig.tight_layout(rect=rect)
  fig.savefig(path, dpi=130)


def _draw_panel(ax, spec: Sequence[BlockSpec], min_level: int, max_level: int, title: str,
                input_label: str = 'P') -> None:
  """One pyramid network's graph on `ax` (a resolved, valid spec)."""
  edges = spec_edges(spec, min_level, max_level)
  num_inputs = max_level - min_level + 1
  positions = node_positions(spec, min_level, max_level)
  num_columns = len(spec) + 1
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
      color, label, text_color = INPUT_COLOR, f'{input_label}{level}', 'white'
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
  ax.set_title(title)
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
