r"""The best architecture a search found, trained with the demo settings, against the paper's
NAS-FPN and FPN at the same settings: does what the proxy ranked first hold up?

  .venv/bin/python experiments/search_retrain.py --output_dir=runs/search_retrain \
      --search_dirs=runs/search_compare/ppo,runs/search_compare/evolution,runs/search_compare/random

Takes the best journal line (highest proxy reward) over --search_dirs, and trains it, 'nasfpn'
and 'fpn' with gin_configs/demo.gin (what `make demo` runs: the same steps, batch, repeats and
filters; only the block-spec table differs) with each --seeds seed, on the demo's synthetic data
(made once in OUTPUT_DIR/data), each in its own model dir OUTPUT_DIR/<name>_seed<seed>, evaluated
on the validation images. A rerun reuses finished model dirs and resumes an interrupted one.

Writes OUTPUT_DIR/search_retrain.png (AP per architecture, a point per seed) and
OUTPUT_DIR/search_retrain.jsonl, and prints one JSON line per run: name, key, proxy_reward (the
search's reward of that key, None for a table the searches never sampled), seed, AP, AP50, flops.
"""
import json
import os
import pathlib
import sys
from typing import Any, Dict, List, Sequence, Tuple

# The shared parts in experiments/bench/, also when this file is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bench import demo_runs  # noqa: E402
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
  flags.DEFINE_list('search_dirs', None, 'Search dirs whose best journal line is trained.')
  flags.DEFINE_list('seeds', ['0', '1'], 'Seeds of every architecture.')
  flags.DEFINE_integer('train_steps', None, "Steps of every model (default: demo.gin's).",
                       lower_bound=1)
  flags.DEFINE_multi_string('gin_bindings', [], 'Bindings on top of demo.gin for every model.')
  flags.mark_flag_as_required('search_dirs')


def best_record(search_dirs: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, float]]:
  """The best journal line over `search_dirs`, and {key: proxy reward} of every sample."""
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
  return max(records, key=lambda r: r['reward']), {r['key']: r['reward'] for r in records}


def run(output_dir: pathlib.Path, search_dirs: Sequence[str], seeds: Sequence[int],
        train_steps=None, gin_bindings: Sequence[str] = ()) -> List[Dict[str, Any]]:
  """Trains (or reuses) the best searched table and the baselines with every seed."""
  best, rewards = best_record(search_dirs)
  space = SearchSpace(min_level=DEMO_LEVELS['min_level'], max_level=DEMO_LEVELS['max_level'])
  tables = {'searched': best['block_specs'], **{name: name for name in BASELINES}}
  output_dir = pathlib.Path(output_dir)
  records = demo_runs.synthetic_records(output_dir / 'data', demo_runs.DEMO_NUM_TRAIN,
                                        demo_runs.DEMO_NUM_VAL)
  bindings = demo_runs.demo_bindings(records, train_steps, gin_bindings)
  rows, flops = [], {}
  for seed in seeds:  # Seeds outermost: an interrupted run has every architecture once first.
    for name, table in tables.items():
      model_dir = output_dir / f'{name}_seed{seed}'
      metrics = demo_runs.train_and_evaluate(
          model_dir, bindings + [block_specs_binding(table)], seed=seed)
      if name not in flops:  # The weights do not change the FLOPs.
        model = RetinaNet.from_config(checkpointing.read_model_config(str(model_dir)))
        flops[name] = demo_runs.exit_flops(model)
      key = space.key(table) if space.contains(table) else None  # FPN has 5 cells, not 7.
      rows.append({'name': name, 'key': key, 'proxy_reward': rewards.get(key), 'seed': seed,
                   'AP': metrics['AP'], 'AP50': metrics['AP50'], 'flops': flops[name]})
  return rows


def draw(rows: Sequence[Dict[str, Any]], path: str) -> None:
  """AP per architecture: a bar at the mean over seeds, a point per seed."""
  names = list(dict.fromkeys(row['name'] for row in rows))
  fig = Figure(figsize=(5, 4))
  ax = fig.subplots()
  for i, name in enumerate(names):
    aps = [row['AP'] for row in rows if row['name'] == name]
    ax.bar(i, sum(aps) / len(aps), color='#9ecae1')
    ax.plot([i] * len(aps), aps, 'ko', alpha=0.7)
  ax.set_xticks(range(len(names)), names)
  ax.set(ylabel='AP (demo val)', title='Searched architecture against NAS-FPN and FPN')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  output_dir = pathlib.Path(FLAGS.output_dir)
  rows = run(output_dir, FLAGS.search_dirs, [int(s) for s in FLAGS.seeds], FLAGS.train_steps,
             FLAGS.gin_bindings)
  draw(rows, str(output_dir / 'search_retrain.png'))
  demo_runs.write_rows(rows, output_dir / 'search_retrain.jsonl')


if __name__ == '__main__':
  define_flags()
  app.run(main)
