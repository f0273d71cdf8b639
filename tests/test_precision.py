"""training.precision: the precision a requested one trains in, per hardware, and the trainer
building its model in it."""
import contextlib
import io
import pathlib

import pytest
import tensorflow as tf

from nasfpn_tf import config
from nasfpn_tf.training import precision
from nasfpn_tf.training import trainer as trainer_lib
from training_helpers import tiny_bindings

INTEL_AMX = frozenset({'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16'})
AMD_ZEN4 = frozenset({'avx512f', 'avx512_bf16', 'avx512_vnni'})
# AMD Zen 3 (EPYC 7003) as Linux lists it: AVX2 and FMA, no AVX-512, no bfloat16 instructions.
AMD_ZEN3 = frozenset({'fpu', 'sse2', 'avx', 'avx2', 'fma', 'f16c', 'bmi2', 'sha_ni', 'vaes'})
# What /proc/cpuinfo gives on Intel Sapphire Rapids with oneDNN held to AVX2
# (ONEDNN_MAX_CPU_ISA=AVX2 changes the kernels, not the flags): still AMX.
SPR_FLAGS = frozenset({'avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16', 'amx_int8'})


@pytest.mark.parametrize('flags, force, expected, said', [
    (INTEL_AMX, False, 'bfloat16', 'mixed_bfloat16 (AMX-BF16)'),
    (INTEL_AMX, True, 'bfloat16', 'mixed_bfloat16 (AMX-BF16)'),
    (SPR_FLAGS, False, 'bfloat16', 'mixed_bfloat16 (AMX-BF16)'),
    (AMD_ZEN3, False, None, 'float32, not the requested bfloat16: this CPU has no bfloat16 '
     'hardware'),
    (AMD_ZEN3, True, 'bfloat16', 'forced by RetinaNetTrainer.force_bfloat16: emulated'),
    # Since session 27 (the class predictor padded, docs/precision.md).
    (AMD_ZEN4, False, 'bfloat16', 'mixed_bfloat16 (AVX512-BF16)'),
    (AMD_ZEN4, True, 'bfloat16', 'mixed_bfloat16 (AVX512-BF16)'),
    # /proc/cpuinfo unreadable: nothing is known of the CPU, so nothing slow is assumed.
    (frozenset(), False, None, 'no bfloat16 hardware'),
])
def test_bfloat16_on_cpus(flags, force, expected, said):
  trained, line = precision.training_precision('bfloat16', force, flags, accelerator=False)
  assert trained == expected
  assert said in line
  assert len(line.splitlines()) == 1


@pytest.mark.parametrize('flags, accelerator, expected', [
    (INTEL_AMX, False, 'demo.gin'),     # bfloat16 on AMX
    (AMD_ZEN4, False, 'demo.gin'),      # bfloat16 on AVX512-BF16
    (frozenset({'avx2', 'avx512f'}), False, 'demo.gin'),  # float32 with AVX-512
    (AMD_ZEN3, False, 'demo_float32.gin'),
    (AMD_ZEN3, True, 'demo.gin'),       # a GPU computes, whatever the host
    (frozenset(), False, 'demo_float32.gin'),
])
def test_the_demo_config_follows_what_the_cpu_trains_fast(flags, accelerator, expected):
  assert precision.demo_gin(flags, accelerator=accelerator) == expected
  # Both are gin files of the package, and the float32 one is the demo's model.
  gin_dir = config.GIN_CONFIGS_DIR
  assert (gin_dir / expected).is_file()
  assert "include 'demo.gin'" in (gin_dir / precision.DEMO_FLOAT32_GIN).read_text()


@pytest.mark.parametrize('requested', [None, 'float16'])
def test_other_precisions_are_kept_on_every_cpu(requested):
  for flags in (INTEL_AMX, AMD_ZEN4, AMD_ZEN3):
    assert precision.training_precision(requested, flags=flags, accelerator=False)[0] == requested


def test_accelerators_train_in_bfloat16_whatever_the_host_cpu():
  assert precision.training_precision('bfloat16', flags=AMD_ZEN4, accelerator=True)[0] == (
      'bfloat16')


def test_flags_are_read_from_proc_cpuinfo(tmp_path, monkeypatch):
  monkeypatch.delenv(precision.CPU_FLAGS_ENV, raising=False)
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text('processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n'
                     'flags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n')
  real_path = precision.pathlib.Path
  monkeypatch.setattr(precision.pathlib, 'Path',
                      lambda name: cpuinfo if name == '/proc/cpuinfo' else real_path(name))
  assert precision.cpu_flags() == frozenset({'fpu', 'sse2', 'avx2', 'fma'})
  assert precision.cpu_name() == 'AMD EPYC 7B13 64-Core Processor'
  assert precision.training_precision('bfloat16', accelerator=False)[0] is None


@pytest.mark.parametrize('vendor,family,model,expected', [
    ('AuthenticAMD', 26, 2, 'AMD EPYC (family 26, model 2: Zen 5)'),
    ('AuthenticAMD', 25, 17, 'AMD EPYC (family 25, model 17: Zen 4)'),
    ('AuthenticAMD', 25, 1, 'AMD EPYC (family 25, model 1: Zen 3)'),
    ('GenuineIntel', 6, 143, 'AMD EPYC (family 6, model 143: Sapphire Rapids)'),
    ('AuthenticAMD', 99, 1, 'AMD EPYC (family 99, model 1)'),
], ids=['zen5', 'zen4', 'zen3', 'sapphire_rapids', 'unknown'])
def test_cpu_name_adds_the_microarchitecture_from_family_and_model(tmp_path, monkeypatch, vendor,
                                                                   family, model, expected):
  cpuinfo = tmp_path / 'cpuinfo'
  cpuinfo.write_text(f'processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\n'
                     f'model\t\t: {model}\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n')
  real_path = precision.pathlib.Path
  monkeypatch.setattr(precision.pathlib, 'Path',
                      lambda name: cpuinfo if name == '/proc/cpuinfo' else real_path(name))
  assert precision.cpu_name() == expected


def test_flags_can_be_injected_to_act_as_another_cpu(monkeypatch):
  monkeypatch.setenv(precision.CPU_FLAGS_ENV, 'avx2,fma sse2')
  assert precision.cpu_flags() == frozenset({'avx2', 'fma', 'sse2'})
  assert precision.training_precision('bfloat16', accelerator=False)[0] is None
  monkeypatch.setenv(precision.CPU_FLAGS_ENV, 'avx2 amx_bf16')
  assert precision.training_precision('bfloat16', accelerator=False)[0] == 'bfloat16'


def test_this_machines_flags_are_read(monkeypatch):
  monkeypatch.delenv(precision.CPU_FLAGS_ENV, raising=False)
  if not pathlib.Path('/proc/cpuinfo').is_file():
    pytest.skip('no /proc/cpuinfo on this system')
  assert {'fpu', 'sse2'} <= precision.cpu_flags()


def test_trainer_builds_in_float32_and_says_so_on_a_cpu_without_bfloat16_hardware(
    synthetic_records, tmp_path, monkeypatch):
  monkeypatch.setattr(precision, 'cpu_flags', lambda: AMD_ZEN3)
  monkeypatch.setattr(precision, 'has_accelerator', lambda: False)
  config.parse_gin([], tiny_bindings(synthetic_records, mixed_precision='bfloat16'))
  with contextlib.redirect_stdout(io.StringIO()) as out:
    trainer = trainer_lib.RetinaNetTrainer(str(tmp_path), tf.distribute.get_strategy())
  assert trainer.mixed_precision is None
  assert trainer.model.get_layer('decoder').compute_dtype == 'float32'
  assert 'Training precision: float32, not the requested bfloat16' in out.getvalue()


@pytest.mark.parametrize('flags, policy', [(INTEL_AMX, 'mixed_bfloat16'),
                                           (AMD_ZEN4, 'mixed_bfloat16'),
                                           (AMD_ZEN3, 'float32')],
                         ids=['amx', 'zen4', 'zen3'])
def test_trainer_proxy_cache_and_benchmark_take_one_decision(synthetic_records, tmp_path,
                                                             monkeypatch, flags, policy):
  """What trains asks for bfloat16 by default everywhere; each part builds in the one policy that
  `training_precision` gives the CPU: the trainer, the CPU proxy's trials, the proxy cache's key
  (its pretraining runs through the trainer) and the benchmark's 'auto'."""
  import sys
  from nasfpn_tf.search import cpu_proxy, feature_cache
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'experiments'))
  from bench import models as bench_models
  monkeypatch.setattr(precision, 'cpu_flags', lambda: flags)
  monkeypatch.setattr(precision, 'has_accelerator', lambda: False)
  config.parse_gin([], tiny_bindings(synthetic_records, mixed_precision='bfloat16'))
  with contextlib.redirect_stdout(io.StringIO()):
    trainer = trainer_lib.RetinaNetTrainer(str(tmp_path), tf.distribute.get_strategy())
  proxy_model = cpu_proxy.build_model(cpu_proxy.CpuProxy())
  assert cpu_proxy.CpuProxy().mixed_precision == feature_cache.CpuProxyCache().mixed_precision == (
      'bfloat16')
  assert trainer.model.get_layer('decoder').dtype_policy.name == policy
  assert proxy_model.get_layer('decoder').dtype_policy.name == policy
  assert feature_cache.cache_key(feature_cache.CpuProxyCache())['trained_in'] == policy
  assert bench_models.fast_precision('auto') == {'mixed_bfloat16': 'bfloat16'}.get(policy, policy)


def _command_line(flags, *args):
  """`python -m nasfpn_tf.training.precision ARGS` in a fresh process on the injected CPU."""
  import os
  import subprocess
  import sys
  from training_helpers import REPO, SUBPROCESS_TIMEOUT
  return subprocess.run(
      [sys.executable, '-m', 'nasfpn_tf.training.precision', *args], capture_output=True,
      text=True, cwd=REPO, timeout=SUBPROCESS_TIMEOUT, check=True,
      env=dict(os.environ, NASFPN_CPU_FLAGS=flags, CUDA_VISIBLE_DEVICES='',
               TF_CPP_MIN_LOG_LEVEL='3'))


@pytest.mark.parametrize('flags, printed', [('avx2,fma', 'float32'), ('avx512_bf16', 'bfloat16'),
                                            ('amx_bf16,avx512_bf16', 'bfloat16')])
def test_the_command_line_prints_the_decision(flags, printed):
  """What `python -m nasfpn_tf.training.precision` prints: the decision, and why on stderr."""
  result = _command_line(flags)
  assert result.stdout.strip() == printed
  assert 'Training precision: ' in result.stderr


@pytest.mark.parametrize('flags, printed', [('avx2,fma', 'demo_float32.gin'),
                                            ('avx2,avx512f,avx512_bf16', 'demo.gin')])
def test_the_command_line_prints_the_demo_config(flags, printed):
  """What the Makefile's DEMO_GIN reads."""
  assert _command_line(flags, '--demo_gin').stdout.strip() == printed
