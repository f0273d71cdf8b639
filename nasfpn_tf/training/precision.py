"""Which Keras mixed-precision policy a requested training precision gets on this hardware.

A requested bfloat16 is used where the hardware does it: GPUs, TPUs and CPUs with AMX-BF16 (Intel
Sapphire Rapids and later) or AVX512-BF16 (e.g. AMD Zen 4, Zen 5). On CPUs without bfloat16
hardware (AVX2-only, e.g. AMD Zen 3) TensorFlow emulates bfloat16, 5-8x slower than float32
(issue 22: the demo at under 1.4 images/s against 7.2 in float32), so `mixed_precision='bfloat16'`
trains in float32 there unless forced, and the run's first line says so.
AVX512-BF16 CPUs trained in float32 from issue 10 (a Zen 4, where bfloat16 training on real COCO
images stopped learning and its weights went NaN) to session 27, when the NaN was found to be
oneDNN's bfloat16 gradient of the class predictor, since padded (`layers.common.
PaddedOutputConv2D`): on a Zen 5 bfloat16 then learned coco128 as float32 does, and trained the
demo in 429 s against float32's 591 s the same day (docs/precision.md).
Every part that trains (the trainer, the search's CPU proxy and its cache, the experiments and
the benchmark) takes this one decision, `training_precision`.
"""
import os
import pathlib
import sys
from typing import FrozenSet, Optional, Tuple

import tensorflow as tf

POLICIES = {None: 'float32', 'bfloat16': 'mixed_bfloat16', 'float16': 'mixed_float16'}


def _cpuinfo_field(name: str) -> str:
  """The first `name` line's value in /proc/cpuinfo ('' where absent or unreadable)."""
  try:
    text = pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return ''
  for line in text.splitlines():
    key, _, value = line.partition(':')
    if key.strip() == name:
      return value.strip()
  return ''


# Stands in for the CPU's flags (space- or comma-separated), to see what another CPU would get:
# `ONEDNN_MAX_CPU_ISA=AVX2 NASFPN_CPU_FLAGS=avx2,fma make demo` on an Intel CPU with AMX runs the
# demo as an AVX2-only CPU (AMD Zen 3) would, kernels and precision.
CPU_FLAGS_ENV = 'NASFPN_CPU_FLAGS'


def cpu_flags() -> FrozenSet[str]:
  """The CPU's feature flags as Linux lists them ('amx_bf16', 'avx512_bf16', ...), or those of
  $NASFPN_CPU_FLAGS where set; empty where /proc/cpuinfo is not readable (then no bfloat16
  hardware is assumed)."""
  injected = os.environ.get(CPU_FLAGS_ENV)
  if injected is not None:
    return frozenset(injected.replace(',', ' ').split())
  return frozenset(_cpuinfo_field('flags').split())


# (vendor, family, first model, last model) -> microarchitecture, for CPUs whose model name
# does not say it: a cloud VM's AMD CPU often reads just "AMD EPYC". From AMD's and Intel's
# family/model numbers (Linux's arch/x86 tables); only the kinds this project meets and their kin.
MICROARCHITECTURES = (
    ('AuthenticAMD', 23, 0x00, 0x2F, 'Zen / Zen+'),
    ('AuthenticAMD', 23, 0x30, 0xFF, 'Zen 2'),
    ('AuthenticAMD', 25, 0x00, 0x0F, 'Zen 3'),
    ('AuthenticAMD', 25, 0x10, 0x1F, 'Zen 4'),
    ('AuthenticAMD', 25, 0x20, 0x5F, 'Zen 3'),
    ('AuthenticAMD', 25, 0x60, 0xAF, 'Zen 4'),
    ('AuthenticAMD', 26, 0x00, 0xFF, 'Zen 5'),
    ('GenuineIntel', 6, 0x55, 0x55, 'Skylake / Cascade Lake'),
    ('GenuineIntel', 6, 0x6A, 0x6C, 'Ice Lake'),
    ('GenuineIntel', 6, 0x8F, 0x8F, 'Sapphire Rapids'),
    ('GenuineIntel', 6, 0xCF, 0xCF, 'Emerald Rapids'),
    ('GenuineIntel', 6, 0xAD, 0xAE, 'Granite Rapids'),
)


def microarchitecture(vendor: str, family: int, model: int) -> Optional[str]:
  """'Zen 5', 'Sapphire Rapids', ... for a CPU's vendor id and family/model numbers as
  /proc/cpuinfo gives them; None for one not in MICROARCHITECTURES."""
  for known_vendor, known_family, first, last, name in MICROARCHITECTURES:
    if (vendor, family) == (known_vendor, known_family) and first <= model <= last:
      return name
  return None


def cpu_name() -> str:
  """The CPU as figures should name it: its model name and, from its family and model numbers,
  the microarchitecture ('AMD EPYC (family 26, model 2: Zen 5)'); 'unknown CPU' where
  /proc/cpuinfo is not readable."""
  name = _cpuinfo_field('model name') or 'unknown CPU'
  family, model = _cpuinfo_field('cpu family'), _cpuinfo_field('model')
  if not (family.isdigit() and model.isdigit()):
    return name
  known = microarchitecture(_cpuinfo_field('vendor_id'), int(family), int(model))
  return f'{name} (family {family}, model {model}' + (f': {known})' if known else ')')


def bfloat16_hardware(flags: FrozenSet[str]) -> Optional[str]:
  """'AMX-BF16' or 'AVX512-BF16' (the best the CPU has), or None (bfloat16 emulated)."""
  if 'amx_bf16' in flags:
    return 'AMX-BF16'
  if 'avx512_bf16' in flags:
    return 'AVX512-BF16'
  return None


def has_accelerator() -> bool:
  """A GPU or TPU is visible: the strategies then compute there, not on the CPU."""
  return bool(tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('TPU'))


def training_precision(mixed_precision: Optional[str], force_bfloat16: bool = False,
                       flags: Optional[FrozenSet[str]] = None,
                       accelerator: Optional[bool] = None) -> Tuple[Optional[str], str]:
  """(the precision to train in: None, 'bfloat16' or 'float16'; a line saying what and why).

  `flags`, `accelerator`: the CPU's flags and whether a GPU/TPU computes (default: this
  machine's, `cpu_flags()` and `has_accelerator()`).
  """
  if mixed_precision not in POLICIES:
    raise ValueError(f'RetinaNetTrainer.mixed_precision={mixed_precision!r}: use None, '
                     '"bfloat16" or "float16".')
  if accelerator is None:
    accelerator = has_accelerator()
  if mixed_precision != 'bfloat16' or accelerator:
    return mixed_precision, f'Training precision: {POLICIES[mixed_precision]}.'
  hardware = bfloat16_hardware(cpu_flags() if flags is None else flags)
  if hardware == 'AMX-BF16':
    return 'bfloat16', 'Training precision: mixed_bfloat16 (AMX-BF16).'
  if hardware == 'AVX512-BF16':
    return 'bfloat16', 'Training precision: mixed_bfloat16 (AVX512-BF16).'
  if force_bfloat16:
    return 'bfloat16', ('Training precision: mixed_bfloat16 on a CPU without bfloat16 hardware, '
                        'forced by RetinaNetTrainer.force_bfloat16: emulated, 5-8x slower than '
                        'float32.')
  return None, ('Training precision: float32, not the requested bfloat16: this CPU has no '
                'bfloat16 hardware (no AMX-BF16 or AVX512-BF16), where TensorFlow emulates '
                'bfloat16 5-8x slower than float32. Set RetinaNetTrainer.force_bfloat16 = True '
                'to train in bfloat16 anyway.')


# `make demo`'s config by what this machine trains fast (see `demo_gin`).
DEMO_GIN = 'demo.gin'
DEMO_FLOAT32_GIN = 'demo_float32.gin'


def demo_gin(flags: Optional[FrozenSet[str]] = None,
             accelerator: Optional[bool] = None) -> str:
  """The demo's gin file on this machine: 'demo.gin' (SGD, 1100 steps of 8 images) wherever its
  step is fast enough for 10 minutes, i.e. in bfloat16 (AMX-BF16, AVX512-BF16 such as AMD Zen 4
  and Zen 5, a GPU or TPU) and in float32 with AVX-512 but no bfloat16 (e.g. Intel Skylake-SP to
  Ice Lake); 'demo_float32.gin' (AdamW, 500 steps of which 300 warm
  up: half the images, so about half the time) on CPUs without AVX-512 (AVX2-only, e.g. AMD
  Zen 3).

  `flags`, `accelerator`: as `training_precision` takes them (default: this machine's).
  """
  flags = cpu_flags() if flags is None else flags
  chosen, _ = training_precision('bfloat16', flags=flags, accelerator=accelerator)
  if chosen == 'bfloat16' or 'avx512f' in flags:
    return DEMO_GIN
  return DEMO_FLOAT32_GIN


def main(argv) -> None:
  """`python -m nasfpn_tf.training.precision [REQUESTED]`: prints what a requested precision
  (default bfloat16) trains in on this machine, `bfloat16`, `float16` or `float32`, on stdout,
  and the trainer's line saying why on stderr.
  `python -m nasfpn_tf.training.precision --demo_gin`: prints the gin file `make demo` trains on
  this machine (`demo_gin`); `--cpu_name`: the CPU as figures name it (`cpu_name`)."""
  if argv[1:] == ['--demo_gin']:
    print(demo_gin())
    return
  if argv[1:] == ['--cpu_name']:
    print(cpu_name())
    return
  requested = argv[1] if len(argv) > 1 else 'bfloat16'
  chosen, line = training_precision(None if requested == 'float32' else requested)
  print(line, file=sys.stderr)
  print(chosen or 'float32')


if __name__ == '__main__':
  main(sys.argv)
