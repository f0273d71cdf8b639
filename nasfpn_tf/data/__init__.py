"""Detection data: dataset writers and readers sharing one tf.Example layout (TFM's keys).

`encode_example` and `decode_example` (`nasfpn_tf.data.tfexample`) are loaded on first use, so
that the modules that need no TensorFlow (the synthetic dataset's generator) start without it.
"""
_TFEXAMPLE_NAMES = ('decode_example', 'encode_example')


def __getattr__(name):
  if name in _TFEXAMPLE_NAMES:
    from nasfpn_tf.data import tfexample  # pylint: disable=import-outside-toplevel
    return getattr(tfexample, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
