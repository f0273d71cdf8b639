"""Our NAS-FPN as a TF Model Garden (`official.vision`) decoder, for TFM's own detectors.

Importing this module registers the decoder type 'nasfpn_tf' in TFM's decoder factory
(`official.vision.modeling.decoders.factory.build_decoder`), so TFM's RetinaNet, Faster / Mask
R-CNN and Cascade R-CNN builders (`official.vision.modeling.factory`) build with our pyramid
(`nasfpn_tf.decoders.NASFPN`) and any of our block-spec tables, and TFM's tasks train it.

TFM's decoder config is a oneof (`official.vision.configs.decoders.Decoder`) whose fields are
fixed, so `Decoder` here extends it with a `nasfpn_tf` field (`NasfpnTfDecoder`);
`use_nasfpn_tf_decoder(config, ...)` puts it into an experiment or model config. Three TFM
experiments come with it (`exp_factory.get_exp_config(name)`, or TFM's train.py
`--experiment=name`): TFM's COCO ResNet-50 RetinaNet, Mask R-CNN and a Cascade R-CNN (TFM's
cascade settings of `cascadercnn_spinenet_coco`: two more stages at IoU 0.6 and 0.7,
class-agnostic boxes, class ensemble) on TFM's ResNet-50, each with our pyramid on P3-P7.
"""
import dataclasses
import json
from typing import Mapping, Optional

import tensorflow as tf
import tf_keras
from official.core import config_definitions as cfg
from official.core import exp_factory
from official.modeling import hyperparams
from official.vision.configs import decoders as tfm_decoders
from official.vision.modeling.decoders import factory

from nasfpn_tf.decoders import block_specs as specs_lib
from nasfpn_tf.decoders.nasfpn import NASFPN

DECODER_TYPE = 'nasfpn_tf'
# TFM experiment name -> (the TFM experiment it starts from, whether it is a Cascade R-CNN).
EXPERIMENTS = {
    'retinanet_resnet_nasfpn_tf_coco': ('retinanet_resnetfpn_coco', False),
    'maskrcnn_resnet_nasfpn_tf_coco': ('maskrcnn_resnetfpn_coco', False),
    'cascadercnn_resnet_nasfpn_tf_coco': ('maskrcnn_resnetfpn_coco', True),
}
_FIELD = 'task.model.decoder.nasfpn_tf'


@dataclasses.dataclass
class NasfpnTfDecoder(hyperparams.Config):
  """Our pyramid's settings in a TFM config (the rest comes from TFM's model config: min_level,
  max_level and norm_activation; the L2 regularizer from its losses).

  block_specs: a name in `nasfpn_tf.decoders.block_specs.SPECS` ('nasfpn', 'nasfpn_lite',
  'fpn') or the rows as JSON, e.g. a search's best architecture:
  '[[4, "global_pooling", [1, 3], false], ...]' (level, op, inputs, is_output).
  merge_filters: the width cells merge at (0: num_filters, as the paper).
  """
  block_specs: str = 'nasfpn'
  num_filters: int = 256
  num_repeats: int = 7
  merge_filters: int = 0
  use_separable_conv: bool = False


@dataclasses.dataclass
class Decoder(tfm_decoders.Decoder):
  """TFM's decoder oneof with our pyramid as one more choice: type 'nasfpn_tf'."""
  nasfpn_tf: NasfpnTfDecoder = dataclasses.field(default_factory=NasfpnTfDecoder)


def block_specs_of(config: NasfpnTfDecoder, min_level: int, max_level: int):
  """The cells `config.block_specs` names, checked for levels min..max; ValueError naming the
  config field otherwise."""
  value = config.block_specs
  try:
    if value.lstrip().startswith('['):
      value = json.loads(value)
    specs = specs_lib.resolve(value, min_level, max_level)
    specs_lib.validate(specs, min_level, max_level)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f'{_FIELD}.block_specs = {config.block_specs!r} (model levels '
                     f'{min_level}..{max_level}): {e}') from None
  return specs


@factory.register_decoder_builder(DECODER_TYPE)
def build_nasfpn_tf_decoder(
    input_specs: Mapping[str, tf.TensorShape],
    model_config: hyperparams.Config,
    l2_regularizer: Optional[tf_keras.regularizers.Regularizer] = None) -> NASFPN:
  """Our `NASFPN` for a TFM model config whose decoder is `Decoder(type='nasfpn_tf')`, on the
  backbone levels from model_config.min_level up (levels below it, e.g. ResNet's C2, are not
  read; levels above the backbone's are max-pooled)."""
  if model_config.decoder.type != DECODER_TYPE:
    raise ValueError(f'task.model.decoder.type is {model_config.decoder.type!r}, not '
                     f'{DECODER_TYPE!r}.')
  config = model_config.decoder.get()
  min_level, max_level = model_config.min_level, model_config.max_level
  specs = block_specs_of(config, min_level, max_level)
  for name in ('num_filters', 'num_repeats'):
    if getattr(config, name) < 1:
      raise ValueError(f'{_FIELD}.{name} = {getattr(config, name)} must be >= 1.')
  if config.merge_filters < 0:
    raise ValueError(f'{_FIELD}.merge_filters = {config.merge_filters} must be >= 0 (0: '
                     'num_filters).')
  levels = {level: shape for level, shape in input_specs.items()
            if min_level <= int(level) <= max_level}
  norm = model_config.norm_activation
  return NASFPN(input_specs=levels, min_level=min_level, max_level=max_level,
                block_specs=specs, num_filters=config.num_filters,
                num_repeats=config.num_repeats, merge_filters=config.merge_filters or None,
                use_separable_conv=config.use_separable_conv, activation=norm.activation,
                use_sync_bn=norm.use_sync_bn, norm_momentum=norm.norm_momentum,
                norm_epsilon=norm.norm_epsilon, kernel_regularizer=l2_regularizer)


def use_nasfpn_tf_decoder(config: hyperparams.Config, **settings) -> hyperparams.Config:
  """Puts our pyramid (`NasfpnTfDecoder(**settings)`) into a TFM experiment config (at
  task.model.decoder) or model config (at .decoder), in place; returns `config`."""
  model = config.task.model if isinstance(config, cfg.ExperimentConfig) else config
  unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(NasfpnTfDecoder)})
  if unknown:
    raise ValueError(f'{unknown}: no such {_FIELD} setting; settings: '
                     f'{[f.name for f in dataclasses.fields(NasfpnTfDecoder)]}.')
  model.decoder = Decoder(type=DECODER_TYPE, nasfpn_tf=NasfpnTfDecoder(**settings))
  return config


def _experiment(base: str, cascade: bool):
  def factory_fn() -> cfg.ExperimentConfig:
    config = exp_factory.get_exp_config(base)
    model = config.task.model
    model.min_level, model.max_level = 3, 7
    if cascade:
      model.roi_sampler.cascade_iou_thresholds = [0.6, 0.7]
      model.detection_head.class_agnostic_bbox_pred = True
      model.detection_head.cascade_class_ensemble = True
    return use_nasfpn_tf_decoder(config, block_specs='nasfpn', num_filters=256, num_repeats=7)
  return factory_fn


for _name, (_base, _cascade) in EXPERIMENTS.items():
  exp_factory.register_config_factory(_name)(_experiment(_base, _cascade))
