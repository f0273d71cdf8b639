r"""FCOS with FPN against FCOS with the published NAS-FCOS pyramid and head, and the best of
NAS-FCOS searches, trained at demo scale with several seeds (issue 24, item 5).

  .venv/bin/python experiments/nasfcos_compare.py --output_dir=runs/nasfcos_compare \
      --search_dirs=runs/nasfcos_fpn,runs/nasfcos_head --seeds=0,1

Every architecture is gin_configs/fcos_demo.gin (the demo with FCOS: ResNet-10 at 256 px, 64
filters, SGD for 1100 steps of 8 images) with the bindings of ARCHITECTURES on top:

- 'fcos_fpn': FCOS with the regular FPN ('fpn', once, as fcos_fpn_r50_256_1152x896.gin), NAS-FCOS's
  baseline. (fcos_demo.gin as is stacks the demo's NAS-FPN twice: 'fcos_nasfpn', not by default.)
- 'nasfcos': the published NAS-FCOS pyramid and head (`decoder = 'nasfcos_fpn'`,
  `fcos_head_spec = 'nasfcos_head'`, docs/nasfcos.md).
- with --search_dirs, the best architecture of each NAS-FCOS search dir (`python -m
  nasfpn_tf.search --space=nasfcos_fpn|nasfcos_head`), read from the dir's best.gin (what the
  search writes for `--gin_file=fcos_demo.gin --gin_file=DIR/best.gin`): 'searched_pyramid' (a
  pyramid search: its pyramid with FCOS's head) and 'searched_head' (a head search: its head on
  the pyramid it searched on, e.g. the pyramid search's best in a progressive search).

Each is trained with every --seeds on the demo's synthetic data (made once in OUTPUT_DIR/data)
in its own model dir OUTPUT_DIR/<name>_seed<seed> and evaluated on the validation images; a rerun
reuses finished model dirs and resumes an interrupted one. FLOPs, params and the median CPU
latency of `detect` at batch 1 (network + post-processing, the architectures timed in turns so
that background load hits all alike) are measured on each architecture's first-seed model.

Writes OUTPUT_DIR/nasfcos_compare.png (AP per architecture with a point per seed; mean AP
against latency) and OUTPUT_DIR/nasfcos_compare.jsonl, and prints one JSON line per run (name,
seed, AP, AP50, flops, params, latency_ms), then a summary line: per architecture the mean AP,
its spread over seeds (max - min), FLOPs, params, latency, and its mean AP minus FCOS-FPN's.
"""
import json
import os
import pathlib
import sys
from typing import Any, Dict, List, Sequence

# The shared parts in experiments/bench/, also when this file is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import demo_runs  # noqa: E402
from bench.timing import alternate  # noqa: E402
from nasfpn_tf import checkpointing  # noqa: E402
from nasfpn_tf.models.retinanet import RetinaNet  # noqa: E402
from nasfpn_tf.search import search_dir as search_dir_lib  # noqa: E402
from nasfpn_tf.search.nasfcos_space import SPACES as NASFCOS_SPACES  # noqa: E402
from nasfpn_tf.utils import model_stats  # noqa: E402

FLAGS = flags.FLAGS
GIN_FILE = 'fcos_demo.gin'
# The bindings of each architecture on top of GIN_FILE.
ARCHITECTURES = {
    'fcos_fpn': ["build_retinanet.block_specs = 'fpn'", 'build_retinanet.num_repeats = 1'],
    'nasfcos': ["build_retinanet.decoder = 'nasfcos_fpn'",
                "build_retinanet.block_specs = 'nasfcos_fpn'",
                "build_retinanet.fcos_head_spec = 'nasfcos_head'"],
    'fcos_nasfpn': [],
}
DEFAULT_ARCHITECTURES = ('fcos_fpn', 'nasfcos')
# The name of a search's best by the space it searched (search.json's space_name).
SEARCHED_NAMES = {'nasfcos_fpn': 'searched_pyramid', 'nasfcos_head': 'searched_head'}
BASELINE = 'fcos_fpn'


def define_flags():
  """The script's flags, defined only when it runs: tests import its functions beside other
  experiments that define flags of the same names."""
  flags.DEFINE_string('output_dir', 'runs/nasfcos_compare', 'Model dirs, data, plot and rows.')
  flags.DEFINE_list('architectures', list(DEFAULT_ARCHITECTURES),
                    f'Fixed architectures trained, of {sorted(ARCHITECTURES)}.')
  flags.DEFINE_list('search_dirs', [], 'NAS-FCOS search dirs (--space=nasfcos_fpn|nasfcos_head) '
                    'whose best.gin is trained too.')
  flags.DEFINE_list('seeds', ['0', '1'], 'Seeds of every architecture.')
  flags.DEFINE_integer('train_steps', None, "Steps of every model (default: fcos_demo.gin's).",
                       lower_bound=1)
  flags.DEFINE_integer('latency_runs', 20, 'Timed rounds of the latency of each architecture.',
                       lower_bound=1)
  flags.DEFINE_multi_string('gin_bindings', [], 'Bindings on top of fcos_demo.gin for every '
                            'model.')


def searched_bindings(search_dirs: Sequence[str]) -> Dict[str, str]:
  """{name: the best.gin text} of each NAS-FCOS search dir, named by its space
  (SEARCHED_NAMES); ValueError naming --search_dirs for a dir without a NAS-FCOS search or a
  best.gin, or two searches of one space."""
  result = {}
  for search_dir in search_dirs:
    directory = pathlib.Path(search_dir)
    search_json = directory / search_dir_lib.IDENTITY_FILE
    if not search_json.exists():
      raise ValueError(f'--search_dirs: {search_dir} holds no search ({search_json} is missing).')
    space_name = json.loads(search_json.read_text()).get('space_name', 'nasfpn')
    if space_name not in NASFCOS_SPACES:
      raise ValueError(f'--search_dirs: {search_dir} searched --space={space_name}, not a '
                       f'NAS-FCOS space ({sorted(NASFCOS_SPACES)}).')
    best = directory / search_dir_lib.BEST_GIN
    if not best.exists():
      raise ValueError(f'--search_dirs: {search_dir} has no {search_dir_lib.BEST_GIN} yet (no '
                       'trial trained to the end).')
    name = SEARCHED_NAMES[space_name]
    if name in result:
      raise ValueError(f'--search_dirs: two searches in --space={space_name}; give one.')
    result[name] = best.read_text()
  return result


def model_cost(model_dir: pathlib.Path) -> Dict[str, int]:
  """FLOPs at batch 1 (network, no post-processing) and params of the model trained in
  `model_dir` (its recorded config; the weights do not count)."""
  model = RetinaNet.from_config(checkpointing.read_model_config(str(model_dir)))
  return {'flops': demo_runs.exit_flops(model), 'params': model_stats.count_params(model)}


def latencies_ms(model_dirs: Dict[str, pathlib.Path], runs: int) -> Dict[str, float]:
  """Median CPU latency in ms of each trained model's `detect` at batch 1, the models timed in
  turns (`timing.alternate`) over `runs` rounds."""
  calls = {}
  for name, model_dir in model_dirs.items():
    model = demo_runs.trained_model(model_dir)
    images = tf.random.stateless_uniform([1] + model.image_size + [3], [0, 0], maxval=255.0)
    detect = tf.function(model.detect)
    calls[name] = lambda f=detect, x=images: f(x)
  timings = alternate(calls, runs, 'latency b1')
  return {name: 1000 * timings[name].median for name in calls}


def run(output_dir: pathlib.Path, seeds: Sequence[int],
        architectures: Sequence[str] = DEFAULT_ARCHITECTURES, search_dirs: Sequence[str] = (),
        train_steps=None, gin_bindings: Sequence[str] = (),
        latency_runs: int = 20) -> List[Dict[str, Any]]:
  """Trains (or reuses) each architecture with every seed; returns the rows, one per run."""
  unknown = [name for name in architectures if name not in ARCHITECTURES]
  if unknown:
    raise ValueError(f'--architectures: {unknown} not of {sorted(ARCHITECTURES)}.')
  if not seeds:
    raise ValueError('--seeds: give at least one seed.')
  extra = {name: list(ARCHITECTURES[name]) for name in architectures}
  extra.update({name: [text] for name, text in searched_bindings(search_dirs).items()})
  output_dir = pathlib.Path(output_dir)
  records = demo_runs.synthetic_records(output_dir / 'data', demo_runs.DEMO_NUM_TRAIN,
                                        demo_runs.DEMO_NUM_VAL)
  bindings = demo_runs.demo_bindings(records, train_steps, gin_bindings)
  runs = []
  for seed in seeds:  # Seeds outermost: an interrupted run has every architecture once first.
    for name in extra:
      model_dir = output_dir / f'{name}_seed{seed}'
      metrics = demo_runs.train_and_evaluate(model_dir, bindings + extra[name], seed=seed,
                                             gin_file=GIN_FILE)
      runs.append((name, seed, metrics))
  first = {name: output_dir / f'{name}_seed{seeds[0]}' for name in extra}
  cost = {name: model_cost(model_dir) for name, model_dir in first.items()}
  latency = latencies_ms(first, latency_runs)
  return [{'name': name, 'seed': seed, 'AP': metrics['AP'], 'AP50': metrics['AP50'],
           **cost[name], 'latency_ms': latency[name]} for name, seed, metrics in runs]


def summary(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """Per architecture: mean AP, spread over seeds (max - min), seeds, FLOPs, params, latency,
  and (when FCOS-FPN ran) its mean AP minus FCOS-FPN's."""
  per_name = {}
  for name in dict.fromkeys(row['name'] for row in rows):
    mine = [row for row in rows if row['name'] == name]
    aps = [row['AP'] for row in mine]
    per_name[name] = {'mean_ap': float(np.mean(aps)), 'spread': float(max(aps) - min(aps)),
                      'seeds': len(aps), 'flops': mine[0]['flops'], 'params': mine[0]['params'],
                      'latency_ms': mine[0]['latency_ms']}
  if BASELINE in per_name:
    for values in per_name.values():
      values[f'minus_{BASELINE}_ap'] = values['mean_ap'] - per_name[BASELINE]['mean_ap']
  return {'architectures': per_name}


def draw(rows: Sequence[Dict[str, Any]], path: str) -> None:
  """Left: AP per architecture, a bar at the mean over seeds, a point per seed. Right: mean AP
  against the CPU latency of `detect`, a labelled point per architecture."""
  per_name = summary(rows)['architectures']
  names = list(per_name)
  fig = Figure(figsize=(max(9.0, 2.2 * len(names) + 4), 4))
  ap_ax, latency_ax = fig.subplots(1, 2)
  for i, name in enumerate(names):
    aps = [row['AP'] for row in rows if row['name'] == name]
    ap_ax.bar(i, per_name[name]['mean_ap'], color='#9ecae1')
    ap_ax.plot([i] * len(aps), aps, 'ko', alpha=0.7)
    latency_ax.plot(per_name[name]['latency_ms'], per_name[name]['mean_ap'], 'o',
                    label=f"{name} ({per_name[name]['flops'] / 1e9:.2f} GFLOPs)")
  ap_ax.set_xticks(range(len(names)), names)
  ap_ax.set(ylabel='AP (demo val)', title='FCOS at demo scale: AP per seed')
  latency_ax.set(xlabel='CPU latency of detect, batch 1 (ms, median)', ylabel='mean AP',
                 title='AP against latency')
  latency_ax.legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  output_dir = pathlib.Path(FLAGS.output_dir)
  rows = run(output_dir, [int(s) for s in FLAGS.seeds], FLAGS.architectures, FLAGS.search_dirs,
             FLAGS.train_steps, FLAGS.gin_bindings, FLAGS.latency_runs)
  draw(rows, str(output_dir / 'nasfcos_compare.png'))
  demo_runs.write_rows(rows, output_dir / 'nasfcos_compare.jsonl')
  print(json.dumps({'summary': summary(rows)}), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
