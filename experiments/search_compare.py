"""PPO, regularized evolution and random search with the same trial budget on one proxy.

The paper ran only RL and says evolution performs alike; this measures the three side by side.
An entry ALGORITHM@TABLE of --algorithms starts that controller from a known table (the search's
--init_block_specs, e.g. ppo@nasfpn), in OUTPUT_DIR/ALGORITHM@TABLE.
Each algorithm is an ordinary search (`nasfpn_tf.search`) in OUTPUT_DIR/<algorithm>, grown in
rounds of --round_trials samples, one algorithm after the other, so that an interrupted run has
comparable budgets and the same command resumes it from the journals. The proxy's shared cache
(the CPU proxy's frozen backbone features) is built once, in OUTPUT_DIR/proxy.

  .venv/bin/python experiments/search_compare.py --output_dir=runs/search_compare \
      --num_trials=100 --proxy=cpu

Writes OUTPUT_DIR/search_compare.png (best and moving-average reward over samples, unique
architectures) and prints one JSON row per algorithm: algorithm, num_trials, num_unique,
best_reward, best_key, moving_average_reward (the last --window samples), trial_hours (time
spent training trials, cached samples excluded); and for each algorithm but --baseline, whether
it beats the baseline after the first --burn_in samples (`lead`): both searches' mean reward
over samples burn_in+1 .. the shorter one's length (the same budget), the difference, its 95%
bootstrap interval, and the one-sided Mann-Whitney p-value (its rewards larger); and for each
algorithm whether it learned (`learning`): its samples after the first --burn_in against those
first ones, by the same test (random search, which learns nothing, is the control).
"""
import json
import pathlib
from typing import Any, Dict, List, Sequence

from absl import app, flags
from matplotlib.figure import Figure
import numpy as np
from scipy import stats

from nasfpn_tf.search import configurables
from nasfpn_tf.search.journal import Journal
from nasfpn_tf.search.progress import moving_average
from nasfpn_tf.search.runner import SearchSettings, run_search
from nasfpn_tf.search.trials import PROXIES
from nasfpn_tf.search import search_dir as search_dir_lib

FLAGS = flags.FLAGS


def define_flags():
  """The script's flags, defined only when it runs: tests import its functions beside other
  experiments that define flags of the same names."""
  flags.DEFINE_string('output_dir', 'runs/search_compare', 'One search dir per algorithm in it.')
  flags.DEFINE_list('algorithms', ['ppo', 'evolution', 'random'],
                    'The controllers to compare; ALGORITHM@TABLE starts one from a known table '
                    '(the search\'s --init_block_specs), e.g. ppo@nasfpn, in a dir of that name.')
  flags.DEFINE_integer('num_trials', 100, 'Samples per algorithm, duplicates included.')
  flags.DEFINE_integer('round_trials', 10, 'Samples each algorithm adds per round.')
  flags.DEFINE_enum('proxy', 'cpu', list(PROXIES), 'The proxy every algorithm trains on.')
  flags.DEFINE_integer('seed', 0, 'Seeds every controller and proxy training.')
  flags.DEFINE_integer('window', 20, 'Samples in the moving average.')
  flags.DEFINE_float('cpus_per_trial', 1, 'CPUs per trial (as the search\'s flag).')
  flags.DEFINE_string('baseline', 'random', 'The algorithm the others are tested against.')
  flags.DEFINE_integer('burn_in', 20, 'Samples left out of that test (the controller learning), '
                       'and the ones each search\'s later samples are tested against.')
  flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings for controllers and proxy.')


def compare_rows(output_dir: pathlib.Path, algorithms: Sequence[str],
                 window: int) -> List[Dict[str, Any]]:
  """One row per algorithm, from its journal."""
  rows = []
  for algorithm in algorithms:
    records = Journal(output_dir / algorithm / search_dir_lib.TRIALS_FILE).read()
    if not records:
      continue
    best = max(records, key=lambda r: r['reward'])
    rows.append({
        'algorithm': algorithm, 'num_trials': len(records),
        'num_unique': len({r['key'] for r in records}),
        'best_reward': best['reward'], 'best_key': best['key'],
        'moving_average_reward': float(moving_average(
            [r['reward'] for r in records], window)[-1]),
        'trial_hours': round(sum(r['seconds'] for r in records if not r['cached']) / 3600, 2)})
  return rows


def _difference(ours: Sequence[float], theirs: Sequence[float], resamples: int,
                seed: int) -> Dict[str, Any]:
  """{'mean', 'baseline_mean', 'difference', 'interval' (95% bootstrap of the difference, both
  resampled with `seed`), 'p_value' (one-sided Mann-Whitney U: `ours` larger)}."""
  ours, theirs = np.asarray(ours, float), np.asarray(theirs, float)
  rng = np.random.default_rng(seed)
  differences = (rng.choice(ours, (resamples, len(ours))).mean(axis=1) -
                 rng.choice(theirs, (resamples, len(theirs))).mean(axis=1))
  return {'mean': float(ours.mean()), 'baseline_mean': float(theirs.mean()),
          'difference': float(ours.mean() - theirs.mean()),
          'interval': [float(v) for v in np.percentile(differences, [2.5, 97.5])],
          'p_value': float(stats.mannwhitneyu(ours, theirs, alternative='greater').pvalue)}


def lead(rewards: Sequence[float], baseline: Sequence[float], burn_in: int,
         resamples: int = 10000, seed: int = 0) -> Dict[str, Any]:
  """Whether `rewards` beat `baseline` at the same budget: both cut to the shorter one's
  length, the first `burn_in` samples left out. {'samples': 'first..last' (1-based),
  **_difference}."""
  budget = min(len(rewards), len(baseline))
  if budget - burn_in < 2:
    raise ValueError(f'--burn_in={burn_in} leaves {max(budget - burn_in, 0)} of {budget} '
                     'samples to compare; give a smaller --burn_in or more samples.')
  return {'samples': f'{burn_in + 1}..{budget}',
          **_difference(rewards[burn_in:budget], baseline[burn_in:budget], resamples, seed)}


def learning(rewards: Sequence[float], burn_in: int, resamples: int = 10000,
             seed: int = 0) -> Dict[str, Any]:
  """Whether a search's samples after its first `burn_in` beat those first ones: what its
  controller learned, with the search as its own baseline (random search, which learns nothing,
  is the control). {'samples': 'first..last', 'baseline_samples': '1..burn_in',
  **_difference}."""
  if burn_in < 2 or len(rewards) - burn_in < 2:
    raise ValueError(f'--burn_in={burn_in} splits {len(rewards)} samples into '
                     f'{min(burn_in, len(rewards))} and {max(len(rewards) - burn_in, 0)}; '
                     'each side needs 2 or more.')
  return {'samples': f'{burn_in + 1}..{len(rewards)}', 'baseline_samples': f'1..{burn_in}',
          **_difference(rewards[burn_in:], rewards[:burn_in], resamples, seed)}


def _rewards(output_dir: pathlib.Path, algorithms: Sequence[str]) -> Dict[str, List[float]]:
  """{algorithm: its journal's rewards} for each algorithm that has run."""
  rewards = {algorithm: [r['reward'] for r in Journal(
      output_dir / algorithm / search_dir_lib.TRIALS_FILE).read()] for algorithm in algorithms}
  return {algorithm: values for algorithm, values in rewards.items() if values}


def leads(output_dir: pathlib.Path, algorithms: Sequence[str], baseline: str,
          burn_in: int) -> List[Dict[str, Any]]:
  """`lead` of each algorithm but `baseline` over it, as rows {'algorithm', 'baseline',
  **lead}; none when the baseline has not run."""
  rewards = _rewards(output_dir, [*algorithms, baseline])
  if baseline not in rewards:
    return []
  return [{'algorithm': algorithm, 'baseline': baseline,
           **lead(rewards[algorithm], rewards[baseline], burn_in)}
          for algorithm in algorithms if algorithm != baseline and algorithm in rewards]


def learnings(output_dir: pathlib.Path, algorithms: Sequence[str],
              burn_in: int) -> List[Dict[str, Any]]:
  """`learning` of each algorithm that has run, as rows {'algorithm', 'learning': True,
  **learning}."""
  return [{'algorithm': algorithm, 'learning': True, **learning(values, burn_in)}
          for algorithm, values in _rewards(output_dir, algorithms).items()]


def draw(output_dir: pathlib.Path, algorithms: Sequence[str], window: int, path: str) -> None:
  fig = Figure(figsize=(12, 4))
  best_ax, average_ax, unique_ax = fig.subplots(1, 3)
  for algorithm in algorithms:
    records = Journal(output_dir / algorithm / search_dir_lib.TRIALS_FILE).read()
    if not records:
      continue
    rewards = [r['reward'] for r in records]
    samples = range(1, len(records) + 1)
    best_ax.plot(samples, [max(rewards[:i]) for i in samples], label=algorithm)
    average_ax.plot(samples, moving_average(rewards, window), label=algorithm)
    keys = [r['key'] for r in records]
    unique_ax.plot(samples, [len(set(keys[:i])) for i in samples], label=algorithm)
  best_ax.set(xlabel='sample', ylabel='reward', title='Best reward so far')
  average_ax.set(xlabel='sample', ylabel='reward', title=f'Moving average ({window})')
  unique_ax.set(xlabel='total samples', ylabel='unique samples', title='Unique architectures')
  for ax in (best_ax, average_ax, unique_ax):
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def search_settings(output_dir: pathlib.Path, entry: str, num_trials: int,
                    **shared) -> SearchSettings:
  """The search of one --algorithms entry (ALGORITHM, or ALGORITHM@TABLE started from that
  table) in OUTPUT_DIR/entry; `shared`: the SearchSettings every entry has (proxy, seed, ...)."""
  algorithm, _, table = entry.partition('@')
  return SearchSettings(search_dir=str(output_dir / entry), algorithm=algorithm,
                        num_trials=num_trials, init_block_specs=table or None,
                        proxy_dir=str(output_dir / search_dir_lib.PROXY_DIR), **shared)


def main(argv):
  del argv
  configurables.parse_gin(gin_bindings=FLAGS.gin_bindings)
  output_dir = pathlib.Path(FLAGS.output_dir)
  for budget in range(FLAGS.round_trials, FLAGS.num_trials + FLAGS.round_trials,
                      FLAGS.round_trials):
    for entry in FLAGS.algorithms:
      print(f'[search_compare] {entry}: up to {min(budget, FLAGS.num_trials)} samples',
            flush=True)
      run_search(search_settings(
          output_dir, entry, min(budget, FLAGS.num_trials), proxy=FLAGS.proxy, seed=FLAGS.seed,
          gin_bindings=tuple(FLAGS.gin_bindings), cpus_per_trial=FLAGS.cpus_per_trial))
      draw(output_dir, FLAGS.algorithms, FLAGS.window, str(output_dir / 'search_compare.png'))
  for row in compare_rows(output_dir, FLAGS.algorithms, FLAGS.window):
    print(json.dumps(row), flush=True)
  for row in leads(output_dir, FLAGS.algorithms, FLAGS.baseline, FLAGS.burn_in):
    print(json.dumps(row), flush=True)
  for row in learnings(output_dir, FLAGS.algorithms, FLAGS.burn_in):
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
