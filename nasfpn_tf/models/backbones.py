"""Backbones by name (TF Model Garden's), trimmed to the features the pyramid reads.

Input convention: RetinaNet takes raw RGB pixels in [0, 255] (float) and normalizes them itself with
`ImageNormalization` (`geometry.normalize_pixels`: ImageNet mean/std, as TFM's RetinaNet input
pipeline does outside its model), so an exported model needs no preprocessing beyond
resizing/padding. TFM backbones normalize nothing themselves.
"""
from typing import Sequence

import tensorflow as tf
import tf_keras
from official.vision.modeling.backbones import mobilenet, resnet

from nasfpn_tf.models import amoebanet, geometry

PYRAMID_INPUT_LEVELS = ('3', '4', '5')

_RESNETS = {'resnet10': 10, 'resnet18': 18, 'resnet34': 34, 'resnet50': 50, 'resnet101': 101,
            'resnet152': 152}
_MOBILENETS = {'mobilenetv2': 'MobileNetV2', 'mobilenetv3large': 'MobileNetV3Large',
               'mobilenetv3small': 'MobileNetV3Small'}
# Our own tf_keras AmoebaNet-D (nasfpn_tf.models.amoebanet), by name -> its size: N normal cells
# per stack (num_cells = 3N), F filters. The NAS-FPN paper gives neither, and its two AmoebaNet
# rows imply backbones of different sizes (docs/results.md, "The AmoebaNet rows"): N=5, F=256 (the
# authors' ImageNet flags have N=4) meets FPN AmoebaNet's FLOPs within 1%; N=6, F=224 puts
# NAS-FPN AmoebaNet's params and FLOPs both within 3.5% (experiments/model_table.py).
_AMOEBANETS = {'amoebanet_d': dict(num_cells=15, reduction_size=256),
               'amoebanet_d_n6_f224': dict(num_cells=18, reduction_size=224)}
BACKBONES = tuple(_RESNETS) + tuple(_MOBILENETS) + tuple(_AMOEBANETS)


@tf_keras.utils.register_keras_serializable(package='nasfpn_tf')
class ImageNormalization(tf_keras.layers.Layer):
  """(pixels - mean) / stddev per channel, so the model takes raw [0, 255] RGB images.

  Inside the model rather than in the input pipeline, so that training, evaluation and an
  exported SavedModel/TFLite file all see the same convention. The output is in the compute
  dtype (mixed precision).
  """

  def __init__(self, mean: Sequence[float] = geometry.IMAGENET_MEAN_RGB,
               stddev: Sequence[float] = geometry.IMAGENET_STDDEV_RGB, **kwargs):
    super().__init__(**kwargs)
    self.mean = [float(m) for m in mean]
    self.stddev = [float(s) for s in stddev]

  def call(self, images):
    return tf.cast(geometry.normalize_pixels(images, self.mean, self.stddev), self.compute_dtype)

  def get_config(self):
    return {**super().get_config(), 'mean': self.mean, 'stddev': self.stddev}


def build_backbone(name: str, input_shape: Sequence[int], use_sync_bn: bool = False,
                   norm_momentum: float = 0.99, norm_epsilon: float = 1e-3,
                   kernel_regularizer=None) -> tf_keras.Model:
  """A backbone by `name` (see `BACKBONES`), returning {'3': C3, '4': C4, '5': C5}.

  `input_shape` is [height, width, 3] or [batch, height, width, 3]. TFM builds layers the
  pyramid never reads (MobileNetV2's final 1x1 conv to 1280 channels, 410k params); re-wrapping
  the functional graph on levels 3..5 drops them from params, FLOPs and run time. The layers
  are TFM's own, so `training` reaches their batch norms and TFM checkpoints still match by
  layer. The model gets an `output_specs` {level: TensorShape} like TFM backbones. AmoebaNet-D
  is ours (`amoebanet.build_amoebanet_d`), built on C3-C5 only.
  """
  shape = list(input_shape)
  if len(shape) == 3:
    shape = [None] + shape
  input_specs = tf_keras.layers.InputSpec(shape=shape)
  norm = dict(use_sync_bn=use_sync_bn, norm_momentum=norm_momentum, norm_epsilon=norm_epsilon,
              kernel_regularizer=kernel_regularizer)
  key = name.lower()
  if key in _AMOEBANETS:
    return amoebanet.build_amoebanet_d(shape, name=key, **_AMOEBANETS[key], **norm)
  if key in _RESNETS:
    full = resnet.ResNet(model_id=_RESNETS[key], input_specs=input_specs, **norm)
  elif key in _MOBILENETS:
    full = mobilenet.MobileNet(model_id=_MOBILENETS[key], input_specs=input_specs, **norm)
  else:
    raise ValueError(f'Unknown backbone {name!r} (gin: build_retinanet.backbone); known: '
                     f'{list(BACKBONES)}.')
  trimmed = tf_keras.Model(full.inputs, {k: full.output[k] for k in PYRAMID_INPUT_LEVELS},
                           name=f'{key}_c3_c5')
  trimmed.output_specs = {k: full.output_specs[k] for k in PYRAMID_INPUT_LEVELS}
  return trimmed
