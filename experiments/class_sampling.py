"""Each class's images per pass under uniform, class-balanced and repeat-factor sampling.

  .venv/bin/python experiments/class_sampling.py \
      --file_pattern='/data/coco128/train-*.tfrecord' --repeat_threshold=0.1 \
      --output=docs/class_sampling.png

Reads the records' classes once (`nasfpn_tf.data.sampling.read_record_classes`, the pass
training makes) and computes, per class, the expected number of images holding it in one pass:
sum over its images of m_i (`expected_repeats`). Prints one JSON line: images, classes, the
pass's seconds, and per sampling the images per pass, the coefficient of variation of the
per-class frequencies, the mean gain of the classes in at most 2 images, and the most common
class's images. Draws the per-class frequencies, classes by uniform frequency, to --output.
"""
import json
import time

from absl import app, flags
from matplotlib.figure import Figure
import numpy as np
import tensorflow as tf

from nasfpn_tf.data import sampling

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('file_pattern', None, 'Training TFRecords.')
  flags.DEFINE_float('repeat_threshold', sampling.DEFAULT_REPEAT_THRESHOLD,
                     "repeat_factor's t (LVIS: 0.001; below the rarest class's image fraction "
                     'it repeats nothing).', lower_bound=0.0, upper_bound=1.0)
  flags.DEFINE_string('output', 'class_sampling.png', 'The figure to write.')
  flags.mark_flag_as_required('file_pattern')


def per_class(record_classes, repeats):
  """{class: sum of m_i over the images holding it}."""
  sums = {}
  for m, classes in zip(repeats, record_classes.image_classes):
    for c in classes:
      sums[c] = sums.get(c, 0.0) + float(m)
  return sums


def main(argv):
  del argv
  files = sorted(tf.io.gfile.glob(FLAGS.file_pattern))
  if not files:
    raise app.UsageError(f'--file_pattern={FLAGS.file_pattern}: no files match.')
  start = time.perf_counter()
  record_classes = sampling.read_record_classes(files)
  seconds = time.perf_counter() - start
  frequencies, summary = {}, {}
  for mode in sampling.SAMPLINGS:
    repeats = sampling.expected_repeats(record_classes, mode, FLAGS.repeat_threshold
                                        if mode == 'repeat_factor' else None)
    frequencies[mode] = per_class(record_classes, repeats)
  uniform = frequencies['uniform']
  rare = [c for c in uniform if uniform[c] <= 2]
  commonest = max(uniform, key=uniform.get)
  for mode, frequency in frequencies.items():
    values = np.array(list(frequency.values()))
    summary[mode] = {
        'images_per_pass': round(float(sum(sampling.expected_repeats(
            record_classes, mode, FLAGS.repeat_threshold if mode == 'repeat_factor' else None))),
                                 1),
        'class_frequency_cv': round(float(values.std() / values.mean()), 3),
        'rare_classes_mean_gain': round(float(np.mean([frequency[c] / uniform[c]
                                                       for c in rare])), 2) if rare else None,
        f'class_{commonest}_images': round(frequency[commonest], 1)}
  print(json.dumps({'images': record_classes.num_images, 'classes': len(uniform),
                    'rare_classes': len(rare), 'read_seconds': round(seconds, 1),
                    'repeat_threshold': FLAGS.repeat_threshold, **summary}), flush=True)

  order = sorted(uniform, key=lambda c: (-uniform[c], c))
  fig = Figure(figsize=(10, 4.2))
  ax = fig.subplots()
  x = np.arange(len(order))
  styles = {'uniform': ('#444444', 'uniform'),
            'class_balanced': ('#1982c4', 'class_balanced (seed weights)'),
            'repeat_factor': ('#ff595e', f'repeat_factor (t = {FLAGS.repeat_threshold:g})')}
  for mode, (color, label) in styles.items():
    ax.plot(x, [frequencies[mode][c] for c in order], 'o-', ms=3, lw=1, color=color,
            label=f'{label}: {summary[mode]["images_per_pass"]:g} images per pass')
  ax.set_yscale('log')
  ax.set_xlabel(f'class, most common first ({len(order)} classes of {record_classes.num_images} '
                'images)')
  ax.set_ylabel('expected images per pass holding it')
  ax.set_title('Per-class image frequency after sampling')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend()
  fig.tight_layout()
  staging = FLAGS.output + '.tmp.png'
  fig.savefig(staging, dpi=110)
  tf.io.gfile.rename(staging, FLAGS.output, overwrite=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
