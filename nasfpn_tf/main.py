r"""Trains and evaluates NAS-FPN RetinaNet models from gin configs.

  python -m nasfpn_tf.main --mode=train_and_eval --model_dir=runs/demo \
      --gin_file=demo.gin --gin_file=schedule_step_50ep.gin \
      --gin_bindings="build_train_dataset.file_pattern = '/data/train-*.tfrecord'" \
      --gin_bindings="build_eval_dataset.file_pattern = '/data/val-*.tfrecord'" \
      --gin_bindings="RetinaNetTrainer.learning_rate = @StepDecayWithWarmup()"

Writes into --model_dir: operative_config.gin (every setting the run used), checkpoints
(ckpt-<step>; a restart resumes from the last), TensorBoard summaries (train/, eval/) and
eval_metrics.json (COCO metrics of the last evaluation). Configuration errors, a diverged loss
or a checkpoint of another config end the program with a message naming the flag, gin binding,
file or checkpoint at fault, and exit status 1.
"""
import sys

from absl import app
from absl import flags
import tensorflow as tf

from nasfpn_tf import config
from nasfpn_tf.training import distribute
from nasfpn_tf.training import trainer as trainer_lib

_GIN_FILE = flags.DEFINE_multi_string(
    'gin_file', [], 'Gin config file, a path or a name in gin_configs/ (demo.gin); repeat the '
    'flag for several, later ones override earlier ones.')
_GIN_BINDINGS = flags.DEFINE_multi_string(
    'gin_bindings', [], 'Gin binding applied after the files, e.g. '
    "'RetinaNetTrainer.train_steps = 100'; repeatable. RetinaNetTrainer "
    '(nasfpn_tf/training/trainer.py) lists the training bindings.')
_MODE = flags.DEFINE_enum(
    'mode', 'train', list(trainer_lib.MODES),
    'train: train to RetinaNetTrainer.train_steps (resuming from the last checkpoint in '
    '--model_dir); eval: COCO-evaluate the last checkpoint; train_and_eval: train, evaluating '
    'every RetinaNetTrainer.eval_every_steps and at the end.')
_MODEL_DIR = flags.DEFINE_string(
    'model_dir', None, 'Folder for checkpoints, summaries, operative_config.gin and '
    'eval_metrics.json; created if missing.', required=True)
_STRATEGY = flags.DEFINE_enum(
    'strategy', 'auto', list(distribute.STRATEGIES),
    'tf.distribute strategy. auto: tpu if --tpu is given, mirrored if more than one GPU, else '
    'one_device. mirrored: all local GPUs (or, without GPUs, the --num_cpu_devices logical CPUs). '
    'multi_worker_mirrored: the cluster in $TF_CONFIG. tpu: the TPU named by --tpu.')
_TPU = flags.DEFINE_string(
    'tpu', None, 'TPU name or grpc://address for --strategy=tpu (or auto); "local" on a TPU VM.')
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    'num_cpu_devices', None, 'Split the CPU into this many logical devices before TensorFlow '
    'starts, so --strategy=mirrored runs with several replicas without GPUs (tests, debugging).',
    lower_bound=1)

# Errors that are the user's input, not a bug: reported in one line, without a traceback.
_USER_ERRORS = (ValueError, trainer_lib.TrainingDivergedError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # tf.distribute logs every collective at INFO; the progress lines are printed.
  tf.get_logger().setLevel('WARNING')
  try:
    if _NUM_CPU_DEVICES.value:
      distribute.configure_cpu_devices(_NUM_CPU_DEVICES.value)
    config.parse_gin(_GIN_FILE.value, _GIN_BINDINGS.value)
    strategy = distribute.get_strategy(_STRATEGY.value, _TPU.value)
    print(f'{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s).',
          flush=True)
    trainer = trainer_lib.RetinaNetTrainer(_MODEL_DIR.value, strategy, mode=_MODE.value)
    trainer.run()
  except _USER_ERRORS as e:
    # Gin appends the chain of configurables it was in; the message already names the culprit.
    lines = [l for l in str(e).splitlines() if not l.startswith('  In call to configurable')]
    sys.exit('nasfpn_tf.main: error: ' + '\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
