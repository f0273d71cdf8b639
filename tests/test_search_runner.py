"""The search loop without Ray: journal, result store, duplicates, budget, resuming, outputs."""
import json
import pickle
import socket
import types

import gin
import numpy as np
import pytest

from nasfpn_tf import config
from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.search import controllers, progress, runner, schedulers, trials
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.search.journal import Journal, ResultStore
from nasfpn_tf.search.space import SearchSpace
from nasfpn_tf.search import search_dir as search_dir_lib
from training_helpers import drive_in_process, plotted_lines, read_png, saved_figures

# 2 output cells over P3-P4: few enough keys (28) that random search repeats them.
SMALL = SearchSpace(num_cells=2, min_level=3, max_level=4)


def test_journal_cuts_a_torn_last_line_and_appends_after_it(tmp_path):
  journal = Journal(tmp_path / search_dir_lib.TRIALS_FILE)
  journal.append({'trial': 0})
  journal.append({'trial': 1})
  with open(journal.path, 'ab') as f:
    f.write(b'{"trial": 2, "rew')  # a kill in the middle of an append
  assert journal.read() == [{'trial': 0}, {'trial': 1}]
  assert journal.path.read_bytes().endswith(b'"rew')  # reading leaves the file alone
  assert journal.recover() == [{'trial': 0}, {'trial': 1}]
  journal.append({'trial': 2})
  assert journal.read() == [{'trial': 0}, {'trial': 1}, {'trial': 2}]


def test_journal_refuses_a_broken_line_that_is_not_the_last(tmp_path):
  path = tmp_path / search_dir_lib.TRIALS_FILE
  path.write_text('{"trial": 0}\nnot json\n{"trial": 2}\n')
  with pytest.raises(ValueError, match='line 2 is not JSON'):
    Journal(path).read()


def test_result_store_round_trip(tmp_path):
  store = ResultStore(tmp_path / search_dir_lib.RESULTS_DIR)
  assert store.get('4:sum:0,1') is None
  store.put('4:sum:0,1', {'ap': 0.25})
  assert store.get('4:sum:0,1') == {'ap': 0.25}
  assert store.get('4:sum:0,2') is None


def _settings(tmp_path, **overrides):
  values = dict(search_dir=str(tmp_path / 'search'), algorithm='random', num_trials=40,
                proxy='synthetic', space=SMALL, seed=3)
  values.update(overrides)
  return runner.SearchSettings(**values)


def _result_of_key(key):
  """A proxy's result that a key alone decides: AP (1 + its 'sum' cells) / (1 + its cells),
  FLOPs 1e9 x (1 + the first input of its last cell), e.g. '3:sum:0,1/4:gp:0,2' -> 2/3, 1e9."""
  cells = key.split('/')
  return {'ap': (1 + sum(cell.split(':')[1] == 'sum' for cell in cells)) / (1 + len(cells)),
          'flops': 1e9 * (1 + int(cells[-1].split(':')[2].split(',')[0]))}


def test_every_sample_is_journaled_once_and_each_key_trained_once(tmp_path):
  settings = _settings(tmp_path, reward='ap_flops', target_flops=2e9)
  runner.check_search_dir(settings)
  searcher = runner.ControllerSearcher(settings, log=lambda line: None)
  drive_in_process(searcher, result_fn=lambda space, specs: _result_of_key(space.key(specs)))
  records = Journal(tmp_path / 'search' / search_dir_lib.TRIALS_FILE).read()
  assert [r['trial'] for r in records] == list(range(40))
  trained = [r['key'] for r in records if not r['cached']]
  assert len(trained) == len(set(trained)) == len({r['key'] for r in records})
  assert len(trained) < 40  # the small space repeats keys, and they were answered from the store
  for record in records:
    assert record['key'] == SMALL.key(record['block_specs'])
    # Each line's reward is its own key's result, by MnasNet's AP x (FLOPs / target)^-0.07.
    result = _result_of_key(record['key'])
    assert record['reward'] == pytest.approx(result['ap'] * (result['flops'] / 2e9)**-0.07,
                                             rel=1e-12)
  assert len({r['reward'] for r in records}) > 2  # rewards that tell trials apart


@pytest.mark.parametrize('algorithm', ['random', 'ppo'])
def test_a_restart_continues_without_losing_or_repeating_a_sample(tmp_path, algorithm):
  settings = _settings(tmp_path, algorithm=algorithm)
  runner.check_search_dir(settings)
  state_path = tmp_path / 'search' / search_dir_lib.CONTROLLER_FILE
  saved_states = []  # the controller's state file after each journal line
  first = runner.ControllerSearcher(
      settings, log=lambda line: saved_states.append(state_path.read_bytes()))
  drive_in_process(first, stop_after=15)  # killed with trials in flight
  assert len(first.records) >= 15
  done = list(first.records)
  # Killed between a journal line and the state it leads to: the state is one line behind.
  state_path.write_bytes(saved_states[-2])
  assert pickle.loads(state_path.read_bytes())['num_records'] == len(done) - 1

  second = runner.ControllerSearcher(settings, log=lambda line: None)
  assert second.records == done
  assert pickle.loads(state_path.read_bytes())['num_records'] == len(done)
  drive_in_process(second)
  records = Journal(tmp_path / 'search' / search_dir_lib.TRIALS_FILE).read()
  assert [r['trial'] for r in records] == list(range(40))
  assert records[:len(done)] == done
  if algorithm == 'ppo':
    # The same policy as a controller that saw every reward without a restart.
    reference = controllers.make_controller('ppo', SMALL, seed=3)
    for record in records:
      reference.feedback(runner._proposal(record, SMALL), record['reward'])  # pylint: disable=protected-access
    for ours, theirs in zip(second.controller.state()['weights'], reference.state()['weights']):
      np.testing.assert_array_equal(ours, theirs)


def test_a_search_dir_of_another_search_is_refused(tmp_path):
  runner.check_search_dir(_settings(tmp_path))
  runner.check_search_dir(_settings(tmp_path, num_trials=80))  # extending is the same search
  with pytest.raises(ValueError, match=r"search.*algorithm: recorded 'random', asked 'ppo'"):
    runner.check_search_dir(_settings(tmp_path, algorithm='ppo'))
  with pytest.raises(ValueError, match='space: recorded'):
    runner.check_search_dir(_settings(tmp_path, space=SearchSpace()))


def test_best_gin_binds_the_best_table(tmp_path):
  record = {'trial': 4, 'reward': 0.5, 'key': SearchSpace().key(specs_lib.NASFPN),
            'block_specs': specs_lib.to_config(specs_lib.NASFPN)}
  path = tmp_path / search_dir_lib.BEST_GIN
  path.write_text(progress.best_gin(record, SearchSpace().config()))
  try:
    config.parse_gin([str(path)])
    assert gin.query_parameter('build_retinanet.block_specs') == specs_lib.to_config(
        specs_lib.NASFPN)
    assert gin.query_parameter('build_retinanet.min_level') == 3
  finally:
    gin.clear_config()


def test_messages_count_trials_from_one(tmp_path):
  """The journal's `trial` is 0-based; every line, file and picture people read counts from 1."""
  record = {'trial': 4, 'reward': 0.5, 'key': SearchSpace().key(specs_lib.NASFPN),
            'block_specs': specs_lib.to_config(specs_lib.NASFPN)}
  assert 'trial 5, reward 0.5000' in progress.best_gin(record, SearchSpace().config())
  lines = []
  progress.Progress(_settings(tmp_path), [record], log=lines.append)
  assert lines == [f'Resuming {tmp_path / "search"}: 1 samples done, 1 unique, best reward 0.5000 '
                   '(trial 5).']


def test_moving_average_by_hand():
  assert progress.moving_average([1, 2, 3, 4], 2).tolist() == [1, 1.5, 2.5, 3.5]


def test_outputs_are_written(tmp_path):
  settings = _settings(tmp_path, num_trials=10)
  runner.check_search_dir(settings)
  searcher = runner.ControllerSearcher(settings, log=lambda line: None)
  with saved_figures() as figures:
    drive_in_process(searcher)
    summary = searcher.progress.summary(wall_seconds=1.0)
  records = searcher.records
  best = max(records, key=lambda r: r['reward'])
  assert summary['best_reward'] == best['reward'] and summary['num_trials'] == 10
  assert summary['num_unique'] == len({r['key'] for r in records})
  directory = tmp_path / 'search'
  # The last picture drawn is the summary's: every sample's reward, the best so far, the count
  # of unique architectures against all samples.
  # 10 x 4 in, 110 dpi
  assert read_png(directory / search_dir_lib.PROGRESS_PNG).shape == (440, 1100, 3)
  reward_ax, unique_ax = figures[-1].axes
  rewards = [r['reward'] for r in records]
  samples = np.arange(1, 11)
  np.testing.assert_array_equal(reward_ax.collections[0].get_offsets(),
                                np.stack([samples, rewards], 1))
  best_line = plotted_lines(reward_ax)[-1]
  np.testing.assert_array_equal(best_line[1], np.maximum.accumulate(rewards))
  unique = [len({r['key'] for r in records[:i]}) for i in samples]
  np.testing.assert_array_equal(plotted_lines(unique_ax)[0][1], unique)
  assert f"reward {best['reward']:.4f}" in (directory / search_dir_lib.BEST_GIN).read_text()
  improvements, best_so_far = 0, -1.0
  for record in records:
    if record['reward'] > best_so_far:
      improvements, best_so_far = improvements + 1, record['reward']
  assert len(list((directory / search_dir_lib.ARCHITECTURES_DIR).glob('*.png'))) == improvements
  assert json.loads((directory / search_dir_lib.IDENTITY_FILE).read_text())['space'] \
      == SMALL.config()


def test_an_unreachable_ray_address_is_named_at_once():
  with socket.socket() as s:  # a port nothing listens on once this closes
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  with pytest.raises(ValueError, match=f"--ray_address='127.0.0.1:{port}': no Ray cluster"):
    runner.check_reachable(f'127.0.0.1:{port}', timeout=2)
  with pytest.raises(ValueError, match='is not host:port'):
    runner.check_reachable('head-node')


def test_unknown_settings_are_named(tmp_path):
  with pytest.raises(ValueError, match="--proxy='gpu'"):
    runner.run_search(_settings(tmp_path, proxy='gpu'))
  with pytest.raises(ValueError, match='--target_flops'):
    runner.run_search(_settings(tmp_path, reward='ap_flops'))
  with pytest.raises(ValueError, match="--algorithm='annealing'"):
    runner.run_search(_settings(tmp_path, algorithm='annealing'))
  with pytest.raises(ValueError, match="--init_block_specs='nasfpn' is not in SearchSpace"):
    runner.run_search(_settings(tmp_path, init_block_specs='nasfpn'))  # a 7-cell P3-P7 table
  assert not (tmp_path / 'search').exists()  # nothing recorded that a fixed command would trip on


# Early stopping (--scheduler=asha): the settings, their errors, and stopped trials in the journal.


def test_asha_rungs_and_reports_are_ray_tunes():
  from ray.tune.schedulers import AsyncHyperBandScheduler  # pylint: disable=g-import-not-at-top
  # The defaults: a factor of 3 and a grace period of a ninth, rounded up.
  cpu = schedulers.resolve('asha', 300, 'CpuProxy.train_steps')
  assert (cpu.grace_period, cpu.reduction_factor, cpu.max_t) == (34, 3.0, 300)
  assert cpu.rungs() == [34, 102] and cpu.report_steps() == [34, 102]
  assert schedulers.resolve('asha', 100, 'x').report_steps() == [12, 36]
  assert schedulers.resolve('asha', 100, 'x', report_every=30).report_steps() == [30, 60, 90]
  assert schedulers.resolve('none', 100, 'x') is None
  for max_t, grace, factor in [(300, 34, 3), (100, 12, 3), (81, 1, 3), (300, 10, 2.5), (64, 4, 4)]:
    ours = schedulers.resolve('asha', max_t, 'x', grace, factor)
    # pylint: disable=protected-access  Ray's own rungs, which ours must match.
    bracket = AsyncHyperBandScheduler(max_t=max_t, grace_period=grace,
                                      reduction_factor=factor)._brackets[0]
    ray_rungs = [m for m, _ in bracket._rungs]
    assert ours.rungs() == sorted(m for m in ray_rungs if m < max_t), (max_t, grace, factor)


def test_bad_scheduler_settings_are_named(tmp_path):
  cases = [
      (dict(scheduler='hyperband'), "--scheduler='hyperband' is not one of"),
      (dict(scheduler='asha', asha_reduction_factor=1.0), '--asha_reduction_factor=1.0 must be'),
      (dict(scheduler='asha', asha_grace_period=100), r'--asha_grace_period=100 must be in '
       r"1..99: below the proxy's 100 train steps \(the synthetic"),
      (dict(scheduler='asha', asha_grace_period=0), '--asha_grace_period=0 must be'),
      (dict(scheduler='asha', report_every=-1), '--report_every=-1 must be in 0..99'),
      (dict(report_every=5), '--report_every=5: ASHA settings, but --scheduler=none'),
      (dict(asha_grace_period=5), '--asha_grace_period=5: ASHA settings'),
      (dict(scheduler='asha', proxy_seeds=2), '--proxy_seeds=2'),
      (dict(scheduler='asha', proxy='paper'), '--proxy=paper'),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      runner.run_search(_settings(tmp_path, **overrides))
  assert not (tmp_path / 'search').exists()  # refused before anything was recorded
  runner.check_search_dir(_settings(tmp_path, scheduler='asha'))
  with pytest.raises(ValueError, match="scheduler: recorded 'asha', asked 'none'"):
    runner.check_search_dir(_settings(tmp_path))


def _drive_with_asha(searcher, stop, stop_after=None, num_parallel=3):
  """Drives `searcher` as Tune with ASHA would, the synthetic proxy in this process: a trial
  whose key `stop(key)` gives a step is stopped after its report there (its last metrics are
  that report's, `final` False), the others report every step and end with their result."""
  in_flight, next_id, completions = [], 0, 0
  while True:
    while len(in_flight) < num_parallel:
      config = searcher.suggest(f't{next_id}')
      next_id += 1
      if config is None:
        break
      in_flight.append((f't{next_id - 1}', config))
    if not in_flight or completions == stop_after:
      return
    trial_id, config = in_flight.pop(0)
    assert config['report_steps'] == [12, 36] and config['max_steps'] == 100
    result = trials.synthetic_result(searcher.settings.space, config['block_specs'])
    reports = []
    for step in config['report_steps']:
      reports.append({'ap': trials.synthetic_curve(result['ap'], step), 'flops': 0,
                      'steps': step})
      if stop(config['key']) == step:
        metrics = {'result_json': json.dumps({**reports[-1], 'reports': reports}),
                   'final': False, 'step': step}
        break
    else:
      result['reports'] = reports
      searcher.results.put(config['key'], result)
      metrics = {'result_json': json.dumps(result), 'final': True, 'step': 100}
    searcher.complete(trial_id, {**metrics, 'reused': False, 'seconds': 0.1}, False)
    completions += 1


def test_stopped_trials_are_journaled_fed_back_and_replayed_on_resume(tmp_path):
  settings = _settings(tmp_path, algorithm='evolution', scheduler='asha')
  asha = runner.resolve_asha(settings)
  runner.check_search_dir(settings)
  # Keys whose first cell sums are stopped at the first rung, those with a pooling first cell
  # whose second cell sums at the second; the rest train to the end.
  stop = lambda key: {'sum': 12}.get(key.split('/')[0].split(':')[1],  # noqa: E731
                                     36 if key.split('/')[1].split(':')[1] == 'sum' else None)
  try:
    # Larger than the budget: the population keeps every (actions, reward) fed back, in order.
    gin.bind_parameter('EvolutionController.population_size', 50)
    first = runner.ControllerSearcher(settings, log=lambda line: None, asha=asha)
    _drive_with_asha(first, stop, stop_after=15)  # killed with trials in flight
    done = list(first.records)
    second = runner.ControllerSearcher(settings, log=lambda line: None, asha=asha)
    assert second.records == done
    assert second.controller.state()['population'] == [
        (tuple(r['actions']), r['reward']) for r in done]
    _drive_with_asha(second, stop)
    population = second.controller.state()['population']
  finally:
    gin.clear_config()
  records = Journal(tmp_path / 'search' / search_dir_lib.TRIALS_FILE).read()
  assert [r['trial'] for r in records] == list(range(40)) and records[:len(done)] == done
  # The controller learned every sample's reward, the stopped ones' included.
  assert population == [(tuple(r['actions']), r['reward']) for r in records]
  by_step = {}
  for record in records:
    final_ap = trials.synthetic_result(SMALL, record['block_specs'])['ap']
    step = stop(record['key'])
    by_step.setdefault(step, []).append(record['cached'])
    # A stopped trial counts its last reported reward, the curve at the step it stopped at; a
    # duplicate of it (cached) is answered with the same.
    assert record['stopped_at_step'] == step
    assert record['reward'] == (final_ap if step is None else
                                trials.synthetic_curve(final_ap, step))
  assert set(by_step) == {None, 12, 36} and any(by_step[12]), by_step  # a cached stopped key
  # The journal's reports, replayed into a new ASHA, stop a weak newcomer at the first rung; a
  # new ASHA without them lets it go on.
  weak = {schedulers.TIME_ATTR: 12, schedulers.METRIC: 0.0}
  for replayed, decision in ((True, 'STOP'), (False, 'CONTINUE')):
    scheduler = schedulers.make_scheduler(asha)
    count = schedulers.replay(scheduler, records if replayed else [], lambda r: r['ap'])
    assert count == (len({r['key'] for r in records}) if replayed else 0)
    newcomer = types.SimpleNamespace(trial_id='new')
    scheduler.on_trial_add(None, newcomer)
    assert scheduler.on_trial_result(None, newcomer, weak) == decision


def test_a_stopped_trial_is_never_the_best(tmp_path):
  """A reward measured before the end is not comparable with a full trial's (a held-out loss
  can be lower after 1 step than after 9, as the tiny CPU proxy showed), so best.gin, the summary
  and the plot's best line take only trials that trained to the end."""
  settings = _settings(tmp_path, num_trials=3)
  runner.check_search_dir(settings)
  space, lines = SearchSpace(num_cells=2, min_level=3, max_level=4), []
  specs = [space.sample(np.random.default_rng(seed)) for seed in range(3)]
  records = [{'trial': i, 'key': space.key(s), 'block_specs': specs_lib.to_config(s),
              'reward': reward, 'cached': False, 'seconds': 1.0, 'stopped_at_step': stopped}
             for i, (s, reward, stopped) in enumerate(zip(specs, (0.9, 0.3, 0.95),
                                                          (12, None, 36)))]
  follow = progress.Progress(settings, [], log=lines.append)
  with saved_figures() as figures:
    follow.records.append(records[0])
    follow.update(records[0])  # stopped: not a best, no best.gin
    assert follow.best is None and not (tmp_path / 'search' / search_dir_lib.BEST_GIN).exists()
    assert 'best: no trial trained to the end yet' in lines[-1]
    for record in records[1:]:
      follow.records.append(record)
      follow.update(record)
    summary = follow.summary(wall_seconds=1.0)
  assert follow.best is records[1] and summary['best_reward'] == 0.3
  assert summary['num_stopped_early'] == 2
  assert 'trial 2, reward 0.3000' in (tmp_path / 'search' / search_dir_lib.BEST_GIN).read_text()
  assert lines[-1].startswith('trial 3/3 | reward 0.9500 (1 s, stopped at step 36) | best 0.3000')
  best_line = plotted_lines(figures[-1].axes[0])[-1][1]
  np.testing.assert_array_equal(best_line, [np.nan, 0.3, 0.3])
  resumed = []
  progress.Progress(settings, records, log=resumed.append)
  assert resumed == [f'Resuming {tmp_path / "search"}: 3 samples done, 3 unique, best reward '
                     '0.3000 (trial 2).']
