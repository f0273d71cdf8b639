"""training.precision: the precision a requested one trains in, per hardware, and the trainer
building its model in it."""
import contextlib
import io

import pytest
import tensorflow as tf

from nasfpn_tf import config
from nasfpn_tf.training import precision
from nasfpn_tf.training import trainer as trainer_lib
from training_helpers import tiny_bindings

INTEL_AMX = frozenset({'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16'})
AMD_ZEN4 = frozenset({'avx512f', 'avx512_bf16', 'avx512_vnni'})
NO_BF16 = frozenset({'avx2', 'fma'})


@pytest.mark.parametrize('flags, force, expected, said', [
    (INTEL_AMX, False, 'bfloat16', 'mixed_bfloat16 (AMX-BF16)'),
    (NO_BF16, False, 'bfloat16', 'emulated'),
    (AMD_ZEN4, False, None, 'float32, not the requested bfloat16'),
    (AMD_ZEN4, True, 'bfloat16', 'forced by RetinaNetTrainer.force_bfloat16'),
    (frozenset(), False, 'bfloat16', 'emulated'),  # /proc/cpuinfo unreadable
])
def test_bfloat16_on_cpus(flags, force, expected, said):
  trained, line = precision.training_precision('bfloat16', force, flags, accelerator=False)
  assert trained == expected
  assert said in line


@pytest.mark.parametrize('requested', [None, 'float16'])
def test_other_precisions_are_kept_on_every_cpu(requested):
  for flags in (INTEL_AMX, AMD_ZEN4, NO_BF16):
    assert precision.training_precision(requested, flags=flags, accelerator=False)[0] == requested


def test_accelerators_train_in_bfloat16_whatever_the_host_cpu():
  assert precision.training_precision('bfloat16', flags=AMD_ZEN4, accelerator=True)[0] == (
      'bfloat16')


def test_this_machines_flags_are_read():
  flags = precision.cpu_flags()
  assert not flags or 'sse2' in flags or 'fpu' in flags


def test_trainer_builds_in_float32_and_says_so_on_a_cpu_without_amx(synthetic_records, tmp_path,
                                                                  monkeypatch):
  monkeypatch.setattr(precision, 'cpu_flags', lambda: AMD_ZEN4)
  config.parse_gin([], tiny_bindings(synthetic_records, mixed_precision='bfloat16'))
  with contextlib.redirect_stdout(io.StringIO()) as out:
    trainer = trainer_lib.RetinaNetTrainer(str(tmp_path), tf.distribute.get_strategy())
  assert trainer.mixed_precision is None
  assert trainer.model.get_layer('decoder').compute_dtype == 'float32'
  assert 'Training precision: float32, not the requested bfloat16' in out.getvalue()
