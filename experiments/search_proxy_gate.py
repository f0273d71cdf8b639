r"""The proxy gate of the architecture search: does the CPU proxy rank architectures reliably?

  .venv/bin/python experiments/search_proxy_gate.py --output_dir=runs/search_proxy_gate

A search is only as good as its proxy. This trains FPN (`block_specs.fpn()`), the paper's
NAS-FPN and `--num_random` random samples of the search space (7 cells over P3-P7), each with two
seeds on the proxy (gin_configs/search_proxy_cpu.gin plus `--gin_bindings`) and once with a
`--long_factor` times longer schedule (a third seed), and reports:

  kendall_tau_seeds  Kendall's tau-b between the two seeds' rewards: is a reward reproducible?
  kendall_tau_long   tau-b between the first seed's rewards and the long schedule's: does the
                     short proxy rank as a longer training does?
  reward_fpn, reward_nasfpn  their rewards (AP on the held-out split), mean of the two seeds;
  seconds_per_trial  the mean wall time of a (short) trial, the shared cache excluded;
and the same taus among the better half of the architectures (by mean short reward), whose order
is what a search needs most and what poor samples do not test.

It runs for hours, so it resumes: every finished trial is one line of `trials.jsonl` in the
output dir (the file is rewritten atomically with the new line), and the same command run again
skips the finished ones; another configuration in the same output dir is refused. It prints a
progress line per trial, draws `gate.png` (seed 1 against seed 2, short against long) and ends
with one JSON line.
"""
import collections
import datetime
import io
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Sequence

from absl import app
from absl import flags
import numpy as np

from nasfpn_tf.decoders import block_specs as block_specs_lib
from nasfpn_tf.search import cpu_proxy
from nasfpn_tf.search import proxy
from nasfpn_tf.search import rewards
from nasfpn_tf.utils import files

_OUTPUT_DIR = None
_WORK_DIR = None
_NUM_RANDOM = None
_SAMPLE_SEED = None
_SEEDS = None
_LONG_SEED = None
_LONG_FACTOR = None
_GIN_BINDINGS = None
_TF_THREADS = None


def define_flags():
  """The script's flags, defined only when it runs: tests load it beside modules that define
  flags of the same names (output_dir)."""
  global _OUTPUT_DIR, _WORK_DIR, _NUM_RANDOM, _SAMPLE_SEED, _SEEDS, _LONG_SEED, _LONG_FACTOR, _GIN_BINDINGS, _TF_THREADS
  _OUTPUT_DIR = flags.DEFINE_string('output_dir', 'runs/search_proxy_gate',
                                    'trials.jsonl, gate_config.json and gate.png go here.')
  _WORK_DIR = flags.DEFINE_string('work_dir', None, "The proxy's cache folder (default: "
                                  '<output_dir>/work); share it between gates of equal data.')
  _NUM_RANDOM = flags.DEFINE_integer('num_random', 18, 'Random architectures besides FPN and '
                                     'NAS-FPN.', lower_bound=0)
  _SAMPLE_SEED = flags.DEFINE_integer('sample_seed', 0, 'Seed of the random architectures.')
  _SEEDS = flags.DEFINE_multi_integer('seed', [1, 2], 'The two trial seeds of the short schedule.')
  _LONG_SEED = flags.DEFINE_integer('long_seed', 3, 'The trial seed of the long schedule.')
  _LONG_FACTOR = flags.DEFINE_integer('long_factor', 3, 'The long schedule has this many times '
                                      'CpuProxy.train_steps.', lower_bound=1)
  _GIN_BINDINGS = flags.DEFINE_multi_string('gin_bindings', [], 'Bindings on top of the proxy gin '
                                            "file, e.g. 'CpuProxy.train_steps = 200'.")
  _TF_THREADS = flags.DEFINE_integer('tf_threads', None, "TensorFlow's thread pools (default: "
                                      "TensorFlow's own).")

TRIALS_FILE = 'trials.jsonl'
CONFIG_FILE = 'gate_config.json'
PLOT_FILE = 'gate.png'
NUM_CELLS, MIN_LEVEL, MAX_LEVEL = 7, 3, 7


class Trial(NamedTuple):
  arch: str
  block_specs: Any  # rows (level, op, [in0, in1], is_output)
  seed: int
  schedule: str  # 'short' or 'long'

  @property
  def key(self):
    return (self.arch, self.seed, self.schedule)


def sample_block_specs(rng: np.random.Generator, num_cells: int = NUM_CELLS,
                       min_level: int = MIN_LEVEL, max_level: int = MAX_LEVEL):
  """A random pyramid of the paper's search space (§3.1), rows as `block_specs.to_config`.

  Per cell: a first input among the candidates so far, a second among the rest, an output level
  (intermediate cells never output the finest), an op; the last L cells output the L levels in
  a random order. (Stands in for `search.space.SearchSpace(...).sample(rng)`.)
  """
  num_levels = max_level - min_level + 1
  output_levels = list(rng.permutation(np.arange(min_level, max_level + 1)))
  rows = []
  for k in range(num_cells):
    first, second = rng.choice(num_levels + k, size=2, replace=False)
    is_output = k >= num_cells - num_levels
    level = (output_levels.pop() if is_output else int(rng.integers(min_level + 1, max_level + 1)))
    op = block_specs_lib.OPS[int(rng.integers(len(block_specs_lib.OPS)))]
    rows.append([int(level), op, [int(first), int(second)], bool(is_output)])
  return rows


def _canonical(rows) -> str:
  """Two tables that build the same network (inputs swapped) share this key."""
  return json.dumps([[level, op, sorted(inputs), out] for level, op, inputs, out in rows])


def architectures(num_random: int, sample_seed: int) -> Dict[str, Any]:
  """{'fpn': rows, 'nasfpn': rows, 'random_00': rows, ...}: distinct networks."""
  archs = {'fpn': block_specs_lib.to_config(block_specs_lib.fpn(MIN_LEVEL, MAX_LEVEL)),
           'nasfpn': block_specs_lib.to_config(block_specs_lib.NASFPN)}
  seen = {_canonical(rows) for rows in archs.values()}
  rng = np.random.default_rng(sample_seed)
  while len(archs) < num_random + 2:
    rows = sample_block_specs(rng)
    if _canonical(rows) not in seen:
      seen.add(_canonical(rows))
      archs[f'random_{len(archs) - 2:02d}'] = rows
  return archs


def plan(archs: Dict[str, Any], seeds: Sequence[int], long_seed: int) -> List[Trial]:
  """Every architecture with each short seed, then all of them long: after the first two rounds
  the seeds' tau is known, hours before the end."""
  trials = [Trial(name, rows, seed, 'short') for seed in seeds for name, rows in archs.items()]
  return trials + [Trial(name, rows, long_seed, 'long') for name, rows in archs.items()]


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
  """Kendall's tau-b of two rankings (ties in either count as neither concordant nor discordant,
  and shrink the normalisation); NaN when one of them is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f'kendall_tau needs two equally long sequences, got {x.shape}, {y.shape}.')
  i, j = np.triu_indices(len(x), k=1)
  dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
  pairs_x, pairs_y = np.count_nonzero(dx), np.count_nonzero(dy)
  if not pairs_x or not pairs_y:
    return float('nan')
  return float(np.sum(dx * dy) / np.sqrt(float(pairs_x) * float(pairs_y)))


def read_records(output_dir: str) -> List[Dict[str, Any]]:
  path = os.path.join(output_dir, TRIALS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def run_gate(output_dir: str, trials: Sequence[Trial], trial_fn: Callable[[Trial], Dict[str, Any]],
             long_factor: int, say: Callable[[str], None] = print) -> List[Dict[str, Any]]:
  """Runs the trials not yet in `output_dir`'s trials.jsonl with `trial_fn(trial)` (a dict with
  'reward' and 'seconds' at least), appending each as one line; returns every record. Until a
  long trial has run, the ETA takes one as `long_factor` short ones."""
  records = read_records(output_dir)
  done = {(r['arch'], r['seed'], r['schedule']) for r in records}
  todo = [t for t in trials if t.key not in done]
  seconds = collections.defaultdict(list)
  for r in records:
    seconds[r['schedule']].append(r['seconds'])
  say(f'{len(trials)} trials, {len(trials) - len(todo)} already done.')
  lines = ''.join(json.dumps(r) + '\n' for r in records)
  for index, trial in enumerate(todo):
    result = trial_fn(trial)
    record = {'arch': trial.arch, 'seed': trial.seed, 'schedule': trial.schedule, **result,
              'block_specs': trial.block_specs}
    lines += json.dumps(record) + '\n'
    files.atomic_write(os.path.join(output_dir, TRIALS_FILE), lines)
    records.append(record)
    seconds[trial.schedule].append(result['seconds'])
    short = float(np.mean(seconds['short'])) if seconds['short'] else result['seconds']
    per_schedule = {'short': short, 'long': (float(np.mean(seconds['long'])) if seconds['long']
                                             else short * long_factor)}
    eta = sum(per_schedule[t.schedule] for t in todo[index + 1:])
    number = len(trials) - len(todo) + index + 1
    say(f'trial {number}/{len(trials)} | {trial.arch} seed {trial.seed} {trial.schedule} | '
        f"reward {result['reward']:.4f} | {result['seconds']:.1f} s | {short:.1f} s/trial | "
        f'ETA {datetime.timedelta(seconds=round(eta))}')
  return records


def rewards_by(records, schedule: str, seed: int) -> Dict[str, float]:
  return {r['arch']: r['reward'] for r in records
          if r['schedule'] == schedule and r['seed'] == seed}


def summarize(records, archs: Sequence[str], seeds: Sequence[int],
              long_seed: int) -> Dict[str, Any]:
  """The gate's figures from complete records (see the module doc)."""
  first, second = (rewards_by(records, 'short', seed) for seed in seeds)
  long = rewards_by(records, 'long', long_seed)
  short_seconds = [r['seconds'] for r in records if r['schedule'] == 'short']
  # A search cares most about the order of the good ones, which poor samples do not test.
  top = sorted(archs, key=lambda a: first[a] + second[a], reverse=True)[:max(2, len(archs) // 2)]

  def tau(other, among):
    return round(kendall_tau([first[a] for a in among], [other[a] for a in among]), 4)

  return {
      'num_architectures': len(archs),
      'kendall_tau_seeds': tau(second, archs),
      'kendall_tau_long': tau(long, archs),
      'kendall_tau_seeds_top_half': tau(second, top),
      'kendall_tau_long_top_half': tau(long, top),
      'reward_fpn': round((first['fpn'] + second['fpn']) / 2, 4),
      'reward_nasfpn': round((first['nasfpn'] + second['nasfpn']) / 2, 4),
      'seconds_per_trial': round(float(np.mean(short_seconds)), 1),
      'seconds_per_long_trial': round(float(np.mean(
          [r['seconds'] for r in records if r['schedule'] == 'long'])), 1),
      'reward_range': [round(min(first.values()), 4), round(max(first.values()), 4)],
  }


def plot(records, archs: Sequence[str], seeds: Sequence[int], long_seed: int, long_factor: int,
         path: str) -> None:
  """Seed 1 against seed 2, and short against long, FPN and NAS-FPN marked."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  first, second = (rewards_by(records, 'short', seed) for seed in seeds)
  long = rewards_by(records, 'long', long_seed)
  figure, axes = plt.subplots(1, 2, figsize=(10, 4.6))
  for ax, other, label in ((axes[0], second, f'reward, seed {seeds[1]}'),
                           (axes[1], long, f'reward, {long_factor}x longer schedule')):
    x, y = [first[a] for a in archs], [other[a] for a in archs]
    ax.scatter(x, y, c='grey', s=18, label='random samples')
    for name, colour in (('fpn', 'tab:blue'), ('nasfpn', 'tab:red')):
      ax.scatter([first[name]], [other[name]], c=colour, s=50, label=name)
    low, high = min(x + y), max(x + y)
    ax.plot([low, high], [low, high], c='lightgrey', lw=1, zorder=0)
    ax.set_xlabel(f'reward (held-out AP), seed {seeds[0]}')
    ax.set_ylabel(label)
    ax.set_title(f'Kendall tau {kendall_tau(x, y):.2f}')
    ax.legend(fontsize=8)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=120)
  plt.close(figure)
  files.atomic_write(path, buffer.getvalue())


def check_config(output_dir: str, gate_config: Dict[str, Any]) -> None:
  """Writes the gate's configuration once; a rerun with another one is refused (its records
  would mix two proxies)."""
  path = os.path.join(output_dir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      recorded = json.load(f)
    differing = sorted(k for k in set(recorded) | set(gate_config)
                       if recorded.get(k) != gate_config.get(k))
    if differing:
      raise ValueError(f'{output_dir} holds a gate run with other settings ({differing}, see '
                       f'{path}): use another --output_dir or the same flags.')
  else:
    files.atomic_write(path, json.dumps(gate_config, indent=1))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  proxy.configure_threads(_TF_THREADS.value)
  output_dir = _OUTPUT_DIR.value
  work_dir = _WORK_DIR.value or os.path.join(output_dir, 'work')
  seeds = _SEEDS.value
  if len(seeds) != 2 or len(set(seeds + [_LONG_SEED.value])) != 3:
    sys.exit(f'search_proxy_gate: error: give two --seed values, both other than --long_seed '
             f'({seeds}, {_LONG_SEED.value}).')
  archs = architectures(_NUM_RANDOM.value, _SAMPLE_SEED.value)
  bindings = list(_GIN_BINDINGS.value)
  try:
    proxy.prepare('cpu', work_dir, bindings)
  except ValueError as e:
    sys.exit(f'search_proxy_gate: error: {e}')
  short_steps = cpu_proxy.CpuProxy().train_steps  # prepare left the proxy's gin parsed
  long_bindings = bindings + [f'CpuProxy.train_steps = {_LONG_FACTOR.value * short_steps}']
  check_config(output_dir, {'architectures': archs, 'seeds': seeds, 'long_seed': _LONG_SEED.value,
                            'long_factor': _LONG_FACTOR.value, 'gin_bindings': bindings})

  def trial_fn(trial: Trial) -> Dict[str, Any]:
    cpu_start = time.process_time()
    result = proxy.run_trial(trial.block_specs, 'cpu', trial.seed, work_dir,
                             long_bindings if trial.schedule == 'long' else bindings)
    # CPU seconds and the load say how much of the wall time a busy machine added.
    return {'reward': rewards.reward(result), **result.to_dict(),
            'cpu_seconds': round(time.process_time() - cpu_start, 1),
            'load_average': round(os.getloadavg()[0], 2)}

  def say(message):
    print(f'[gate {time.strftime("%H:%M:%S")}] {message}', flush=True)

  records = run_gate(output_dir, plan(archs, seeds, _LONG_SEED.value), trial_fn,
                     _LONG_FACTOR.value, say)
  plot(records, list(archs), seeds, _LONG_SEED.value, _LONG_FACTOR.value,
       os.path.join(output_dir, PLOT_FILE))
  print(json.dumps(summarize(records, list(archs), seeds, _LONG_SEED.value)), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
