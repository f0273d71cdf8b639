r"""Where one training step of a gin config goes on this CPU: op types and model parts, from the
TF profiler (issue 22: the demo's float32 step on an AVX2-only CPU).

  .venv/bin/python experiments/step_profile.py --gin_file=demo.gin \
      --gin_bindings="build_train_dataset.file_pattern = 'runs/demo/records/train-*.tfrecord'"
  # as an AVX2-only CPU (AMD Zen 3) would run it, on an Intel CPU:
  ONEDNN_MAX_CPU_ISA=AVX2 NASFPN_CPU_FLAGS=avx2,fma .venv/bin/python experiments/step_profile.py ...

Trains --warmup_steps, then traces --steps steps with the trainer's own compiled step, and prints
the CPU, the precision it trained in, images/s of the traced steps (the profiler adds a little),
and the summed op time per op type and per model part (backbone, decoder, head, rest: loss,
optimizer, input), each as seconds per step and a share. Op times add up to more than the wall
time where the two cores run ops side by side.
"""
import collections
import re
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags

import tensorflow as tf

from bench import op_profile
from nasfpn_tf import config
from nasfpn_tf.training import distribute
from nasfpn_tf.training import precision
from nasfpn_tf.training import trainer as trainer_lib

FLAGS = flags.FLAGS
flags.DEFINE_multi_string('gin_file', ['demo.gin'], 'Gin config(s), as nasfpn_tf.main takes them.')
flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings.')
flags.DEFINE_integer('warmup_steps', 5, 'Untraced steps first (tracing, warm caches).')
flags.DEFINE_integer('steps', 10, 'Traced steps.')
flags.DEFINE_integer('top', 15, 'Op types listed.')

def _part(name: str) -> str:
  """The model part of an op (forward or gradient): 'backbone', 'decoder', 'head', 'optimizer'
  (the SGD update of every variable), or 'loss and rest'."""
  match = re.search(r'retinanet/([^/]+)/', name)
  if match:
    part = match.group(1)
    return part if part in ('decoder', 'head') else 'backbone'
  if '/SGD' in name:
    return 'optimizer'
  return 'loss and rest'


def op_seconds(logdir: str):
  """({op type: seconds}, {model part: seconds}, {op: seconds}) of the ops the executor ran."""
  by_type, by_part, by_op = collections.Counter(), collections.Counter(), collections.Counter()
  for name, seconds in op_profile.executor_events(logdir):
    op = op_profile.op_name_and_type(name)
    if op is None:
      continue
    op_name, op_type = op[0], op[1].replace('_MklNative', '').replace('_Mkl', '')
    by_type[op_type] += seconds
    by_part[_part(op_name)] += seconds
    by_op[f'{op_name.replace("while/body/_1/", "")} ({op_type})'] += seconds
  return by_type, by_part, by_op


def main(_):
  config.parse_gin(FLAGS.gin_file, FLAGS.gin_bindings + [
      'RetinaNetTrainer.log_every_steps = 1000000', 'RetinaNetTrainer.eval_every_steps = None'])
  model_dir = tempfile.mkdtemp(prefix='nasfpn_step_profile_')
  logdir = tempfile.mkdtemp(prefix='nasfpn_step_trace_')
  try:
    trainer = trainer_lib.RetinaNetTrainer(model_dir, distribute.get_strategy('auto'),
                                           mode='train')
    batch = trainer.global_batch_size
    iterator = trainer.train_iterator()
    trainer.run_steps(iterator, FLAGS.warmup_steps)
    tf.profiler.experimental.start(logdir)
    started = time.perf_counter()
    for _ in range(FLAGS.steps):
      trainer.run_steps(iterator, 1)
    wall = (time.perf_counter() - started) / FLAGS.steps
    tf.profiler.experimental.stop()
    by_type, by_part, by_op = op_seconds(logdir)
  finally:
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.rmtree(logdir, ignore_errors=True)
  total = sum(by_type.values()) / FLAGS.steps
  print(f'CPU: {precision.cpu_name()}; flags as decided on: '
        f'{precision.bfloat16_hardware(precision.cpu_flags()) or "no bfloat16 hardware"}; '
        f'trained in {precision.POLICIES[trainer.mixed_precision]}')
  print(f'{wall:.3f} s a step of {batch} images ({batch / wall:.1f} images/s, traced); '
        f'op time {total:.3f} s a step')
  print('| model part | s/step | share |\n|---|---:|---:|')
  for part, seconds in sorted(by_part.items(), key=lambda kv: -kv[1]):
    print(f'| {part} | {seconds / FLAGS.steps:.3f} | {seconds / FLAGS.steps / total:.0%} |')
  print('| op type | s/step | share |\n|---|---:|---:|')
  for op_type, seconds in by_type.most_common(FLAGS.top):
    print(f'| {op_type} | {seconds / FLAGS.steps:.3f} | {seconds / FLAGS.steps / total:.0%} |')
  print('| op | s/step | share |\n|---|---:|---:|')
  for op, seconds in by_op.most_common(FLAGS.top):
    print(f'| {op} | {seconds / FLAGS.steps:.4f} | {seconds / FLAGS.steps / total:.1%} |')


if __name__ == '__main__':
  sys.exit(app.run(main))
