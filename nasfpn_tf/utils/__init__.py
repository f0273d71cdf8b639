"""Measuring models: parameter and FLOP counts comparable with the paper's Table 1.

The counters load TensorFlow on first use, not on `import nasfpn_tf.utils.files`: a search
worker that trains nothing (the synthetic proxy) imports the journal's atomic write only.
"""
_MODEL_STATS = ('count_flops', 'count_params', 'frozen_inference_graph')


def __getattr__(name):
  if name in _MODEL_STATS:
    from nasfpn_tf.utils import model_stats  # pylint: disable=g-import-not-at-top
    return getattr(model_stats, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_MODEL_STATS))
