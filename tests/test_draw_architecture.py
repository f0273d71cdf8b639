"""The architecture drawing: its graph matches the builder's wiring, and each spec renders."""

import matplotlib.colors
import pytest

from nasfpn_tf.decoders.block_specs import NASFPN, BlockSpec, resolve
from nasfpn_tf.visualization import architecture
from training_helpers import load_experiment, read_png, saved_figures

draw_architecture = load_experiment('draw_architecture')


def test_nasfpn_edges_hand_counted():
  # Candidates 0..4 are P3..P7, cell k is 5 + k. Two inputs per cell, plus the dangling P5 and P7
  # inputs, unread until the P5 (cell 4) and P7 (cell 5) output cells.
  expected = [
      (1, 5, 'input'), (3, 5, 'input'),
      (1, 6, 'input'), (5, 6, 'input'),
      (0, 7, 'input'), (6, 7, 'input'),
      (6, 8, 'input'), (7, 8, 'input'),
      (7, 9, 'input'), (8, 9, 'input'), (2, 9, 'dangling'),
      (6, 10, 'input'), (9, 10, 'input'), (4, 10, 'dangling'),
      (9, 11, 'input'), (10, 11, 'input'),
  ]
  assert [tuple(edge) for edge in architecture.spec_edges(NASFPN, 3, 7)] == expected


@pytest.mark.parametrize('name,min_level,max_level', [
    ('nasfpn', 3, 7), ('nasfpn_lite', 3, 6), ('fpn', 3, 7), ('fpn', 2, 5)])
def test_draws_png(tmp_path, name, min_level, max_level):
  """The picture shows a node per input level and cell where node_positions puts it, coloured
  as input, intermediate or output cell, and an arrow per edge of spec_edges, dangling ones in
  their own colour."""
  path = tmp_path / f'{name}.png'
  spec = resolve(name, min_level, max_level)
  with saved_figures() as figures:
    architecture.draw_spec(spec, min_level, max_level, str(path), title=name)
  [figure] = figures
  width, height = figure.get_size_inches() * 130  # saved at 130 dpi
  assert read_png(path).shape == (int(height), int(width), 3)  # as matplotlib truncates
  [ax] = figure.axes
  num_inputs = max_level - min_level + 1
  positions = architecture.node_positions(spec, min_level, max_level)
  assert [tuple(c.get_offsets()[0]) for c in ax.collections] == [tuple(p) for p in positions]
  expected_colors = [architecture.INPUT_COLOR] * num_inputs + [
      architecture.OUTPUT_COLOR if cell.is_output else architecture.CELL_COLOR for cell in spec]
  assert [tuple(c.get_facecolor()[0]) for c in ax.collections] == [
      matplotlib.colors.to_rgba(color) for color in expected_colors]
  edges = architecture.spec_edges(spec, min_level, max_level)
  arrows = [text for text in ax.texts if getattr(text, 'arrow_patch', None) is not None]
  assert len(arrows) == len(edges)
  dangling = matplotlib.colors.to_rgba(architecture.DANGLING_COLOR)
  assert sum(arrow.arrow_patch.get_edgecolor() == dangling for arrow in arrows) == sum(
      edge.kind == 'dangling' for edge in edges)


def test_natural_levels():
  assert draw_architecture.natural_levels('nasfpn') == (3, 7)
  assert draw_architecture.natural_levels('nasfpn_lite') == (3, 6)
  assert draw_architecture.natural_levels('fpn') == (3, 7)


def test_bad_spec_raises(tmp_path):
  reads_the_future = NASFPN[:2] + (BlockSpec(3, 'sum', (0, 12), True),) + NASFPN[3:]
  with pytest.raises(ValueError, match='does not exist yet'):
    architecture.draw_spec(reads_the_future, 3, 7, str(tmp_path / 'bad.png'))
  with pytest.raises(ValueError, match='No output cell produces level 8'):
    architecture.draw_spec(NASFPN, 3, 8, str(tmp_path / 'bad.png'))
  assert not (tmp_path / 'bad.png').exists()
