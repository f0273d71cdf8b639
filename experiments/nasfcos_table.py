"""Params and FLOPs of the published NAS-FCOS pyramid beside NAS-FCOS's Table (R-50, 1088x800).

Builds R-50 (`build_backbone`, C3-C5), the published pyramid (`NASFCOSFPN`, 'nasfcos_fpn') at a
pyramid width, and the published head (`NASFCOSHead`, 'nasfcos_head', 80 classes + the
background column) at a head width, on one 800x1088 image (the paper's "1088x800"; the released
code pads to multiples of 32, which these already are). Params count every weight (BN
statistics included); FLOPs are the TF profiler's on the frozen inference graph
(nasfpn_tf.utils.model_stats: 2 per multiply-add), no post-processing. NAS-FCOS's table counts
multiply-adds (its FPN-FCOS R-50, 169.9 "GFLOPs", is about R-50's 71 G multiply-adds at this
size plus FCOS's head's 90 G), so the comparison is against our FLOPs / 2 (docs/nasfcos.md).

  python experiments/nasfcos_table.py                   # markdown table on stdout
  python experiments/nasfcos_table.py --rows=mobilenetv2:256:256,resnet101:256:256
"""
import sys
import time

import tensorflow as tf
import tf_keras
from absl import app, flags, logging

from nasfpn_tf.decoders.nasfcos_fpn import NASFCOSFPN
from nasfpn_tf.models.backbones import build_backbone
from nasfpn_tf.models.nasfcos_head import NASFCOSHead
from nasfpn_tf.utils import count_flops, count_params

IMAGE = (800, 1088, 3)
NUM_CLASSES = 81  # COCO's 80 + the background column of our heads
# NAS-FCOS's Table 2 at 1088x800: (params, G "FLOPs") by backbone:pyramid width:head width.
PAPER = {'resnet50:256:256': (46.0e6, 199.6e9), 'resnet50:128:128': (29.6e6, 104.3e9),
         'resnet50:128:256': (34.1e6, 170.4e9), 'resnet101:256:256': (64.9e6, 264.0e9),
         'mobilenetv2:256:256': (23.7e6, 131.8e9), 'mobilenetv2:128:128': (7.7e6, 39.5e9),
         'mobilenetv2:128:256': (12.3e6, 105.6e9)}

FLAGS = flags.FLAGS
flags.DEFINE_list('rows', [k for k in PAPER if k.startswith('resnet50')],
                  'backbone:pyramid width:head width rows to measure; the paper has '
                  + ', '.join(PAPER) + '.')


def measure(backbone_name: str, pyramid_width: int, head_width: int) -> dict:
  backbone = build_backbone(backbone_name, IMAGE)
  pyramid = NASFCOSFPN(backbone.output_specs, block_specs='nasfcos_fpn',
                       num_filters=pyramid_width, name='nasfcos_fpn')
  head = NASFCOSHead(3, 7, NUM_CLASSES, head_spec='nasfcos_head', num_filters=head_width,
                     name='nasfcos_head')
  images = tf_keras.Input(IMAGE, batch_size=1)
  features = pyramid(backbone(images))
  to_pyramid = tf_keras.Model(images, features)
  full = tf_keras.Model(images, head(features))
  result = dict(
      row=f'{backbone_name}:{pyramid_width}:{head_width}',
      backbone_params=count_params(backbone), pyramid_params=count_params(pyramid),
      head_params=count_params(head), params=count_params(full),
      backbone_flops=count_flops(backbone, IMAGE), to_pyramid_flops=count_flops(to_pyramid, IMAGE),
      flops=count_flops(full, IMAGE))
  tf_keras.backend.clear_session()
  return result


def markdown(results) -> str:
  lines = ['| backbone:pyramid:head widths | backbone | pyramid | head | total | paper | Δ | '
           'FLOPs backbone | + pyramid | + head | multiply-adds | paper | Δ |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    paper_params, paper_flops = PAPER.get(r['row'], (None, None))
    dp = '—' if paper_params is None else f'{(r["params"] - paper_params) / paper_params:+.1%}'
    macs = r['flops'] / 2
    df = '—' if paper_flops is None else f'{(macs - paper_flops) / paper_flops:+.1%}'
    lines.append(
        f'| {r["row"]} | {r["backbone_params"] / 1e6:.2f}M | {r["pyramid_params"] / 1e6:.2f}M | '
        f'{r["head_params"] / 1e6:.2f}M | {r["params"] / 1e6:.2f}M | '
        f'{"—" if paper_params is None else f"{paper_params / 1e6:.1f}M"} | {dp} | '
        f'{r["backbone_flops"] / 1e9:.1f}G | {r["to_pyramid_flops"] / 1e9:.1f}G | '
        f'{r["flops"] / 1e9:.1f}G | {macs / 1e9:.1f}G | '
        f'{"—" if paper_flops is None else f"{paper_flops / 1e9:.1f}G"} | {df} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  results = []
  for i, row in enumerate(FLAGS.rows, 1):
    try:
      backbone_name, pyramid_width, head_width = row.split(':')
      pyramid_width, head_width = int(pyramid_width), int(head_width)
    except ValueError as e:
      raise app.UsageError(f'--rows: {row!r} is not backbone:pyramid:head, e.g. '
                           'resnet50:256:256') from e
    start = time.time()
    results.append(measure(backbone_name, pyramid_width, head_width))
    print(f'[{i}/{len(FLAGS.rows)}] {row}: {results[-1]["params"]:,} params, '
          f'{results[-1]["flops"] / 1e9:.1f}G FLOPs ({time.time() - start:.0f} s)',
          file=sys.stderr, flush=True)
  print(markdown(results))


if __name__ == '__main__':
  app.run(main)
