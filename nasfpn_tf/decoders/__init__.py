"""Pyramid networks (decoders) from block specs.

`NASFPN` is imported on first use, so that `block_specs`, plain data, loads without TensorFlow.
"""
from nasfpn_tf.decoders.block_specs import SPECS, BlockSpec

__all__ = ['BlockSpec', 'NASFPN', 'SPECS']


def __getattr__(name):
  if name == 'NASFPN':
    from nasfpn_tf.decoders.nasfpn import NASFPN  # pylint: disable=import-outside-toplevel
    return NASFPN
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
