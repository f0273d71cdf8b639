"""TFLite CPU latency of the mobile models beside the paper's Pixel 1 figures; int8 vs float AP.

Latency (default): each model of paper Table 1's mobile rows is built from its gin file with
random weights (latency does not depend on them; batch-norm statistics are set from random
images so activations keep a trained model's scale: `nasfpn_tf.utils.batch_norm`), exported with
nasfpn_tf.export.tflite in every quantization (int8 calibrated on random images: fine for timing,
not for accuracy) and timed in the stock TFLite interpreter (XNNPACK) on this machine's CPU:
warm-up runs, then the median (and fastest) of --runs invocations of the whole file (network +
TFLite_Detection_PostProcess), batch 1, the files taking turns so that load from other processes falls on all alike. Ratios
are to FPNLite @64 in the same column, as the paper's are. With random weights every score sits
near the 0.01 prior, below the 0.05 NMS threshold, so NMS has nothing to do in these timings:
the post-processing op is timed on its own below, with N candidates above the threshold, in
regular (class-aware) and fast (class-agnostic) NMS.

  python experiments/tflite_latency.py                       # markdown tables
  python experiments/tflite_latency.py --json --num_threads=1 --quantizations=float32,int8

AP (--ap_model_dir=<trained model dir>): exports that model dir as float32 and int8 (calibrated
on its training records), both with regular NMS, and float32 with fast NMS, and evaluates each
file with COCO AP on the model dir's eval records (build_eval_dataset.file_pattern of its
operative config), one image at a time through the interpreter, the int8 file fed uint8 pixels.
"""
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple

import gin
import numpy as np
import tensorflow as tf
import tf_keras
from absl import app, flags, logging

from nasfpn_tf.config import GIN_CONFIGS_DIR, parse_gin
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.evaluation import evaluate
from nasfpn_tf.export import tflite
from nasfpn_tf.export import tflite_postprocess
from nasfpn_tf.export import tflite_runtime
from nasfpn_tf.export.saved_model import load_model
from nasfpn_tf.models import build_retinanet
from nasfpn_tf.utils.batch_norm import calibrate_batch_norm


class PaperRow(NamedTuple):
  name: str        # gin file stem
  label: str
  pixel1_ms: float  # paper Table 1, Pixel 1 CPU


ROWS = (
    PaperRow('fpnlite_mnv2_64_320', 'FPNLite MobileNetV2 @64', 192.0),
    PaperRow('nasfpn_lite_mnv2_3x48_320', 'NAS-FPNLite MobileNetV2 (3@48)', 210.0),
    PaperRow('nasfpn_lite_mnv2_7x64_320', 'NAS-FPNLite MobileNetV2 (7@64)', 285.0),
)
BASELINE = ROWS[0].name

FLAGS = flags.FLAGS
flags.DEFINE_list('only', None, 'Gin file stems to measure; default all: '
                  f'{", ".join(row.name for row in ROWS)} (the first is the ratios\' baseline).')
flags.DEFINE_list('quantizations', list(tflite.QUANTIZATIONS), 'TFLite variants to time.')
flags.DEFINE_list('num_threads', ['1', '2'], 'Interpreter thread counts to time.')
flags.DEFINE_integer('warmup', 5, 'Untimed runs first.')
flags.DEFINE_integer('runs', 50, 'Timed runs per file and thread count; the median (and the '
                     'fastest) are reported.')
flags.DEFINE_integer('rounds', 10, 'The timed runs are spread over this many rounds in which '
                     'all files take turns (see time_interleaved).')
flags.DEFINE_integer('calibration_images', 8, 'Random images calibrating the int8 files.')
flags.DEFINE_list('postprocess_candidates', ['0', '300', '3000'],
                  '(anchor, class) pairs above the score threshold for the post-processing-only '
                  'timings; empty: skip them.')
flags.DEFINE_bool('json', False, 'Print JSON rows instead of markdown.')
flags.DEFINE_string('output_dir', None, 'Keep the .tflite files here (default: a temp dir).')
flags.DEFINE_string('ap_model_dir', None, 'Trained model dir: report float32 vs int8 COCO AP '
                    'of its TFLite exports on its eval records instead of latency.')
flags.DEFINE_integer('ap_num_representative_images', 100, 'int8 calibration images (--ap).')
flags.DEFINE_integer('ap_max_images', None, 'Evaluate on the first N eval images only (--ap).')


def _median_and_min_ms(times: List[float]) -> Dict[str, float]:
  return {'ms': 1000 * statistics.median(times), 'min_ms': 1000 * min(times)}


def _ready_interpreter(path: str, num_threads: int):
  """An interpreter of `path` with a random image (of its input dtype) set as input."""
  interpreter = tflite_runtime.interpreter(model_path=path, num_threads=num_threads)
  for detail in interpreter.get_input_details():
    dtype = np.dtype(detail['dtype'])
    value = np.random.RandomState(0).uniform(0, 255, detail['shape']).astype(dtype)
    interpreter.set_tensor(detail['index'], value)
  return interpreter


def time_interleaved(rows: List[Dict]) -> None:
  """Adds 'ms' (median) and 'min_ms' (fastest) of one invoke to each row ({path, num_threads}).

  After --warmup runs each, the rows take turns in --rounds rounds (a shuffled order each round)
  of --runs / --rounds invokes, so that a busy machine's load, which drifts, weighs on every
  row alike.
  """
  interpreters = [_ready_interpreter(r['path'], r['num_threads']) for r in rows]
  for interpreter in interpreters:
    for _ in range(FLAGS.warmup):
      interpreter.invoke()
  times = [[] for _ in rows]
  rng = np.random.RandomState(0)
  per_round = max(1, FLAGS.runs // FLAGS.rounds)
  for round_index in range(FLAGS.rounds):
    for i in rng.permutation(len(rows)):
      for _ in range(per_round):
        start = time.perf_counter()
        interpreters[i].invoke()
        times[i].append(time.perf_counter() - start)
    print(f'timing round {round_index + 1}/{FLAGS.rounds} (load {os.getloadavg()[0]:.1f})',
          file=sys.stderr, flush=True)
  for row, row_times in zip(rows, times):
    row.update(_median_and_min_ms(row_times), runs=len(row_times))


def _random_images(image_size, count):
  rng = np.random.RandomState(0)
  return [rng.uniform(0, 255, [1] + list(image_size) + [3]).astype(np.float32)
          for _ in range(count)]


def export_model(row: PaperRow, output_dir: str) -> List[Dict]:
  """Exports `row` in each quantization: a row per (quantization, thread count) to time."""
  parse_gin([str(GIN_CONFIGS_DIR / f'{row.name}.gin')])
  model = build_retinanet()
  calibrate_batch_norm(model, np.stack([image[0] for image in
                                        _random_images(model.image_size, 2)]))
  results = []
  for quantization in FLAGS.quantizations:
    path = os.path.join(output_dir, f'{row.name}_{quantization}.tflite')
    start = time.perf_counter()
    summary = tflite.export_model_tflite(
        model, path, quantization,
        representative_data=_random_images(model.image_size, FLAGS.calibration_images))
    export_s = time.perf_counter() - start
    print(f'{row.name} {quantization}: exported in {export_s:.0f} s', file=sys.stderr,
          flush=True)
    for threads in FLAGS.num_threads:
      results.append(dict(name=row.name, label=row.label, quantization=quantization,
                          num_threads=int(threads), path=path,
                          size_bytes=summary['size_bytes'], paper_pixel1_ms=row.pixel1_ms,
                          export_s=round(export_s, 1)))
  tf_keras.backend.clear_session()
  return results


def measure_postprocess(output_dir: str) -> List[Dict]:
  """The op alone on FPNLite's 320 anchors (19,125, 91 classes): `candidates` random (anchor,
  class) pairs scored in [0.05, 1), the rest below the 0.05 threshold; random box encodings."""
  parse_gin([str(GIN_CONFIGS_DIR / f'{BASELINE}.gin')])
  model = build_retinanet()
  anchors = tflite_postprocess.anchors_center_size(model.geometry)
  num_anchors, num_classes = len(anchors), model.get_config()['num_classes']
  results = []
  for regular in (True, False):
    postprocess = tflite_postprocess.postprocess_op(
        tflite_postprocess.postprocess_attributes(model, regular))

    @tf.function(input_signature=[tf.TensorSpec([1, num_anchors, 4], tf.float32),
                                  tf.TensorSpec([1, num_anchors, num_classes], tf.float32)])
    def only_postprocess(box_encodings, class_predictions):
      outputs = postprocess(  # pylint: disable=cell-var-from-loop
          box_encodings, class_predictions, tf.constant(anchors))
      return dict(zip(tflite_runtime.OUTPUT_NAMES, outputs))

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [only_postprocess.get_concrete_function()], tf.Module())
    converter.allow_custom_ops = True
    path = os.path.join(output_dir, f'postprocess_{"regular" if regular else "fast"}.tflite')
    with open(path, 'wb') as f:
      f.write(converter.convert())
    for candidates in FLAGS.postprocess_candidates:
      candidates = int(candidates)
      rng = np.random.RandomState(0)
      scores = rng.uniform(0, 0.04, [1, num_anchors, num_classes]).astype(np.float32)
      pairs = rng.choice(num_anchors * (num_classes - 1), candidates, replace=False)
      scores[0, pairs // (num_classes - 1), pairs % (num_classes - 1) + 1] = rng.uniform(
          0.05, 1.0, candidates)
      encodings = rng.normal(0, 0.5, [1, num_anchors, 4]).astype(np.float32)
      for threads in FLAGS.num_threads:
        interpreter = tflite_runtime.interpreter(model_path=path, num_threads=int(threads))
        runner = interpreter.get_signature_runner()
        inputs = dict(zip(sorted(runner.get_input_details()), (encodings, scores)))
        for _ in range(FLAGS.warmup):
          runner(**inputs)
        times = []
        for _ in range(FLAGS.runs):
          start = time.perf_counter()
          runner(**inputs)
          times.append(time.perf_counter() - start)
        results.append(dict(use_regular_nms=regular, candidates=candidates,
                            num_threads=int(threads), **_median_and_min_ms(times)))
  tf_keras.backend.clear_session()
  return results


def _ratios(rows: List[Dict]) -> None:
  for key in ('ms', 'min_ms'):
    base = {(r['quantization'], r['num_threads']): r[key] for r in rows if r['name'] == BASELINE}
    for r in rows:
      b = base.get((r['quantization'], r['num_threads']))
      r['ratio' if key == 'ms' else 'min_ratio'] = r[key] / b if b else None
  for r in rows:
    r['paper_ratio'] = r['paper_pixel1_ms'] / ROWS[0].pixel1_ms


def latency_markdown(rows: List[Dict], post: List[Dict]) -> str:
  quantizations = list(dict.fromkeys(r['quantization'] for r in rows))
  lines = []
  for threads in dict.fromkeys(r['num_threads'] for r in rows):
    lines += [f'\n**{threads} thread(s)**: ms per 320x320 image, TFLite interpreter, batch 1: '
              'median / fastest run (ratio of the medians to FPNLite @64)\n',
              '| model | paper Pixel 1 | ' + ' | '.join(quantizations) + ' |',
              '|---|---|' + '---|' * len(quantizations)]
    for name in dict.fromkeys(r['name'] for r in rows):
      cells = {r['quantization']: r for r in rows
               if r['name'] == name and r['num_threads'] == threads}
      first = next(iter(cells.values()))
      paper = f"{first['paper_pixel1_ms']:.0f} ms ({first['paper_ratio']:.2f}x)"
      lines.append(f"| {first['label']} | {paper} | " + ' | '.join(
          f"{cells[q]['ms']:.1f} / {cells[q]['min_ms']:.1f} ({cells[q]['ratio']:.2f}x)"
          if q in cells else '-'
          for q in quantizations) + ' |')
  lines += ['\nFile sizes (MB): ' + '; '.join(
      f"{r['name']} {r['quantization']} {r['size_bytes'] / 1e6:.2f}"
      for r in rows if r['num_threads'] == rows[0]['num_threads'])]
  if post:
    lines += ['\n**TFLite_Detection_PostProcess alone** (19,125 anchors, 90 classes, max 100 '
              'detections): median / fastest ms\n',
              '| candidates above 0.05 | threads | regular NMS (class-aware) | fast NMS '
              '(class-agnostic) |', '|---|---|---|---|']
    keys = dict.fromkeys((p['candidates'], p['num_threads']) for p in post)
    for candidates, threads in keys:
      cell = {p['use_regular_nms']: f"{p['ms']:.2f} / {p['min_ms']:.2f}" for p in post
              if (p['candidates'], p['num_threads']) == (candidates, threads)}
      lines.append(f'| {candidates} | {threads} | {cell[True]} | {cell[False]} |')
  return '\n'.join(lines)


def _evaluate_tflite(path: str, model_config, file_pattern: str) -> Dict[str, float]:
  """COCO metrics of a .tflite on the eval records, as the trainer evaluates."""
  detector = tflite_runtime.TFLiteDetector(model_path=path)
  dataset = input_pipeline.build_eval_dataset(file_pattern=file_pattern, global_batch_size=1,
                                              model_config=model_config)
  return evaluate.evaluate_detector(lambda images: detector(images.numpy()), dataset,
                                    max_batches=FLAGS.ap_max_images).metrics


def measure_ap(model_dir: str, output_dir: str) -> List[Dict]:
  model, _, _ = load_model(model_dir)  # parses the model dir's operative config
  file_pattern = gin.query_parameter('build_eval_dataset.file_pattern')
  rows = []
  for quantization, regular in (('float32', True), ('int8', True), ('float32', False)):
    nms = 'regular' if regular else 'fast'
    path = os.path.join(output_dir, f'ap_{quantization}_{nms}.tflite')
    summary = tflite.export_tflite(
        model_dir, path, quantization, use_regular_nms=regular,
        num_representative_images=FLAGS.ap_num_representative_images)
    metrics = _evaluate_tflite(path, model.get_config(), file_pattern)
    rows.append(dict(quantization=quantization, use_regular_nms=regular, AP=metrics['AP'],
                     AP50=metrics['AP50'],
                     size_bytes=summary['size_bytes'], checkpoint=summary['checkpoint'],
                     eval_file_pattern=file_pattern,
                     representative_file_pattern=summary.get('representative_file_pattern')))
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.get_logger().setLevel('ERROR')
  if not (FLAGS['verbosity'].present or FLAGS['v'].present):
    # TF Model Garden logs every MobileNet block at INFO, burying the progress lines.
    logging.set_verbosity(logging.WARNING)
  output_dir = FLAGS.output_dir or tempfile.mkdtemp(prefix='tflite_latency_')
  os.makedirs(output_dir, exist_ok=True)
  if FLAGS.ap_model_dir:
    rows = measure_ap(FLAGS.ap_model_dir, output_dir)
    if FLAGS.json:
      print(json.dumps(rows, indent=1))
      return
    print('| TFLite | NMS | AP | AP50 | size MB |\n|---|---|---|---|---|')
    for r in rows:
      nms = 'regular' if r['use_regular_nms'] else 'fast'
      print(f"| {r['quantization']} | {nms} | {100 * r['AP']:.1f} | {100 * r['AP50']:.1f} | "
            f"{r['size_bytes'] / 1e6:.2f} |")
    print(f"\nint8 - float32 AP50: {100 * (rows[1]['AP50'] - rows[0]['AP50']):+.1f} points "
          f"({rows[0]['checkpoint']}, eval {rows[0]['eval_file_pattern']})")
    return
  names = FLAGS.only or [row.name for row in ROWS]
  unknown = sorted(set(names) - {row.name for row in ROWS})
  if unknown:
    raise app.UsageError(f'--only: unknown {unknown}; known: {[row.name for row in ROWS]}')
  rows = []
  for row in ROWS:
    if row.name in names:
      rows += export_model(row, output_dir)
  load_before = os.getloadavg()
  time_interleaved(rows)
  load_after = os.getloadavg()
  _ratios(rows)
  post = measure_postprocess(output_dir) if FLAGS.postprocess_candidates else []
  load = (f'{os.cpu_count()} CPUs; 1-minute load average {load_before[0]:.1f} before the '
          f'model timings, {load_after[0]:.1f} after')
  if FLAGS.json:
    print(json.dumps({'models': rows, 'postprocess': post, 'load': load}, indent=1))
  else:
    print(latency_markdown(rows, post) + f'\n\n{load}; files in {output_dir}')


if __name__ == '__main__':
  app.run(main)
