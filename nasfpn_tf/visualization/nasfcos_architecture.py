"""Draws a NAS-FCOS pyramid spec in the manner of `architecture.draw_spec` (NAS-FPN's Fig. 7).

One row per level (C2 at the bottom), the backbone features C2-C5 in the left column (green;
grey when no cell reads them), then the cells left to right in spec order at their output
level (the finer input's), labelled by their aggregation. Each arrow is a cell input with its
unary op written on it. The cells that give P3-P5 are red and name their level; dashed arrows
are the other unconsumed cells, added to every output (`nasfcos_specs.wiring`, the released
code's reading).
"""
from typing import Optional

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from nasfpn_tf.decoders import nasfcos_specs as specs_lib
from nasfpn_tf.visualization.architecture import (CELL_COLOR, DANGLING_COLOR, EDGE_COLOR,
                                                  INPUT_COLOR, NODE_RADIUS_PT, NODE_SIZE,
                                                  OUTPUT_COLOR, _connection, _node_key)

UNUSED_COLOR = '#bdbdbd'
OP_LABELS = {'sep_conv_3x3': 'sep3', 'sep_conv_3x3_dil3': 'sep3 d3', 'sep_conv_5x5_dil6': 'sep5 d6',
             'skip': 'skip', 'deform_conv_3x3': 'dcn3'}
AGG_LABELS = {'weighted_sum': 'wsum', 'concat': 'cat'}


def draw_nasfcos_spec(spec: specs_lib.SpecLike, path: str, title: Optional[str] = None) -> None:
  """Validates `spec` (a name in `nasfcos_specs.SPECS` or rows) and writes its graph PNG."""
  spec = specs_lib.resolve(spec)
  wiring = specs_lib.wiring(spec)
  num_inputs = len(specs_lib.POOL_LEVELS)
  positions = [(0, level) for level in specs_lib.POOL_LEVELS] + [
      (k + 1, cell.level) for k, cell in enumerate(wiring.cells)]
  output_level = {index: level for level, index in wiring.outputs.items()}
  fig = Figure(figsize=(1.5 + 1.1 * (len(spec) + 1), 1.6 + 1.1 * num_inputs))
  ax = fig.subplots()

  def arrow(src, dst, dashed, label=None, branch=0):
    (x0, y0), (x1, y1) = positions[src], positions[dst]
    connection = _connection(positions[src], positions[dst], positions)
    bracket = connection.startswith('arc,')
    if bracket:  # Longer same-level detours ride higher, so brackets do not overlap.
      arm = 16 + 11 * (x1 - x0)
      connection = f'arc,angleA=90,angleB=90,armA={arm},armB={arm},rad=8'
    ax.annotate('', xy=positions[dst], xytext=positions[src], zorder=1, arrowprops=dict(
        arrowstyle='-|>', mutation_scale=11, lw=1.6 if dashed else 1.1,
        color=DANGLING_COLOR if dashed else EDGE_COLOR, linestyle='--' if dashed else '-',
        shrinkA=NODE_RADIUS_PT, shrinkB=NODE_RADIUS_PT + 1, connectionstyle=connection))
    if label:
      # Near the arrow's head, so labels of arrows into one cell sit apart; a bracket's on its
      # descent into the cell.
      t = 0.5 if y0 == y1 else 0.7
      x, y = ((x1 - 0.45, y1 + 0.28 + 0.22 * branch) if bracket else
              (x0 + t * (x1 - x0), y0 + t * (y1 - y0)))
      ax.text(x, y, label,
              fontsize=7, ha='center', va='center', color='#263238', zorder=4,
              bbox=dict(boxstyle='round,pad=0.15', fc='white', ec='none', alpha=0.85))

  for cell in wiring.cells:
    for i, (src, op) in enumerate(zip(cell.inputs, cell.ops)):
      if cell.inputs[0] == cell.inputs[1] and i == 1:
        ax.texts[-1].set_text(f'2x {OP_LABELS[op]}' if cell.ops[0] == op else
                              f'{OP_LABELS[cell.ops[0]]} + {OP_LABELS[op]}')
        continue
      arrow(src, cell.index, False, OP_LABELS[op], branch=i)
  for extra in wiring.extras:
    for index in wiring.outputs.values():
      arrow(extra, index, True)

  for index, (x, level) in enumerate(positions):
    if index < num_inputs:
      used = index in wiring.read_pool_inputs
      color, label, text_color = (INPUT_COLOR if used else UNUSED_COLOR), f'C{level}', 'white'
    else:
      cell = wiring.cells[index - num_inputs]
      label = AGG_LABELS[cell.agg]
      if index in output_level:
        color, text_color = OUTPUT_COLOR, 'white'
        label += f'\n→P{output_level[index]}'
      else:
        color, text_color = CELL_COLOR, 'black'
    ax.scatter([x], [level], s=NODE_SIZE * 1.3, c=color, edgecolors='#37474f', linewidths=1.2,
               zorder=2)
    ax.text(x, level, label, ha='center', va='center', fontsize=8, fontweight='bold',
            color=text_color, zorder=3)

  levels = specs_lib.POOL_LEVELS
  ax.set_xlim(-0.7, len(spec) + 0.7)
  ax.set_ylim(levels[0] - 0.7, levels[-1] + 1.1)
  ax.set_yticks(levels)
  ax.set_yticklabels([f'1/{2 ** level}' for level in levels])
  ax.set_xticks(range(len(spec) + 1))
  ax.set_xticklabels(['backbone'] + [f'cell {k}' for k in range(len(spec))], fontsize=8)
  ax.tick_params(length=0)
  for side in ('top', 'right', 'bottom', 'left'):
    ax.spines[side].set_visible(False)
  ax.set_title(title or f'NAS-FCOS pyramid, {len(spec)} cells (P6, P7: stride-2 convs of P5)')
  legend = [_node_key(INPUT_COLOR, 'backbone feature'), _node_key(UNUSED_COLOR, 'unread'),
            _node_key(CELL_COLOR, 'cell'), _node_key(OUTPUT_COLOR, 'output cell'),
            Line2D([], [], color=EDGE_COLOR, label='input (its op)')]
  if wiring.extras:
    legend.append(Line2D([], [], color=DANGLING_COLOR, ls='--', lw=1.6,
                         label='unconsumed: added to outputs'))
  ax.legend(handles=legend, loc='upper center', bbox_to_anchor=(0.5, -0.08), ncol=3,
            frameon=False, fontsize=8)
  fig.text(0.99, 0.01, 'cat: concat + BN-ReLU + grouped 1x1   wsum: weighted sum   '
           'dcn3: deformable 3x3   sepK dD: separable KxK, dilation D', ha='right', fontsize=7,
           color='#616161')
  fig.tight_layout()
  fig.savefig(path, dpi=130)
