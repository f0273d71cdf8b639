"""The paper's Table 1 (params, FLOPs) beside the same models built from this project's gin files.

Each row is a gin file of gin_configs/ built with `build_retinanet`; params count every weight
(BN statistics included), FLOPs come from the TF profiler on the frozen inference graph of
backbone + pyramid + head at batch 1 (2 FLOPs per multiply-add, no post-processing), see
nasfpn_tf.utils.model_stats. Differences are (ours - paper) / paper.

  python experiments/model_table.py                     # markdown table on stdout
  python experiments/model_table.py --json --only=nasfpn_r50_7x256_640
"""
import json
import pathlib
import sys
import time
from typing import NamedTuple, Optional

import tf_keras
from absl import app, flags, logging

from nasfpn_tf.config import GIN_CONFIGS_DIR, parse_gin
from nasfpn_tf.models import build_retinanet
from nasfpn_tf.utils import count_flops, count_params


class PaperRow(NamedTuple):
  name: str                       # gin file stem.
  label: str                      # the paper's name for the model.
  paper_flops: float
  paper_params: Optional[float]   # None: not published.
  flops_target: Optional[float]   # largest relative difference accepted; None: not checked.
  params_target: Optional[float]  # the same for params.


# Paper Table 1; the MobileNetV2 640 FLOPs are from §4.4's text (Figure 8b), its params unpublished
# and its repeats and width unstated, so that row is shown but not checked. The AmoebaNet-D size
# is unpublished too, and the two rows' params imply backbones 18M apart at the same FLOPs: each
# row has its own size (backbones.py), FPN's held to 1% FLOPs and 5% params, NAS-FPN's to 5%.
ROWS = (
    PaperRow('nasfpn_r50_7x256_640', 'NAS-FPN R-50 (7@256)', 281.3e9, 60.3e6, 0.01, 0.005),
    PaperRow('nasfpn_r50_7x256_1024', 'NAS-FPN R-50 (7@256)', 720.4e9, 60.3e6, 0.01, 0.01),
    PaperRow('nasfpn_r50_7x256_1280', 'NAS-FPN R-50 (7@256)', 1125.5e9, 60.3e6, 0.01, 0.01),
    PaperRow('nasfpn_r50_7x384_1280_dropblock', 'NAS-FPN R-50 (7@384) + DropBlock', 2086.3e9,
             103.9e6, 0.01, 0.01),
    PaperRow('fpn_r50_256_640', 'FPN R-50 @256', 193.6e9, 34.0e6, 0.01, 0.01),
    PaperRow('fpn_r101_256_640', 'FPN R-101 @256', 254.2e9, 53.0e6, 0.01, 0.01),
    PaperRow('fpn_r50_256_1024', 'FPN R-50 @256', 495.8e9, 34.0e6, 0.01, 0.01),
    PaperRow('fpn_r101_256_1024', 'FPN R-101 @256', 651.1e9, 53.0e6, 0.01, 0.01),
    PaperRow('fpn_amoebanet_256_1280', 'FPN AmoebaNet @256', 1311e9, 114.4e6, 0.01, 0.05),
    PaperRow('nasfpn_amoebanet_7x384_1280', 'NAS-FPN AmoebaNet (7@384)', 2633e9, 166.5e6, 0.05,
             0.05),
    PaperRow('nasfpn_amoebanet_7x384_1280_dropblock', 'NAS-FPN AmoebaNet (7@384) + DropBlock',
             2633e9, 166.5e6, 0.05, 0.05),
    PaperRow('nasfpn_lite_mnv2_3x48_320', 'NAS-FPNLite MobileNetV2 (3@48)', 1.52e9, 2.16e6, 0.15,
             0.15),
    PaperRow('nasfpn_lite_mnv2_7x64_320', 'NAS-FPNLite MobileNetV2 (7@64)', 1.96e9, 2.62e6, 0.15,
             0.15),
    PaperRow('fpnlite_mnv2_64_320', 'FPNLite MobileNetV2 @64', 1.51e9, 2.02e6, 0.15, 0.15),
    PaperRow('nasfpn_mnv2_640', 'NAS-FPN MobileNetV2', 160e9, None, None, None),
)

FLAGS = flags.FLAGS
flags.DEFINE_bool('json', False, 'Print a JSON list of rows (name, image_size, params, flops, '
                  'paper_params, paper_flops, params_diff, flops_diff) instead of markdown.')
flags.DEFINE_list('only', None, 'Comma-separated row names (gin file stems) to measure; '
                  f'default all: {", ".join(row.name for row in ROWS)}.')
flags.DEFINE_string('gin_dir', str(GIN_CONFIGS_DIR), 'Folder holding the <name>.gin files.')


def _diff(ours, paper):
  return None if paper is None else (ours - paper) / paper


def measure(row: PaperRow, gin_dir: pathlib.Path) -> dict:
  """Builds the row's model from its gin file and counts its params and FLOPs."""
  parse_gin([str(gin_dir / f'{row.name}.gin')])
  model = build_retinanet()
  image_size = model.image_size
  params = count_params(model)
  flops = count_flops(model, image_size + [3])
  tf_keras.backend.clear_session()  # The big models would otherwise pile up in memory.
  paper_params = None if row.paper_params is None else round(row.paper_params)
  return dict(name=row.name, image_size=image_size, params=params, flops=flops,
              paper_params=paper_params, paper_flops=round(row.paper_flops),
              params_diff=_diff(params, row.paper_params),
              flops_diff=_diff(flops, row.paper_flops))


def _verdict(row: PaperRow, result: dict) -> str:
  if row.flops_target is None:
    return 'not checked'
  ok = abs(result['flops_diff']) <= row.flops_target and (
      result['params_diff'] is None or abs(result['params_diff']) <= row.params_target)
  target = (f'±{row.flops_target:.0%}' if row.params_target == row.flops_target else
            f'params ±{row.params_target:.1%}, FLOPs ±{row.flops_target:.0%}')
  return f'{"ok" if ok else "MISSED"} ({target})'


def _pct(diff):
  return '—' if diff is None else f'{diff:+.2%}'


def markdown(rows, results) -> str:
  lines = ['| model | gin | image | params | paper | Δ | FLOPs | paper | Δ | target |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for row, r in zip(rows, results):
    paper_params = '—' if r['paper_params'] is None else f'{r["paper_params"] / 1e6:.2f}M'
    lines.append(
        f'| {row.label} | {r["name"]} | {"x".join(map(str, r["image_size"]))} | {r["params"] / 1e6:.3f}M | '
        f'{paper_params} | {_pct(r["params_diff"])} | {r["flops"] / 1e9:.2f}B | '
        f'{r["paper_flops"] / 1e9:.2f}B | {_pct(r["flops_diff"])} | {_verdict(row, r)} |')
  return '\n'.join(lines)


def main(argv):
  del argv  # No positional arguments.
  if not (FLAGS['verbosity'].present or FLAGS['v'].present):
    # TF Model Garden logs every MobileNet block at INFO, burying the progress lines.
    logging.set_verbosity(logging.WARNING)
  rows = ROWS
  if FLAGS.only:
    known = {row.name: row for row in ROWS}
    unknown = [name for name in FLAGS.only if name not in known]
    if unknown:
      raise app.UsageError(f'--only: unknown rows {unknown}; known: {list(known)}')
    rows = [known[name] for name in FLAGS.only]
  results = []
  for i, row in enumerate(rows, 1):
    start = time.time()
    result = measure(row, pathlib.Path(FLAGS.gin_dir))
    print(f'[{i}/{len(rows)}] {row.name}: {result["params"]:,} params, '
          f'{result["flops"] / 1e9:.2f}B FLOPs ({time.time() - start:.0f} s)',
          file=sys.stderr, flush=True)
    results.append(result)
  print(json.dumps(results, indent=1) if FLAGS.json else markdown(rows, results))


if __name__ == '__main__':
  app.run(main)
