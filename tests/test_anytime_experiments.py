"""experiments/anytime.py and stacking.py: their plots from rows, and the specs they accept.
(Both scripts train several demo-scale models even with tiny flags, longer than the suite's
budget for a smoke test: they are run end to end by hand, see the README.)"""
import numpy as np
import pytest

from training_helpers import load_experiment, plotted_lines, read_png, saved_figures

anytime = load_experiment('anytime')
stacking = load_experiment('stacking')


def test_anytime_plot(tmp_path):
  rows = [{'exit': k, 'flops': 1e9 * k, 'latency_ms': 10.0 * k, 'AP': 0.1 * k, 'AP50': 0.2 * k,
           'separate_AP': 0.12 * k} for k in (1, 2, 3)]
  with saved_figures() as figures:
    anytime.draw(rows, str(tmp_path / 'anytime.png'))
  assert read_png(tmp_path / 'anytime.png').shape == (440, 660, 3)  # 6 x 4 in at 110 dpi
  [ax] = figures[0].axes
  # The exits' AP as a line, the separately trained models' as points, both against GFLOPs.
  exits, separate = plotted_lines(ax)
  np.testing.assert_allclose(exits, [[1, 2, 3], [0.1, 0.2, 0.3]])
  np.testing.assert_allclose(separate, [[1, 2, 3], [0.12, 0.24, 0.36]])
  assert [text.get_text() for text in ax.texts] == ['1', '2', '3']  # each exit labelled


def test_stacking_plot(tmp_path):
  rows = [{'spec': spec, 'repeats': r, 'seed': seed, 'AP': 0.1 * r + 0.01 * seed, 'AP50': 0.5,
           'flops': 1e9 * r} for spec in ('nasfpn', 'fpn') for r in (1, 2, 3) for seed in (0, 1)]
  with saved_figures() as figures:
    stacking.draw(rows, str(tmp_path / 'stacking.png'))
  assert read_png(tmp_path / 'stacking.png').shape == (440, 660, 3)
  [ax] = figures[0].axes
  # Per spec, the line through the mean over seeds, then each repeat count's points.
  lines = plotted_lines(ax)
  assert len(lines) == 2 * (1 + 3)
  for spec, (x, y) in zip(('nasfpn', 'fpn'), (lines[0], lines[4])):
    np.testing.assert_allclose(x, [1, 2, 3])
    np.testing.assert_allclose(y, [0.1 * r + 0.005 for r in (1, 2, 3)], err_msg=spec)
  np.testing.assert_allclose(lines[1][1], [0.1, 0.11])  # nasfpn, 1 repeat, seeds 0 and 1
  assert [text.get_text() for text in ax.get_legend().get_texts()] == ['nasfpn', 'fpn']


def test_stacking_names_an_unknown_spec(tmp_path):
  with pytest.raises(ValueError, match=r"--specs \['fpm'\]: not in the block-spec table"):
    stacking.run(tmp_path, ['nasfpn', 'fpm'], [1], [0])
