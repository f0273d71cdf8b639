"""What the trainer, driver and distributed tests share: tiny-model gin bindings, readers."""
import pathlib

import tensorflow as tf


def tiny_bindings(records, **trainer):
  """Gin bindings of a tiny NAS-FPN RetinaNet (ResNet-10, 16 filters, 128 px) on `records`;
  `trainer` overrides RetinaNetTrainer bindings (values as Python literals)."""
  trainer = {'train_steps': 4, 'global_batch_size': 2, 'checkpoint_every_steps': 2,
             'log_every_steps': 2, 'eval_batch_size': 2, **trainer}
  return [
      'build_retinanet.image_size = (128, 128)',
      'build_retinanet.num_classes = 10',  # synthetic ids 1..9
      "build_retinanet.backbone = 'resnet10'",
      'build_retinanet.num_filters = 16',
      'build_retinanet.num_repeats = 1',
      'build_retinanet.head_num_convs = 1',
      'build_retinanet.head_num_filters = 16',
      'build_retinanet.l2_weight_decay = 1e-4',
      f"build_train_dataset.file_pattern = '{records['train']}'",
      f"build_eval_dataset.file_pattern = '{records['val']}'",
      'RetinaNetTrainer.learning_rate = @StepDecayWithWarmup()',
      'StepDecayWithWarmup.base_learning_rate = 0.01',
      'StepDecayWithWarmup.boundary_steps = [100]',
      'StepDecayWithWarmup.warmup_steps = 2',
      'StepDecayWithWarmup.warmup_learning_rate = 0.001',
  ] + [f'RetinaNetTrainer.{name} = {value!r}' for name, value in trainer.items()]


def read_scalars(log_dir):
  """{tag: {step: value}} of the TensorBoard scalars under `log_dir`."""
  scalars = {}
  for path in sorted(pathlib.Path(log_dir).glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return scalars


def checkpoint_step(path):
  """The optimizer iteration count stored in checkpoint `path`."""
  reader = tf.train.load_checkpoint(path)
  keys = [k for k in reader.get_variable_to_shape_map()
          if k.startswith('optimizer/') and '/_iterations/' in k]
  assert len(keys) == 1, keys
  return int(reader.get_tensor(keys[0]))
