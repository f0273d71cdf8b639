"""experiments/search_compare.py: its rows and plot, read from searches' journals."""
import numpy as np
import pytest

from nasfpn_tf.search import runner
from nasfpn_tf.search.journal import Journal
from nasfpn_tf.search.space import SearchSpace
from nasfpn_tf.search import search_dir as search_dir_lib
from training_helpers import (drive_in_process, load_experiment, plotted_lines, read_png,
                              saved_figures)

search_compare = load_experiment('search_compare')
SPACE = SearchSpace(num_cells=2, min_level=3, max_level=4)


def test_rows_and_plot_from_the_journals(tmp_path):
  for algorithm, num_trials in (('random', 12), ('evolution', 9)):
    settings = runner.SearchSettings(search_dir=str(tmp_path / algorithm), algorithm=algorithm,
                                     num_trials=num_trials, proxy='synthetic', space=SPACE)
    runner.check_search_dir(settings)
    drive_in_process(runner.ControllerSearcher(settings, log=lambda line: None))
  rows = search_compare.compare_rows(tmp_path, ['random', 'evolution', 'ppo'], window=4)
  assert [row['algorithm'] for row in rows] == ['random', 'evolution']  # ppo never ran
  for row, num_trials in zip(rows, (12, 9)):
    records = Journal(tmp_path / row['algorithm'] / search_dir_lib.TRIALS_FILE).read()
    rewards = [r['reward'] for r in records]
    assert row['num_trials'] == num_trials
    assert row['best_reward'] == max(rewards)
    assert np.isclose(row['moving_average_reward'], np.mean(rewards[-4:]))
    assert row['num_unique'] == len({r['key'] for r in records})
  path = tmp_path / 'compare.png'
  with saved_figures() as figures:
    search_compare.draw(tmp_path, ['random', 'evolution', 'ppo'], 4, str(path))
  assert read_png(path).shape == (440, 1320, 3)  # 12 x 4 in at 110 dpi
  # Three panels, a line per algorithm that ran: best so far, moving average, unique samples.
  best_ax, average_ax, unique_ax = figures[0].axes
  for ax in (best_ax, average_ax, unique_ax):
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['random', 'evolution']
  for i, algorithm in enumerate(('random', 'evolution')):
    records = Journal(tmp_path / algorithm / search_dir_lib.TRIALS_FILE).read()
    rewards = [r['reward'] for r in records]
    np.testing.assert_array_equal(plotted_lines(best_ax)[i][1], np.maximum.accumulate(rewards))
    np.testing.assert_allclose(plotted_lines(average_ax)[i][1][-1], np.mean(rewards[-4:]))
    np.testing.assert_array_equal(plotted_lines(unique_ax)[i][1],
                                  [len({r['key'] for r in records[:n]})
                                   for n in range(1, len(records) + 1)])


search_retrain = load_experiment('search_retrain')


def test_retrain_takes_the_best_line_over_the_searches(tmp_path):
  space = SearchSpace()  # demo.gin's levels, P3-P7
  dirs = []
  for algorithm, num_trials in (('random', 5), ('evolution', 4)):
    settings = runner.SearchSettings(search_dir=str(tmp_path / algorithm), algorithm=algorithm,
                                     num_trials=num_trials, proxy='synthetic', space=space)
    runner.check_search_dir(settings)
    drive_in_process(runner.ControllerSearcher(settings, log=lambda line: None))
    dirs.append(settings.search_dir)
  best, rewards = search_retrain.best_record(dirs)
  records = [r for d in dirs for r in Journal(f'{d}/{search_dir_lib.TRIALS_FILE}').read()]
  assert best['reward'] == max(r['reward'] for r in records)
  assert rewards == {r['key']: r['reward'] for r in records}
  rows = [{'name': name, 'AP': 0.1 * i + 0.01 * seed} for i, name in
          enumerate(('searched', 'nasfpn', 'fpn')) for seed in (0, 1)]
  with saved_figures() as figures:
    search_retrain.draw(rows, str(tmp_path / 'retrain.png'))
  assert read_png(tmp_path / 'retrain.png').shape == (440, 550, 3)  # 5 x 4 in at 110 dpi
  [ax] = figures[0].axes
  # A bar at each architecture's mean AP over seeds, a point per seed.
  np.testing.assert_allclose([bar.get_height() for bar in ax.patches], [0.005, 0.105, 0.205])
  np.testing.assert_allclose([y for _, y in plotted_lines(ax)], [[0, 0.01], [0.1, 0.11],
                                                                [0.2, 0.21]])
  assert [t.get_text() for t in ax.get_xticklabels()] == ['searched', 'nasfpn', 'fpn']


def test_retrain_refuses_a_dir_without_a_search_or_over_other_levels(tmp_path):
  with pytest.raises(ValueError, match=r'--search_dirs: .*nothing.* holds no search'):
    search_retrain.best_record([str(tmp_path / 'nothing')])
  settings = runner.SearchSettings(search_dir=str(tmp_path / 'p3p4'), algorithm='random',
                                   num_trials=1, proxy='synthetic', space=SPACE)
  runner.check_search_dir(settings)
  with pytest.raises(ValueError, match=r"p3p4 searched levels \{'max_level': 4, 'min_level': 3\}"):
    search_retrain.best_record([settings.search_dir])
