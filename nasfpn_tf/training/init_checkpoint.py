"""Initial weights from another run's checkpoint, as TF Model Garden's RetinaNet task reads them
(`official/vision/tasks/retinanet.py`, `initialize`): the backbone, or the whole model.

'backbone' reads TFM's published backbone checkpoints (ImageNet ResNets and MobileNets, written
as `tf.train.Checkpoint(backbone=<TFM backbone>)`) or the backbone of a nasfpn_tf model dir.
Our backbone is TFM's own backbone model re-wrapped on levels 3-5 (`backbones.build_backbone`):
its layers keep TFM's order, so it reads TFM's layout directly; what it trimmed (MobileNetV2's
last 1x1 conv) stays in the checkpoint unread. 'all' reads every weight of a nasfpn_tf model dir
(the model, not the optimizer: training starts at step 0).

Every variable of the part being initialized must be in the checkpoint with its shape: the
checkpoint is checked against the model before anything is read, and each variable that is
missing or of another shape is named, by its path in the checkpoint, with nothing loaded.
"""
from typing import Dict, List

import tensorflow as tf
import tf_keras
from tensorflow.core.protobuf import trackable_object_graph_pb2

MODULES = ('backbone', 'all')
_BINDING = 'RetinaNetTrainer.init_checkpoint'
_OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'
_LISTED = 10  # Mismatches named in an error; the rest are counted.


class InitCheckpointError(ValueError):
  """An init checkpoint that is missing, unreadable, or does not fit the model."""


def check_modules(modules: str) -> None:
  if modules not in MODULES:
    raise ValueError(f'RetinaNetTrainer.init_checkpoint_modules must be one of {list(MODULES)}, '
                     f'got {modules!r}.')


def resolve(path: str) -> str:
  """The checkpoint `path` names: itself (a prefix such as .../ckpt-28080), or in a folder the
  latest its `checkpoint` file names, else its only checkpoint."""
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is not None:
      return latest
    prefixes = sorted(p[:-len('.index')] for p in tf.io.gfile.glob(f'{path}/*.index'))
    if len(prefixes) != 1:
      raise InitCheckpointError(f'{_BINDING}: the folder {path} has no `checkpoint` file and '
                                f'{len(prefixes)} checkpoints {prefixes}: name one.')
    return prefixes[0]
  if not tf.io.gfile.exists(path + '.index'):
    raise InitCheckpointError(f'{_BINDING}: no checkpoint {path} ({path}.index not found).')
  return path


def initialize(model: tf_keras.Model, path: str, modules: str = 'backbone') -> str:
  """Loads `modules` ('backbone' or 'all') of `model` (a RetinaNet) from checkpoint `path` (a
  prefix or a folder); returns the checkpoint read. Raises InitCheckpointError naming every
  variable the checkpoint lacks or holds in another shape, before loading anything."""
  check_modules(modules)
  path = resolve(path)
  reader = tf.train.load_checkpoint(path)
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
  root = _reading_root(model, modules, path, _children(graph, 0))
  problems = _mismatches(root, graph, reader.get_variable_to_shape_map())
  if problems:
    part = 'the model' if modules == 'all' else "the model's backbone"
    listed = problems[:_LISTED]
    if len(problems) > _LISTED:
      listed.append(f'... and {len(problems) - _LISTED} more')
    raise InitCheckpointError(
        f'{_BINDING}: checkpoint {path} does not fit {part} '
        f'(init_checkpoint_modules = {modules!r}); nothing was loaded. {len(problems)} '
        'variable(s) of the model:\n  ' + '\n  '.join(listed))
  status = root.read(path)
  status.expect_partial()  # What the model does not read (the optimizer, trimmed layers).
  status.assert_existing_objects_matched()
  return path


def _children(graph, node_id: int) -> Dict[str, int]:
  return {child.local_name: child.node_id for child in graph.nodes[node_id].children}


def _reading_root(model, modules: str, path: str, roots: Dict[str, int]) -> tf.train.Checkpoint:
  """The object tree to read `path` into: TFM's backbone layout (root `backbone`) or a nasfpn_tf
  model dir's (root `model`, whose `backbone` is the RetinaNet's)."""
  if modules == 'all':
    if 'model' not in roots:
      raise InitCheckpointError(
          f'{_BINDING}: {path} is not a nasfpn_tf checkpoint (its root objects: {sorted(roots)}); '
          "'all' reads a nasfpn_tf model dir. For a TF Model Garden backbone checkpoint, bind "
          "RetinaNetTrainer.init_checkpoint_modules = 'backbone'.")
    return tf.train.Checkpoint(model=model)
  if 'backbone' in roots:
    return tf.train.Checkpoint(backbone=model.backbone)
  if 'model' in roots:
    return tf.train.Checkpoint(model=tf.train.Checkpoint(backbone=model.backbone))
  raise InitCheckpointError(
      f'{_BINDING}: {path} holds no backbone (its root objects: {sorted(roots)}); expected '
      "'backbone' (TF Model Garden) or 'model' (a nasfpn_tf model dir).")


def _mismatches(root, graph, shapes: Dict[str, List[int]]) -> List[str]:
  """'<path>: why' for every variable under `root` that the checkpoint lacks or holds in another
  shape; the tree is walked as a restore matches it (by child names, breadth first)."""
  matched, paths, variables = set(), {}, {}
  problems = []
  queue = [(root, 0, '')]
  while queue:
    obj, node_id, path = queue.pop(0)
    if id(obj) in matched or (node_id is None and id(obj) in paths):
      continue
    paths.setdefault(id(obj), path)
    if isinstance(obj, tf.Variable):
      variables[id(obj)] = obj
      if node_id is None:
        continue
      matched.add(id(obj))
      key = next((a.checkpoint_key for a in graph.nodes[node_id].attributes
                  if a.name == 'VARIABLE_VALUE'), None)
      if key is None:
        problems.append(f'{path} ({obj.name}): not a variable in the checkpoint')
      elif list(shapes[key]) != obj.shape.as_list():
        problems.append(f'{path} ({obj.name}): shape {list(shapes[key])} in the checkpoint, '
                        f'{obj.shape.as_list()} in the model')
      continue
    if node_id is not None:
      matched.add(id(obj))
    in_checkpoint = _children(graph, node_id) if node_id is not None else {}
    for name, child in tf.train.TrackableView.children(obj).items():
      queue.append((child, in_checkpoint.get(name), f'{path}/{name}' if path else name))
  problems += [f'{paths[i]} ({v.name}): not in the checkpoint'
               for i, v in variables.items() if i not in matched]
  return problems

