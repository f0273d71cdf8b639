"""nasfpn_tf.main: flags, and configuration errors that end the program naming the culprit."""
import os
import re
import subprocess
import sys

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

from nasfpn_tf import main
from training_helpers import REPO, SUBPROCESS_TIMEOUT, run_main, tiny_bindings


FLAGS = flags.FLAGS


def cli_args(records, model_dir, *extra_bindings, **trainer):
  return [f'--model_dir={model_dir}'] + [
      f'--gin_bindings={b}' for b in tiny_bindings(records, **trainer) + list(extra_bindings)]


def test_help_explains_every_flag():
  help_text = FLAGS.module_help(main)
  for flag in ('gin_file', 'gin_bindings', 'mode', 'model_dir', 'strategy', 'tpu', 'seed',
               'num_cpu_devices'):
    assert f'--{flag}' in help_text
  for word in ('train_and_eval', 'multi_worker_mirrored', 'TF_CONFIG', 'logical devices'):
    assert word in help_text


def test_misspelled_gin_binding_is_named(synthetic_records, tmp_path):
  with pytest.raises(SystemExit) as exit_:
    run_main(*cli_args(synthetic_records, tmp_path, 'RetinaNetTrainer.trian_steps = 3'))
  message = str(exit_.value.code)
  assert "gin binding 'RetinaNetTrainer.trian_steps = 3'" in message
  assert 'trian_steps' in message
  assert not list(tmp_path.iterdir())  # nothing written


def test_missing_gin_file_is_named(tmp_path):
  with pytest.raises(SystemExit, match="gin file 'no_such.gin' not found"):
    run_main(f'--model_dir={tmp_path}', '--gin_file=no_such.gin')


def test_missing_tfrecords_exit_nonzero_naming_the_pattern(synthetic_records, tmp_path):
  """Through the real command line: exit status and the message on stderr."""
  pattern = str(tmp_path / 'nowhere' / 'train-*.tfrecord')
  args = cli_args(synthetic_records, tmp_path / 'model',
                  f"build_train_dataset.file_pattern = '{pattern}'")
  result = subprocess.run([sys.executable, '-m', 'nasfpn_tf.main', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 1
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line == f"nasfpn_tf.main: error: no files match the file pattern '{pattern}'"


def test_empty_dataset_is_named(synthetic_records, tmp_path):
  empty = tmp_path / 'empty-00000-of-00001.tfrecord'
  tf.io.TFRecordWriter(str(empty)).close()
  pattern = str(tmp_path / 'empty-*.tfrecord')
  with pytest.raises(SystemExit, match=f'empty dataset: .*{re.escape(pattern)}.* no records'):
    run_main(*cli_args(synthetic_records, tmp_path / 'model',
                       f"build_train_dataset.file_pattern = '{pattern}'"))


def test_eval_without_a_checkpoint_says_so(synthetic_records, tmp_path):
  with pytest.raises(SystemExit, match=f'--mode=eval: no checkpoint in --model_dir={tmp_path}'):
    run_main('--mode=eval', *cli_args(synthetic_records, tmp_path))


def test_unknown_strategy_is_rejected_by_the_flag(tmp_path):
  with pytest.raises(flags.IllegalFlagValueError):
    FLAGS(['main.py', f'--model_dir={tmp_path}', '--strategy=parameter_server'])
  FLAGS.unparse_flags()


def _trained_weights(records, model_dir, *flags_):
  """{name: value} of the last checkpoint of a 2-step `nasfpn_tf.main` training with `flags_`."""
  run_main('--mode=train', *flags_, *cli_args(records, model_dir, train_steps=2,
                                               checkpoint_every_steps=2))
  reader = tf.train.load_checkpoint(str(model_dir))
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
          if name.startswith('model/') and 'OPTIMIZER_SLOT' not in name}


def test_seed_makes_a_training_repeat_and_another_seed_differ(synthetic_records, tmp_path):
  """--seed: the same seed gives the same weights after two steps (initial draw and data order),
  another seed other ones."""
  first = _trained_weights(synthetic_records, tmp_path / 'a', '--seed=3')
  again = _trained_weights(synthetic_records, tmp_path / 'b', '--seed=3')
  other = _trained_weights(synthetic_records, tmp_path / 'c', '--seed=4')
  assert first.keys() == again.keys() == other.keys() and len(first) > 10
  for name, value in first.items():
    np.testing.assert_allclose(again[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  kernels = [name for name in first if 'kernel' in name]
  assert kernels
  assert sum(not np.allclose(first[name], other[name]) for name in kernels) > len(kernels) // 2
