"""experiments/controller_surrogate.py: the surrogate against a known reward, the replays, rows."""
import numpy as np
import pytest

from nasfpn_tf.search.journal import Journal
from nasfpn_tf.search.space import SearchSpace
from nasfpn_tf.search import search_dir as search_dir_lib
from training_helpers import load_experiment, run_synthetic_search

controller_surrogate = load_experiment('controller_surrogate')
SPACE = SearchSpace(num_cells=3, min_level=3, max_level=5)


def _linear_rewards(actions, seed=0):
  """A reward linear in the one-hot decisions, with weights drawn with `seed`."""
  weights = np.random.default_rng(seed).uniform(0, 0.05, [SPACE.num_decisions, SPACE.max_options])
  return np.array([weights[np.arange(SPACE.num_decisions), a].sum() for a in actions]), weights


def test_the_surrogate_recovers_a_linear_reward_and_says_how_well_it_ranks():
  rng = np.random.default_rng(0)
  actions = np.array([SPACE.sample_actions(rng) for _ in range(300)])
  rewards, weights = _linear_rewards(actions)
  surrogate = controller_surrogate.Surrogate(SPACE.num_decisions, SPACE.max_options, ridge=1e-3)
  surrogate.fit(actions, rewards)
  fresh = np.array([SPACE.sample_actions(rng) for _ in range(50)])
  np.testing.assert_allclose(surrogate.predict(fresh), _linear_rewards(fresh)[0], atol=2e-3)
  # One decision changed by hand moves the prediction by the difference of its two weights.
  changed = fresh[0].copy()
  t = next(t for t in range(SPACE.num_decisions)
           if SPACE.static_masks[t].sum() > 1 and not SPACE.exclusions[t].any())
  other = next(o for o in np.flatnonzero(SPACE.static_masks[t]) if o != changed[t])
  before = surrogate.predict(changed)[0]
  changed[t], old = other, changed[t]
  assert surrogate.predict(changed)[0] - before == pytest.approx(
      weights[t, other] - weights[t, old], abs=2e-3)
  validation = controller_surrogate.cross_validate(SPACE, actions, rewards, folds=5, ridge=1e-3)
  assert validation['architectures'] == 300
  assert validation['tau'] > 0.9 and validation['r2'] > 0.95
  # Rewards the decisions do not explain: the held-out predictions do not rank them.
  noise = rng.permutation(rewards)
  assert abs(controller_surrogate.cross_validate(SPACE, actions, noise, 5, 1e-3)['tau']) < 0.2


def test_replays_learn_where_the_controller_can_and_replay_exactly():
  rng = np.random.default_rng(1)
  actions = np.array([SPACE.sample_actions(rng) for _ in range(200)])
  surrogate = controller_surrogate.Surrogate(SPACE.num_decisions, SPACE.max_options, 1e-3)
  surrogate.fit(actions, _linear_rewards(actions)[0])
  truths, noisy = {}, {}
  for setting in ('random', 'evolution:population_size=10:tournament_size=3'):
    for seed in range(3):
      truth, reward = controller_surrogate.replay(SPACE, setting, surrogate, 40, seed,
                                                  noise=0.001, in_flight=2)
      assert truth.shape == reward.shape == (40,)
      assert np.abs(reward - truth).max() < 0.01  # the noise is what it was asked to be
      truths.setdefault(setting, []).append(truth)
      noisy.setdefault(setting, []).append(reward)
  again = controller_surrogate.replay(SPACE, 'random', surrogate, 40, 0, 0.001, 2)
  np.testing.assert_array_equal(again[1], noisy['random'][0])  # seeded: it replays
  rows = {r['setting']: r for r in controller_surrogate.setting_rows(truths, noisy, burn_in=10)}
  evolution = rows['evolution:population_size=10:tournament_size=3']
  # Random search learns only by chance (a run in 20 at p < 0.05); evolution on a linear reward
  # in every run, and above random search's.
  assert rows['random']['learned_runs'] < 3 and 'beat_random_runs' not in rows['random']
  assert evolution['learned_runs'] == 3 and evolution['beat_random_runs'] == 3
  assert (evolution['mean_true_reward_after_burn_in'] >
          rows['random']['mean_true_reward_after_burn_in'] + 0.02)
  # The row's figures by hand.
  later = [run[10:].mean() for run in truths['random']]
  assert rows['random']['mean_true_reward_after_burn_in'] == pytest.approx(np.mean(later))
  assert rows['random']['standard_error'] == pytest.approx(np.std(later, ddof=1) / np.sqrt(3))
  assert rows['random']['mean_true_reward_last_10'] == pytest.approx(
      np.mean([run[-10:].mean() for run in truths['random']]))


def test_settings_parse_and_bad_ones_are_named():
  assert controller_surrogate.parse_setting('ppo@nasfpn:batch_size=4:learning_rate=0.005') == (
      'ppo', 'nasfpn', {'batch_size': 4, 'learning_rate': 0.005})
  assert controller_surrogate.parse_setting('random') == ('random', None, {})
  with pytest.raises(ValueError, match=r"'rl:batch_size=4': unknown controller 'rl'"):
    controller_surrogate.parse_setting('rl:batch_size=4')
  with pytest.raises(ValueError, match=r"'ppo:batch_size': 'batch_size' is not PARAM=VALUE"):
    controller_surrogate.parse_setting('ppo:batch_size')


def test_journal_data_takes_each_key_once_over_searches_of_one_space(tmp_path):
  dirs = []
  for algorithm, num_trials in (('random', 6), ('evolution', 5)):
    dirs.append(run_synthetic_search(tmp_path / algorithm, algorithm, num_trials, SPACE).search_dir)
  space, actions, rewards = controller_surrogate.journal_data(dirs)
  assert space.config() == SPACE.config()
  records = [r for d in dirs for r in Journal(f'{d}/{search_dir_lib.TRIALS_FILE}').read()]
  first = {}
  for record in records:
    first.setdefault(record['key'], record)
  assert len(rewards) == len(first)
  assert sorted(map(tuple, actions.tolist())) == sorted(tuple(r['actions']) for r in first.values())
  other = run_synthetic_search(tmp_path / 'other', 'random', 2,
                               SearchSpace(num_cells=4, min_level=3, max_level=5))
  with pytest.raises(ValueError, match=r'--search_dirs: .*other searched'):
    controller_surrogate.journal_data(dirs + [other.search_dir])
