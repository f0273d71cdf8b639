"""RetinaNet around the pyramid: geometry, backbones, head, losses, post-processing, gin factory."""
from nasfpn_tf.models.backbones import BACKBONES, ImageNormalization, build_backbone
from nasfpn_tf.models.factory import build_retinanet
from nasfpn_tf.models.geometry import ModelGeometry
from nasfpn_tf.models.head import RetinaNetHead
from nasfpn_tf.models.losses import RetinaNetLoss
from nasfpn_tf.models.postprocess import DetectionGenerator
from nasfpn_tf.models.retinanet import RetinaNet
