"""Draws a pyramid spec as a graph in the manner of the NAS-FPN paper's Figure 7 (the drawing
itself: `nasfpn_tf.visualization.architecture`).

  python experiments/draw_architecture.py --spec=nasfpn --output=docs/nasfpn.png
  python experiments/draw_architecture.py --spec=nasfcos_fpn   # NAS-FCOS's pyramid
  python experiments/draw_architecture.py --pyramids=fpn,nasfpn,nasfpn \
      --output=docs/fpn_nasfpn_nasfpn.png   # a stack of different pyramids (docs/pyramids.md)
"""
from typing import Tuple

from absl import app, flags

from nasfpn_tf.decoders import nasfcos_specs
from nasfpn_tf.decoders.block_specs import SPECS, resolve
from nasfpn_tf.visualization.architecture import draw_pyramids, draw_spec
from nasfpn_tf.visualization.nasfcos_architecture import draw_nasfcos_spec

FLAGS = flags.FLAGS
flags.DEFINE_enum('spec', 'nasfpn', sorted(SPECS) + sorted(nasfcos_specs.SPECS),
                  'Name of the spec in SPECS (or nasfcos_specs.SPECS) to draw.')
flags.DEFINE_integer('min_level', None, 'Lowest pyramid level; default: the spec\'s own '
                     '(3 for all of nasfpn, nasfpn_lite, fpn).')
flags.DEFINE_integer('max_level', None, 'Highest pyramid level; default: the spec\'s own '
                     '(nasfpn 7, nasfpn_lite 6, fpn 7).')
flags.DEFINE_string('output', None, 'PNG path to write; default docs/<spec>.png.')
flags.DEFINE_list('pyramids', None, 'Draw this stack instead of --spec: one name of SPECS per '
                  'repeat, first first, as build_retinanet.pyramids (e.g. fpn,nasfpn,nasfpn).')
flags.DEFINE_string('title', None, 'Figure title; default names the spec, its levels and cells.')


def natural_levels(name: str) -> Tuple[int, int]:
  """The levels a named spec is written for (fpn, built for any, defaults to `resolve`'s 3-7)."""
  levels = [cell.level for cell in resolve(name) if cell.is_output]
  return min(levels), max(levels)


def main(argv):
  del argv
  if FLAGS.pyramids:
    min_level = 3 if FLAGS.min_level is None else FLAGS.min_level
    max_level = 7 if FLAGS.max_level is None else FLAGS.max_level
    path = FLAGS.output or f'docs/{"_".join(FLAGS.pyramids)}.png'
    draw_pyramids(FLAGS.pyramids, min_level, max_level, path, title=FLAGS.title or
                  f'{" -> ".join(FLAGS.pyramids)}, P{min_level}-P{max_level}')
    print(f'Wrote {path}')
    return
  if FLAGS.spec in nasfcos_specs.SPECS:
    path = FLAGS.output or f'docs/{FLAGS.spec}.png'
    draw_nasfcos_spec(FLAGS.spec, path, FLAGS.title)
    print(f'Wrote {path}')
    return
  default_min, default_max = natural_levels(FLAGS.spec)
  min_level = default_min if FLAGS.min_level is None else FLAGS.min_level
  max_level = default_max if FLAGS.max_level is None else FLAGS.max_level
  spec = resolve(FLAGS.spec, min_level, max_level)
  path = FLAGS.output or f'docs/{FLAGS.spec}.png'
  title = FLAGS.title or f'{FLAGS.spec}: {len(spec)} cells, P{min_level}-P{max_level}'
  draw_spec(spec, min_level, max_level, path, title)
  print(f'Wrote {path}')


if __name__ == '__main__':
  app.run(main)
