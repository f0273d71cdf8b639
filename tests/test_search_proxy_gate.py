"""The proxy gate (experiments/search_proxy_gate.py): its samples, journal, rank figures per reward
setting, picture and the checks of its dir. Trials are stand-ins (numbers given per architecture
and seed); one test runs the CPU proxy's trial function over a stand-in `proxy.run_trial`."""
import json
import math

import numpy as np
import pytest
from scipy import stats

import training_helpers
from nasfpn_tf.decoders import block_specs as block_specs_lib
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.search.journal import Journal

gate = training_helpers.load_experiment('search_proxy_gate')

ARCHS = ['fpn', 'nasfpn'] + [f'random_{i:02d}' for i in range(8)]
_RNG = np.random.default_rng(7)
# Per architecture: held-out AP and loss of the two short seeds, and the long schedule's AP.
AP = {1: dict(zip(ARCHS, _RNG.uniform(0.0, 0.4, len(ARCHS)))),
      2: dict(zip(ARCHS, _RNG.uniform(0.0, 0.4, len(ARCHS))))}
LOSS = {1: dict(zip(ARCHS, _RNG.uniform(0.5, 2.0, len(ARCHS)))),
        2: dict(zip(ARCHS, _RNG.uniform(0.5, 2.0, len(ARCHS))))}
LONG_AP = dict(zip(ARCHS, _RNG.uniform(0.0, 0.5, len(ARCHS))))
SECONDS = {1: 10.0, 2: 14.0, 3: 30.0}


def _stand_in(calls=None, kill_at=None):
  """A trial function giving the numbers above; with kill_at, raises Killed at that call once
  (the process dies mid-trial)."""

  class Killed(Exception):
    pass

  state = {'killed': False}

  def trial_fn(trial):
    if calls is not None:
      calls.append(trial.key)
    if kill_at is not None and len(calls) == kill_at and not state['killed']:
      state['killed'] = True
      raise Killed
    if trial.schedule == 'long':
      ap, loss = LONG_AP[trial.arch], 0.5
    else:
      ap, loss = AP[trial.seed][trial.arch], LOSS[trial.seed][trial.arch]
    return {'ap': ap, 'ap50': ap + 0.1, 'heldout_loss': loss, 'seconds': SECONDS[trial.seed]}

  trial_fn.Killed = Killed
  return trial_fn


def _archs():
  return {name: [] for name in ARCHS}


def _run(output_dir, trial_fn=None, **changes):
  arguments = dict(output_dir=str(output_dir), work_dir=None, archs=_archs(), seeds=[1, 2],
                   long_seed=3, long_factor=3, gin_bindings=[], say=lambda m: None,
                   trial_fn=trial_fn or _stand_in())
  arguments.update(changes)
  with training_helpers.saved_figures() as figures:
    summary = gate.gate(**arguments)
  return summary, figures


def test_kendall_tau_by_hand_with_ties_and_against_scipy():
  assert gate.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
  assert gate.kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
  # Pairs: 4 concordant, 2 tied (one in x, one in y): tau-b = 4 / sqrt(5 * 5).
  assert gate.kendall_tau([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(0.8)
  assert math.isnan(gate.kendall_tau([1, 1, 1], [1, 2, 3]))
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 5, 30), rng.integers(0, 5, 30)
  assert gate.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)


def test_samples_are_the_search_spaces_and_distinct():
  archs = gate.architectures(num_random=12, sample_seed=0)
  assert list(archs)[:2] == ['fpn', 'nasfpn'] and len(archs) == 14
  space = gate.SPACE
  keys = [space.key(rows) for name, rows in archs.items() if name != 'fpn']  # FPN: 5 cells
  assert len(set(keys)) == 13
  # The samples are SearchSpace.sample's, in order (none of the first 12 repeats a key here).
  rng = np.random.default_rng(0)
  assert [archs[f'random_{i:02d}'] for i in range(12)] == [
      block_specs_lib.to_config(space.sample(rng)) for _ in range(12)]
  assert archs['fpn'] == block_specs_lib.to_config(block_specs_lib.fpn(3, 7))
  assert gate.arch_key(archs['fpn']) is None  # outside the space, keyed by its name
  assert gate.arch_key(archs['nasfpn']) == space.key('nasfpn')


def test_each_reward_setting_ranked_against_the_long_schedule_by_hand(tmp_path):
  summary, _ = _run(tmp_path)
  # The reference's better half, and each setting's rewards, computed here from the numbers.
  top = [ARCHS[i] for i in np.argsort([-LONG_AP[a] for a in ARCHS])[:len(ARCHS) // 2]]
  rewards = {'ap_x1': {a: AP[1][a] for a in ARCHS},
             'neg_loss_x1': {a: -LOSS[1][a] for a in ARCHS},
             'ap_x2': {a: (AP[1][a] + AP[2][a]) / 2 for a in ARCHS},
             'neg_loss_x2': {a: -(LOSS[1][a] + LOSS[2][a]) / 2 for a in ARCHS}}
  second = {'ap_x1': AP[2], 'neg_loss_x1': {a: -LOSS[2][a] for a in ARCHS}}

  def tau(x, y, among):
    return stats.kendalltau([x[a] for a in among], [y[a] for a in among]).statistic

  assert summary['num_architectures'] == 10 and summary['better_half'] == 5
  assert list(summary['settings']) == ['ap_x1', 'neg_loss_x1', 'ap_x2', 'neg_loss_x2']
  for name, figures in summary['settings'].items():
    assert figures['tau_long'] == pytest.approx(tau(rewards[name], LONG_AP, ARCHS), abs=1e-4)
    assert figures['tau_long_better_half'] == pytest.approx(
        tau(rewards[name], LONG_AP, top), abs=1e-4)
    if name in second:
      assert figures['tau_seeds'] == pytest.approx(tau(rewards[name], second[name], ARCHS),
                                                   abs=1e-4)
      assert figures['tau_seeds_better_half'] == pytest.approx(
          tau(rewards[name], second[name], top), abs=1e-4)
    else:  # two seeds' mean: no second reward of its own to compare with
      assert 'tau_seeds' not in figures and 'tau_seeds_better_half' not in figures
    # One seed costs the mean short trial (10 s and 14 s), two seeds twice it.
    assert figures['seconds_per_trial'] == (12.0 if name.endswith('x1') else 24.0)
  assert summary['long_ap_nasfpn'] == pytest.approx(LONG_AP['nasfpn'], abs=1e-4)
  assert summary['ap_fpn'] == pytest.approx((AP[1]['fpn'] + AP[2]['fpn']) / 2, abs=1e-4)
  assert summary['seconds_per_long_trial'] == 30.0
  table = gate.markdown_table(summary).splitlines()
  assert table[0].startswith('| reward setting | tau seed vs seed, all 10 | ') and len(table) == 6
  ap_x2 = summary['settings']['ap_x2']
  assert table[4] == (f"| ap_x2 | n/a | n/a | {ap_x2['tau_long']:.2f} | "
                      f"{ap_x2['tau_long_better_half']:.2f} | 24 |")
  json.loads(json.dumps(summary, allow_nan=False))  # the final line is strict JSON


def test_a_constant_reward_has_no_tau(tmp_path):
  zero_ap = _stand_in()

  def trial_fn(trial):
    return {**zero_ap(trial), 'ap': 0.0}  # too short a training: AP 0 everywhere

  summary, _ = _run(tmp_path, trial_fn)
  assert summary['settings']['ap_x1']['tau_seeds'] is None
  assert summary['settings']['neg_loss_x1']['tau_long'] is None  # the reference is constant too
  assert summary['settings']['neg_loss_x1']['tau_seeds'] is not None
  table = gate.markdown_table(summary)
  assert '| ap_x1 | constant | constant | constant | constant | 12 |' in table
  json.loads(json.dumps(summary, allow_nan=False))


def test_the_picture_shows_each_setting_against_the_reference(tmp_path):
  _, figures = _run(tmp_path)
  image = training_helpers.read_png(tmp_path / search_dir_lib.GATE_PNG)
  assert image.shape == (840, 1350, 3)  # 13.5 x 8.4 in at 100 dpi
  axes = figures[0].axes
  assert len(axes) == 6
  top = set(ARCHS[i] for i in np.argsort([-LONG_AP[a] for a in ARCHS])[:5])
  # Row 2, middle: -loss of seed 1 against the long AP; worse half, better half, FPN, NAS-FPN.
  ax = axes[4]
  points = [collection.get_offsets().tolist() for collection in ax.collections]
  assert points == [
      [[-LOSS[1][a], LONG_AP[a]] for a in ARCHS if a not in top],
      [[-LOSS[1][a], LONG_AP[a]] for a in ARCHS if a in top],
      [[-LOSS[1]['fpn'], LONG_AP['fpn']]], [[-LOSS[1]['nasfpn'], LONG_AP['nasfpn']]]]
  assert ax.get_title().startswith('neg_loss x1 vs long AP: tau ')
  # Row 1, right: the two seeds' mean AP.
  means = axes[2].collections[2].get_offsets().tolist()
  assert means == [[pytest.approx((AP[1]['fpn'] + AP[2]['fpn']) / 2), LONG_AP['fpn']]]


def test_gate_resumes_from_its_journal_without_retraining_finished_trials(tmp_path):
  trials = gate.plan(_archs(), seeds=[1, 2], long_seed=3)
  assert len(trials) == 30 and len({t.key for t in trials}) == 30
  calls = []
  trial_fn = _stand_in(calls, kill_at=13)
  with pytest.raises(trial_fn.Killed):
    _run(tmp_path, trial_fn)
  path = tmp_path / search_dir_lib.TRIALS_FILE
  assert len(Journal(path).read()) == 12
  with open(path, 'ab') as f:  # a kill -9 in the middle of the next line's write
    f.write(b'{"arch": "random_0')
  calls.clear()
  lines = []
  summary, _ = _run(tmp_path, trial_fn, say=lines.append)
  assert calls == [t.key for t in trials[12:]]  # nothing trained twice
  assert lines[0] == '30 trials, 12 already done.' and lines[-1].startswith('trial 30/30 |')
  assert 'AP ' in lines[-1] and 'loss 0.5000' in lines[-1]
  records = Journal(path).read()
  assert sorted((r['arch'], r['seed'], r['schedule']) for r in records) == sorted(
      t.key for t in trials)
  assert all(r['heldout_loss'] is not None and r['ap'] is not None for r in records)
  # The same figures as a gate that never stopped.
  assert summary == _run(tmp_path / 'again')[0]


def test_a_gate_dir_of_another_configuration_is_refused(tmp_path):
  _run(tmp_path)
  recorded = json.loads((tmp_path / search_dir_lib.GATE_IDENTITY_FILE).read_text())
  assert recorded['long_factor'] == 3 and recorded['space'] == gate.SPACE.config()
  _run(tmp_path)  # the same gate again: nothing to train, accepted
  calls = []
  with pytest.raises(ValueError, match=r'holds another proxy gate .*long_factor: recorded 3, '
                     r'asked 2\. Use a new --output_dir'):
    _run(tmp_path, _stand_in(calls), long_factor=2)
  other = _archs()
  other['random_07'] = [[4, 'sum', [0, 1], False]]
  with pytest.raises(ValueError, match=r'architectures: recorded'):
    _run(tmp_path, _stand_in(calls), archs=other)
  assert not calls


def test_a_journal_without_the_heldout_loss_is_refused(tmp_path):
  journal = Journal(tmp_path / search_dir_lib.TRIALS_FILE)
  journal.append({'arch': 'fpn', 'seed': 1, 'schedule': 'short', 'reward': 0.2, 'ap': 0.2,
                  'seconds': 60.0, 'block_specs': []})
  calls = []
  with pytest.raises(ValueError, match=r"trials.jsonl: 1 of 1 trials lack \['heldout_loss'\] "
                     r'.*before the gate kept the held-out loss.*new --output_dir'):
    _run(tmp_path, _stand_in(calls))
  assert not calls and not (tmp_path / search_dir_lib.GATE_IDENTITY_FILE).exists()


def test_two_seeds_other_than_the_long_one_are_needed(tmp_path):
  with pytest.raises(ValueError, match=r'two --seed values, both other than --long_seed'):
    _run(tmp_path, seeds=[1, 3])


def test_the_cpu_trial_records_ap_and_loss_with_the_long_schedules_bindings(monkeypatch):
  from nasfpn_tf.search import proxy  # pylint: disable=g-import-not-at-top
  calls = []

  def run_trial(block_specs, name, seed, work_dir, bindings):
    calls.append((name, seed, work_dir, list(bindings)))
    return proxy.TrialResult(ap=0.25, ap50=0.5, flops=10, params=2, seconds=3.0, steps=4,
                             final_loss=0.9, heldout_loss=1.25)

  monkeypatch.setattr(proxy, 'run_trial', run_trial)
  trial_fn = gate.cpu_trial_fn('w', ['a = 1'], ['a = 1', 'CpuProxy.train_steps = 12'])
  short = trial_fn(gate.Trial('nasfpn', 'nasfpn', 1, 'short'))
  trial_fn(gate.Trial('nasfpn', 'nasfpn', 3, 'long'))
  assert calls == [('cpu', 1, 'w', ['a = 1']),
                   ('cpu', 3, 'w', ['a = 1', 'CpuProxy.train_steps = 12'])]
  assert short['ap'] == 0.25 and short['heldout_loss'] == 1.25 and short['seconds'] == 3.0
  assert 'cpu_seconds' in short and 'load_average' in short


def test_a_reference_dir_gives_the_long_trials_and_only_short_ones_train(tmp_path):
  full, _ = _run(tmp_path / 'full')
  calls = []
  summary, _ = _run(tmp_path / 'cheap', _stand_in(calls), long_factor=7,
                    reference_dir=str(tmp_path / 'full'))
  assert sorted(calls) == sorted((a, s, 'short') for a in ARCHS for s in (1, 2))
  assert summary == full  # the same short numbers against the same long trials
  recorded = json.loads((tmp_path / 'cheap' / search_dir_lib.GATE_IDENTITY_FILE).read_text())
  assert recorded['long_factor'] == 3  # the reference's, not the flag's
  assert recorded['reference_dir'] == str(tmp_path / 'full')
  assert {r['schedule'] for r in Journal(tmp_path / 'cheap' / search_dir_lib.TRIALS_FILE).read()
          } == {'short'}
  other = _archs()
  other['random_07'] = [[4, 'sum', [0, 1], False]]
  with pytest.raises(ValueError, match=r'--reference_dir=.*full ran other architectures'):
    _run(tmp_path / 'c2', archs=other, reference_dir=str(tmp_path / 'full'))
  with pytest.raises(ValueError, match=r'--reference_dir=.*nowhere holds no proxy gate'):
    _run(tmp_path / 'c3', reference_dir=str(tmp_path / 'nowhere'))
  partial = tmp_path / 'partial'
  trial_fn = _stand_in([], kill_at=22)
  with pytest.raises(trial_fn.Killed):
    _run(partial, trial_fn)
  with pytest.raises(ValueError, match=r"partial lacks the long trials of \['nasfpn', 'random_00', "):
    _run(tmp_path / 'c4', reference_dir=str(partial))
