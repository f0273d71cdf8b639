r"""The proxy's top architectures trained with the demo settings, and the best of them against
the paper's NAS-FPN and FPN at the same settings with several seeds: does what the proxy ranked
first hold up, and does it beat the table it started from?

  .venv/bin/python experiments/search_retrain.py --output_dir=runs/search_retrain \
      --search_dirs=runs/search_compare/ppo,runs/search_compare/random --top_k=5 --seeds=0,1,2

As the paper and NAS-FCOS do: the --top_k distinct architectures of highest proxy reward over
--search_dirs' journals are each trained once (the first seed) with gin_configs/demo.gin (what
`make demo` runs: the same steps, batch, repeats and filters; only the block-spec table
differs), on the demo's synthetic data (made once in OUTPUT_DIR/data); the one of highest AP
among them ("chosen") is then trained with the other --seeds, and 'nasfpn' and 'fpn' with every
seed. Each run has its own model dir, OUTPUT_DIR/<nasfpn|fpn>_seed<seed> and for a searched
table OUTPUT_DIR/searched-<its key's digest>_seed<seed> (`model_dir_name`; in the rows it is
`searched<rank>`, rank 1 the proxy's best), evaluated on the validation images; a rerun reuses
finished model dirs and resumes an interrupted one, also after the searches grew and the ranks
moved (the dir follows the architecture, not its rank).

--keys=KEY1 --keys=KEY2 trains the architectures of those keys instead (as a journal or
docs/search.md spells them; no proxy reward, no tau), e.g. more seeds of a chosen one after its
search dir is gone; --baselines=nasfpn trains only NAS-FPN beside it (empty: no baseline). A
finished model dir is named by its key and trained on in the spelling it holds.

  .venv/bin/python experiments/search_retrain.py --output_dir=runs/search_retrain \
      --keys='4:global_pooling:2,3/6:global_pooling:3,5/...' --baselines=nasfpn --seeds=3,4

Writes OUTPUT_DIR/search_retrain.png (AP per architecture of this call, a point per seed) and
OUTPUT_DIR/search_retrain.jsonl (the rows of earlier calls into the same dir kept, unless this
call redid their run: `merged_rows`), and prints one JSON line per row (name, rank, key,
proxy_reward: the search's reward of that key, None for a table the searches never sampled;
seed, AP, AP50, flops), then a summary line: per architecture the mean and median AP, its SD and
spread over seeds (max - min) and FLOPs, and against NAS-FPN seed by seed (wins, the mean paired
difference with a 95% bootstrap interval, and whether it exceeds NAS-FPN's spread); the chosen
one's AP minus NAS-FPN's; and Kendall's tau between the proxy's rewards and the retrained APs of
the top architectures (do they rank them alike?).
"""
import datetime
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, List, Sequence, Tuple

# The shared parts in experiments/bench/, also when this file is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

from bench import demo_runs  # noqa: E402
import search_proxy_gate  # noqa: E402  (kendall_tau)
from nasfpn_tf import checkpointing  # noqa: E402
from nasfpn_tf.models.retinanet import RetinaNet  # noqa: E402
from nasfpn_tf.search.journal import Journal  # noqa: E402
from nasfpn_tf.search.progress import block_specs_binding  # noqa: E402
from nasfpn_tf.search.space import SearchSpace  # noqa: E402
from nasfpn_tf.search import search_dir as search_dir_lib  # noqa: E402

FLAGS = flags.FLAGS
BASELINES = ('nasfpn', 'fpn')
# demo.gin's pyramid levels: a searched table must be over the same ones.
DEMO_LEVELS = {'min_level': 3, 'max_level': 7}


def define_flags():
  """The script's flags, defined only when it runs: tests import its functions beside other
  experiments that define flags of the same names."""
  flags.DEFINE_string('output_dir', 'runs/search_retrain', 'Model dirs, data, plot and rows.')
  flags.DEFINE_list('search_dirs', None, 'Search dirs whose best journal lines are trained.')
  flags.DEFINE_multi_string('keys', None, "Instead of --search_dirs: an architecture's key (as "
                            'journals and docs/search.md spell it), repeated for more; in this '
                            'order ranks 1, 2, ...; each is trained once (the first seed), the '
                            'best of them with the other seeds.')
  flags.DEFINE_list('baselines', list(BASELINES), 'Fixed tables trained with every seed.')
  flags.DEFINE_integer('top_k', 5, 'Distinct architectures of highest proxy reward trained once '
                       '(the first seed); the best of them gets the other seeds.', lower_bound=1)
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of the chosen architecture and the baselines.')
  flags.DEFINE_integer('train_steps', None, "Steps of every model (default: demo.gin's).",
                       lower_bound=1)
  flags.DEFINE_multi_string('gin_bindings', [], 'Bindings on top of demo.gin for every model.')
  flags.DEFINE_integer('parallel', 1, 'Runs trained at once, each in a process of its own with '
                       "its share of the CPU's threads (a GPU's memory shared): for a GPU or "
                       'many cores, where one demo run leaves most of it idle.', lower_bound=1)
  flags.mark_flags_as_mutual_exclusive(['search_dirs', 'keys'], required=True)


def top_records(search_dirs: Sequence[str],
                top_k: int) -> Tuple[List[Dict[str, Any]], Dict[str, float]]:
  """The `top_k` journal lines of highest reward over `search_dirs`, one per key (its best),
  best first; and {key: best proxy reward} of every sampled key."""
  records = []
  for search_dir in search_dirs:
    search_json = pathlib.Path(search_dir) / search_dir_lib.IDENTITY_FILE
    if not search_json.exists():
      raise ValueError(f'--search_dirs: {search_dir} holds no search ({search_json} is missing).')
    levels = {k: v for k, v in json.loads(search_json.read_text())['space'].items()
              if k in DEMO_LEVELS}
    if levels != DEMO_LEVELS:
      raise ValueError(f'--search_dirs: {search_dir} searched levels {levels}; demo.gin trains '
                       f'{DEMO_LEVELS}.')
    records += Journal(pathlib.Path(search_dir) / search_dir_lib.TRIALS_FILE).read()
  if not records:
    raise ValueError(f'--search_dirs {list(search_dirs)}: no finished trial in their journals.')
  best_of_key = {}
  for record in sorted(records, key=lambda r: -r['reward']):  # stable: the earlier line on ties
    best_of_key.setdefault(record['key'], record)
  ranked = list(best_of_key.values())
  return ranked[:top_k], {key: record['reward'] for key, record in best_of_key.items()}


def model_dir_name(name: str, key, seed: int) -> str:
  """The model dir's name of `name` (a baseline's, or `searched<rank>` with its architecture
  `key`) trained with `seed`: a searched one's is named by its key, not its rank."""
  if name.startswith('searched'):
    name = 'searched-' + hashlib.sha1(key.encode()).hexdigest()[:12]
  return f'{name}_seed{seed}'


def model_flops(model_dir: pathlib.Path) -> int:
  """FLOPs of the model trained in `model_dir` (its recorded config; the weights do not count)."""
  return demo_runs.exit_flops(RetinaNet.from_config(checkpointing.read_model_config(
      str(model_dir))))


def trained_spelling(model_dir: pathlib.Path, table, key, space: SearchSpace):
  """The table to train in `model_dir`: the spelling of `key` its recorded model was trained
  with, when it holds one (a journal's spelling and `--keys`' canonical one swap inputs of the
  same network, and the dir is named by the key), else `table`."""
  recorded = (checkpointing.read_model_config(str(model_dir)) or {}).get('block_specs')
  if key is not None and recorded and space.contains(recorded) and space.key(recorded) == key:
    return recorded
  return table


def run(output_dir: pathlib.Path, search_dirs: Sequence[str], seeds: Sequence[int],
        top_k: int = 5, train_steps=None, gin_bindings: Sequence[str] = (),
        keys: Sequence[str] = (), baselines: Sequence[str] = BASELINES,
        parallel: int = 1) -> Tuple[List[Dict[str, Any]], str]:
  """Trains (or reuses) the top searched tables once (`keys` instead of the searches' top: no
  proxy reward then), then the best of them and the `baselines` with every seed, `parallel`
  runs at a time (`demo_runs.train_all`); returns the rows (one per run) and the chosen one's
  name."""
  space = SearchSpace(min_level=DEMO_LEVELS['min_level'], max_level=DEMO_LEVELS['max_level'])
  if keys:
    try:
      top, rewards = [{'block_specs': space.parse_key(key)} for key in keys], {}
    except ValueError as e:
      raise ValueError(f'--keys: {e}') from e
  else:
    top, rewards = top_records(search_dirs, top_k)
  tables = {f'searched{rank}': record['block_specs'] for rank, record in enumerate(top, 1)}
  baselines = tuple(baselines)
  tables.update({name: name for name in baselines})
  output_dir = pathlib.Path(output_dir)
  records = demo_runs.synthetic_records(output_dir / 'data', demo_runs.DEMO_NUM_TRAIN,
                                        demo_runs.DEMO_NUM_VAL)
  bindings = demo_runs.demo_bindings(records, train_steps, gin_bindings)
  rows, flops = [], {}
  total = len(top) + (len(seeds) - 1) + len(baselines) * len(seeds)
  started = time.time()

  def train(names_and_seeds):
    """Trains (name, seed) pairs, `parallel` at a time, and adds their rows in this order."""
    planned = []
    for name, seed in names_and_seeds:
      key = space.key(tables[name]) if space.contains(tables[name]) else None  # FPN: 5 cells
      model_dir = output_dir / model_dir_name(name, key, seed)
      table = trained_spelling(model_dir, tables[name], key, space)
      planned.append((name, seed, key, demo_runs.Run(
          model_dir, bindings + [block_specs_binding(table)], seed)))
    done_before = len(rows)

    def starting(index):
      name, seed = planned[index][:2]
      eta = ''
      if rows or index:  # from the runs so far (a reused one takes seconds)
        left = (time.time() - started) / (done_before + index) * (total - done_before - index)
        eta = f', ETA {datetime.timedelta(seconds=int(left))}'
      demo_runs.say(f'run {done_before + index + 1} of {total}: {name} (seed {seed}){eta}')

    results = demo_runs.train_all([run for *_, run in planned], parallel, starting)
    for (name, seed, key, run), metrics in zip(planned, results):
      if name not in flops:
        flops[name] = model_flops(run.model_dir)
      rank = int(name[len('searched'):]) if name.startswith('searched') else None
      rows.append({'name': name, 'rank': rank, 'key': key, 'proxy_reward': rewards.get(key),
                   'seed': seed, 'AP': metrics['AP'], 'AP50': metrics['AP50'],
                   'flops': flops[name]})

  train([(f'searched{rank}', seeds[0]) for rank in range(1, len(top) + 1)])
  chosen = max(rows, key=lambda row: row['AP'])['name']  # the first on ties: the proxy's order
  # Seeds outermost: an interrupted run has every architecture once first.
  train([(name, seed) for seed in seeds for name in (chosen,) + baselines
         if not (name == chosen and seed == seeds[0])])
  return rows, chosen


def summary(rows: Sequence[Dict[str, Any]], chosen: str) -> Dict[str, Any]:
  """Per architecture: mean and median AP, SD and spread over seeds (max - min), seeds, FLOPs,
  and against NAS-FPN where both trained (`against_nasfpn`); the chosen one's mean AP minus
  NAS-FPN's; Kendall's tau of proxy reward vs AP over the top architectures."""
  per_name = {}
  for name in dict.fromkeys(row['name'] for row in rows):
    aps = [row['AP'] for row in rows if row['name'] == name]
    per_name[name] = {'mean_ap': float(np.mean(aps)), 'median_ap': float(np.median(aps)),
                      'sd': float(np.std(aps, ddof=1)) if len(aps) > 1 else None,
                      'spread': float(max(aps) - min(aps)),
                      'seeds': len(aps), 'flops': next(r['flops'] for r in rows
                                                        if r['name'] == name)}
  if 'nasfpn' in per_name:
    for name, entry in per_name.items():
      if name != 'nasfpn':
        entry['against_nasfpn'] = against_nasfpn(rows, name)
  first = [row for row in rows if row['rank'] is not None and row['seed'] == rows[0]['seed']]
  tau = None
  if len(first) > 1 and all(r['proxy_reward'] is not None for r in first):  # not for --keys
    tau = search_proxy_gate.kendall_tau([r['proxy_reward'] for r in first],
                                        [r['AP'] for r in first])
  result = {'architectures': per_name, 'chosen': chosen, 'top_k_tau_proxy_vs_ap': tau}
  if 'nasfpn' in per_name:
    result['chosen_minus_nasfpn_ap'] = per_name[chosen]['mean_ap'] - per_name['nasfpn']['mean_ap']
  return result


def against_nasfpn(rows: Sequence[Dict[str, Any]], name: str, resamples: int = 10000,
                   seed: int = 0) -> Dict[str, Any]:
  """`name` against NAS-FPN seed by seed, over the seeds both trained (a seed draws the same
  data order for both, so the pairs share that part of the noise): {'seeds', 'wins' (seeds
  where `name` has the higher AP), 'difference' (mean AP difference), 'interval' (95% bootstrap
  of it, seeds resampled with `seed`; None under 2 seeds), 'above_by_spread' (the issue's goal:
  the difference exceeds NAS-FPN's spread over all its seeds, max - min)}."""
  ap = {(row['name'], row['seed']): row['AP'] for row in rows}
  shared = sorted(s for n, s in ap if n == name and ('nasfpn', s) in ap)
  differences = np.array([ap[name, s] - ap['nasfpn', s] for s in shared])
  nasfpn = [v for (n, _), v in ap.items() if n == 'nasfpn']
  result = {'seeds': len(shared), 'wins': int(np.sum(differences > 0)),
            'difference': float(differences.mean()) if shared else None, 'interval': None,
            'above_by_spread': bool(shared) and float(differences.mean()) > max(nasfpn) - min(
                nasfpn)}
  if len(shared) > 1:
    picks = np.random.default_rng(seed).integers(0, len(shared), (resamples, len(shared)))
    result['interval'] = [float(v) for v in np.percentile(differences[picks].mean(axis=1),
                                                          [2.5, 97.5])]
  return result


def draw(rows: Sequence[Dict[str, Any]], path: str) -> None:
  """AP per architecture: a bar at the mean over seeds, a point per seed."""
  names = list(dict.fromkeys(row['name'] for row in rows))
  fig = Figure(figsize=(max(5.0, 1.1 * len(names)), 4))
  ax = fig.subplots()
  for i, name in enumerate(names):
    aps = [row['AP'] for row in rows if row['name'] == name]
    ax.bar(i, sum(aps) / len(aps), color='#9ecae1')
    ax.plot([i] * len(aps), aps, 'ko', alpha=0.7)
  ax.set_xticks(range(len(names)), names)
  ax.set(ylabel='AP (demo val)', title='Searched architectures against NAS-FPN and FPN')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def merged_rows(path: pathlib.Path, rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """The rows of an earlier call in `path` that this call's `rows` did not redo (a run is its
  key, or its name for a baseline, and its seed), then `rows`: calls with other --keys or
  --seeds in one output dir add to the file instead of replacing it."""
  def run_id(row):
    return (row['key'] or row['name'], row['seed'])

  redone = {run_id(row) for row in rows}
  earlier = []
  if path.exists():
    earlier = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [row for row in earlier if run_id(row) not in redone] + list(rows)


def main(argv):
  del argv
  output_dir = pathlib.Path(FLAGS.output_dir)
  rows, chosen = run(output_dir, FLAGS.search_dirs, [int(s) for s in FLAGS.seeds], FLAGS.top_k,
                     FLAGS.train_steps, FLAGS.gin_bindings, FLAGS.keys or (), FLAGS.baselines,
                     FLAGS.parallel)
  draw(rows, str(output_dir / 'search_retrain.png'))
  path = output_dir / 'search_retrain.jsonl'
  demo_runs.write_rows(merged_rows(path, rows), path)
  print(json.dumps({'summary': summary(rows, chosen)}), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
