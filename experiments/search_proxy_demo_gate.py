r"""Does a proxy rank pyramids as the demo's full training does?

  .venv/bin/python experiments/search_proxy_demo_gate.py --output_dir=runs/demo_gate_e2e \
      --proxy=e2e --work_dir=runs/e2e_search/proxy --seeds=0,1 \
      --gin_bindings="CosineDecayWithWarmup.base_learning_rate = 0.02"

`search_proxy_gate.py` ranks a proxy against a longer run of the same proxy. This ranks it
against the reference that matters: the demo's held-out AP (gin_configs/demo.gin, 1100 steps from
scratch) of pyramids already retrained with `search_retrain.py`, read from --reference (default
`bench/demo_reference_zen4.json`: per pyramid its block specs, a key of `SearchSpace` or a name
of `block_specs.SPECS`, and its demo AP per seed). Each pyramid (--pyramids: a subset) is trained
on --proxy (`proxy.run_trial`, the proxy's gin plus --gin_bindings; its cache in --work_dir)
with each of --seeds, and rewarded by the held-out AP. It prints, and ends with as one JSON line:

  tau_seeds          the first seed's rewards against the second's: is the proxy reproducible?
  tau_demo_mean      the rewards' mean over seeds against the demo's mean AP over its seeds
  tau_demo_median    ... against the demo's median AP (robust to a collapsed demo run)
  tau_better_half    tau_demo_mean over the better half by the demo's mean AP
  tau_demo_seed0_vs_seed1  the demo's seed 0 against its seed 1, over the pyramids it trained
                     with both: how far the reference itself ranks alike (a ceiling)
  seconds_per_trial  the mean wall time of a trial

(Kendall's tau-b, `search_proxy_gate.kendall_tau`), a markdown table of every pyramid, and draws
OUTPUT_DIR/demo_gate.png (the proxy's reward per seed against the demo's mean AP).

It resumes: every finished trial is one line of OUTPUT_DIR's journal (`search.journal.Journal`,
`search_dir.TRIALS_FILE`), and the same command trains only what is missing; more --seeds or
--pyramids later add to it. The dir records the proxy and bindings (`search_dir.check_identity`,
`search_dir.GATE_IDENTITY_FILE`): a run with others is refused, naming them.
"""
import datetime
import json
import os
import pathlib
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

# The shared parts in experiments/, also when this file is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import say  # noqa: E402
import search_proxy_gate  # noqa: E402  (kendall_tau, better_half)
from nasfpn_tf.decoders import block_specs as block_specs_lib  # noqa: E402
from nasfpn_tf.search import search_dir as search_dir_lib  # noqa: E402
from nasfpn_tf.search.journal import Journal  # noqa: E402
from nasfpn_tf.search.space import SearchSpace  # noqa: E402

FLAGS = flags.FLAGS
DEFAULT_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bench',
                                 'demo_reference_zen4.json')
PNG = 'demo_gate.png'
SPACE = SearchSpace()
# plot's second panel: the pyramids within this much demo AP of the best.
ZOOM_SPAN = 0.1


def define_flags():
  flags.DEFINE_string('output_dir', 'runs/search_proxy_demo_gate',
                      f'{search_dir_lib.TRIALS_FILE}, {search_dir_lib.GATE_IDENTITY_FILE} and '
                      f'{PNG} go here.')
  flags.DEFINE_enum('proxy', 'e2e', ['cpu', 'e2e'], 'The proxy whose reward is ranked.')
  flags.DEFINE_string('work_dir', None, "The proxy's cache folder (default: <output_dir>/work); "
                      "a search's <search_dir>/proxy shares its cache.")
  flags.DEFINE_list('seeds', ['0', '1'], 'Trial seeds of every pyramid.')
  flags.DEFINE_list('pyramids', None, "The reference's pyramids to train (default: all).")
  flags.DEFINE_multi_string('gin_bindings', [], "Bindings on top of the proxy's gin file.")
  flags.DEFINE_string('reference', DEFAULT_REFERENCE, "JSON of the pyramids' demo AP per seed.")
  flags.DEFINE_integer('tf_threads', None, "TensorFlow's thread pools (default: all cores).")


def load_reference(path: str, names: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
  """{name: {'block_specs': the spelling, 'rows': what run_trial takes, 'ap': {seed: AP}}}:
  the reference's pyramids (those of `names`, in their order); ValueError naming the file and
  the pyramid when one does not parse or has no AP."""
  try:
    with open(path) as f:
      pyramids = json.load(f)['pyramids']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'--reference={path}: not a JSON object with "pyramids" ({e}).') from e
  unknown = sorted(set(names or ()) - set(pyramids))
  if unknown:
    raise ValueError(f'--pyramids: {unknown} are not in --reference={path} '
                     f'(it has {sorted(pyramids)}).')
  result = {}
  for name in names or pyramids:
    entry = pyramids[name]
    spelling = entry.get('block_specs')
    try:
      rows = spelling if spelling in block_specs_lib.SPECS else SPACE.parse_key(spelling)
      ap = {int(seed): float(value) for seed, value in entry['ap'].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f'--reference={path}: pyramid {name!r}: {e}') from e
    if not ap:
      raise ValueError(f'--reference={path}: pyramid {name!r} has no demo AP.')
    result[name] = {'block_specs': spelling, 'rows': rows, 'ap': ap}
  return result


def run(output_dir: str, reference: Dict[str, Dict[str, Any]], seeds: Sequence[int],
        trial_fn: Callable[[Any, int], Dict[str, Any]], identity: Dict[str, Any],
        say: Callable[[str], None] = print) -> List[Dict[str, Any]]:
  """Trains each (pyramid, seed) not yet in the journal with trial_fn(rows, seed) (a dict with
  'ap' and 'seconds' at least), journalling each; returns the records of the reference's
  pyramids and `seeds`. Refuses a dir of another identity, or whose journal trained a pyramid
  of the same name in another spelling."""
  os.makedirs(output_dir, exist_ok=True)
  search_dir_lib.check_identity(output_dir, identity, file_name=search_dir_lib.GATE_IDENTITY_FILE,
                                what='demo gate', flag='--output_dir')
  journal = Journal(pathlib.Path(output_dir) / search_dir_lib.TRIALS_FILE)
  records = journal.recover()
  for r in records:
    if r['pyramid'] in reference and r['block_specs'] != reference[r['pyramid']]['block_specs']:
      raise ValueError(f"{journal.path}: pyramid {r['pyramid']!r} was trained as "
                       f"{r['block_specs']}, the reference has "
                       f"{reference[r['pyramid']]['block_specs']}: use another --output_dir.")
  done = {(r['pyramid'], r['seed']) for r in records}
  todo = [(name, seed) for seed in seeds for name in reference if (name, seed) not in done]
  say(f'{len(reference) * len(seeds)} trials, {len(reference) * len(seeds) - len(todo)} '
      'already done.')
  seconds = [r['seconds'] for r in records]
  for index, (name, seed) in enumerate(todo):
    result = trial_fn(reference[name]['rows'], seed)
    record = {'pyramid': name, 'seed': seed, 'block_specs': reference[name]['block_specs'],
              'ap': result['ap'], 'seconds': result['seconds'],
              **{k: result.get(k) for k in ('ap50', 'flops', 'steps')},
              'load_average': round(os.getloadavg()[0], 2)}
    journal.append(record)
    records.append(record)
    seconds.append(result['seconds'])
    eta = float(np.mean(seconds)) * (len(todo) - index - 1)
    say(f'trial {index + 1}/{len(todo)} | {name} seed {seed} | AP {result["ap"]:.4f} | '
        f'{result["seconds"]:.0f} s | ETA {datetime.timedelta(seconds=round(eta))}')
  return [r for r in records if r['pyramid'] in reference and r['seed'] in seeds]


def summarize(records: Sequence[Dict[str, Any]], reference: Dict[str, Dict[str, Any]],
              seeds: Sequence[int]) -> Dict[str, Any]:
  """The gate's figures (see the module doc) and a row per pyramid."""
  names = list(reference)
  reward = {(r['pyramid'], r['seed']): r['ap'] for r in records}
  mean = {n: float(np.mean([reward[n, s] for s in seeds])) for n in names}
  demo_mean = {n: float(np.mean(list(reference[n]['ap'].values()))) for n in names}
  demo_median = {n: float(np.median(list(reference[n]['ap'].values()))) for n in names}
  tau = search_proxy_gate.kendall_tau

  def against(demo, among):
    return tau([mean[n] for n in among], [demo[n] for n in among])

  top = search_proxy_gate.better_half(names, demo_mean)
  # The reference's own noise: the demo's first two seeds over the pyramids trained with both.
  both = [n for n in names if {0, 1} <= set(reference[n]['ap'])]
  demo_seeds = (tau([reference[n]['ap'][0] for n in both], [reference[n]['ap'][1] for n in both])
                if len(both) > 1 else None)
  figures = {
      'tau_seeds': (tau([reward[n, seeds[0]] for n in names], [reward[n, seeds[1]] for n in names])
                    if len(seeds) > 1 else None),
      'tau_demo_mean': against(demo_mean, names),
      'tau_demo_median': against(demo_median, names),
      'tau_better_half': against(demo_mean, top),
      'better_half': top,
      'tau_demo_seed0_vs_seed1': demo_seeds, 'demo_seed0_and_seed1': both,
      'seconds_per_trial': float(np.mean([r['seconds'] for r in records])),
      'trials': len(records)}
  rows = [{'pyramid': n, 'demo_mean_ap': demo_mean[n], 'demo_median_ap': demo_median[n],
           'demo_seeds': len(reference[n]['ap']), 'rewards': [reward[n, s] for s in seeds],
           'reward': mean[n]} for n in names]
  return {**figures, 'rows': rows}


def markdown_table(summary: Dict[str, Any], seeds: Sequence[int]) -> str:
  head = ['pyramid', 'demo AP, mean (seeds)', 'median'] + [f'reward, seed {s}' for s in seeds]
  lines = ['| ' + ' | '.join(head + ['mean']) + ' |', '|' + '---|' * (len(head) + 1)]
  for row in sorted(summary['rows'], key=lambda r: -r['demo_mean_ap']):
    cells = [row['pyramid'], f"{row['demo_mean_ap']:.3f} ({row['demo_seeds']})",
             f"{row['demo_median_ap']:.3f}"] + [f'{r:.3f}' for r in row['rewards']]
    lines.append('| ' + ' | '.join(cells + [f"{row['reward']:.3f}"]) + ' |')
  taus = ', '.join(f'{k} {summary[k]:.2f}' for k in
                   ('tau_seeds', 'tau_demo_mean', 'tau_demo_median', 'tau_better_half',
                    'tau_demo_seed0_vs_seed1')
                   if summary[k] is not None)
  return '\n'.join(lines + ['', f"{taus}; {summary['seconds_per_trial']:.0f} s a trial"])


def plot(summary: Dict[str, Any], seeds: Sequence[int], title: str, path: str) -> None:
  """The proxy's reward (a point per seed, a bar at their mean) against the demo's mean AP; where
  the demo's APs span more than ZOOM_SPAN, a second panel shows the pyramids within ZOOM_SPAN of
  the best, where the labels of the first would pile up."""
  rows = summary['rows']
  best = max(row['demo_mean_ap'] for row in rows)
  near = [row for row in rows if row['demo_mean_ap'] >= best - ZOOM_SPAN]
  panels = [rows] + ([near] if len(near) < len(rows) else [])
  fig = Figure(figsize=(6.4 * len(panels), 4.6))
  for ax, shown in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
    for row in shown:
      x = row['demo_mean_ap']
      ax.plot([x] * len(row['rewards']), row['rewards'], 'o', color='#3182bd', alpha=0.6)
      ax.plot([x], [row['reward']], '_', color='k', markersize=14)
      ax.annotate(row['pyramid'], (x, row['reward']), textcoords='offset points', xytext=(5, 3),
                  fontsize=7)
    ax.set(xlabel='demo AP (mean over its seeds)', ylabel=f'proxy reward (seeds {list(seeds)})')
  seeds_tau = summary['tau_seeds']
  fig.suptitle(f"{title}: tau {summary['tau_demo_mean']:.2f} against the demo, "
               f"{'-' if seeds_tau is None else f'{seeds_tau:.2f}'} seed vs seed"
               + (f'; right: the pyramids within {ZOOM_SPAN} AP of the best' if len(panels) > 1
                  else ''), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from nasfpn_tf.search import proxy  # pylint: disable=g-import-not-at-top
  proxy.configure_threads(FLAGS.tf_threads)
  work_dir = FLAGS.work_dir or os.path.join(FLAGS.output_dir, 'work')
  seeds = [int(s) for s in FLAGS.seeds]

  def trial_fn(rows, seed):
    return proxy.run_trial(rows, FLAGS.proxy, seed, work_dir, FLAGS.gin_bindings).to_dict()

  identity = {'proxy': FLAGS.proxy, 'gin_bindings': list(FLAGS.gin_bindings),
              'work_dir': os.path.abspath(work_dir)}
  try:
    reference = load_reference(FLAGS.reference, FLAGS.pyramids)
    records = run(FLAGS.output_dir, reference, seeds, trial_fn, identity, say)
  except ValueError as e:
    sys.exit(f'search_proxy_demo_gate: error: {e}')
  summary = summarize(records, reference, seeds)
  plot(summary, seeds, f'--proxy={FLAGS.proxy}', os.path.join(FLAGS.output_dir, PNG))
  print(markdown_table(summary, seeds), flush=True)
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
