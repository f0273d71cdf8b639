r"""Trains, evaluates and exports NAS-FPN RetinaNet models from gin configs.

  python -m nasfpn_tf.main --mode=train_and_eval --model_dir=runs/r50 \
      --gin_file=nasfpn_r50_7x256_640.gin --gin_file=recipe_coco_50ep.gin \
      --gin_bindings="build_train_dataset.file_pattern = '/data/train-*.tfrecord'" \
      --gin_bindings="build_eval_dataset.file_pattern = '/data/val-*.tfrecord'"

--mode=show_config prints the run those files resolve to (steps, batch, weight decay, the
learning rate at its milestones, input size, parameters) as one JSON line, training nothing.

Writes into --model_dir: model_config.json (the model's config, what its checkpoints fit),
operative_config.gin (every setting the run used), checkpoints (ckpt-<step>; a restart resumes
from the last), TensorBoard summaries (train/, eval/) and eval_metrics.json (COCO metrics of the
last evaluation). Configuration errors, a diverged loss
or a checkpoint of another config end the program with a message naming the flag, gin binding,
file or checkpoint at fault, and exit status 1.

Exports read the model dir's own model_config.json (in older model dirs, operative_config.gin)
and last checkpoint (not --gin_file):

  python -m nasfpn_tf.main --mode=export_saved_model --model_dir=runs/demo \
      --export_dir=exports/demo/1
  python -m nasfpn_tf.main --mode=export_tflite --model_dir=runs/demo \
      --tflite_path=exports/demo.tflite --quantization=float16

Each prints a JSON summary of what it wrote. --mode=export writes both from one restore, in one
process (what `make demo` runs; faster than the two modes one after the other, each of which
starts TensorFlow and restores the checkpoint), and prints the two summaries, the SavedModel's
first:

  python -m nasfpn_tf.main --mode=export --model_dir=runs/demo --export_dir=exports/demo/1 \
      --tflite_path=exports/demo.tflite

--seed=N seeds the weights and the data order, as experiments/bench/demo_runs.py does.

--mode=eval --tta_scales=1.0,1.25 --tta_flip evaluates with test-time augmentation (docs/tta.md).
"""
import json
import sys

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf
import tf_keras

from nasfpn_tf import config
from nasfpn_tf import tta_flags
from nasfpn_tf.export import saved_model
from nasfpn_tf.training import distribute
from nasfpn_tf.training import recipes
from nasfpn_tf.training import trainer as trainer_lib

_GIN_FILE = flags.DEFINE_multi_string(
    'gin_file', [], 'Gin config file, a path or a name in gin_configs/ (demo.gin); repeat the '
    'flag for several, later ones override earlier ones. Not for the exports.')
_GIN_BINDINGS = flags.DEFINE_multi_string(
    'gin_bindings', [], 'Gin binding applied after the files, e.g. '
    "'RetinaNetTrainer.train_steps = 100'; repeatable. RetinaNetTrainer "
    '(nasfpn_tf/training/trainer.py) lists the training bindings. The exports apply them on '
    "top of the model dir's model_config.json: post-processing settings such as "
    "'build_retinanet.max_detections = 300' (a change to the network fails against the "
    'checkpoint).')
EXPORT_MODES = ('export_saved_model', 'export_tflite', 'export')
SHOW_CONFIG = 'show_config'
_MODE = flags.DEFINE_enum(
    'mode', 'train', list(trainer_lib.MODES) + list(EXPORT_MODES) + [SHOW_CONFIG],
    'train: train to RetinaNetTrainer.train_steps (resuming from the last checkpoint in '
    '--model_dir); eval: COCO-evaluate the last checkpoint; train_and_eval: train, evaluating '
    'every RetinaNetTrainer.eval_every_steps and at the end. export_saved_model: the last '
    'checkpoint, built from the model dir\'s model_config.json, as a SavedModel for TF '
    'Serving in --export_dir (signatures: nasfpn_tf/export/saved_model.py); export_tflite: as a '
    'TFLite file at --tflite_path; export: both, from one restore (one JSON summary line '
    'each, the SavedModel\'s first). show_config: print the run the gin files resolve to (train '
    'steps, batch, weight decay, momentum, precision, the learning rate at step 0, the end of '
    'warm-up and each decay, image size, parameter count) as one JSON line; it reads no data, '
    'trains nothing and needs no --model_dir.')
_MODEL_DIR = flags.DEFINE_string(
    'model_dir', None, 'Folder for checkpoints, summaries, model_config.json, '
    'operative_config.gin and eval_metrics.json; created if missing. The exports read it. '
    'Required except for --mode=show_config.')
_EXPORT_DIR = flags.DEFINE_string(
    'export_dir', None, 'For --mode=export_saved_model and export: the SavedModel folder to '
    'write: new, empty, or an earlier export, which is replaced (to keep it, export to another '
    'folder); TF Serving loads <base>/<version>, e.g. exports/nasfpn/1.')
_TFLITE_PATH = flags.DEFINE_string(
    'tflite_path', None, 'For --mode=export_tflite and export: the .tflite file to write; its '
    'label map goes beside it as <stem>.labels.json.')
_QUANTIZATION = flags.DEFINE_enum(
    'quantization', 'float32', ['float32', 'float16', 'dynamic', 'int8'],
    'For --mode=export_tflite and export: float32; float16 weights; dynamic (int8 weights, '
    'activations quantized on the fly); int8 (full integer with uint8 input, calibrated on '
    '--representative_file_pattern).')
_REPRESENTATIVE_FILE_PATTERN = flags.DEFINE_string(
    'representative_file_pattern', None, 'For --quantization=int8: TFRecords whose first '
    '--num_representative_images images calibrate it; default: the training records of the '
    'operative config.')
_NUM_REPRESENTATIVE_IMAGES = flags.DEFINE_integer(
    'num_representative_images', 100, 'For --quantization=int8: see --representative_file_pattern.',
    lower_bound=1)
_TFLITE_UINT8_INPUT = flags.DEFINE_bool(
    'tflite_uint8_input', True, 'For --quantization=int8: the file takes uint8 pixels '
    '(--notflite_uint8_input: float32 pixels, quantized inside). Outputs are float32 boxes, '
    'classes and scores in every variant (TFLite_Detection_PostProcess computes in float).')
_TFLITE_FAST_NMS = flags.DEFINE_bool(
    'tflite_fast_nms', False, 'For --mode=export_tflite and export: the post-processing op\'s '
    'fast NMS (one class per anchor, class-agnostic suppression) instead of the regular '
    'per-class NMS that matches the SavedModel; faster on phones, slightly different '
    'detections.')
_TFLITE_METADATA = flags.DEFINE_bool(
    'tflite_metadata', True, 'For --mode=export_tflite and export: write the TFLite metadata '
    "that MediaPipe Tasks' ObjectDetector needs (labels from the label map, input "
    'normalization, output roles; docs/mediapipe.md) into the file; the TFLite interpreter '
    'ignores it. '
    '--notflite_metadata: the bare model.')
_TFLITE_EXIT = flags.DEFINE_integer(
    'tflite_exit', None, 'For --mode=export_tflite (and export) of an anytime model '
    '(build_retinanet.anytime = True): the exit k the file stops at, computing only the first k '
    'pyramids and that exit\'s head (default: the last exit). The SavedModel has every exit as '
    'signatures serving_exit_<k>.')
_EXPORT_LABEL_MAP = flags.DEFINE_string(
    'export_label_map', None, 'For the exports: a JSON {"category id": "name"} to ship with '
    'the model; default: the {prefix}-label_map.json beside the TFRecords of the operative '
    'config, else category ids without names.')
_STRATEGY = flags.DEFINE_enum(
    'strategy', 'auto', list(distribute.STRATEGIES),
    'tf.distribute strategy. auto: tpu if --tpu is given, mirrored if more than one GPU, else '
    'one_device. mirrored: all local GPUs (or, without GPUs, the --num_cpu_devices logical CPUs). '
    'multi_worker_mirrored: the cluster in $TF_CONFIG. tpu: the TPU named by --tpu.')
_TPU = flags.DEFINE_string(
    'tpu', None, 'TPU name or grpc://address for --strategy=tpu (or auto); "local" on a TPU VM.')
_SEED = flags.DEFINE_integer(
    'seed', None, 'Seeds the initial weights and the order and augmentation of the training '
    'data (tf_keras.utils.set_random_seed), so two runs of one config can be compared paired; '
    'default: unseeded. Runs on other CPUs or thread counts still differ in float rounding.',
    lower_bound=0)
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    'num_cpu_devices', None, 'Split the CPU into this many logical devices before TensorFlow '
    'starts, so --strategy=mirrored runs with several replicas without GPUs (tests, debugging).',
    lower_bound=1)
TTA_MODES = ('eval', 'train_and_eval')  # where --tta_scales / --tta_flip (tta_flags) apply
flags.adopt_module_key_flags(tta_flags)

# Errors that are the user's input, not a bug: reported in one line, without a traceback.
_USER_ERRORS = (ValueError, trainer_lib.TrainingDivergedError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # tf.distribute logs every collective at INFO; the progress lines are printed.
  tf.get_logger().setLevel('WARNING')
  try:
    tta = tta_flags.tta_config()
    if tta and _MODE.value not in TTA_MODES:
      raise ValueError(f'--tta_scales / --tta_flip are for --mode={" or ".join(TTA_MODES)} '
                       f'(and nasfpn_tf.predict), not --mode={_MODE.value}.')
    if _MODE.value == SHOW_CONFIG:
      config.parse_gin(_GIN_FILE.value, _GIN_BINDINGS.value)
      print(json.dumps(recipes.resolved_run()), flush=True)
      return
    if not _MODEL_DIR.value:
      raise ValueError(f'--mode={_MODE.value} needs --model_dir.')
    if _MODE.value in EXPORT_MODES:
      _export()
      return
    if _NUM_CPU_DEVICES.value:
      distribute.configure_cpu_devices(_NUM_CPU_DEVICES.value)
    config.parse_gin(_GIN_FILE.value, _GIN_BINDINGS.value)
    strategy = distribute.get_strategy(_STRATEGY.value, _TPU.value)
    if _SEED.value is not None:
      tf_keras.utils.set_random_seed(_SEED.value)
    print(f'{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s).',
          flush=True)
    trainer = trainer_lib.RetinaNetTrainer(_MODEL_DIR.value, strategy, mode=_MODE.value,
                                           tta=tta)
    trainer.run()
  except _USER_ERRORS as e:
    # Gin appends the chain of configurables it was in; the message already names the culprit.
    lines = [l for l in str(e).splitlines() if not l.startswith('  In call to configurable')]
    sys.exit('nasfpn_tf.main: error: ' + '\n'.join(lines))


def _export() -> None:
  """The export(s) that --mode names, from --model_dir's own config and last checkpoint,
  restored once."""
  mode = _MODE.value
  if not (flags.FLAGS['verbosity'].present or flags.FLAGS['v'].present):
    # Saving and converting log every traced function at INFO, burying the summary line.
    logging.set_verbosity(logging.WARNING)
  if _GIN_FILE.value:
    raise ValueError(f'--mode={mode} builds the model from {_MODEL_DIR.value}/'
                     'model_config.json, the config of its checkpoints; drop --gin_file.')
  saved_model_export = mode in ('export_saved_model', 'export')
  tflite_export = mode in ('export_tflite', 'export')
  if not tflite_export:
    if _TFLITE_EXIT.value is not None:
      raise ValueError('--tflite_exit is for --mode=export_tflite or export; the SavedModel '
                       'holds every exit (signatures serving_exit_<k>).')
    if flags.FLAGS['tflite_metadata'].present:
      raise ValueError('--tflite_metadata is for --mode=export_tflite or export; a SavedModel '
                       'carries its label map in its assets.')
  if saved_model_export and not _EXPORT_DIR.value:
    raise ValueError(f'--mode={mode} needs --export_dir.')
  if tflite_export and not _TFLITE_PATH.value:
    raise ValueError(f'--mode={mode} needs --tflite_path.')
  if tflite_export:
    # Imported here so the other modes never load the TFLite conversion code.
    from nasfpn_tf.export import tflite  # pylint: disable=g-import-not-at-top
  restored = None
  if saved_model_export and tflite_export:
    # Both from one restore, before either writes: a model dir that cannot be loaded leaves no
    # half of the pair.
    restored = saved_model.load_model(_MODEL_DIR.value, _GIN_BINDINGS.value)
    # The TFLite half's own checks too, before the SavedModel is written.
    tflite.check_exit(restored[0], _TFLITE_EXIT.value, _MODEL_DIR.value)
  if saved_model_export:
    summary = saved_model.export_saved_model(_MODEL_DIR.value, _EXPORT_DIR.value,
                                             _GIN_BINDINGS.value, _EXPORT_LABEL_MAP.value,
                                             restored)
    print(json.dumps(summary, default=str), flush=True)
  if tflite_export:
    summary = tflite.export_tflite(
        _MODEL_DIR.value, _TFLITE_PATH.value, quantization=_QUANTIZATION.value,
        representative_file_pattern=_REPRESENTATIVE_FILE_PATTERN.value,
        num_representative_images=_NUM_REPRESENTATIVE_IMAGES.value,
        int8_io=_TFLITE_UINT8_INPUT.value, use_regular_nms=not _TFLITE_FAST_NMS.value,
        gin_bindings=_GIN_BINDINGS.value, label_map_path=_EXPORT_LABEL_MAP.value,
        num_repeats=_TFLITE_EXIT.value, metadata=_TFLITE_METADATA.value, restored=restored)
    print(json.dumps(summary, default=str), flush=True)


if __name__ == '__main__':
  app.run(main)
