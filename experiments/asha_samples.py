"""Samples per hour with and without ASHA, and whether ASHA keeps what full trials rank best.

Two random searches with the same seed on one proxy, OUTPUT_DIR/none (every trial trains to the
end) and OUTPUT_DIR/asha (`--scheduler=asha`, `nasfpn_tf.search.schedulers`). Random search
draws the same architectures in the same order whatever the rewards, so the two searches train
the same samples and differ only in the scheduler (a learning controller would follow the
rewards apart). They grow in rounds of --round_trials samples, one after the other, so an
interrupted run has comparable budgets and the same command resumes both from their journals;
the wall time of each call is kept in OUTPUT_DIR/<scheduler>/sessions.jsonl (a call killed before
it returns leaves none: its samples then count with no wall time; rerun from a fresh dir for a
clean figure). The proxy's shared cache (the CPU proxy's features) is built once, in
OUTPUT_DIR/proxy, before the first timed call.

  .venv/bin/python experiments/asha_samples.py --output_dir=runs/asha_samples --proxy=cpu \
      --num_trials=60

Prints one JSON row per scheduler (samples, trained, stopped early, wall hours, samples per
hour of wall time and of trial time, the best reward of a full trial) and one for what ASHA kept:
the --top_k architectures by full-trial reward (OUTPUT_DIR/none), and where each of them ended
under ASHA (the step it was stopped at, or max_t: survived). Draws OUTPUT_DIR/asha_samples.png.
"""
import json
import pathlib
import time
from typing import Any, Dict, Sequence

from absl import app, flags
from matplotlib.figure import Figure

from nasfpn_tf.search import configurables
from nasfpn_tf.search.journal import Journal
from nasfpn_tf.search.runner import SearchSettings, run_search
from nasfpn_tf.search.space import SearchSpace
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.utils.files import atomic_write

FLAGS = flags.FLAGS
SCHEDULERS = ('none', 'asha')


def define_flags():
  """The script's flags, defined only when it runs (tests import its functions)."""
  flags.DEFINE_string('output_dir', 'runs/asha_samples', 'A search dir per scheduler in it.')
  flags.DEFINE_enum('proxy', 'cpu', ['cpu', 'synthetic'], 'The proxy both searches train on.')
  flags.DEFINE_integer('num_trials', 60, 'Samples per search, duplicates included.')
  flags.DEFINE_integer('round_trials', 10, 'Samples each search adds per round.')
  flags.DEFINE_integer('seed', 0, 'Seeds the random search (both) and the proxy trainings.')
  flags.DEFINE_integer('num_cells', 7, 'Merging cells per pyramid network.')
  flags.DEFINE_integer('top_k', 5, 'How many of the best full trials to follow under ASHA.')
  flags.DEFINE_float('cpus_per_trial', 1, 'CPUs per trial (as the search\'s flag).')
  flags.DEFINE_float('synthetic_seconds', 0.0, '--proxy=synthetic: seconds a full trial waits.')
  flags.DEFINE_integer('asha_grace_period', None, 'As the search\'s flag.')
  flags.DEFINE_float('asha_reduction_factor', None, 'As the search\'s flag.')
  flags.DEFINE_integer('report_every', 0, 'As the search\'s flag.')
  flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings for the proxy.')


def _trained(records: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
  """{key: the journal line that trained it}."""
  return {r['key']: r for r in records if not r['cached']}


def scheduler_row(output_dir: pathlib.Path, scheduler: str) -> Dict[str, Any]:
  """What one search cost and found, from its journal and its sessions' wall times."""
  records = Journal(output_dir / scheduler / search_dir_lib.TRIALS_FILE).read()
  sessions = Journal(output_dir / scheduler / 'sessions.jsonl').read()
  wall_hours = sum(s['wall_seconds'] for s in sessions) / 3600
  trained = _trained(records)
  trial_hours = sum(r['seconds'] for r in trained.values()) / 3600
  full = [r for r in trained.values() if r.get('stopped_at_step') is None]
  best = max(full, key=lambda r: r['reward']) if full else None
  return {
      'scheduler': scheduler, 'num_trials': len(records), 'trained': len(trained),
      'stopped_early': len(trained) - len(full), 'wall_hours': round(wall_hours, 4),
      'samples_per_hour': round(len(records) / wall_hours, 1) if wall_hours else None,
      'trial_hours': round(trial_hours, 4),
      'samples_per_trial_hour': round(len(records) / trial_hours, 1) if trial_hours else None,
      'best_full_reward': best['reward'] if best else None,
      'best_key': best['key'] if best else None}


def kept_row(output_dir: pathlib.Path, top_k: int) -> Dict[str, Any]:
  """The top_k architectures by full-trial reward (the search without ASHA; ties broken by
  sample order) and where each ended under ASHA: 'max_t' (survived), the step it was stopped
  at, or None (not sampled there yet). ValueError when the two searches drew other samples.
  The samples are matched by proposal: with trials side by side a journal is in the order
  trials finished, and a search's last proposals may be left untrained when it stops."""
  journals = {s: Journal(output_dir / s / search_dir_lib.TRIALS_FILE).read() for s in SCHEDULERS}
  proposals = {s: {r['proposal_index']: r['key'] for r in records}
               for s, records in journals.items()}
  common = proposals['none'].keys() & proposals['asha'].keys()
  if any(proposals['none'][i] != proposals['asha'][i] for i in common):
    raise ValueError(f'{output_dir}: the searches with and without ASHA drew other samples; '
                     'they must be random searches with the same seed and space.')
  full = sorted(_trained(journals['none']).values(), key=lambda r: (-r['reward'], r['trial']))
  top = full[:top_k]
  under_asha = _trained(journals['asha'])
  outcome = []
  for record in top:
    asha = under_asha.get(record['key'])
    outcome.append(None if asha is None else
                   'max_t' if asha.get('stopped_at_step') is None else asha['stopped_at_step'])
  return {
      'top_k': top_k, 'keys': [r['key'] for r in top], 'full_rewards': [r['reward'] for r in top],
      'under_asha': outcome, 'survived': sum(o == 'max_t' for o in outcome),
      # A tie at the cut: another architecture had the k-th reward, so the top k is one choice.
      'tie_at_cut': len(full) > top_k and full[top_k]['reward'] == top[-1]['reward']}


def draw(output_dir: pathlib.Path, rows: Sequence[Dict[str, Any]], kept: Dict[str, Any],
         path: str) -> None:
  """Samples per hour (wall and trial time) per scheduler; each architecture's full-trial
  reward against what it got under ASHA, by where ASHA ended it, the top_k circled."""
  fig = Figure(figsize=(11, 4))
  rate_ax, kept_ax = fig.subplots(1, 2)
  names = [row['scheduler'] for row in rows]
  for offset, field, label in ((-0.2, 'samples_per_hour', 'wall time'),
                               (0.2, 'samples_per_trial_hour', 'trial time')):
    values = [row[field] or 0 for row in rows]
    bars = rate_ax.bar([i + offset for i in range(len(rows))], values, width=0.4, label=label)
    rate_ax.bar_label(bars, fmt='%.0f', fontsize=8)
  rate_ax.set_xticks(range(len(rows)), [f'--scheduler={n}' for n in names])
  rate_ax.set(ylabel='samples per hour', title='Samples per hour')
  rate_ax.legend(fontsize=8)
  full = _trained(Journal(output_dir / 'none' / search_dir_lib.TRIALS_FILE).read())
  asha = _trained(Journal(output_dir / 'asha' / search_dir_lib.TRIALS_FILE).read())
  groups = {}
  for key, record in asha.items():
    if key in full:
      step = record.get('stopped_at_step')
      groups.setdefault('reached max_t' if step is None else f'stopped at step {step}',
                        []).append((full[key]['reward'], record['reward']))
  for label in sorted(groups, key=lambda g: (g == 'reached max_t', len(g), g)):
    points = groups[label]
    kept_ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, label=label)
  top = [(full[k]['reward'], asha[k]['reward']) for k in kept['keys'] if k in asha]
  kept_ax.scatter([p[0] for p in top], [p[1] for p in top], s=90, facecolors='none',
                  edgecolors='black', label=f'top {kept["top_k"]} of the full trials')
  kept_ax.set(xlabel='reward, full trial', ylabel='reward under ASHA',
              title=f'What ASHA kept: {kept["survived"]} of the top {kept["top_k"]} reached max_t')
  kept_ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _search(output_dir: pathlib.Path, scheduler: str, num_trials: int) -> SearchSettings:
  asha = scheduler == 'asha'
  return SearchSettings(
      search_dir=str(output_dir / scheduler), algorithm='random', num_trials=num_trials,
      proxy=FLAGS.proxy, space=SearchSpace(num_cells=FLAGS.num_cells), seed=FLAGS.seed,
      gin_bindings=tuple(FLAGS.gin_bindings), cpus_per_trial=FLAGS.cpus_per_trial,
      proxy_dir=str(output_dir / 'proxy'), synthetic_seconds=FLAGS.synthetic_seconds,
      scheduler=scheduler, asha_grace_period=FLAGS.asha_grace_period if asha else None,
      asha_reduction_factor=FLAGS.asha_reduction_factor if asha else None,
      report_every=FLAGS.report_every if asha else 0)


def main(argv):
  del argv
  configurables.parse_gin(gin_bindings=FLAGS.gin_bindings)
  output_dir = pathlib.Path(FLAGS.output_dir)
  if FLAGS.proxy != 'synthetic':  # the shared cache, built before the first timed call
    from nasfpn_tf.search import proxy  # pylint: disable=g-import-not-at-top
    proxy.prepare(FLAGS.proxy, str(output_dir / 'proxy'), FLAGS.gin_bindings)
  for budget in range(FLAGS.round_trials, FLAGS.num_trials + FLAGS.round_trials,
                      FLAGS.round_trials):
    for scheduler in SCHEDULERS:
      settings = _search(output_dir, scheduler, min(budget, FLAGS.num_trials))
      before = len(Journal(pathlib.Path(settings.search_dir) / search_dir_lib.TRIALS_FILE).read())
      if before >= settings.num_trials:
        continue
      print(f'[asha_samples] --scheduler={scheduler}: up to {settings.num_trials} samples',
            flush=True)
      started = time.time()
      summary = run_search(settings)
      Journal(pathlib.Path(settings.search_dir) / 'sessions.jsonl').append(
          {'samples_before': before, 'samples_after': summary['num_trials'],
           'wall_seconds': time.time() - started})
  rows = [scheduler_row(output_dir, scheduler) for scheduler in SCHEDULERS]
  kept = kept_row(output_dir, FLAGS.top_k)
  for row in rows + [kept]:
    print(json.dumps(row), flush=True)
  atomic_write(output_dir / 'asha_samples.json', json.dumps({'rows': rows, 'kept': kept},
                                                            indent=2))
  draw(output_dir, rows, kept, str(output_dir / 'asha_samples.png'))


if __name__ == '__main__':
  define_flags()
  app.run(main)
