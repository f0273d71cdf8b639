r"""Is the spread of the demo's AP between seeds the training's or the 200 validation images'?

  .venv/bin/python experiments/demo_eval_noise.py --output_dir=runs/demo_eval_noise \
      --model_dirs=runs/search_retrain/nasfpn_seed0,runs/search_retrain/nasfpn_seed1,...

Each trained demo model dir (as `make demo` or experiments/search_retrain.py leave them) is
evaluated twice with its last checkpoint: on the demo's validation images (the first --num_val
of the synthetic val split, seed 0, --image_size: the AP its own eval_metrics.json holds, which
this checks) and on --num_extra further images of the same split, drawn the same way and never
trained on. Where the AP on the extra images follows the AP on the demo's images, the seeds
differ because training does; where it does not, 200 images are too few to rank pyramids by.

One journal line per model dir (OUTPUT_DIR/rows.jsonl, `Journal`: a rerun evaluates only the
dirs not in it yet). Architecture and seed come from the dir's name, `<architecture>_seed<N>`
(search_retrain's `model_dir_name`); a second dir of the same architecture and seed is left out
of the summary and named. Prints per architecture the mean and SD over seeds on both image sets,
then the pooled SD over seeds, the SD of the difference between the two sets' AP (the part of a
seed's AP that the choice of 200 images makes), Kendall's tau of the architectures' mean AP on
the two sets, and of seed 0 against seed 1 on each; the last line is JSON. Draws
OUTPUT_DIR/demo_eval_noise.png: each model's AP on the extra images against the demo's.

--reference=experiments/bench/demo_reference_zen4.json also writes that demo-gate reference's
pyramids with their AP on the extra images (OUTPUT_DIR/demo_reference_extra.json), for
`search_proxy_demo_gate.py --reference=...`: the proxies ranked against the larger image set.
"""
import json
import os
import pathlib
import re
import sys
import time
from typing import Any, Dict, Optional, Sequence

# The shared parts in experiments/bench/, also when this file is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import demo_runs  # noqa: E402
from bench.timing import say  # noqa: E402
import search_proxy_demo_gate  # noqa: E402  (load_reference, SPACE)
import search_proxy_gate  # noqa: E402  (kendall_tau)
import search_retrain  # noqa: E402  (model_dir_name)
from nasfpn_tf.data import input_pipeline  # noqa: E402
from nasfpn_tf.evaluation.evaluate import evaluate_detector  # noqa: E402
from nasfpn_tf.export.saved_model import load_model  # noqa: E402
from nasfpn_tf.search.journal import Journal  # noqa: E402
from nasfpn_tf.training import precision  # noqa: E402
from nasfpn_tf.training.trainer import METRICS_FILE  # noqa: E402
from nasfpn_tf.utils.files import atomic_write  # noqa: E402

FLAGS = flags.FLAGS
SEED_SUFFIX = re.compile(r'^(?P<architecture>.+)_seed(?P<seed>\d+)$')


def define_flags() -> None:
  flags.DEFINE_string('output_dir', 'runs/demo_eval_noise', 'Images, journal, plot.')
  flags.DEFINE_list('model_dirs', None, 'Trained demo model dirs, each <architecture>_seed<N>.')
  flags.DEFINE_integer('num_val', demo_runs.DEMO_NUM_VAL, "The demo's validation images.")
  flags.DEFINE_integer('num_extra', 2000, 'Further validation images of the same split.')
  flags.DEFINE_integer('image_size', 256, "The synthetic generator's nominal size (the demo's).")
  flags.DEFINE_integer('eval_batch_size', 20, 'Images per evaluation batch.')
  flags.DEFINE_string('reference', None, "A demo gate's reference (search_proxy_demo_gate.py "
                      "--reference): also write its pyramids' AP on the extra images, per seed "
                      'evaluated here, as OUTPUT_DIR/demo_reference_extra.json, a reference of '
                      'its own for the gate.')


def architecture_and_seed(model_dir: str):
  """('nasfpn', 3) for .../nasfpn_seed3; ValueError naming a dir not so named."""
  match = SEED_SUFFIX.match(pathlib.Path(model_dir).name)
  if not match:
    raise ValueError(f'--model_dirs: {model_dir} is not named <architecture>_seed<N> (as '
                     'experiments/search_retrain.py names its model dirs).')
  return match['architecture'], int(match['seed'])


def evaluate(model_dir: str, file_pattern: str, num_val: int, batch_size: int) -> Dict[str, Any]:
  """AP and AP50 of the model dir's last checkpoint on the first `num_val` images of the
  records and on the rest."""
  start = time.perf_counter()
  model, _, step = load_model(model_dir)
  dataset = input_pipeline.build_eval_dataset(file_pattern, batch_size, model.get_config())
  detect = tf.function(model.detect)
  demo = evaluate_detector(detect, dataset.take(num_val // batch_size))
  extra = evaluate_detector(detect, dataset.skip(num_val // batch_size))
  architecture, seed = architecture_and_seed(model_dir)
  return {'model_dir': model_dir, 'architecture': architecture, 'seed': seed, 'step': step,
          'ap_val': demo.metrics['AP'], 'ap50_val': demo.metrics['AP50'],
          'num_val': demo.num_images, 'ap_extra': extra.metrics['AP'],
          'ap50_extra': extra.metrics['AP50'], 'num_extra': extra.num_images,
          'seconds': time.perf_counter() - start}


def check_recorded(row: Dict[str, Any]) -> None:
  """The AP on the demo's images must be the one the model dir recorded: else these are not
  the images it was evaluated on (another --num_val or --image_size)."""
  recorded = json.loads((pathlib.Path(row['model_dir']) / METRICS_FILE).read_text())
  if abs(recorded['AP'] - row['ap_val']) > 1e-6:
    raise ValueError(f"{row['model_dir']}: AP {row['ap_val']:.5f} on the first {row['num_val']} "
                     f"images, but its {METRICS_FILE} says {recorded['AP']:.5f}: its validation "
                     'images were other ones (--num_val, --image_size).')


def summarize(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """The figures of the module docstring from the journal's rows."""
  runs, duplicates = {}, []
  for row in rows:
    key = (row['architecture'], row['seed'])
    if key in runs:
      duplicates.append(row['model_dir'])
    else:
      runs[key] = row
  by_arch: Dict[str, Dict[int, Dict[str, Any]]] = {}
  for (arch, seed), row in runs.items():
    by_arch.setdefault(arch, {})[seed] = row
  table, deviations = {}, {'val': [], 'extra': []}
  for arch, seeds in by_arch.items():
    entry = {'seeds': sorted(seeds)}
    for part in ('val', 'extra'):
      aps = np.array([seeds[s][f'ap_{part}'] for s in sorted(seeds)])
      entry[f'mean_{part}'] = float(aps.mean())
      entry[f'sd_{part}'] = float(aps.std(ddof=1)) if len(aps) > 1 else None
      deviations[part] += list(aps - aps.mean()) if len(aps) > 1 else []
    table[arch] = entry
  dof = sum(len(s) - 1 for s in by_arch.values())
  pooled = {p: float(np.sqrt(np.sum(np.square(deviations[p])) / dof)) if dof else None
            for p in deviations}
  differences = np.array([r['ap_val'] - r['ap_extra'] for r in runs.values()])
  archs = list(table)
  both = [a for a in archs if {0, 1} <= set(by_arch[a])]
  def tau(x, y):
    return search_proxy_gate.kendall_tau(x, y) if len(x) > 1 else None
  return {
      'architectures': table, 'duplicates': duplicates, 'num_models': len(runs),
      'pooled_sd_over_seeds': pooled,
      'sd_of_val_minus_extra': float(differences.std(ddof=1)) if len(differences) > 1 else None,
      'mean_of_val_minus_extra': float(differences.mean()),
      'tau_mean_val_vs_extra': tau([table[a]['mean_val'] for a in archs],
                                   [table[a]['mean_extra'] for a in archs]),
      'tau_seed0_vs_seed1': {p: tau([by_arch[a][0][f'ap_{p}'] for a in both],
                                    [by_arch[a][1][f'ap_{p}'] for a in both])
                             for p in ('val', 'extra')},
      'num_with_seeds_0_and_1': len(both)}


def reference_on_extra(reference_path: str, rows: Sequence[Dict[str, Any]]):
  """(a demo gate reference holding the pyramids of `reference_path` with their AP on the extra
  images, for the seeds `rows` hold; the names of its pyramids of which none was evaluated). A
  pyramid's model dirs are found by search_retrain's names: a fixed table's own name, a searched
  one's key digest."""
  by_run = {(r['architecture'], r['seed']): r for r in rows}
  pyramids, missing = {}, []
  for name, entry in search_proxy_demo_gate.load_reference(reference_path).items():
    table = entry['rows']
    if not isinstance(table, str):
      table = search_retrain.model_dir_name(
          'searched', search_proxy_demo_gate.SPACE.key(table), 0).rsplit('_seed', 1)[0]
    ap = {str(seed): by_run[table, seed]['ap_extra'] for seed in sorted(entry['ap'])
          if (table, seed) in by_run}
    if ap:
      pyramids[name] = {'block_specs': entry['block_specs'], 'ap': ap}
    else:
      missing.append(name)
  num_extra = rows[0]['num_extra'] if rows else 0
  return {'about': f'The pyramids of {reference_path} with their AP on {num_extra} further '
                   'synthetic validation images (experiments/demo_eval_noise.py), per seed.',
          'machine': precision.cpu_name(), 'pyramids': pyramids}, missing


# The right panel's span below the best AP: the pyramids near the best, where seeds decide.
ZOOM_SPAN = 0.1


def plot(rows: Sequence[Dict[str, Any]], path: pathlib.Path) -> None:
  """Each model's AP on the extra images against its AP on the demo's, by architecture (a colour
  and marker each); all of them left, those within ZOOM_SPAN of the best right."""
  figure = Figure(figsize=(12.0, 5.6))
  panels = figure.subplots(1, 2)
  archs = sorted({r['architecture'] for r in rows})
  best = max(max(r['ap_val'], r['ap_extra']) for r in rows)
  for ax, shown in zip(panels, (rows, [r for r in rows if r['ap_val'] >= best - ZOOM_SPAN])):
    for i, arch in enumerate(archs):
      mine = [r for r in shown if r['architecture'] == arch]
      if mine:
        ax.scatter([r['ap_val'] for r in mine], [r['ap_extra'] for r in mine], s=24,
                   color=f'C{i % 10}', marker='os^D'[i // 10 % 4], label=arch[:24])
    low = min(min(r['ap_val'], r['ap_extra']) for r in shown) - 0.005
    high = max(max(r['ap_val'], r['ap_extra']) for r in shown) + 0.005
    ax.plot([low, high], [low, high], color='0.6', lw=0.8, zorder=0)
    ax.set_xlabel(f"AP on the demo's {rows[0]['num_val']} validation images")
    ax.set_ylabel(f"AP on {rows[0]['num_extra']} further images")
  panels[0].set_title('Demo models, a point per seed', fontsize=9)
  panels[1].set_title(f'Those within {ZOOM_SPAN} AP of the best', fontsize=9)
  panels[1].legend(fontsize=6, loc='upper left')
  figure.tight_layout()
  figure.savefig(path, dpi=110)


def run(output_dir: str, model_dirs: Sequence[str], num_val: int, num_extra: int,
        image_size: int, batch_size: int, reference: Optional[str] = None) -> Dict[str, Any]:
  """Evaluates the model dirs not in OUTPUT_DIR's journal yet; prints, plots and returns the
  summary of all of them (`summarize`)."""
  if num_val % batch_size:  # The demo's images must be whole batches: they are taken first.
    raise ValueError(f'--num_val={num_val} must be a multiple of --eval_batch_size={batch_size}.')
  for model_dir in model_dirs:
    architecture_and_seed(model_dir)  # Every name checked before any work.
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  journal = Journal(out / 'rows.jsonl')
  done = {r['model_dir'] for r in journal.recover()}
  todo = [d for d in model_dirs if d not in done]
  # The synthetic val split's first images (seed 0: the demo's come first), one shard in order.
  file_pattern = demo_runs.synthetic_records(
      out, 0, num_val + num_extra, image_size)['val'] if todo else None
  for i, model_dir in enumerate(todo, 1):
    row = evaluate(model_dir, file_pattern, num_val, batch_size)
    check_recorded(row)
    journal.append(row)
    say(f"{i}/{len(todo)} {model_dir}: AP {row['ap_val']:.4f} on {num_val}, "
        f"{row['ap_extra']:.4f} on {num_extra} ({row['seconds']:.0f} s)")
  rows = [r for r in journal.read() if r['model_dir'] in set(model_dirs)]
  summary = summarize(rows)
  def sd(value):
    return '-' if value is None else f'{value:.4f}'
  for arch, entry in summary['architectures'].items():
    say(f"{arch}: seeds {entry['seeds']}, AP {entry['mean_val']:.4f} (SD {sd(entry['sd_val'])}) "
        f"on the demo's images, {entry['mean_extra']:.4f} (SD {sd(entry['sd_extra'])}) on the "
        'extra ones')
  if summary['duplicates']:
    say(f"left out, a second dir of an architecture and seed: {summary['duplicates']}")
  plot(rows, out / 'demo_eval_noise.png')
  if reference:
    extra, missing = reference_on_extra(reference, rows)
    atomic_write(out / 'demo_reference_extra.json', json.dumps(extra, indent=2) + '\n')
    say(f"{out / 'demo_reference_extra.json'}: {len(extra['pyramids'])} pyramids"
        + (f"; none evaluated of {missing}" if missing else ''))
  print(json.dumps({k: v for k, v in summary.items() if k != 'architectures'}), flush=True)
  return summary


def main(argv) -> None:
  del argv
  if not FLAGS.model_dirs:
    raise app.UsageError('--model_dirs: give the trained demo model dirs to evaluate.')
  run(FLAGS.output_dir, FLAGS.model_dirs, FLAGS.num_val, FLAGS.num_extra, FLAGS.image_size,
      FLAGS.eval_batch_size, FLAGS.reference)


if __name__ == '__main__':
  define_flags()
  app.run(main)
