"""The CPU proxy's trial: the candidate pyramid and the head trained on cached backbone features.

`CpuSearchProxy` is the proxy task as an object: built once from its data and backbone features
(a `feature_cache` folder) and its settings (the model's arguments, `CpuProxy`, the loss), read
from the parsed gin config in `from_gin`, it never reads gin again: each trial builds the
package's RetinaNet from those arguments with the candidate's (its pyramid, or a NAS-FCOS
pyramid or head: `new_model`), `run` trains its `decoder` and `head` (the backbone stays frozen:
its features come from the cache), SGD with momentum on the detector's loss (`RetinaNetLoss`, or
`FCOSLoss` when `build_retinanet.detector = 'fcos'`: the cache then holds FCOS's point targets),
a cosine learning rate after a linear warm-up (`CosineDecayWithWarmup`), batches drawn with the
trial's seed, then scores it on the held-out features, one forward pass giving both: COCO AP
through the model's own post-processing and `evaluate_detector`, and the held-out loss (the
training loss on the held-out images' labels, NAS-FCOS's reward).
"""
import dataclasses
import gc
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import gin
import numpy as np
import tensorflow as tf
import tf_keras

from nasfpn_tf.evaluation import evaluate
from nasfpn_tf.models import factory
from nasfpn_tf.models.retinanet import RetinaNet
from nasfpn_tf.search import feature_cache
from nasfpn_tf.training import precision
from nasfpn_tf.training import schedules

# The losses of the last steps average into the trial's final loss.
_FINAL_LOSS_STEPS = 20


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CpuProxy:
  """One trial's training (gin `CpuProxy.<field>`).

  train_steps of batch_size cached images; learning_rate reached after warmup_steps (from a
  sixth of it), then a cosine to 0 at the last step; SGD momentum; mixed_precision as
  `RetinaNetTrainer.mixed_precision` (bfloat16 where the trainer trusts it, else float32);
  eval_batch_size for the held-out images. pretrained_head: start the head from the cache's
  pretraining head (`feature_cache.HEAD_FILE`) instead of its initialisation. None (the
  default): wherever the cache has one (a backbone from --backbone_checkpoint comes without)
  and the trial's head is the pretraining one, weight for weight (4 convs of
  CpuProxyCache.pretrain_filters; not a searched head); True: always, an error where it cannot;
  False: never.
  """
  train_steps: int = 150
  batch_size: int = 8
  learning_rate: float = 0.04
  warmup_steps: int = 25
  momentum: float = 0.9
  mixed_precision: Optional[str] = 'bfloat16'
  eval_batch_size: int = 50
  pretrained_head: Optional[bool] = None


def build_model(settings: CpuProxy,
                model_arguments: Optional[Mapping[str, Any]] = None) -> tf_keras.Model:
  """The RetinaNet of `model_arguments` (default: the gin-configured one) in the trial's training
  precision (the one build of a trial; its errors say the proxy config does not build)."""
  chosen, _ = precision.training_precision(settings.mixed_precision)
  previous = tf_keras.mixed_precision.global_policy()
  tf_keras.mixed_precision.set_global_policy(precision.POLICIES[chosen])
  try:
    if model_arguments is None:
      return factory.build_retinanet()
    return RetinaNet(**model_arguments)
  finally:
    tf_keras.mixed_precision.set_global_policy(previous)


def feature_network(model: tf_keras.Model) -> tf_keras.Model:
  """The model's pyramid and head as one Keras model on backbone features {'3': C3, ...}: the
  model's raw outputs ('cls_outputs', 'box_outputs', an FCOS's 'centerness_outputs')."""
  inputs = {level: tf_keras.Input(shape[1:], name=f'c{level}')
            for level, shape in model.backbone.output_specs.items()}
  outputs = model.head(model.decoder(inputs))
  names = ('cls_outputs', 'box_outputs', 'centerness_outputs')
  return tf_keras.Model(inputs, dict(zip(names, outputs)), name='pyramid_and_head')


def batch_order(num_images: int, num_steps: int, batch_size: int, seed: int) -> np.ndarray:
  """[num_steps, batch_size] image indices: epochs of seeded permutations, back to back."""
  rng = np.random.default_rng(seed)
  needed = num_steps * batch_size
  epochs = [rng.permutation(num_images) for _ in range(-(-needed // num_images))]
  return np.concatenate(epochs)[:needed].reshape(num_steps, batch_size)


def _as_loss_labels(labels: Mapping[str, Any]) -> Dict[str, Any]:
  """Cached anchor labels, or FCOS's point labels (narrow dtypes), as the loss takes them."""
  labels = dict(labels)
  labels['cls_targets'] = tf.nest.map_structure(lambda t: tf.cast(t, tf.int32),
                                                labels['cls_targets'])
  for key in ('box_targets', 'cls_weights', 'box_weights'):
    if key in labels:  # FCOS's have no class weights
      labels[key] = tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), labels[key])
  return labels


def check_report_steps(report_steps: Sequence[int], settings: CpuProxy) -> None:
  """ValueError naming CpuProxy.train_steps when a report step is not one before the last."""
  wrong = [s for s in report_steps if not 1 <= s < settings.train_steps]
  if wrong:
    raise ValueError(f'report steps {wrong} are not in 1..{settings.train_steps - 1}, the steps '
                     f'before the last of CpuProxy.train_steps = {settings.train_steps}.')


def train(net: tf_keras.Model, train_split: Mapping[str, Any], settings: CpuProxy,
          loss_fn, seed: int, report_steps: Sequence[int] = (),
          report: Optional[Callable[[int, float], None]] = None) -> float:
  """Trains `net` on the cached split; returns the mean loss of its last steps. With `report`,
  calls report(step, mean loss of the last steps so far) after each of `report_steps` (steps
  before the last one: the caller evaluates there, e.g. for ASHA)."""
  check_report_steps(report_steps, settings)
  features = train_split['features']
  labels = {k: v for k, v in train_split['labels'].items() if k != 'image_info'}
  optimizer = tf_keras.optimizers.SGD(
      learning_rate=schedules.CosineDecayWithWarmup(
          settings.learning_rate, total_steps=settings.train_steps,
          warmup_steps=min(settings.warmup_steps, settings.train_steps - 1),
          warmup_learning_rate=settings.learning_rate / 6),
      momentum=settings.momentum)
  variables = net.trainable_variables

  @tf.function
  def step(indices):
    batch_features = {k: tf.cast(tf.gather(v, indices), tf.float32)
                      for k, v in features.items()}
    batch_labels = _as_loss_labels(
        tf.nest.map_structure(lambda t: tf.gather(t, indices), labels))
    with tf.GradientTape() as tape:
      outputs = net(batch_features, training=True)
      loss = loss_fn(outputs, batch_labels)['total_loss']
      if net.losses:
        loss += tf.add_n([tf.cast(l, tf.float32) for l in net.losses])
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  num_images = len(next(iter(train_split['features'].values())))
  report_at = set(report_steps) if report is not None else set()
  losses = []
  for indices in batch_order(num_images, settings.train_steps, settings.batch_size, seed):
    losses.append(step(tf.constant(indices)))
    if len(losses) in report_at:
      report(len(losses), float(np.mean([float(l) for l in losses[-_FINAL_LOSS_STEPS:]])))
  return float(np.mean([float(l) for l in losses[-_FINAL_LOSS_STEPS:]]))


def evaluate_heldout(model: tf_keras.Model, net: tf_keras.Model,
                     heldout_split: Mapping[str, Any], loss_fn,
                     batch_size: int) -> Tuple[evaluate.Evaluation, Dict[str, float]]:
  """(COCO metrics, held-out loss) of the trained pyramid and head on the held-out features, from
  one forward pass per batch of `batch_size` images (one traced function gives both).

  The metrics: the model's own post-processing, scored by `evaluate_detector`. The loss:
  {'heldout_loss', 'heldout_<term>' for each term of the loss (cls_loss, box_loss, an FCOS's
  centerness_loss)}, `loss_fn` (`RetinaNetLoss` or `FCOSLoss`) on every held-out image at once
  (their labels, `heldout_split['targets']`). The loss divides each batch's sum of a term by
  n + offset (`loss_fn.normalizers`: positives + 1, or FCOS's centerness sum); undone per batch
  and divided once by the sums of n + offset, the result does not depend on the batch size."""
  @tf.function
  def forward(inputs):
    outputs = net({k: tf.cast(v, tf.float32) for k, v in inputs['features'].items()},
                  training=False)
    labels = _as_loss_labels(inputs['targets'])
    losses = loss_fn(outputs, labels)
    sums = {term: (losses[term] * (n + offset), n, offset)
            for term, (n, offset) in loss_fn.normalizers(labels).items()}
    if model.detector == 'fcos':  # as RetinaNet.detect
      detections = model.detection_generator(outputs['cls_outputs'], outputs['box_outputs'],
                                             outputs['centerness_outputs'], model.points)
    else:
      detections = model.detection_generator(outputs['cls_outputs'], outputs['box_outputs'],
                                             model.anchor_boxes)
    return detections, sums

  totals = {}  # term -> [sum of the term, sum of its n, its offset]

  def detect(inputs):
    detections, batch_sums = forward(inputs)
    for term, (term_sum, n, offset) in batch_sums.items():
      total = totals.setdefault(term, [0.0, 0.0, float(offset)])
      total[0], total[1] = total[0] + float(term_sum), total[1] + float(n)
    return detections

  dataset = tf.data.Dataset.from_tensor_slices(
      ({'features': heldout_split['features'], 'targets': heldout_split['targets']},
       heldout_split['labels'])).batch(batch_size)
  evaluation = evaluate.evaluate_detector(detect, dataset)
  terms = {term: term_sum / (n + offset) if n + offset > 0 else 0.0
           for term, (term_sum, n, offset) in totals.items()}
  weights = loss_fn.term_weights()
  return evaluation, {
      'heldout_loss': sum(weights[term] * value for term, value in terms.items()),
      **{f'heldout_{term}': value for term, value in terms.items()}}


class CpuSearchProxy:
  """The CPU proxy task: one feature cache, one model configuration, one training recipe.

  Invariant: everything a trial reads is fixed at construction (the cache's tensors, the model's
  arguments, `settings`, `loss_fn`), so trials do not depend on the global gin config and one
  process can run many; `run` with the same specs and seed replays the same numbers.
  """

  def __init__(self, cache: Mapping[str, Any], model_arguments: Mapping[str, Any],
               settings: CpuProxy, loss_fn):
    """cache: `feature_cache.load`'s; model_arguments: every RetinaNet argument but the
    candidate's (a trial's); loss_fn: the training loss (`factory.build_loss` of the model's
    detector), also the held-out loss."""
    self.cache = cache
    self.model_arguments = dict(model_arguments)
    self.settings = settings
    self.loss_fn = loss_fn
    if settings.pretrained_head is True and cache['head'] is None:
      raise ValueError('CpuProxy.pretrained_head = True needs the pretraining head, and this '
                       "cache's backbone came from --backbone_checkpoint, untrained with a head; "
                       'leave CpuProxy.pretrained_head unset.')

  @classmethod
  def from_gin(cls, cache_folder: str) -> 'CpuSearchProxy':
    """The proxy of the parsed gin config (`CpuProxy`, `build_retinanet`, the loss's
    bindings) on the cache in `cache_folder` (`feature_cache.prepare`'s)."""
    arguments = {name: factory.model_argument(name) for name in factory.MODEL_ARGUMENTS}
    return cls(feature_cache.load(cache_folder), arguments, CpuProxy(),
               factory.build_loss(arguments))

  def new_model(self, candidate: Mapping[str, Any], seed: int) -> tf_keras.Model:
    """The trial's model: the proxy's with the `build_retinanet` arguments `candidate` (its
    pyramid, `{'block_specs': rows}`, or a search space's `model_arguments`), initialised with
    `seed` (its head from the pretraining one as `CpuProxy.pretrained_head` says)."""
    # Trials in one process do not pile up models, traced functions and layer names.
    tf_keras.backend.clear_session()
    gc.collect()
    tf_keras.utils.set_random_seed(seed)
    model = build_model(self.settings, {**self.model_arguments, **candidate})
    head, wanted = self.cache['head'], self.settings.pretrained_head
    if wanted or (wanted is None and head is not None and _head_fits(model, head)):
      _load_head(model, head)
    return model

  def train(self, model: tf_keras.Model, seed: int, report_steps: Sequence[int] = (),
            report: Optional[Callable[[int, Dict[str, Any]], None]] = None):
    """(pyramid-and-head network, final training loss, seconds): `model`'s pyramid and head
    trained on the cached training features, batches drawn with `seed`; seconds:
    {'train_seconds': the steps' (their tracing included), 'evaluate_seconds': the reports'
    evaluations'}. With `report`, evaluates on the held-out features after each of
    `report_steps` and calls report(step, {**`evaluate`, 'steps': step, 'final_loss': the
    training loss so far, **the seconds so far})."""
    net = feature_network(model)
    start = time.perf_counter()
    seconds = {'train_seconds': 0.0, 'evaluate_seconds': 0.0}

    def evaluate_at(step, loss):
      evaluate_start = time.perf_counter()
      seconds['train_seconds'] = evaluate_start - start - seconds['evaluate_seconds']
      measured = self.evaluate(model, net)
      seconds['evaluate_seconds'] += time.perf_counter() - evaluate_start
      report(step, {**measured, 'steps': step, 'final_loss': loss, **seconds})

    final_loss = train(net, self.cache['train'], self.settings, self.loss_fn, seed, report_steps,
                       evaluate_at if report is not None else None)
    seconds['train_seconds'] = time.perf_counter() - start - seconds['evaluate_seconds']
    return net, final_loss, seconds

  def evaluate(self, model: tf_keras.Model, net: tf_keras.Model) -> Dict[str, float]:
    """{'ap', 'ap50', 'heldout_loss', 'heldout_cls_loss', 'heldout_box_loss'} on the held-out
    features."""
    evaluation, losses = evaluate_heldout(model, net, self.cache['heldout'], self.loss_fn,
                                          self.settings.eval_batch_size)
    return {'ap': evaluation.metrics['AP'], 'ap50': evaluation.metrics['AP50'], **losses}

  def run(self, model: tf_keras.Model, seed: int, report_steps: Sequence[int] = (),
          report: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """`model` (`new_model`'s) trained and evaluated: {'ap', 'ap50', 'heldout_loss', ...,
    'steps', 'final_loss', 'train_seconds', 'evaluate_seconds' (every evaluation's)}; with
    `report`, the same at `report_steps` too (see `train`)."""
    net, final_loss, seconds = self.train(model, seed, report_steps, report)
    evaluate_start = time.perf_counter()
    measured = self.evaluate(model, net)
    return {**measured, 'steps': self.settings.train_steps, 'final_loss': final_loss,
            'train_seconds': seconds['train_seconds'],
            'evaluate_seconds': seconds['evaluate_seconds'] + time.perf_counter() - evaluate_start}


def _head_fits(model: tf_keras.Model, weights) -> bool:
  """Whether `weights` (the pretraining head's) have the shapes of the model's head weights."""
  return [tuple(w.shape) for w in model.head.weights] == [w.shape for w in weights]


def _load_head(model: tf_keras.Model, weights) -> None:
  """The pretraining head's weights into the trial's head, whose shapes must be the same."""
  if not _head_fits(model, weights):
    shapes = [tuple(w.shape) for w in model.head.weights]
    raise ValueError('CpuProxy.pretrained_head = True needs the pretraining head: '
                     'build_retinanet.head_num_convs = 4 and head_num_filters = '
                     'CpuProxyCache.pretrain_filters (the head has weights of shapes '
                     f'{shapes}, the cached one {[w.shape for w in weights]}).')
  model.head.set_weights(weights)
