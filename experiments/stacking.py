r"""Stacking pyramids at demo scale (the paper's Fig. 8a): does AP keep rising with more
NAS-FPN repeats, and not with more FPN repeats?

  .venv/bin/python experiments/stacking.py --output_dir=runs/stacking [--with_7]

Trains gin_configs/demo.gin (what `make demo` runs) with the pyramid of each --specs entry (the
block-spec table: 'nasfpn', 'fpn') stacked --repeats times (1, 2, 3, 5; --with_7 adds 7), with
each --seeds seed (the initial weights and the data order), all with the same budget (demo.gin's
steps and batch, or --train_steps), on the demo's synthetic data (made once in OUTPUT_DIR/data),
each in its own model dir OUTPUT_DIR/<spec>_<repeats>x_seed<seed>, evaluated by the trainer on
the validation images. Seeds go outermost, so an interrupted run has every configuration once
before any twice; a rerun reuses the finished model dirs and resumes an interrupted one.

Writes OUTPUT_DIR/stacking.png (AP against repeats: a line per spec through the seeds' mean,
each seed a point) and OUTPUT_DIR/stacking.jsonl, and prints one JSON line per run: spec,
repeats, seed, AP, AP50, flops (the model at batch 1, TF profiler).
"""
import collections
import os
import pathlib
import sys
from typing import Any, Dict, List, Sequence

# The shared parts in experiments/bench/, also when this file is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

from bench import demo_runs  # noqa: E402
from nasfpn_tf import checkpointing  # noqa: E402
from nasfpn_tf.decoders import block_specs  # noqa: E402
from nasfpn_tf.models.retinanet import RetinaNet  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """The script's flags, defined only when it runs: tests import its functions beside other
  experiments that define flags of the same names."""
  flags.DEFINE_string('output_dir', 'runs/stacking', 'Model dirs, data, plot and rows go here.')
  flags.DEFINE_list('specs', ['nasfpn', 'fpn'], 'Pyramids of the block-spec table to stack.')
  flags.DEFINE_list('repeats', ['1', '2', '3', '5'], 'Repeat counts.')
  flags.DEFINE_bool('with_7', False, 'Also 7 repeats (the longest runs).')
  flags.DEFINE_list('seeds', ['0', '1'], 'Seeds of every configuration.')
  flags.DEFINE_integer('train_steps', None, 'Steps of every model (default: demo.gin\'s).',
                       lower_bound=1)
  flags.DEFINE_integer('num_train', demo_runs.DEMO_NUM_TRAIN, 'Synthetic training images.')
  flags.DEFINE_integer('num_val', demo_runs.DEMO_NUM_VAL, 'Synthetic validation images.')
  flags.DEFINE_multi_string('gin_bindings', [], 'Bindings on top of demo.gin for every model.')


def run(output_dir: pathlib.Path, specs: Sequence[str], repeats: Sequence[int],
        seeds: Sequence[int], train_steps=None, num_train: int = demo_runs.DEMO_NUM_TRAIN,
        num_val: int = demo_runs.DEMO_NUM_VAL,
        gin_bindings: Sequence[str] = ()) -> List[Dict[str, Any]]:
  """Trains (or reuses) every (spec, repeats, seed); returns one row per run."""
  unknown = sorted(set(specs) - set(block_specs.SPECS))
  if unknown:
    raise ValueError(f'--specs {unknown}: not in the block-spec table {sorted(block_specs.SPECS)}')
  output_dir = pathlib.Path(output_dir)
  records = demo_runs.synthetic_records(output_dir / 'data', num_train, num_val)
  bindings = demo_runs.demo_bindings(records, train_steps, gin_bindings)
  rows, flops = [], {}
  for seed in seeds:
    for spec in specs:
      for count in repeats:
        model_dir = output_dir / f'{spec}_{count}x_seed{seed}'
        metrics = demo_runs.train_and_evaluate(model_dir, bindings + [
            f"build_retinanet.block_specs = '{spec}'", f'build_retinanet.num_repeats = {count}'],
            seed=seed)
        if (spec, count) not in flops:  # The weights do not change the FLOPs.
          model = RetinaNet.from_config(checkpointing.read_model_config(str(model_dir)))
          flops[spec, count] = demo_runs.exit_flops(model)
        rows.append({'spec': spec, 'repeats': count, 'seed': seed, 'AP': metrics['AP'],
                     'AP50': metrics['AP50'], 'flops': flops[spec, count]})
  return rows


def draw(rows: Sequence[Dict[str, Any]], path: str) -> None:
  """AP against repeats, a line per spec through the mean over seeds, a point per run."""
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  by_spec = collections.defaultdict(lambda: collections.defaultdict(list))
  for row in rows:
    by_spec[row['spec']][row['repeats']].append(row['AP'])
  for spec, by_repeats in by_spec.items():
    counts = sorted(by_repeats)
    line, = ax.plot(counts, [np.mean(by_repeats[c]) for c in counts], '-', label=spec)
    for count in counts:
      ax.plot([count] * len(by_repeats[count]), by_repeats[count], 'o', color=line.get_color(),
              alpha=0.6)
  ax.set(xlabel='stacked pyramids (repeats)', ylabel='AP (demo val)',
         title='Stacking pyramids (paper Fig. 8a, demo scale)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  output_dir = pathlib.Path(FLAGS.output_dir)
  repeats = [int(r) for r in FLAGS.repeats] + ([7] if FLAGS.with_7 else [])
  rows = run(output_dir, FLAGS.specs, repeats, [int(s) for s in FLAGS.seeds], FLAGS.train_steps,
             FLAGS.num_train, FLAGS.num_val, FLAGS.gin_bindings)
  draw(rows, str(output_dir / 'stacking.png'))
  demo_runs.write_rows(rows, output_dir / 'stacking.jsonl')


if __name__ == '__main__':
  define_flags()
  app.run(main)
