"""`build_retinanet`: the one gin configurable that describes a whole model."""
from typing import Optional, Sequence

import gin

from nasfpn_tf.models.retinanet import RetinaNet


@gin.configurable
def build_retinanet(image_size: Sequence[int] = (640, 640),
                    num_classes: int = 91,
                    backbone: str = 'resnet50',
                    min_level: int = 3,
                    max_level: int = 7,
                    block_specs='nasfpn',
                    num_filters: int = 256,
                    num_repeats: int = 7,
                    use_separable_conv: bool = False,
                    dropblock_keep_prob: Optional[float] = None,
                    dropblock_size: int = 3,
                    dropblock_ramp_steps: int = 0,
                    head_num_convs: int = 4,
                    head_num_filters: int = 256,
                    head_use_separable_conv: bool = False,
                    anchor_num_scales: int = 3,
                    anchor_aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                    anchor_size: float = 4.0,
                    pre_nms_top_k: int = 1000,
                    pre_nms_score_threshold: float = 0.05,
                    nms_iou_threshold: float = 0.5,
                    max_detections: int = 100,
                    activation: str = 'relu',
                    use_sync_bn: bool = False,
                    norm_momentum: float = 0.99,
                    norm_epsilon: float = 1e-3,
                    l2_weight_decay: float = 0.0) -> RetinaNet:
  """A `RetinaNet` from gin bindings `build_retinanet.<argument>` (see RetinaNet for each).

  The signature repeats RetinaNet's, argument for argument (a test keeps them equal), because gin
  only checks binding names against explicit parameters: a misspelled binding must fail, not
  vanish into **kwargs. The model's config holds every argument, so a saved model rebuilds
  without gin.
  """
  return RetinaNet(**locals())
