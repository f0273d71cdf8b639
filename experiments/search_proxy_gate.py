r"""The proxy gate of the search: which reward ranks architectures as longer training does?

  .venv/bin/python experiments/search_proxy_gate.py --output_dir=runs/search_proxy_gate

A search is only as good as its reward. This trains FPN (`block_specs.fpn()`), the paper's
NAS-FPN and `--num_random` distinct random samples of the search space (`search.space.
SearchSpace`, 7 cells over P3-P7), each with two seeds on the proxy (gin_configs/
search_proxy_cpu.gin plus `--gin_bindings`) and once with a `--long_factor` times longer schedule
(a third seed), or takes the long trials of another gate's dir (`--reference_dir`: a cheaper proxy
ranked against the same reference). Every trial keeps the held-out AP (`--reward=ap`) and the
held-out focal + box loss (`--reward=neg_loss` is its negative; `search.rewards`). For each reward
setting (ap_x1, neg_loss_x1: the first --seed's reward, as `--proxy_seeds=1` gives it; ap_x2,
neg_loss_x2: the two seeds' mean, as `--proxy_seeds=2`) it reports Kendall's tau-b

  tau_seeds   (x1 settings) the first seed's reward against the second's: is it reproducible?
  tau_long    the reward against the long schedule's held-out AP, the reference: does the short
              proxy rank as a longer training does?

over all architectures and over the better half by the reference (None, "constant" in the table,
where a ranking is constant), and `seconds_per_trial` (x1: the mean short trial, x2: twice it).
It prints a markdown table, draws `gate.png` (a row per reward: seed against seed, then x1 and x2
against the reference) and ends with one JSON line.

It resumes: every finished trial is one line of the output dir's journal (`search.journal.
Journal`, `search_dir.TRIALS_FILE`); the same command again trains only the trials not there.
The dir records the gate's configuration (`search_dir.GATE_IDENTITY_FILE`, checked by
`search_dir.check_identity`): another one is refused, naming the settings that differ, as is a
journal written before the gate kept the held-out loss.
"""
import collections
import datetime
import io
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np

from nasfpn_tf.decoders import block_specs as block_specs_lib
from nasfpn_tf.search import rewards
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.search.journal import Journal
from nasfpn_tf.search.space import SearchSpace
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
_REFERENCE_DIR = None


def define_flags():
  """The script's flags, defined only when it runs: tests load it beside modules that define
  flags of the same names (output_dir)."""
  global _OUTPUT_DIR, _WORK_DIR, _NUM_RANDOM, _SAMPLE_SEED, _SEEDS, _LONG_SEED, _LONG_FACTOR
  global _GIN_BINDINGS, _TF_THREADS, _REFERENCE_DIR
  _OUTPUT_DIR = flags.DEFINE_string(
      'output_dir', 'runs/search_proxy_gate',
      f'{search_dir_lib.TRIALS_FILE}, {search_dir_lib.GATE_IDENTITY_FILE} and '
      f'{search_dir_lib.GATE_PNG} go here.')
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
  _REFERENCE_DIR = flags.DEFINE_string(
      'reference_dir', None, "Another gate's --output_dir of the same architectures and long "
      'seed: its long trials are the reference and only the short ones train here (a cheaper '
      'proxy ranked against the same longer training).')


SPACE = SearchSpace(num_cells=7, min_level=3, max_level=7)
# The reward settings compared: (name, reward kind, seeds averaged).
SETTINGS = (('ap_x1', 'ap', 1), ('neg_loss_x1', 'neg_loss', 1),
            ('ap_x2', 'ap', 2), ('neg_loss_x2', 'neg_loss', 2))
# What every trial's record must hold for the settings above.
MEASURED = ('ap', 'heldout_loss', 'seconds')


class Trial(NamedTuple):
  arch: str
  block_specs: Any  # rows (level, op, [in0, in1], is_output)
  seed: int
  schedule: str  # 'short' or 'long'

  @property
  def key(self):
    return (self.arch, self.seed, self.schedule)


def architectures(num_random: int, sample_seed: int,
                  space: SearchSpace = SPACE) -> Dict[str, Any]:
  """{'fpn': rows, 'nasfpn': rows, 'random_00': rows, ...}: `num_random` samples of `space`
  (`SearchSpace.sample`, seeded with sample_seed) whose keys (`SearchSpace.key`: the network up to
  input order) differ from each other's and NAS-FPN's. FPN (5 cells) is outside the space."""
  archs = {'fpn': block_specs_lib.to_config(block_specs_lib.fpn(space.min_level,
                                                                space.max_level)),
           'nasfpn': block_specs_lib.to_config(block_specs_lib.NASFPN)}
  seen = {space.key(archs['nasfpn'])}
  rng = np.random.default_rng(sample_seed)
  while len(archs) < num_random + 2:
    specs = space.sample(rng)
    if space.key(specs) not in seen:
      seen.add(space.key(specs))
      archs[f'random_{len(archs) - 2:02d}'] = block_specs_lib.to_config(specs)
  return archs


def arch_key(rows, space: SearchSpace = SPACE) -> Optional[str]:
  """The architecture's `SearchSpace.key` (what a search's journal keys it by); None outside the
  space (FPN)."""
  return space.key(rows) if space.contains(rows) else None


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


def journal(output_dir: str) -> Journal:
  return Journal(pathlib.Path(output_dir) / search_dir_lib.TRIALS_FILE)


def read_records(output_dir: str) -> List[Dict[str, Any]]:
  """The journal's complete lines; ValueError naming the file when a trial lacks what the gate
  compares (a journal of the gate before it kept the held-out loss)."""
  records = journal(output_dir).read()
  lacking = [r for r in records if any(r.get(name) is None for name in MEASURED)]
  if lacking:
    first = lacking[0]
    missing = [name for name in MEASURED if first.get(name) is None]
    raise ValueError(
        f'{journal(output_dir).path}: {len(lacking)} of {len(records)} trials lack {missing} '
        f"(the first: {first.get('arch')} seed {first.get('seed')} {first.get('schedule')}); "
        'they were recorded before the gate kept the held-out loss beside the AP. Run the '
        'gate in a new --output_dir (pass --work_dir=<this dir>/work to reuse its cache).')
  return records


def run_gate(output_dir: str, trials: Sequence[Trial], trial_fn: Callable[[Trial], Dict[str, Any]],
             long_factor: int, say: Callable[[str], None] = print) -> List[Dict[str, Any]]:
  """Runs the trials not yet in `output_dir`'s journal with `trial_fn(trial)` (a dict with 'ap',
  'heldout_loss' and 'seconds' at least), appending each as one line; returns every record.
  Until a long trial has run, the ETA takes one as `long_factor` short ones."""
  os.makedirs(output_dir, exist_ok=True)
  read_records(output_dir)  # refuses a journal the gate cannot compare
  records = journal(output_dir).recover()
  done = {(r['arch'], r['seed'], r['schedule']) for r in records}
  todo = [t for t in trials if t.key not in done]
  seconds = collections.defaultdict(list)
  for r in records:
    seconds[r['schedule']].append(r['seconds'])
  say(f'{len(trials)} trials, {len(trials) - len(todo)} already done.')
  for index, trial in enumerate(todo):
    result = trial_fn(trial)
    missing = [name for name in MEASURED if result.get(name) is None]
    if missing:
      raise ValueError(f'trial {trial.key} measured no {missing}: the gate compares the '
                       'held-out AP and loss, which only the CPU proxy measures.')
    record = {'arch': trial.arch, 'seed': trial.seed, 'schedule': trial.schedule, **result,
              'block_specs': trial.block_specs, 'key': arch_key(trial.block_specs)}
    journal(output_dir).append(record)
    records.append(record)
    seconds[trial.schedule].append(result['seconds'])
    short = float(np.mean(seconds['short'])) if seconds['short'] else result['seconds']
    per_schedule = {'short': short, 'long': (float(np.mean(seconds['long'])) if seconds['long']
                                             else short * long_factor)}
    eta = sum(per_schedule[t.schedule] for t in todo[index + 1:])
    number = len(trials) - len(todo) + index + 1
    say(f'trial {number}/{len(trials)} | {trial.arch} seed {trial.seed} {trial.schedule} | '
        f"AP {result['ap']:.4f} | loss {result['heldout_loss']:.4f} | "
        f"{result['seconds']:.1f} s | {short:.1f} s/trial | "
        f'ETA {datetime.timedelta(seconds=round(eta))}')
  return records


def by_arch(records, schedule: str, seed: int) -> Dict[str, Dict[str, Any]]:
  return {r['arch']: r for r in records if r['schedule'] == schedule and r['seed'] == seed}


def setting_rewards(records, archs: Sequence[str], seeds: Sequence[int], kind: str,
                    num_seeds: int) -> Dict[str, float]:
  """{arch: reward} of a setting: `rewards.reward` of kind over the first num_seeds seeds (their
  mean, as a search with --proxy_seeds=num_seeds rewards them)."""
  runs = [by_arch(records, 'short', seed) for seed in seeds[:num_seeds]]
  return {a: rewards.reward({'seeds': [run[a] for run in runs]}, kind=kind) for a in archs}


def reference(records, archs: Sequence[str], long_seed: int) -> Dict[str, float]:
  """{arch: the long schedule's held-out AP}."""
  long = by_arch(records, 'long', long_seed)
  return {a: float(long[a]['ap']) for a in archs}


def better_half(archs: Sequence[str], ref: Dict[str, float]) -> List[str]:
  """The better half of the architectures by the reference (at least two)."""
  return sorted(archs, key=lambda a: ref[a], reverse=True)[:max(2, len(archs) // 2)]


def summarize(records, archs: Sequence[str], seeds: Sequence[int],
              long_seed: int) -> Dict[str, Any]:
  """The gate's figures from complete records (see the module doc)."""
  ref = reference(records, archs, long_seed)
  top = better_half(archs, ref)
  short = [by_arch(records, 'short', seed) for seed in seeds]
  trial_seconds = float(np.mean([r['seconds'] for r in records if r['schedule'] == 'short']))

  def tau(a, b, among):
    value = kendall_tau([a[n] for n in among], [b[n] for n in among])
    return None if math.isnan(value) else round(value, 4)  # None: a ranking is constant

  settings = {}
  for name, kind, num_seeds in SETTINGS:
    reward = setting_rewards(records, archs, seeds, kind, num_seeds)
    figures = {}
    if num_seeds == 1:
      other = {a: rewards.reward(short[1][a], kind=kind) for a in archs}
      figures.update(tau_seeds=tau(reward, other, archs),
                     tau_seeds_better_half=tau(reward, other, top))
    figures.update(tau_long=tau(reward, ref, archs), tau_long_better_half=tau(reward, ref, top),
                   seconds_per_trial=round(num_seeds * trial_seconds, 1))
    settings[name] = figures
  ap = setting_rewards(records, archs, seeds, 'ap', 2)
  return {
      'num_architectures': len(archs),
      'better_half': len(top),
      'settings': settings,
      'ap_fpn': round(ap['fpn'], 4), 'ap_nasfpn': round(ap['nasfpn'], 4),
      'long_ap_fpn': round(ref['fpn'], 4), 'long_ap_nasfpn': round(ref['nasfpn'], 4),
      'long_ap_range': [round(min(ref.values()), 4), round(max(ref.values()), 4)],
      'seconds_per_short_trial': round(trial_seconds, 1),
      'seconds_per_long_trial': round(float(np.mean(
          [r['seconds'] for r in records if r['schedule'] == 'long'])), 1),
  }


def markdown_table(summary: Dict[str, Any]) -> str:
  """The settings' figures as a markdown table."""

  def cell(figures, name):
    if name not in figures:
      return 'n/a'  # two seeds' mean: no second reward of its own
    return 'constant' if figures[name] is None else f'{figures[name]:.2f}'

  n, half = summary['num_architectures'], summary['better_half']
  lines = [f'| reward setting | tau seed vs seed, all {n} | tau seed vs seed, better {half} | '
           f'tau vs long AP, all {n} | tau vs long AP, better {half} | s per trial |',
           '|---|---|---|---|---|---|']
  for name, figures in summary['settings'].items():
    taus = ' | '.join(cell(figures, f'tau_{which}') for which in (
        'seeds', 'seeds_better_half', 'long', 'long_better_half'))
    lines.append(f"| {name} | {taus} | {figures['seconds_per_trial']:.0f} |")
  return '\n'.join(lines)


_LABELS = {'ap': 'held-out AP', 'neg_loss': '-(held-out loss)'}


def plot(records, archs: Sequence[str], seeds: Sequence[int], long_seed: int, long_factor: int,
         path: str) -> None:
  """A row per reward (AP, -loss): seed against seed, then one seed's and two seeds' mean against
  the long schedule's AP; the better half (by it) in black, FPN and NAS-FPN marked."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  ref = reference(records, archs, long_seed)
  top = set(better_half(archs, ref))
  figure, axes = plt.subplots(2, 3, figsize=(13.5, 8.4))
  for row, kind in zip(axes, ('ap', 'neg_loss')):
    x1 = setting_rewards(records, archs, seeds, kind, 1)
    second = by_arch(records, 'short', seeds[1])
    panels = (
        (x1, {a: rewards.reward(second[a], kind=kind) for a in archs},
         f'{_LABELS[kind]}, seed {seeds[1]}', f'{kind} seed vs seed'),
        (x1, ref, f'held-out AP, {long_factor}x longer schedule', f'{kind} x1 vs long AP'),
        (setting_rewards(records, archs, seeds, kind, 2), ref,
         f'held-out AP, {long_factor}x longer schedule', f'{kind} x2 vs long AP'))
    for ax, (xs, ys, ylabel, title) in zip(row, panels):
      for among, colour, label in (([a for a in archs if a not in top], 'lightgrey',
                                    'worse half (long AP)'),
                                   ([a for a in archs if a in top], 'black',
                                    'better half (long AP)')):
        ax.scatter([xs[a] for a in among], [ys[a] for a in among], c=colour, s=18, label=label)
      for name, colour in (('fpn', 'tab:blue'), ('nasfpn', 'tab:red')):
        ax.scatter([xs[name]], [ys[name]], c=colour, s=50, label=name)
      tau_all = kendall_tau([xs[a] for a in archs], [ys[a] for a in archs])
      tau_top = kendall_tau([xs[a] for a in top], [ys[a] for a in top])
      seeds_note = f'mean of seeds {seeds[0]}, {seeds[1]}' if 'x2' in title else \
          f'seed {seeds[0]}'
      ax.set_xlabel(f'{_LABELS[kind]}, {seeds_note}')
      ax.set_ylabel(ylabel)
      ax.set_title(f'{title}: tau {tau_all:.2f}, better half {tau_top:.2f}', fontsize=10)
      ax.legend(fontsize=7)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=100)
  plt.close(figure)
  files.atomic_write(path, buffer.getvalue())


def gate_identity(archs: Dict[str, Any], seeds: Sequence[int], long_seed: int, long_factor: int,
                  gin_bindings: Sequence[str]) -> Dict[str, Any]:
  """What a gate dir's trials depend on: a rerun with another is refused."""
  return {'architectures': archs, 'seeds': list(seeds), 'long_seed': long_seed,
          'long_factor': long_factor, 'gin_bindings': list(gin_bindings),
          'space': SPACE.config()}


def check_gate_dir(output_dir: str, identity: Dict[str, Any], record: bool = True) -> None:
  """Refuses a gate dir of another configuration or with a journal the gate cannot compare
  (`search_dir.check_identity`, `read_records`); with `record`, writes the identity."""
  read_records(output_dir)
  search_dir_lib.check_identity(output_dir, identity, record=record,
                                file_name=search_dir_lib.GATE_IDENTITY_FILE, what='proxy gate',
                                flag='--output_dir')


def cpu_trial_fn(work_dir: str, bindings: Sequence[str],
                 long_bindings: Sequence[str]) -> Callable[[Trial], Dict[str, Any]]:
  """A trial on the CPU proxy (`proxy.run_trial`): its result with the CPU seconds and load."""
  from nasfpn_tf.search import proxy  # pylint: disable=g-import-not-at-top

  def trial_fn(trial: Trial) -> Dict[str, Any]:
    cpu_start = time.process_time()
    result = proxy.run_trial(trial.block_specs, 'cpu', trial.seed, work_dir,
                             long_bindings if trial.schedule == 'long' else bindings)
    # CPU seconds and the load say how much of the wall time a busy machine added.
    return {**result.to_dict(), 'cpu_seconds': round(time.process_time() - cpu_start, 1),
            'load_average': round(os.getloadavg()[0], 2)}

  return trial_fn


def reference_trials(reference_dir: str, archs: Dict[str, Any],
                     long_seed: int) -> Tuple[List[Dict[str, Any]], int]:
  """(the long trials, their long_factor) of the gate in `reference_dir`, which must have run
  the same architectures with the same long seed to the end; ValueError naming the dir if not."""
  try:
    with open(os.path.join(reference_dir, search_dir_lib.GATE_IDENTITY_FILE)) as f:
      other = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'--reference_dir={reference_dir} holds no proxy gate: {e}') from e
  if other.get('architectures') != json.loads(json.dumps(archs)) or \
      other.get('long_seed') != long_seed:
    raise ValueError(f'--reference_dir={reference_dir} ran other architectures or another '
                     f"long seed ({other.get('long_seed')}): give the same --num_random, "
                     '--sample_seed and --long_seed.')
  long = [r for r in read_records(reference_dir)
          if r['schedule'] == 'long' and r['seed'] == long_seed]
  missing = sorted(set(archs) - {r['arch'] for r in long})
  if missing:
    raise ValueError(f'--reference_dir={reference_dir} lacks the long trials of {missing}.')
  return long, other['long_factor']


def gate(output_dir: str, work_dir: Optional[str], archs: Dict[str, Any], seeds: Sequence[int],
         long_seed: int, long_factor: int, gin_bindings: Sequence[str],
         say: Callable[[str], None] = print,
         trial_fn: Optional[Callable[[Trial], Dict[str, Any]]] = None,
         reference_dir: Optional[str] = None) -> Dict[str, Any]:
  """Checks the gate dir, builds the proxy's cache, runs the missing trials, draws gate.png;
  returns the summary. trial_fn: instead of the CPU proxy's (tests). reference_dir: another
  gate's dir whose long trials (and long_factor) are the reference: only the short trials run."""
  if len(seeds) != 2 or len(set(list(seeds) + [long_seed])) != 3:
    raise ValueError(f'give two --seed values, both other than --long_seed ({list(seeds)}, '
                     f'{long_seed}).')
  reference = []
  if reference_dir:
    reference, long_factor = reference_trials(reference_dir, archs, long_seed)
  identity = gate_identity(archs, seeds, long_seed, long_factor, gin_bindings)
  if reference_dir:
    identity['reference_dir'] = os.path.abspath(reference_dir)
  check_gate_dir(output_dir, identity, record=False)
  if trial_fn is None:
    # pylint: disable=g-import-not-at-top
    from nasfpn_tf.search import cpu_proxy
    from nasfpn_tf.search import proxy
    work_dir = work_dir or os.path.join(output_dir, 'work')
    proxy.prepare('cpu', work_dir, gin_bindings)
    short_steps = cpu_proxy.CpuProxy().train_steps  # prepare left the proxy's gin parsed
    long_bindings = list(gin_bindings) + [f'CpuProxy.train_steps = {long_factor * short_steps}']
    trial_fn = cpu_trial_fn(work_dir, gin_bindings, long_bindings)
  check_gate_dir(output_dir, identity)
  trials = [t for t in plan(archs, seeds, long_seed) if not (reference and t.schedule == 'long')]
  records = run_gate(output_dir, trials, trial_fn, long_factor, say) + reference
  plot(records, list(archs), seeds, long_seed, long_factor,
       os.path.join(output_dir, search_dir_lib.GATE_PNG))
  return summarize(records, list(archs), seeds, long_seed)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from nasfpn_tf.search import proxy  # pylint: disable=g-import-not-at-top
  proxy.configure_threads(_TF_THREADS.value)

  def say(message):
    print(f'[gate {time.strftime("%H:%M:%S")}] {message}', flush=True)

  try:
    summary = gate(_OUTPUT_DIR.value, _WORK_DIR.value,
                   architectures(_NUM_RANDOM.value, _SAMPLE_SEED.value), _SEEDS.value,
                   _LONG_SEED.value, _LONG_FACTOR.value, list(_GIN_BINDINGS.value), say,
                   reference_dir=_REFERENCE_DIR.value)
  except ValueError as e:
    sys.exit(f'search_proxy_gate: error: {e}')
  print(markdown_table(summary), flush=True)
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
