"""The trainer's checks of its settings: each error names the gin binding (or mode) at fault,
before anything is built."""
import gin
import tensorflow as tf

MODES = ('train', 'eval', 'train_and_eval')


def missing_binding(name: str, example: str) -> ValueError:
  return ValueError(f'gin binding {name} is required, e.g. --gin_bindings="{name} = {example}"')


def require_binding(name: str, example: str) -> None:
  """Fails naming the gin binding when a needed one is missing (gin's own error names none)."""
  try:
    gin.query_parameter(name)
  except ValueError:
    raise missing_binding(name, example) from None


def check(mode: str, strategy: tf.distribute.Strategy, **counts: int) -> None:
  """Fails naming the binding for a mode or count that cannot work (`counts`: >= 1 each)."""
  if mode not in MODES:
    raise ValueError(f'mode {mode!r} is not one of {list(MODES)}.')
  for name, value in counts.items():
    if value < 1:
      raise ValueError(f'RetinaNetTrainer.{name} must be >= 1, got {value}.')
  replicas = strategy.num_replicas_in_sync
  if counts['global_batch_size'] % replicas:
    raise ValueError(f"RetinaNetTrainer.global_batch_size={counts['global_batch_size']} must be "
                     f'a multiple of the {replicas} replicas.')
