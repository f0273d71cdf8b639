"""Our NAS-FPN RetinaNet vs TF Model Garden's, same architecture and weights, side by side.

For each configuration, TFM's model is built as a TFM user gets it (the `retinanet_resnetfpn_coco`
experiment with decoder `nasfpn`, its default detection generator: `nms_version` 'v2', per-class
top 5000 then per-class NMS), its batch-norm statistics set from random images so that
activations and scores keep a trained model's scale (`nasfpn_tf.utils.batch_norm`; scores then
sit near the 0.01 prior, below the 0.05 threshold, as most (anchor, class) scores of a trained
model do), ours is converted from it (`compat.tfm.retinanet_from_tfm`: same weights, raw outputs
checked equal), and in one process, alternating the two call by call:

* end-to-end inference (network + post-processing) at batch 1 and 8, and network-only latency
  (backbone + pyramid + head); each side gets its own input convention from the same pixels
  (ours: [0, 255], normalized inside; TFM: normalized outside, in the timed function);
* the post-processing alone on the same raw outputs with class logits lifted so that every
  pre-NMS candidate passes the score threshold (the worst case for ours: full NMS; not for
  TFM, whose padded NMS is slower when few candidates pass, as with real outputs);
* the training step (our `RetinaNetTrainer` step; TFM's `RetinaNetTask.train_step`) on one fixed
  batch with TFM `AnchorLabeler` targets, steady state after warm-up, from the same weights;
* with --profile_train_step, where each side's step spends its time, from the TF profiler, by
  op type: convolutions (forward and both gradients), batch norm + ReLU + max pool, and the rest
  (loss, casts, gradient sums, optimizer, resampling); and the ratio ours / TFM that would remain
  if everything but our convolutions and batch norms took no time (`train_step_ratio_bound_*`);
* peak memory (max RSS) of a subprocess per side running the end-to-end inference at batch 8,
  and one running train steps;
* COCO AP (pycocotools, 0-1 scale) of both on the same images with the same weights: TFM's model
  of the `small` architecture trained briefly on the synthetic shapes (`nasfpn_tf.data.synthetic`,
  cached in --work_dir), copied into ours, evaluated on the synthetic val split at the
  configuration's image size (for `r50_640` this is the small network run at 640 px: a trained
  R-50 is out of reach here, and its raw outputs equal TFM's anyway, so AP checks the
  post-processing and the precision).

Precision: inference and AP compare both in float32 (what TFM's factory builds and what our
exports run), so the detections can be equal; where the trainer trains in bfloat16 (CPUs with
AMX-BF16, GPUs: `training.precision`, or --fast_precision=bfloat16) ours in bfloat16 is an extra
column. Training compares
like with like at that fast precision (TFM's COCO experiment trains in bfloat16:
`mixed_precision_dtype`), and in float32.

This file holds the flags and runs the comparisons of each configuration; the comparisons are in
bench/ (latency, training with op_profile, memory, ap), the typed results and their JSON keys in
bench/rows.py, the table in bench/report.py.

  python experiments/benchmark.py --configs=small,r50_640 --json --ap_num_val=64
      # 2 cores: small ~15 min plus ~15 min to train the AP model once; r50_640 ~30 min
  python experiments/benchmark.py --configs=r50_640 --repeats=3 --json
  python experiments/benchmark.py --configs=small --skip_train --skip_ap --skip_memory
  python experiments/benchmark.py --configs=r50_640 --profile_train_step --skip_inference \
      --skip_ap --skip_memory  # ~10 min
"""
import json
import os
import pathlib
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The parts in experiments/bench/, also when this file is loaded by path (tests).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from bench import ap, latency, memory, models, report, rows  # noqa: E402
from bench import training as training_lib  # noqa: E402
from bench.timing import say  # noqa: E402
from nasfpn_tf.compat.tfm import retinanet_from_tfm  # noqa: E402
from nasfpn_tf.models.geometry import normalize_pixels  # noqa: E402
from nasfpn_tf.utils.batch_norm import calibrate_batch_norm  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('configs', ['small', 'r50_640'],
                  'Configurations to run (see CONFIGS in bench/models.py).')
flags.DEFINE_bool('json', False, 'Also print one JSON object per configuration (last lines).')
flags.DEFINE_integer('repeats', 5, 'Timed calls per side for batch-1 and network-only latency, '
                     'and timed train steps per variant.')
flags.DEFINE_integer('repeats_b8', 3, 'Timed calls per side at batch 8.')
flags.DEFINE_integer('train_batch', None, 'Training batch (default: per configuration).')
flags.DEFINE_bool('skip_inference', False, 'Skip the latency comparison (to debug the rest).')
flags.DEFINE_bool('skip_train', False, 'Skip the training-step comparison.')
flags.DEFINE_bool('skip_ap', False, 'Skip the COCO AP comparison.')
flags.DEFINE_bool('skip_memory', False, 'Skip the peak-memory subprocesses.')
flags.DEFINE_bool('profile_train_step', False,
                  'After timing, trace --profile_steps train steps per side and variant and print '
                  'where the time goes by op type. Runs TF with one inter-op thread (ops one at '
                  'a time, so their durations add up to the step; step times stay within noise).')
flags.DEFINE_integer('profile_steps', 2, 'Train steps traced per side with --profile_train_step.')
flags.DEFINE_bool('xla', False, 'Also time ours with XLA (jit_compile) for the network and the '
                  'train step (on this 2-core CPU: train step 2.3x slower than without).')
flags.DEFINE_enum('fast_precision', 'auto', ['auto', 'float32', 'bfloat16'],
                  'Training precision of both sides (and the extra inference column of ours); '
                  'auto: what the trainer trains a requested bfloat16 in here '
                  '(training.precision): bfloat16 on a GPU or with AMX-BF16, else float32.')
flags.DEFINE_string('work_dir', os.path.join(tempfile.gettempdir(), 'nasfpn_benchmark'),
                    'Cache of the synthetic data and the AP model (reused across runs).')
flags.DEFINE_integer('ap_train_steps', 800, 'Training steps of the AP model (batch 8).')
flags.DEFINE_integer('ap_num_train', 800, 'Synthetic training images for the AP model.')
flags.DEFINE_integer('ap_num_val', 100, 'Synthetic validation images AP is measured on.')
# Memory workers (internal): one side, one job, in a fresh process.
flags.DEFINE_enum('worker', None, ['infer', 'train'], 'Internal: run one peak-memory job.')
flags.DEFINE_string('worker_spec', None, 'Internal: JSON job description of a worker.')



def run_config(name: str, precision: str, work_dir: pathlib.Path) -> rows.ConfigResult:
  """Every comparison the flags ask for, on configuration `name`."""
  config = models.CONFIGS[name]
  size = config.image_size
  load_avg_start = os.getloadavg()[0]
  say(f'== {name}: {config.label}, 91 classes; fast precision {precision}')
  task = models.tfm_task(config)
  tfm_model = models.build_tfm(task)
  # Trained-like activations: without this, random BN statistics let activations grow through
  # the repeats until every score saturates, a regime no trained model is in (and one where
  # TFM's NMS is much faster: its padded NMS stops early once 100 boxes per class are kept).
  calibrate_batch_norm(tfm_model, normalize_pixels(models.random_images(2, size, seed=5)))
  ours = retinanet_from_tfm(tfm_model)
  ours_bf16 = (None if precision == 'float32' else
               models.build_ours(ours.get_config(), precision, tfm_model))
  model_config = models.plain(ours.get_config())
  diff = models.max_abs_diff(ours, tfm_model, size)
  diff_bf16 = None if ours_bf16 is None else models.max_abs_diff(ours_bf16, tfm_model, size)
  say(f'built; raw outputs ours float32 vs TFM float32: max |diff| {diff:.3g}' +
      ('' if diff_bf16 is None else f', ours bfloat16: {diff_bf16:.3g}'))

  inference = training = peak_memory = ap_result = None
  if not FLAGS.skip_inference:
    inference = latency.inference_comparison(ours, ours_bf16, tfm_model, size, FLAGS.repeats,
                                             FLAGS.repeats_b8, FLAGS.xla)
  batch = FLAGS.train_batch or config.train_batch
  if not FLAGS.skip_train:
    training = training_lib.training_comparison(
        task, tfm_model, model_config, precision, batch, FLAGS.repeats, FLAGS.xla,
        FLAGS.profile_steps if FLAGS.profile_train_step else None)
  if not FLAGS.skip_memory:
    peak_rss_mb = {}
    for kind in ('infer',) + (() if FLAGS.skip_train else ('train',)):
      peak_rss_mb[kind] = {}
      for side in ('ours', 'theirs'):
        spec = {'config': name, 'side': side, 'model_config': model_config,
                # Inference in float32 on both sides, training at the fast precision.
                'precision': 'float32' if kind == 'infer' else precision, 'batch': batch}
        say(f'peak memory: {kind} {side} ({spec["precision"]}) in a subprocess')
        peak_rss_mb[kind][side] = memory.measure_memory(
            os.path.abspath(__file__), kind, spec)['peak_rss_mb']
    peak_memory = rows.Memory(peak_rss_mb)
  if not FLAGS.skip_ap:
    ap_result = ap.ap_comparison(config, precision, work_dir, ap.ApData(
        num_train=FLAGS.ap_num_train, num_val=FLAGS.ap_num_val, train_steps=FLAGS.ap_train_steps))
  return rows.ConfigResult(
      config=name, label=config.label, fast_precision=precision,
      params=int(ours.count_params()), network_max_abs_diff=diff,
      network_max_abs_diff_bf16=diff_bf16, load_avg_start=load_avg_start,
      load_avg_end=os.getloadavg()[0], inference=inference, training=training,
      memory=peak_memory, ap=ap_result)


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  tf.get_logger().setLevel('ERROR')
  if FLAGS.profile_train_step:
    tf.config.threading.set_inter_op_parallelism_threads(1)
  if FLAGS.worker:
    print(json.dumps(memory.run_worker(FLAGS.worker, json.loads(FLAGS.worker_spec))),
          flush=True)
    return
  unknown = [c for c in FLAGS.configs if c not in models.CONFIGS]
  if unknown:
    raise app.UsageError(f'unknown --configs {unknown}; known: {list(models.CONFIGS)}')
  work_dir = pathlib.Path(FLAGS.work_dir)
  work_dir.mkdir(parents=True, exist_ok=True)
  precision = models.fast_precision(FLAGS.fast_precision)
  results = []
  for name in FLAGS.configs:
    results.append(run_config(name, precision, work_dir))
    report.print_table(results[-1])
  if len(results) > 1:
    for result in results:
      report.print_table(result)
  if FLAGS.json:
    for result in results:
      print(json.dumps(result.to_json(), sort_keys=True))


if __name__ == '__main__':
  app.run(main)
