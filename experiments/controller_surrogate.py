r"""Controller settings tried in seconds on a surrogate of the proxy, fitted to searches' journals.

A real comparison of controllers costs about 20 minutes per 50 samples on 2 cores
(`search_compare.py`); this one replays the package's controllers (`search.controllers`, each
setting built with its keyword arguments) against a stand-in for the proxy, so that settings can
be screened before any of them is run for real:

  .venv/bin/python experiments/controller_surrogate.py --output_dir=runs/controller_surrogate \
      --search_dirs=runs/compare_fast/ppo,runs/compare_fast/random,runs/compare_fast/evolution \
      --settings=random,evolution,ppo:batch_size=4,ppo:batch_size=4:learning_rate=0.005

The surrogate: ridge regression of the reward on the one-hot decisions (each decision step's
action) of every distinct architecture in the journals (the first reward of a key), plus
Gaussian noise of --noise (the proxy's seed noise) on every sample drawn. How far to trust it is
measured first and printed: --folds-fold cross-validation, Kendall's tau and R^2 of the held-out
predictions, over all architectures and over the better half. A surrogate that does not rank
held-out architectures says nothing about controllers.

Each --settings entry, NAME[:PARAM=VALUE...] (a controller of `controllers.CONTROLLERS` and its
constructor's keyword arguments; [@TABLE] after NAME starts it from a known table as the search's
--init_block_specs), runs --runs times (seeds 0..runs-1) for --num_samples samples, --in_flight
proposals out at once as in a search with trials side by side (rewards come back oldest first).
Prints a JSON line per setting: the surrogate's mean true (noise-free) reward over samples
burn_in+1..num_samples and over its last 10, averaged over runs with their standard error; in
how many runs the setting learned (`search_compare.learning`: its later samples above its first
--burn_in, p < 0.05) and beat random search of the same seed (`search_compare.lead`, p < 0.05).
Writes OUTPUT_DIR/controller_surrogate.png (mean true reward per sample, per setting) and
OUTPUT_DIR/controller_surrogate.jsonl.
"""
import collections
import json
import os
import pathlib
import sys
from typing import Any, Dict, List, Sequence, Tuple

# search_compare's tests, also when this file is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

import search_compare  # noqa: E402  (lead, learning)
import search_proxy_gate  # noqa: E402  (kendall_tau)
from nasfpn_tf.search import controllers  # noqa: E402
from nasfpn_tf.search import search_dir as search_dir_lib  # noqa: E402
from nasfpn_tf.search import space as space_lib  # noqa: E402
from nasfpn_tf.search.journal import Journal  # noqa: E402
from nasfpn_tf.utils.files import atomic_write  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """The script's flags, defined only when it runs (tests import its functions)."""
  flags.DEFINE_string('output_dir', 'runs/controller_surrogate', 'Plot and rows.')
  flags.DEFINE_list('search_dirs', None, 'Searches (one space) whose journals the surrogate '
                    'is fitted to.')
  flags.DEFINE_list('settings', ['random', 'evolution', 'ppo', 'ppo:batch_size=4'],
                    'NAME[@TABLE][:PARAM=VALUE...] controller settings to replay.')
  flags.DEFINE_integer('num_samples', 50, 'Samples per run.')
  flags.DEFINE_integer('runs', 10, 'Runs (seeds) per setting.')
  flags.DEFINE_integer('in_flight', 2, 'Proposals out at once.')
  flags.DEFINE_float('noise', 0.01, 'Standard deviation of the noise on each sample\'s reward.')
  flags.DEFINE_float('ridge', 30.0, 'The surrogate\'s ridge penalty.')
  flags.DEFINE_integer('folds', 5, 'Cross-validation folds of the surrogate.')
  flags.DEFINE_integer('burn_in', 20, 'As search_compare.py\'s.')


def journal_data(search_dirs: Sequence[str]) -> Tuple[Any, np.ndarray, np.ndarray]:
  """(space, [n, num_decisions] actions, [n] rewards) of the distinct keys over the searches'
  journals (a key's first line). ValueError naming a dir of another space or with no trials."""
  space, seen, actions, rewards = None, set(), [], []
  for directory in search_dirs:
    identity = json.loads((pathlib.Path(directory) / search_dir_lib.IDENTITY_FILE).read_text())
    this = space_lib.from_config(identity['space'])
    if space is not None and this.config() != space.config():
      raise ValueError(f'--search_dirs: {directory} searched {this.config()}, the first dir '
                       f'{space.config()}; the surrogate is of one space.')
    space = this
    records = Journal(pathlib.Path(directory) / search_dir_lib.TRIALS_FILE).read()
    if not records:
      raise ValueError(f'--search_dirs: {directory} has no finished trial.')
    for record in records:
      if record['key'] not in seen:
        seen.add(record['key'])
        actions.append(record['actions'])
        rewards.append(record['reward'])
  return space, np.asarray(actions, int), np.asarray(rewards, float)


class Surrogate:
  """Ridge regression of the reward on one-hot decisions: reward ~ b + sum_t w[t, action_t]."""

  def __init__(self, num_decisions: int, max_options: int, ridge: float = 1.0):
    self.num_decisions, self.max_options, self.ridge = num_decisions, max_options, ridge
    self.weights, self.bias = None, 0.0

  def features(self, actions: np.ndarray) -> np.ndarray:
    actions = np.asarray(actions, int).reshape(-1, self.num_decisions)
    onehot = np.zeros([len(actions), self.num_decisions * self.max_options])
    rows = np.arange(len(actions))[:, None]
    onehot[rows, np.arange(self.num_decisions) * self.max_options + actions] = 1.0
    return onehot

  def fit(self, actions: np.ndarray, rewards: np.ndarray) -> 'Surrogate':
    x, y = self.features(actions), np.asarray(rewards, float)
    self.bias = float(y.mean())
    self.weights = np.linalg.solve(x.T @ x + self.ridge * np.eye(x.shape[1]),
                                   x.T @ (y - self.bias))
    return self

  def predict(self, actions: np.ndarray) -> np.ndarray:
    return self.features(actions) @ self.weights + self.bias


def cross_validate(space, actions: np.ndarray, rewards: np.ndarray, folds: int, ridge: float,
                   seed: int = 0) -> Dict[str, float]:
  """Held-out predictions of a --folds-fold split: Kendall's tau and R^2, all and better half."""
  order = np.random.default_rng(seed).permutation(len(rewards))
  predicted = np.zeros(len(rewards))
  for fold in np.array_split(order, folds):
    train = np.setdiff1d(order, fold)
    surrogate = Surrogate(space.num_decisions, space.max_options, ridge)
    predicted[fold] = surrogate.fit(actions[train], rewards[train]).predict(actions[fold])
  better = rewards >= np.median(rewards)

  def r2(truth, guess):
    return float(1 - np.sum((truth - guess)**2) / np.sum((truth - truth.mean())**2))

  return {'architectures': len(rewards),
          'tau': search_proxy_gate.kendall_tau(list(rewards), list(predicted)),
          'tau_better_half': search_proxy_gate.kendall_tau(list(rewards[better]),
                                                           list(predicted[better])),
          'r2': r2(rewards, predicted), 'r2_better_half': r2(rewards[better], predicted[better])}


def parse_setting(setting: str) -> Tuple[str, str, Dict[str, Any]]:
  """'ppo@nasfpn:batch_size=4:learning_rate=0.005' -> ('ppo', 'nasfpn', {...}); values as
  Python literals (int, float) where they parse, else strings."""
  name, *params = setting.split(':')
  name, _, table = name.partition('@')
  if name not in controllers.CONTROLLERS:
    raise ValueError(f'--settings: {setting!r}: unknown controller {name!r}; controllers are '
                     f'{sorted(controllers.CONTROLLERS)}.')
  kwargs = {}
  for param in params:
    key, equals, value = param.partition('=')
    if not equals:
      raise ValueError(f'--settings: {setting!r}: {param!r} is not PARAM=VALUE.')
    for kind in (int, float):
      try:
        value = kind(value)
        break
      except ValueError:
        pass
    kwargs[key] = value
  return name, table or None, kwargs


def replay(space, setting: str, surrogate: Surrogate, num_samples: int, seed: int, noise: float,
           in_flight: int) -> Tuple[np.ndarray, np.ndarray]:
  """(true rewards, noisy rewards) of one run of `setting`: the controller built with seed `seed`,
  proposals kept `in_flight` at once, each answered (oldest first) with the surrogate's reward
  plus noise drawn with `seed`."""
  name, table, kwargs = parse_setting(setting)
  controller = controllers.CONTROLLERS[name](space, seed=seed, init_block_specs=table, **kwargs)
  rng = np.random.default_rng(seed)
  pending = collections.deque()
  truths, noisy = [], []
  while len(truths) < num_samples:
    while len(pending) < in_flight and len(truths) + len(pending) < num_samples:
      pending.append(controller.propose())
    proposal = pending.popleft()
    truth = float(surrogate.predict(np.asarray(proposal.actions))[0])
    reward = truth + float(rng.normal(0.0, noise))
    controller.feedback(proposal, reward)
    truths.append(truth)
    noisy.append(reward)
  return np.asarray(truths), np.asarray(noisy)


def setting_rows(truths: Dict[str, List[np.ndarray]], noisy: Dict[str, List[np.ndarray]],
                 burn_in: int, baseline: str = 'random') -> List[Dict[str, Any]]:
  """One row per setting from its runs (see the module's docstring)."""
  rows = []
  for setting, runs in truths.items():
    later = np.array([run[burn_in:].mean() for run in runs])
    last = np.array([run[-10:].mean() for run in runs])
    learned = sum(search_compare.learning(list(run), burn_in)['p_value'] < 0.05
                  for run in noisy[setting])
    row = {'setting': setting, 'runs': len(runs),
           'mean_true_reward_after_burn_in': float(later.mean()),
           'standard_error': float(later.std(ddof=1) / np.sqrt(len(runs))) if len(runs) > 1
                             else None,
           'mean_true_reward_last_10': float(last.mean()), 'learned_runs': int(learned)}
    if baseline in noisy and setting != baseline:
      row['beat_random_runs'] = int(sum(
          search_compare.lead(list(ours), list(theirs), burn_in)['p_value'] < 0.05
          for ours, theirs in zip(noisy[setting], noisy[baseline])))
    rows.append(row)
  return rows


def draw(truths: Dict[str, List[np.ndarray]], validation: Dict[str, float], path: str) -> None:
  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  for setting, runs in truths.items():
    ax.plot(np.arange(1, len(runs[0]) + 1), np.mean(runs, axis=0), label=setting)
  ax.set(xlabel='sample', ylabel='surrogate reward (noise-free), mean over runs',
         title=f'Controllers on the surrogate (held-out tau {validation["tau"]:.2f}, '
               f'better half {validation["tau_better_half"]:.2f})')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  if not FLAGS.search_dirs:
    raise app.UsageError('--search_dirs is required.')
  output_dir = pathlib.Path(FLAGS.output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  space, actions, rewards = journal_data(FLAGS.search_dirs)
  validation = cross_validate(space, actions, rewards, FLAGS.folds, FLAGS.ridge)
  print(json.dumps({'surrogate': validation}), flush=True)
  surrogate = Surrogate(space.num_decisions, space.max_options, FLAGS.ridge).fit(actions, rewards)
  truths, noisy = {}, {}
  for setting in FLAGS.settings:
    parse_setting(setting)  # a bad entry is named before any run
  for setting in FLAGS.settings:
    for seed in range(FLAGS.runs):
      truth, reward = replay(space, setting, surrogate, FLAGS.num_samples, seed, FLAGS.noise,
                             FLAGS.in_flight)
      truths.setdefault(setting, []).append(truth)
      noisy.setdefault(setting, []).append(reward)
    print(f'[controller_surrogate] {setting}: {FLAGS.runs} runs', flush=True)
  rows = setting_rows(truths, noisy, FLAGS.burn_in)
  for row in rows:
    print(json.dumps(row), flush=True)
  atomic_write(output_dir / 'controller_surrogate.jsonl',
               ''.join(json.dumps(row) + '\n' for row in [{'surrogate': validation}] + rows))
  draw(truths, validation, str(output_dir / 'controller_surrogate.png'))


if __name__ == '__main__':
  define_flags()
  app.run(main)
