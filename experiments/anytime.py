r"""Anytime detection at demo scale: one model with an exit after each of N stacked pyramids
against models of 1..N pyramids trained separately.

  .venv/bin/python experiments/anytime.py --output_dir=runs/anytime

Trains gin_configs/demo.gin (what `make demo` runs) with --num_repeats N pyramids as an anytime
model (build_retinanet.anytime: a shared head after every pyramid, deep supervision with equal
weights) in OUTPUT_DIR/anytime_N, and demo.gin with 1..N pyramids as plain models in
OUTPUT_DIR/repeats_k, all with the same budget (the same steps of the same batch), on the demo's
synthetic data (made once in OUTPUT_DIR/data) and evaluated on its validation images by the
trainer. Then, per exit k of the anytime model:
  flops       the exit alone at batch 1 (backbone, k pyramids, one head; TF profiler), which is
              also what a plain model of k pyramids computes;
  latency_ms  CPU latency of `detect(images, num_repeats=k)` (network + post-processing) at
              batch 1 in float32, median of --latency_runs rounds, the exits timed in turns;
  AP, AP50    of the exit (eval_metrics.json 'exits'); separate_AP: the plain model of k
              pyramids.
Writes OUTPUT_DIR/anytime.png (AP against FLOPs: the exits as a line, the separately trained
models as points) and OUTPUT_DIR/anytime.jsonl, and prints one JSON line per exit.

Each model trains in its own model dir, so a rerun reuses the finished ones and resumes an
interrupted one from its last checkpoint.
"""
import os
import pathlib
import sys
from typing import Any, Dict, List, Sequence

# The shared parts in experiments/bench/, also when this file is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bench import demo_runs  # noqa: E402
from bench.timing import say  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """The script's flags, defined only when it runs: tests import its functions beside other
  experiments that define flags of the same names."""
  flags.DEFINE_string('output_dir', 'runs/anytime', 'Model dirs, data, plot and rows go here.')
  flags.DEFINE_integer('num_repeats', 4, 'N: the anytime model\'s pyramids (and exits).',
                       lower_bound=1)
  flags.DEFINE_integer('train_steps', None, 'Steps of every model (default: demo.gin\'s).',
                       lower_bound=1)
  flags.DEFINE_integer('num_train', demo_runs.DEMO_NUM_TRAIN, 'Synthetic training images.')
  flags.DEFINE_integer('num_val', demo_runs.DEMO_NUM_VAL, 'Synthetic validation images.')
  flags.DEFINE_integer('latency_runs', 30, 'Timed rounds per exit.', lower_bound=1)
  flags.DEFINE_multi_string('gin_bindings', [], 'Bindings on top of demo.gin for every model.')


def run(output_dir: pathlib.Path, num_repeats: int, train_steps=None,
        num_train: int = demo_runs.DEMO_NUM_TRAIN, num_val: int = demo_runs.DEMO_NUM_VAL,
        latency_runs: int = 30, gin_bindings: Sequence[str] = ()) -> List[Dict[str, Any]]:
  """Trains (or reuses) every model and measures; returns one row per exit."""
  output_dir = pathlib.Path(output_dir)
  records = demo_runs.synthetic_records(output_dir / 'data', num_train, num_val)
  bindings = demo_runs.demo_bindings(records, train_steps, gin_bindings)
  anytime_dir = output_dir / f'anytime_{num_repeats}'
  anytime_metrics = demo_runs.train_and_evaluate(anytime_dir, bindings + [
      f'build_retinanet.num_repeats = {num_repeats}', 'build_retinanet.anytime = True'])
  separate_metrics = {
      k: demo_runs.train_and_evaluate(output_dir / f'repeats_{k}', bindings + [
          f'build_retinanet.num_repeats = {k}'])
      for k in range(1, num_repeats + 1)}
  model = demo_runs.trained_model(anytime_dir)
  exits = list(range(1, num_repeats + 1))
  say('FLOPs of each exit')
  flops = {k: demo_runs.exit_flops(model, k) for k in exits}
  latencies = demo_runs.exit_latencies_ms(model, exits, latency_runs)
  return [{'exit': k, 'flops': flops[k], 'latency_ms': round(latencies[k], 2),
           'AP': anytime_metrics['exits'][str(k)]['AP'],
           'AP50': anytime_metrics['exits'][str(k)]['AP50'],
           'separate_AP': separate_metrics[k]['AP']} for k in exits]


def draw(rows: Sequence[Dict[str, Any]], path: str) -> None:
  """AP against GFLOPs: the anytime model's exits as a line, the plain models as points."""
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  gflops = [row['flops'] / 1e9 for row in rows]
  ax.plot(gflops, [row['AP'] for row in rows], 'o-', label='anytime model, exit k')
  ax.plot(gflops, [row['separate_AP'] for row in rows], 's', label='k pyramids, trained alone')
  for x, row in zip(gflops, rows):
    ax.annotate(str(row['exit']), (x, row['AP']), textcoords='offset points', xytext=(4, 4))
  ax.set(xlabel='GFLOPs (batch 1)', ylabel='AP (demo val)',
         title='Anytime exits against separately trained models')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  output_dir = pathlib.Path(FLAGS.output_dir)
  rows = run(output_dir, FLAGS.num_repeats, FLAGS.train_steps, FLAGS.num_train, FLAGS.num_val,
             FLAGS.latency_runs, FLAGS.gin_bindings)
  draw(rows, str(output_dir / 'anytime.png'))
  demo_runs.write_rows(rows, output_dir / 'anytime.jsonl')


if __name__ == '__main__':
  define_flags()
  app.run(main)
