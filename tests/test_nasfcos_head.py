"""The NAS-FCOS head: its spec table, NASFCOSHead's weights and outputs, its space, the detector."""
import numpy as np
import pytest
import tensorflow as tf

from nasfpn_tf.decoders import nasfcos_specs as specs_lib
from nasfpn_tf.models.nasfcos_head import NASFCOSHead
from nasfpn_tf.search.nasfcos_space import SPACES, NASFCOSHeadSpace

F = 32           # filters; GroupNorm takes 32 groups
CLASSES = 5
LEVELS = (3, 4, 5)


def features(seed=0):
  rng = np.random.default_rng(seed)
  return {str(level): tf.constant(rng.normal(size=[1, 32 // 2**(level - 3),
                                                   32 // 2**(level - 3), F]), tf.float32)
          for level in LEVELS}


# Weights of one op by hand: conv kernel (+ bias, + offset conv for DCNv2 with 2 groups:
# 3 * 2 * 9 = 54 channels) + GroupNorm's gamma and beta.
OP_PARAMS = {'conv_1x1': F * F + 2 * F, 'conv_3x3': 9 * F * F + 2 * F,
             'sep_conv_3x3': 9 * F + F * F + 2 * F, 'sep_conv_3x3_dil3': 9 * F + F * F + 2 * F,
             'skip': 0, 'deform_conv_3x3': 9 * F * F + F + 9 * F * 54 + 54 + 2 * F}
# Predictors (3x3 convs with bias: classes, 4 distances, centerness) and a scale per level.
PREDICTOR_PARAMS = (9 * F + 1) * (CLASSES + 4 + 1) + len(LEVELS)


def count(head):
  return sum(w.shape.num_elements() for w in {id(w): w for w in head.weights}.values())


def test_published_head_table_and_weights():
  assert specs_lib.NASFCOS_HEAD.ops == ('deform_conv_3x3', 'conv_3x3', 'deform_conv_3x3',
                                        'conv_1x1', 'skip', 'skip')
  assert specs_lib.NASFCOS_HEAD.unshared == 0
  head = NASFCOSHead(3, 5, CLASSES, num_filters=F)
  outputs = head(features())
  for level in LEVELS:
    size = 32 // 2**(level - 3)
    assert [o[str(level)].shape.as_list() for o in outputs] == [
        [1, size, size, CLASSES], [1, size, size, 4], [1, size, size, 1]]
  tower = sum(OP_PARAMS[op] for op in specs_lib.NASFCOS_HEAD.ops)
  assert count(head) == 2 * tower + PREDICTOR_PARAMS
  clone = NASFCOSHead.from_config(head.get_config())
  clone(features())
  clone.set_weights(head.get_weights())
  for a, b in zip(clone(features(1)), head(features(1))):
    for level in a:
      np.testing.assert_allclose(a[level].numpy(), b[level].numpy(), atol=1e-5)


def test_unshared_layers_have_a_copy_per_level():
  spec = (['conv_3x3', 'skip', 'sep_conv_3x3_dil3', 'conv_1x1', 'skip', 'conv_3x3'], 3)
  head = NASFCOSHead(3, 5, CLASSES, head_spec=spec, num_filters=F)
  head(features())
  unshared = sum(OP_PARAMS[op] for op in spec[0][:3])
  shared = sum(OP_PARAMS[op] for op in spec[0][3:])
  assert count(head) == 2 * (len(LEVELS) * unshared + shared) + PREDICTOR_PARAMS
  # Levels differ only through their own leading layers: P3's copy is not P4's.
  names = {w.name for w in head.weights}
  assert any('classnet-p3-0_conv_3x3' in n for n in names)
  assert any('classnet-p4-0_conv_3x3' in n for n in names)


def test_bad_head_specs_name_the_layer():
  with pytest.raises(ValueError, match="head layer 2: unknown op 'deform_5x5'"):
    NASFCOSHead(3, 5, CLASSES, head_spec=(['skip', 'skip', 'deform_5x5'], 0), num_filters=F)
  with pytest.raises(ValueError, match='unshared=4 is outside 0..3'):
    NASFCOSHead(3, 5, CLASSES, head_spec=(['skip'] * 3, 4), num_filters=F)
  with pytest.raises(ValueError, match="Unknown NAS-FCOS head spec 'fcos'"):
    specs_lib.resolve_head('fcos')


def test_head_space():
  space = SPACES['nasfcos_head']()
  assert space.encode('nasfcos_head') == (0, 5, 1, 5, 0, 4, 4)  # the authors' config
  assert space.decode(space.encode('nasfcos_head')) == specs_lib.NASFCOS_HEAD
  assert space.size() == 7 * 6**6
  assert NASFCOSHeadSpace.from_config(space.config()) == space
  assert not space.contains((['skip'] * 5, 0))
  # Per-level copies of weightless layers change nothing.
  assert space.key((['conv_1x1', 'skip'] + ['skip'] * 4, 2)) == space.key(
      (['conv_1x1', 'skip'] + ['skip'] * 4, 1))
  assert space.key((['conv_1x1'] * 6, 2)) != space.key((['conv_1x1'] * 6, 1))


@pytest.mark.parametrize('seed', [0, 1])
def test_head_space_samples_build(seed):
  space = NASFCOSHeadSpace()
  spec = space.sample(np.random.default_rng(seed))
  assert space.decode(space.encode(spec)) == spec
  head = NASFCOSHead(3, 5, CLASSES, head_spec=spec, num_filters=F)
  outputs = head(features(seed))
  assert all(np.isfinite(o[level].numpy()).all() for o in outputs for level in o)
  tower = lambda level_ops: sum(OP_PARAMS[op] for op in level_ops)  # noqa: E731
  assert count(head) == 2 * (len(LEVELS) * tower(spec.ops[:spec.unshared])
                             + tower(spec.ops[spec.unshared:])) + PREDICTOR_PARAMS


# ---------------------------------------------------------------- NAS-FCOS in the detector

def test_fcos_with_nasfcos_pyramid_and_head():
  """build_retinanet(detector='fcos', decoder='nasfcos_fpn', fcos_head_spec=...) builds the
  published pyramid and head; its config round-trips; a RetinaNet's config is unchanged."""
  from nasfpn_tf.decoders.nasfcos_fpn import NASFCOSFPN  # pylint: disable=import-outside-toplevel
  from nasfpn_tf.models.factory import MODEL_ARGUMENTS  # pylint: disable=import-outside-toplevel
  from nasfpn_tf.models.retinanet import RetinaNet  # pylint: disable=import-outside-toplevel
  tiny = dict(image_size=(128, 128), num_classes=CLASSES, backbone='resnet10', num_filters=F,
              head_num_filters=F, max_detections=5)
  model = RetinaNet(**tiny, detector='fcos', decoder='nasfcos_fpn', fcos_head_spec='nasfcos_head')
  assert isinstance(model.decoder, NASFCOSFPN) and isinstance(model.head, NASFCOSHead)
  assert model.decoder.block_specs == specs_lib.NASFCOS_FPN
  assert count(model.head) == 2 * sum(OP_PARAMS[op] for op in specs_lib.NASFCOS_HEAD.ops) + (
      (9 * F + 1) * (CLASSES + 4 + 1) + 5)
  config = model.get_config()
  assert config['decoder'] == 'nasfcos_fpn' and config['block_specs'] == 'nasfcos_fpn'
  assert RetinaNet.from_config(config).get_config() == config
  images = tf.random.uniform([1, 128, 128, 3], 0, 255)
  outputs = model(images, training=False)
  assert outputs['centerness_outputs']['7'].shape.as_list() == [1, 1, 1, 1]
  assert model.detect(images)['detection_boxes'].shape.as_list() == [1, 5, 4]
  # Rows and head specs as data are recorded as data.
  rows = specs_lib.to_config(specs_lib.NASFCOS_FPN)
  rows[2][2] = 'weighted_sum'
  other = RetinaNet(**tiny, detector='fcos', decoder='nasfcos_fpn', block_specs=rows,
                    fcos_head_spec=(['conv_3x3', 'skip'], 1))
  assert other.get_config()['block_specs'] == rows
  assert other.get_config()['fcos_head_spec'] == [['conv_3x3', 'skip'], 1]
  assert 'decoder' not in RetinaNet(**tiny, num_repeats=1).get_config()
  assert {'decoder', 'fcos_head_spec'} <= set(MODEL_ARGUMENTS)  # gin bindings


@pytest.mark.parametrize('arguments, match', [
    (dict(decoder='nasfcos'), r"build_retinanet.decoder = 'nasfcos' is not one of"),
    (dict(fcos_head_spec='nasfcos_head'), 'fcos_head_spec only applies with'),
    (dict(decoder='nasfcos_fpn', anytime=True), 'anytime needs build_retinanet.decoder'),
])
def test_bad_nasfcos_bindings_are_named(arguments, match):
  from nasfpn_tf.models.retinanet import RetinaNet  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=match):
    RetinaNet(image_size=(128, 128), num_classes=CLASSES, backbone='resnet10', num_filters=F,
              **arguments)
