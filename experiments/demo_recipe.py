r"""How sure is a demo recipe's AP50? A demo gin file and variants of it trained with several
seeds, each AP50 against the demo's aim (>= 0.6).

  .venv/bin/python experiments/demo_recipe.py --output_dir=runs/demo_recipe \
      --gin_file=demo_float32.gin --seeds=0,1,2,3 \
      --variant='clip10: RetinaNetTrainer.clip_gradient_norm = 10.0' \
      --variant='lr2e-3: CosineDecayWithWarmup.base_learning_rate = 0.002'

One run's AP50 says little: the demo trains from scratch for a few thousand images, and runs of
one config differ by several points (docs/results.md, "How the demo was tuned"). Each variant
(a name and `;`-separated gin bindings on top of --gin_file; 'as_is' is the file unchanged,
always trained first) is trained with every seed (the initial weights and the data order) on
the demo's synthetic data (made once in OUTPUT_DIR/data: the images `make demo` writes), each in
its own model dir OUTPUT_DIR/<variant>_seed<seed>, and evaluated by the trainer on the 200
validation images. Seeds go outermost, so an interrupted call has every variant once before any
twice; a rerun reuses finished model dirs and resumes an interrupted one.

Writes OUTPUT_DIR/demo_recipe.jsonl (a row per run: variant, bindings, seed, AP, AP50, seconds
of training and evaluation in the call that trained it) and OUTPUT_DIR/demo_recipe.png (AP50
per variant, a point per seed, the aim drawn), and prints per variant the AP50's mean, SD,
minimum and the share of seeds at or above --aim, the mean AP and seconds, and the mean AP50
difference to 'as_is' over the seeds both trained, with the number of seeds it was ahead.
"""
import json
import os
import pathlib
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

# The shared parts in experiments/bench/, also when this file is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

from bench import demo_runs  # noqa: E402
from nasfpn_tf.search import search_dir  # noqa: E402
from nasfpn_tf.utils.files import atomic_write  # noqa: E402

FLAGS = flags.FLAGS
AS_IS = 'as_is'
# Seconds of a run's training and evaluation, written in its model dir when it finishes.
SECONDS_FILE = 'demo_recipe_seconds.json'
# The gin file and bindings a model dir is trained with (it is named by its variant only).
RECIPE_FILE = 'demo_recipe.json'


def define_flags():
  """The script's flags, defined only when it runs: tests import its functions beside other
  experiments that define flags of the same names."""
  flags.DEFINE_string('output_dir', 'runs/demo_recipe', 'Model dirs, data, plot and rows.')
  flags.DEFINE_string('gin_file', 'demo_float32.gin', 'The demo config the variants change.')
  flags.DEFINE_multi_string('variant', [], "'NAME: BINDING; BINDING ...' on top of --gin_file.")
  flags.DEFINE_list('seeds', ['0', '1', '2', '3'], 'Seeds of every variant.')
  flags.DEFINE_float('aim', 0.6, 'The AP50 a run should reach (the demo aims at 0.6).')


def parse_variants(specs: Sequence[str]) -> List[Tuple[str, List[str]]]:
  """[(name, bindings)] of 'NAME: BINDING; BINDING' specs, 'as_is' (no binding) first."""
  variants = [(AS_IS, [])]
  for spec in specs:
    name, sep, rest = spec.partition(':')
    name = name.strip()
    bindings = [b.strip() for b in rest.split(';') if b.strip()]
    if not sep or not name or not bindings or not name.replace('-', '').replace('.', '').replace(
        '_', '').isalnum():
      raise ValueError(f"--variant={spec!r}: expected 'NAME: BINDING; BINDING ...', NAME of "
                       'letters, digits, -, _ and ., at least one binding.')
    if name in dict(variants):
      raise ValueError(f'--variant={spec!r}: the name {name!r} is taken.')
    variants.append((name, bindings))
  return variants


def run(output_dir: pathlib.Path, gin_file: str, variants: Sequence[Tuple[str, List[str]]],
        seeds: Sequence[int], records: Optional[Dict[str, str]] = None,
        common_bindings: Sequence[str] = ()) -> List[Dict[str, Any]]:
  """Trains (or reuses) every (variant, seed); returns a row per run. `records` (None: the
  demo's, made in OUTPUT_DIR/data) and `common_bindings` (before each variant's) are for tests.
  """
  output_dir = pathlib.Path(output_dir)
  records = records or demo_runs.synthetic_records(output_dir / 'data', demo_runs.DEMO_NUM_TRAIN,
                                                   demo_runs.DEMO_NUM_VAL)
  rows = []
  for seed in seeds:
    for name, bindings in variants:
      model_dir = output_dir / f'{name}_seed{seed}'
      seconds_path = model_dir / SECONDS_FILE
      search_dir.check_identity(model_dir, {'gin_file': gin_file, 'bindings': bindings},
                                file_name=RECIPE_FILE, what='demo_recipe run',
                                flag=f'--variant name than {name!r}')
      start = time.time()
      metrics = demo_runs.train_and_evaluate(
          model_dir, demo_runs.demo_bindings(records, extra=[*common_bindings, *bindings]), seed,
          gin_file)
      if not seconds_path.exists():
        atomic_write(seconds_path, json.dumps({'seconds': time.time() - start}))
      rows.append({'variant': name, 'bindings': bindings, 'seed': seed, 'AP': metrics['AP'],
                   'AP50': metrics['AP50'],
                   'seconds': json.loads(seconds_path.read_text())['seconds']})
  return rows


def summarize(rows: Sequence[Dict[str, Any]], aim: float) -> List[Dict[str, Any]]:
  """Per variant (in the rows' order): seeds, AP50 mean, SD (ddof 1; 0 for one seed), minimum,
  the share of seeds at or above `aim`, mean AP and mean seconds; and against 'as_is' seed by
  seed (the seeds both trained): how many, the mean AP50 difference and the seeds it was ahead.
  """
  names = list(dict.fromkeys(row['variant'] for row in rows))
  as_is = {row['seed']: row['AP50'] for row in rows if row['variant'] == AS_IS}
  summary = []
  for name in names:
    mine = [row for row in rows if row['variant'] == name]
    ap50 = np.array([row['AP50'] for row in mine])
    paired = [row['AP50'] - as_is[row['seed']] for row in mine if row['seed'] in as_is]
    summary.append({
        'variant': name, 'seeds': len(mine), 'AP50_mean': float(ap50.mean()),
        'AP50_sd': float(ap50.std(ddof=1)) if len(ap50) > 1 else 0.0,
        'AP50_min': float(ap50.min()), 'share_at_aim': float(np.mean(ap50 >= aim)),
        'AP_mean': float(np.mean([row['AP'] for row in mine])),
        'seconds_mean': float(np.mean([row['seconds'] for row in mine])),
        'paired_seeds': len(paired),
        'AP50_minus_as_is': float(np.mean(paired)) if paired else None,
        'ahead_of_as_is': sum(d > 0 for d in paired)})
  return summary


def draw(rows: Sequence[Dict[str, Any]], aim: float, path: pathlib.Path) -> None:
  """AP50 per variant, a point per seed and a bar at the mean, the aim as a line."""
  names = list(dict.fromkeys(row['variant'] for row in rows))
  fig = Figure(figsize=(max(5, 1.2 * len(names) + 2), 4))
  ax = fig.subplots()
  for x, name in enumerate(names):
    values = [row['AP50'] for row in rows if row['variant'] == name]
    ax.plot([x] * len(values), values, 'o', alpha=0.6, color='C0')
    ax.plot([x - 0.25, x + 0.25], [np.mean(values)] * 2, '-', color='C1')
  ax.axhline(aim, color='C3', linestyle='--', label=f'aim {aim}')
  ax.set_xticks(range(len(names)), names, rotation=20)
  ax.set(ylabel='AP50 (demo val)', title='Demo recipes over seeds')
  ax.legend()
  fig.tight_layout()
  fig.savefig(str(path), dpi=110)


def main(argv):
  del argv
  output_dir = pathlib.Path(FLAGS.output_dir)
  variants = parse_variants(FLAGS.variant)  # Bad specs fail before any work.
  rows = run(output_dir, FLAGS.gin_file, variants, [int(s) for s in FLAGS.seeds])
  draw(rows, FLAGS.aim, output_dir / 'demo_recipe.png')
  demo_runs.write_rows(rows, output_dir / 'demo_recipe.jsonl')
  print(json.dumps({'summary': summarize(rows, FLAGS.aim)}), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
