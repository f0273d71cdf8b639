"""experiments/search_compare.py: its rows and plot, read from searches' journals."""
import json

import numpy as np
import pytest

from nasfpn_tf.checkpointing import CheckpointMismatchError
from nasfpn_tf.decoders import block_specs as block_specs_lib
from nasfpn_tf.search import runner, trials
from nasfpn_tf.search.journal import Journal
from nasfpn_tf.search.space import SearchSpace
from nasfpn_tf.search import search_dir as search_dir_lib
from training_helpers import (drive_in_process, load_experiment, plotted_lines, read_png,
                              run_synthetic_search, saved_figures, tiny_bindings)

search_compare = load_experiment('search_compare')
SPACE = SearchSpace(num_cells=2, min_level=3, max_level=4)


def test_rows_and_plot_from_the_journals(tmp_path):
  for algorithm, num_trials in (('random', 12), ('evolution', 9)):
    run_synthetic_search(tmp_path / algorithm, algorithm, num_trials, SPACE)
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


def test_an_algorithm_at_a_table_starts_from_it_in_a_dir_of_its_own(tmp_path):
  settings = search_compare.search_settings(tmp_path, 'ppo@nasfpn', 8, proxy='synthetic',
                                            seed=3)
  assert (settings.algorithm, settings.init_block_specs, settings.num_trials, settings.seed) == (
      'ppo', 'nasfpn', 8, 3)
  assert settings.search_dir == str(tmp_path / 'ppo@nasfpn')
  assert settings.proxy_dir == str(tmp_path / 'proxy')
  plain = search_compare.search_settings(tmp_path, 'random', 8, proxy='synthetic', seed=3)
  assert (plain.algorithm, plain.init_block_specs) == ('random', None)
  # What the search does with it: PPO fitted its policy to the table first, so its samples
  # mostly take the table's decisions (a uniform draw agrees with about a quarter of them).
  runner.check_search_dir(settings)
  drive_in_process(runner.ControllerSearcher(settings, log=lambda line: None))
  table = SearchSpace().encode('nasfpn')
  records = Journal(tmp_path / 'ppo@nasfpn' / search_dir_lib.TRIALS_FILE).read()
  assert len(records) == 8
  assert np.mean([np.mean(np.equal(r['actions'], table)) for r in records]) > 0.7


def test_lead_compares_at_the_same_budget_after_the_burn_in(tmp_path):
  rng = np.random.default_rng(1)
  better = list(rng.uniform(0.0, 0.1, 5)) + list(rng.uniform(0.2, 0.3, 30))
  baseline = list(rng.uniform(0.1, 0.2, 40))  # 5 samples more: cut to the other's 35
  row = search_compare.lead(better, baseline, burn_in=5)
  assert row['samples'] == '6..35'
  assert row['mean'] == pytest.approx(np.mean(better[5:]))
  assert row['baseline_mean'] == pytest.approx(np.mean(baseline[5:35]))
  assert row['difference'] == pytest.approx(row['mean'] - row['baseline_mean'])
  assert 0 < row['interval'][0] < row['difference'] < row['interval'][1]
  assert row['p_value'] < 1e-6  # every later sample above every baseline one
  assert search_compare.lead(better, baseline, burn_in=5) == row  # seeded: it replays
  # The same rewards lead nowhere: the interval holds 0, and p is about one half.
  same = search_compare.lead(baseline, baseline, burn_in=5)
  assert same['difference'] == 0 and same['interval'][0] < 0 < same['interval'][1]
  assert 0.4 < same['p_value'] < 0.6
  # By hand: [3, 4] against [1, 2]: U = 4, the largest; of the C(4, 2) = 6 equally likely
  # splits of the ranks, only this one reaches it: p = 1/6.
  assert search_compare.lead([0.3, 0.4], [0.1, 0.2], burn_in=0)['p_value'] == pytest.approx(1 / 6)
  with pytest.raises(ValueError, match=r'--burn_in=9 leaves 1 of 10 samples'):
    search_compare.lead([0.1] * 10, [0.2] * 12, burn_in=9)
  # From the journals: each algorithm but the baseline, against it.
  for algorithm, num_trials in (('random', 8), ('evolution', 6)):
    run_synthetic_search(tmp_path / algorithm, algorithm, num_trials, SPACE)
  rows = search_compare.leads(tmp_path, ['random', 'evolution', 'ppo'], 'random', burn_in=2)
  assert [(r['algorithm'], r['baseline'], r['samples']) for r in rows] == [
      ('evolution', 'random', '3..6')]
  rewards = {a: [r['reward'] for r in Journal(tmp_path / a / search_dir_lib.TRIALS_FILE).read()]
             for a in ('random', 'evolution')}
  assert rows[0]['mean'] == pytest.approx(np.mean(rewards['evolution'][2:6]))
  assert rows[0]['baseline_mean'] == pytest.approx(np.mean(rewards['random'][2:6]))
  assert search_compare.leads(tmp_path, ['evolution'], 'ppo', burn_in=2) == []  # never ran


def test_learning_tests_a_search_s_later_samples_against_its_first(tmp_path):
  rng = np.random.default_rng(2)
  rising = list(rng.uniform(0.0, 0.1, 10)) + list(rng.uniform(0.2, 0.3, 25))
  row = search_compare.learning(rising, burn_in=10)
  assert (row['samples'], row['baseline_samples']) == ('11..35', '1..10')
  assert row['mean'] == pytest.approx(np.mean(rising[10:]))
  assert row['baseline_mean'] == pytest.approx(np.mean(rising[:10]))
  assert 0 < row['interval'][0] < row['difference'] < row['interval'][1]
  assert row['p_value'] < 1e-4  # every later sample above every first one
  # A flat series (random search's kind) learns nothing; a falling one even less.
  first = list(rng.permutation(np.linspace(0.1, 0.2, 10)))
  flat_row = search_compare.learning(first * 3, burn_in=10)  # later: the same values twice
  assert flat_row['difference'] == pytest.approx(0)
  assert flat_row['interval'][0] < 0 < flat_row['interval'][1]
  assert 0.4 < flat_row['p_value'] < 0.6
  falling = rising[10:20] + rising[:10] + rising[:10]
  assert search_compare.learning(falling, burn_in=10)['p_value'] > 0.999
  # By hand: [3, 4] after [1, 2]: p = 1/6 as for `lead`.
  assert search_compare.learning([0.1, 0.2, 0.3, 0.4], burn_in=2)['p_value'] == pytest.approx(
      1 / 6)
  with pytest.raises(ValueError, match=r'--burn_in=20 splits 21 samples into 20 and 1'):
    search_compare.learning([0.1] * 21, burn_in=20)
  # From the journals: one row per search that ran, its own rewards split at burn_in.
  run_synthetic_search(tmp_path / 'random', 'random', 6, SPACE)
  rewards = [r['reward'] for r in Journal(tmp_path / 'random' / search_dir_lib.TRIALS_FILE).read()]
  rows = search_compare.learnings(tmp_path, ['random', 'ppo'], burn_in=2)
  assert [(r['algorithm'], r['learning'], r['samples']) for r in rows] == [
      ('random', True, '3..6')]
  assert rows[0]['mean'] == pytest.approx(np.mean(rewards[2:]))
  assert rows[0]['baseline_mean'] == pytest.approx(np.mean(rewards[:2]))


search_retrain = load_experiment('search_retrain')


@pytest.fixture(scope='module')
def searches(tmp_path_factory):
  """A random and an evolution search over demo.gin's levels (P3-P7) on the synthetic proxy (the
  tests only read them): their dirs and journal lines."""
  tmp_path = tmp_path_factory.mktemp('searches')
  space = SearchSpace()
  dirs = []
  for algorithm, num_trials in (('random', 5), ('evolution', 4)):
    dirs.append(run_synthetic_search(tmp_path / algorithm, algorithm, num_trials, space).search_dir)
  return dirs, [r for d in dirs for r in Journal(f'{d}/{search_dir_lib.TRIALS_FILE}').read()]


def test_retrain_takes_the_best_lines_over_the_searches_one_per_key(tmp_path, searches):
  dirs, records = searches
  best_of_key = {}
  for record in records:
    best_of_key[record['key']] = max(best_of_key.get(record['key'], -1.0), record['reward'])
  top, rewards = search_retrain.top_records(dirs, 3)
  assert rewards == best_of_key
  assert [r['reward'] for r in top] == sorted(best_of_key.values(), reverse=True)[:3]
  assert len({r['key'] for r in top}) == 3
  assert search_retrain.top_records(dirs, 100)[0][0] == top[0]  # fewer keys than asked: all
  rows = [{'name': name, 'AP': 0.1 * i + 0.01 * seed} for i, name in
          enumerate(('searched1', 'nasfpn', 'fpn')) for seed in (0, 1)]
  with saved_figures() as figures:
    search_retrain.draw(rows, str(tmp_path / 'retrain.png'))
  assert read_png(tmp_path / 'retrain.png').shape == (440, 550, 3)  # 5 x 4 in at 110 dpi
  [ax] = figures[0].axes
  # A bar at each architecture's mean AP over seeds, a point per seed.
  np.testing.assert_allclose([bar.get_height() for bar in ax.patches], [0.005, 0.105, 0.205])
  np.testing.assert_allclose([y for _, y in plotted_lines(ax)], [[0, 0.01], [0.1, 0.11],
                                                                [0.2, 0.21]])
  assert [t.get_text() for t in ax.get_xticklabels()] == ['searched1', 'nasfpn', 'fpn']


def test_retrain_trains_the_top_k_once_then_the_best_of_them_and_the_baselines_per_seed(
    tmp_path, monkeypatch, searches):
  """The top 3 by proxy reward with the first seed; the one of highest AP among them (rank 2
  here) with the other seeds, NAS-FPN and FPN with every seed; nothing trained twice."""
  dirs, _ = searches
  top, _ = search_retrain.top_records(dirs, 3)
  ap_of = {'searched1': 0.30, 'searched2': 0.40, 'searched3': 0.20, 'nasfpn': 0.35, 'fpn': 0.25}
  trained = []

  # The model dirs of searched tables are named by their keys: a rank moved by a grown search
  # never reuses another architecture's dir.
  names = {search_retrain.model_dir_name(f'searched{rank}', record['key'], 0).rsplit(
      '_seed', 1)[0]: f'searched{rank}' for rank, record in enumerate(top, 1)}
  assert len(names) == 3 and all(name.startswith('searched-') for name in names)

  def train_and_evaluate(model_dir, bindings, seed, gin_file):
    name = model_dir.name.rsplit('_seed', 1)[0]
    name = names.get(name, name)
    trained.append((name, seed, bindings[-1]))
    return {'AP': ap_of[name] + 0.01 * seed, 'AP50': 0.9, 'step': 1}

  monkeypatch.setattr(search_retrain.demo_runs, 'synthetic_records',
                      lambda *args: {'train': 't', 'val': 'v'})
  monkeypatch.setattr(search_retrain.demo_runs, 'train_and_evaluate', train_and_evaluate)
  monkeypatch.setattr(search_retrain, 'model_flops', lambda model_dir: len(model_dir.name))
  said = []
  monkeypatch.setattr(search_retrain.demo_runs, 'say', said.append)
  rows, chosen = search_retrain.run(tmp_path / 'retrain', dirs, [0, 1, 2], top_k=3)
  assert chosen == 'searched2'
  # Progress: each run numbered out of all 11 (3 + 2 more seeds + 2 baselines x 3), an ETA from
  # the second on.
  runs = [line for line in said if line.startswith('run ')]
  assert runs[0] == 'run 1 of 11: searched1 (seed 0)' and len(runs) == 11
  assert runs[-1].startswith('run 11 of 11: fpn (seed 2), ETA 0:00:0')
  assert [(name, seed) for name, seed, _ in trained] == [
      ('searched1', 0), ('searched2', 0), ('searched3', 0), ('nasfpn', 0), ('fpn', 0),
      ('searched2', 1), ('nasfpn', 1), ('fpn', 1), ('searched2', 2), ('nasfpn', 2), ('fpn', 2)]
  # Each searched table is trained as the journal has it.
  for (name, _, binding), record in zip(trained[:3], top):
    assert binding == search_retrain.block_specs_binding(record['block_specs']), name
  assert [row['proxy_reward'] for row in rows[:3]] == [r['reward'] for r in top]
  assert [row['rank'] for row in rows[:3]] == [1, 2, 3]
  result = search_retrain.summary(rows, chosen)
  assert result['chosen_minus_nasfpn_ap'] == pytest.approx(0.05)
  assert {k: v for k, v in result['architectures']['searched2'].items()
          if k != 'against_nasfpn'} == {
      'mean_ap': pytest.approx(0.41), 'median_ap': pytest.approx(0.41),
      'sd': pytest.approx(0.01), 'spread': pytest.approx(0.02), 'seeds': 3,
      'flops': len(search_retrain.model_dir_name('searched2', top[1]['key'], 0))}
  assert result['architectures']['searched2']['against_nasfpn'] == {
      'seeds': 3, 'wins': 3, 'difference': pytest.approx(0.05),
      'interval': [pytest.approx(0.05), pytest.approx(0.05)], 'above_by_spread': True}
  # The proxy's rewards of the top 3 paired with their first-seed APs (0.30, 0.40, 0.20).
  assert result['top_k_tau_proxy_vs_ap'] == pytest.approx(search_retrain.search_proxy_gate
                                                          .kendall_tau([r['reward'] for r in top],
                                                                       [0.30, 0.40, 0.20]))


def test_against_nasfpn_pairs_the_seeds_both_trained():
  nasfpn = {0: 0.52, 1: 0.50, 2: 0.55, 4: 0.51}
  ours = {0: 0.53, 1: 0.49, 2: 0.58, 3: 0.70}  # seed 3 has no NAS-FPN to pair with
  rows = [{'name': n, 'seed': s, 'AP': ap} for n, aps in (('nasfpn', nasfpn), ('x', ours))
          for s, ap in aps.items()]
  result = search_retrain.against_nasfpn(rows, 'x', resamples=20000)
  differences = [0.01, -0.01, 0.03]
  assert (result['seeds'], result['wins']) == (3, 2)
  assert result['difference'] == pytest.approx(np.mean(differences))
  # The bootstrap's interval of the mean of three differences lies within their range.
  low, high = result['interval']
  assert -0.01 - 1e-9 <= low < np.mean(differences) < high <= 0.03 + 1e-9
  assert result['above_by_spread'] is False  # 0.01 against NAS-FPN's spread 0.05


def test_a_finished_model_dir_is_reused_only_for_the_model_it_holds(synthetic_records, tmp_path):
  """What the experiments' reruns rely on: a finished model dir comes back as it is for the
  same bindings, and is refused, naming what differs, for another pyramid."""
  demo_runs = search_retrain.demo_runs
  bindings = tiny_bindings(synthetic_records, train_steps=2) + [
      'RetinaNetTrainer.mixed_precision = None']
  model_dir = tmp_path / 'run'
  first = demo_runs.train_and_evaluate(model_dir, bindings)
  assert first['step'] == 2
  written = (model_dir / 'eval_metrics.json').stat().st_mtime_ns
  assert demo_runs.train_and_evaluate(model_dir, bindings) == first
  assert (model_dir / 'eval_metrics.json').stat().st_mtime_ns == written  # reused, not retrained
  with pytest.raises(CheckpointMismatchError,
                     match=r'(?s)holds a finished model other.*build_retinanet\.block_specs'):
    demo_runs.train_and_evaluate(model_dir, bindings + ["build_retinanet.block_specs = 'fpn'"])


def test_retrain_refuses_a_dir_without_a_search_or_over_other_levels(tmp_path):
  with pytest.raises(ValueError, match=r'--search_dirs: .*nothing.* holds no search'):
    search_retrain.top_records([str(tmp_path / 'nothing')], 5)
  settings = runner.SearchSettings(search_dir=str(tmp_path / 'p3p4'), algorithm='random',
                                   num_trials=1, proxy='synthetic', space=SPACE)
  runner.check_search_dir(settings)
  with pytest.raises(ValueError, match=r"p3p4 searched levels \{'max_level': 4, 'min_level': 3\}"):
    search_retrain.top_records([settings.search_dir], 5)


asha_samples = load_experiment('asha_samples')


def test_asha_rows_and_what_asha_kept_from_the_journals(tmp_path):
  # The same 8 random samples (seed 3) with and without ASHA; under ASHA the keys whose first
  # cell pools are stopped at step 12, with the reward they had there.
  trained = {}
  for scheduler in asha_samples.SCHEDULERS:
    settings = runner.SearchSettings(search_dir=str(tmp_path / scheduler), algorithm='random',
                                     num_trials=8, proxy='synthetic', space=SPACE, seed=3,
                                     scheduler=scheduler)
    runner.check_search_dir(settings)
    searcher = runner.ControllerSearcher(settings, log=lambda line: None,
                                         asha=runner.resolve_asha(settings))
    asha = scheduler == 'asha'

    def result(space, specs, asha=asha):
      if asha and 'global_pooling' in space.key(specs).split('/')[0]:
        return {'ap': 0.1, 'flops': 0, 'steps': 12, 'stopped_at_step': 12}
      return trials.synthetic_result(space, specs)

    drive_in_process(searcher, result_fn=result)
    Journal(tmp_path / scheduler / 'sessions.jsonl').append(
        {'samples_before': 0, 'samples_after': 8, 'wall_seconds': 36.0 if asha else 72.0})
    trained[scheduler] = {r['key']: r for r in searcher.records if not r['cached']}
  rows = [asha_samples.scheduler_row(tmp_path, s) for s in asha_samples.SCHEDULERS]
  none_row, asha_row = rows
  assert none_row['samples_per_hour'] == 8 / (72 / 3600) == 400.0
  assert asha_row['samples_per_hour'] == 8 / (36 / 3600) == 800.0
  stopped_keys = [k for k in trained['asha'] if 'global_pooling' in k.split('/')[0]]
  assert asha_row['stopped_early'] == len(stopped_keys) > 0 and none_row['stopped_early'] == 0
  assert asha_row['trained'] == none_row['trained'] == len(trained['none'])
  # The best full trial: over every trained key without ASHA, over the survivors with it.
  survivors = [r['reward'] for k, r in trained['asha'].items() if k not in stopped_keys]
  assert asha_row['best_full_reward'] == max(survivors)
  assert none_row['best_full_reward'] == max(r['reward'] for r in trained['none'].values())
  kept = asha_samples.kept_row(tmp_path, top_k=3)
  ranked = sorted(trained['none'].values(), key=lambda r: (-r['reward'], r['trial']))[:3]
  assert kept['keys'] == [r['key'] for r in ranked]
  assert kept['under_asha'] == [12 if r['key'] in stopped_keys else 'max_t' for r in ranked]
  assert kept['survived'] == sum(r['key'] not in stopped_keys for r in ranked)
  with saved_figures() as figures:
    asha_samples.draw(tmp_path, rows, kept, str(tmp_path / 'asha.png'))
  assert read_png(tmp_path / 'asha.png').shape == (440, 1210, 3)  # 11 x 4 in at 110 dpi
  rate_ax, kept_ax = figures[0].axes
  assert [p.get_height() for p in rate_ax.patches] == [400.0, 800.0] + [
      row['samples_per_trial_hour'] for row in rows]
  # Every architecture once, at (its full reward, its reward under ASHA); the top 3 circled.
  points = np.concatenate([c.get_offsets() for c in kept_ax.collections[:-1]])
  expected = [(trained['none'][k]['reward'], r['reward']) for k, r in trained['asha'].items()]
  assert sorted(map(tuple, points.tolist())) == sorted(expected)
  assert len(kept_ax.collections[-1].get_offsets()) == 3
  # The journals are in the order trials finished (side by side, not the order drawn), and a
  # search may stop with proposals left untrained: samples are matched by proposal.
  trials_file = tmp_path / 'asha' / search_dir_lib.TRIALS_FILE
  original = trials_file.read_text()
  records = [json.loads(line) for line in original.splitlines()]
  untrained = records[-1]['key']
  trials_file.write_text(''.join(json.dumps(r) + '\n' for r in records[:-1][::-1]))
  reordered = asha_samples.kept_row(tmp_path, top_k=3)
  assert reordered['keys'] == kept['keys']
  assert reordered['under_asha'] == [None if key == untrained else outcome
                                     for key, outcome in zip(kept['keys'], kept['under_asha'])]
  trials_file.write_text(original)
  # Searches that drew other samples are not compared.
  (tmp_path / 'asha' / search_dir_lib.TRIALS_FILE).write_text(
      (tmp_path / 'asha' / search_dir_lib.TRIALS_FILE).read_text()
      .replace(ranked[0]['key'], 'other'))
  with pytest.raises(ValueError, match='drew other samples'):
    asha_samples.kept_row(tmp_path, top_k=3)


trial_cost = load_experiment('trial_cost')


def test_trial_cost_summary_keeps_first_trials_apart_and_ranges_each_architecture():
  rows = [{'version': version, 'index': index, 'architecture': name, 'seconds': seconds,
           'ap': ap}
          for version, index, name, seconds, ap in (
              ('before', 0, 'nasfpn', 300.0, 0.20), ('before', 1, 'fpn', 50.0, 0.10),
              ('before', 0, 'nasfpn', 70.0, 0.22), ('before', 1, 'fpn', 54.0, 0.12),
              ('after', 0, 'nasfpn', 60.0, 0.21), ('after', 1, 'fpn', 40.0, 0.11),
              ('after', 0, 'nasfpn', 62.0, 0.21), ('after', 1, 'fpn', 44.0, 0.11))]
  result = trial_cost.summary(rows)
  assert result['before'] == {'first_trial_s': 185.0, 'later_trials_s': 52.0}
  assert result['after'] == {'first_trial_s': 61.0, 'later_trials_s': 42.0}
  assert result['later_ratio_after_before'] == round(42 / 52, 3)
  assert result['ap_nasfpn'] == {'before': [0.2, 0.22], 'after': [0.21, 0.21]}
  assert result['ap_fpn'] == {'before': [0.1, 0.12], 'after': [0.11, 0.11]}


def test_retrain_by_keys_trains_those_pyramids_beside_the_baselines_asked_for(tmp_path,
                                                                             monkeypatch):
  """--keys instead of search dirs: each key's pyramid once, the best with the other seeds,
  only NAS-FPN beside it; no proxy reward and no tau; a key outside the space is named."""
  space = SearchSpace()
  keys = [space.key(space.sample(np.random.default_rng(seed))) for seed in (0, 1)]
  trained = []
  best = search_retrain.model_dir_name('searched', keys[1], 3).rsplit('_seed', 1)[0]

  def train_and_evaluate(model_dir, bindings, seed, gin_file):
    trained.append((model_dir.name, seed, bindings[-1]))
    return {'AP': 0.5 if model_dir.name.startswith(best) else 0.4, 'AP50': 0.9, 'step': 1}

  monkeypatch.setattr(search_retrain.demo_runs, 'synthetic_records',
                      lambda *args: {'train': 't', 'val': 'v'})
  monkeypatch.setattr(search_retrain.demo_runs, 'train_and_evaluate', train_and_evaluate)
  monkeypatch.setattr(search_retrain, 'model_flops', lambda model_dir: 1)
  monkeypatch.setattr(search_retrain.demo_runs, 'say', lambda line: None)
  rows, chosen = search_retrain.run(tmp_path, None, [3, 4], keys=keys, baselines=['nasfpn'])
  dirs = [search_retrain.model_dir_name('searched', key, 3) for key in keys]
  assert [(name, seed) for name, seed, _ in trained] == [
      (dirs[0], 3), (dirs[1], 3), ('nasfpn_seed3', 3),
      (search_retrain.model_dir_name('searched', keys[1], 4), 4), ('nasfpn_seed4', 4)]
  for (_, _, binding), key in zip(trained, keys):
    assert binding == search_retrain.block_specs_binding(space.parse_key(key))
  assert chosen == 'searched2' and [row['key'] for row in rows[:2]] == keys
  assert all(row['proxy_reward'] is None for row in rows)
  result = search_retrain.summary(rows, chosen)
  assert result['top_k_tau_proxy_vs_ap'] is None
  assert set(result['architectures']) == {'searched1', 'searched2', 'nasfpn'}
  with pytest.raises(ValueError, match=r'--keys: cell 0: level 9 is not allowed: the levels '
                                       r'are 3\.\.7'):
    search_retrain.run(tmp_path, None, [3], keys=['9:sum:0,1' + keys[0][9:]])


def test_retrain_reuses_a_model_dir_holding_another_spelling_of_the_same_key(tmp_path,
                                                                            monkeypatch):
  """A journal's table and `--keys`' canonical one may swap a cell's inputs (the same network,
  the same key, so the same model dir): a finished dir is trained on in the spelling it holds,
  and another pyramid's record is not taken for it."""
  space = SearchSpace()
  nasfpn_key = space.key('nasfpn')
  canonical = space.parse_key(nasfpn_key)
  swapped = json.loads(json.dumps(block_specs_lib.to_config(canonical)))
  swapped[1][2] = swapped[1][2][::-1]  # cell 1 sums P4 and cell 0: either order, one network
  assert space.key(swapped) == nasfpn_key
  assert json.dumps(swapped) != json.dumps(block_specs_lib.to_config(canonical))
  model_dir = tmp_path / search_retrain.model_dir_name('searched', nasfpn_key, 0)
  model_dir.mkdir()
  (model_dir / 'model_config.json').write_text(json.dumps({'block_specs': swapped}))
  assert search_retrain.trained_spelling(model_dir, canonical, nasfpn_key, space) == swapped
  assert search_retrain.trained_spelling(tmp_path / 'none', canonical, nasfpn_key,
                                         space) == canonical
  other = space.key(space.sample(np.random.default_rng(0)))
  assert search_retrain.trained_spelling(model_dir, space.parse_key(other), other,
                                         space) == space.parse_key(other)
  trained = []
  monkeypatch.setattr(search_retrain.demo_runs, 'synthetic_records',
                      lambda *args: {'train': 't', 'val': 'v'})
  monkeypatch.setattr(search_retrain.demo_runs, 'train_and_evaluate',
                      lambda model_dir, bindings, seed, gin: trained.append(bindings[-1]) or {
                          'AP': 0.5, 'AP50': 0.9, 'step': 1})
  monkeypatch.setattr(search_retrain, 'model_flops', lambda model_dir: 1)
  monkeypatch.setattr(search_retrain.demo_runs, 'say', lambda line: None)
  search_retrain.run(tmp_path, None, [0, 1], keys=[nasfpn_key], baselines=[])
  assert trained == [search_retrain.block_specs_binding(swapped),     # seed 0: the dir's
                     search_retrain.block_specs_binding(canonical)]  # seed 1: a new dir


def test_retrain_rows_of_an_earlier_call_are_kept_unless_redone(tmp_path):
  """A second call into the same output dir (more seeds, other --keys) adds its rows to
  search_retrain.jsonl; a run it redid (same key, or baseline name, and seed) replaces the old."""
  path = tmp_path / 'search_retrain.jsonl'
  first = [{'name': 'searched1', 'key': 'k1', 'seed': 0, 'AP': 0.5},
           {'name': 'nasfpn', 'key': None, 'seed': 0, 'AP': 0.52},
           {'name': 'nasfpn', 'key': None, 'seed': 1, 'AP': 0.51}]
  assert search_retrain.merged_rows(path, first) == first  # no file yet
  search_retrain.demo_runs.write_rows(first, path)
  # 'searched1' now names another key: both are kept; NAS-FPN's seed 1 was redone.
  second = [{'name': 'searched1', 'key': 'k2', 'seed': 0, 'AP': 0.4},
            {'name': 'nasfpn', 'key': None, 'seed': 1, 'AP': 0.49}]
  merged = search_retrain.merged_rows(path, second)
  assert merged == first[:2] + second
  search_retrain.demo_runs.write_rows(merged, path)
  assert [json.loads(line) for line in path.read_text().splitlines()] == merged
