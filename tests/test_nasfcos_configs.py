"""The NAS-FCOS gin files (gin_configs/nasfcos_*_1152x896.gin, fcos_fpn_r50_256_1152x896.gin):
what they bind, that each builds (at a small size: params do not depend on it) with the params
of a count by hand, and the paper's 1088x800, which the detector refuses by name and the
pyramid alone takes with the released code's ceil sizes. The R-101 file is the R-50 one with
another backbone, so only that is checked here (building R-101 costs 10-25 s);
experiments/nasfcos_table.py builds every file at its real size."""

import gin
import pytest
import tf_keras

from nasfpn_tf.config import GIN_CONFIGS_DIR
from nasfpn_tf.decoders.nasfcos_fpn import NASFCOSFPN
from nasfpn_tf.models import build_retinanet
from nasfpn_tf.search.configurables import parse_gin

FILES = {  # file: (backbone C3-C5 channels, decoder, head spec)
    'nasfcos_r50_256_1152x896.gin': ((512, 1024, 2048), 'nasfcos_fpn', None),
    'nasfcos_r101_256_1152x896.gin': ((512, 1024, 2048), 'nasfcos_fpn', None),
    'nasfcos_mnv2_256_1152x896.gin': ((32, 96, 320), 'nasfcos_fpn', None),
    'nasfcos_head_r50_256_1152x896.gin': ((512, 1024, 2048), 'nasfcos_fpn', 'nasfcos_head'),
    'fcos_fpn_r50_256_1152x896.gin': ((512, 1024, 2048), 'nasfpn', None),
}
WIDTH, CLASSES, SIDE = 256, 91, 128


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def _conv(cin, cout, k, bias=True):
  return cin * cout * k * k + (cout if bias else 0)


def _pyramid_by_hand(channels, w):
  """Trainable weights of the published pyramid: adapt C3-C5 (1x1, BN), 12 deformable 3x3 (with
  bias, a 3x3 conv to 2 groups x 27 offsets and masks, BN), 7 concats (BN on 2w, grouped 1x1),
  P6 and P7 (3x3 stride 2, bias)."""
  deformable = _conv(w, w, 3) + _conv(w, 2 * 27, 3) + 2 * w
  return (sum(_conv(c, w, 1, False) + 2 * w for c in channels) + 12 * deformable
          + 7 * (2 * 2 * w + 2 * w) + 2 * _conv(w, w, 3))


def _head_by_hand(w, spec):
  """FCOS's towers (4 x conv 3x3 with bias + GroupNorm) or the published head's (deformable,
  conv 3x3, deformable, conv 1x1, each + GroupNorm), twice, + the predictors and 5 scales."""
  if spec is None:
    tower = 4 * (_conv(w, w, 3) + 2 * w)
  else:
    deformable = _conv(w, w, 3) + _conv(w, 2 * 27, 3)
    tower = 2 * deformable + _conv(w, w, 3, False) + _conv(w, w, 1, False) + 4 * 2 * w
  return 2 * tower + _conv(w, CLASSES, 3) + _conv(w, 4, 3) + _conv(w, 1, 3) + 5


def _trainable(layer):
  return sum(w.shape.num_elements() for w in layer.trainable_weights)


@pytest.mark.parametrize('name', sorted(FILES))
def test_binds_the_released_settings(name):
  parse_gin([str(GIN_CONFIGS_DIR / name)])
  query = lambda p: gin.query_parameter(f'build_retinanet.{p}')  # noqa: E731
  channels, decoder, spec = FILES[name]
  assert tuple(query('image_size')) == (896, 1152)  # 1088x800 padded to multiples of 128
  assert (query('detector'), query('decoder'), query('num_filters')) == ('fcos', decoder, WIDTH)
  assert (query('fcos_center_sampling_radius'), query('fcos_centerness_on_reg'),
          query('nms_iou_threshold')) == (0.0, False, 0.6)
  if spec is not None:
    assert query('fcos_head_spec') == spec


def test_r101_is_the_r50_file_with_resnet101():
  r50, r101 = (GIN_CONFIGS_DIR / f'nasfcos_{b}_256_1152x896.gin' for b in ('r50', 'r101'))
  bindings = [line for line in r101.read_text().splitlines()
              if line.strip() and not line.startswith('#')]
  assert bindings == [f"include '{r50.name}'", "build_retinanet.backbone = 'resnet101'"]


@pytest.mark.parametrize('name', sorted(set(FILES) - {'nasfcos_r101_256_1152x896.gin'}))
def test_builds_with_params_by_hand(name):
  channels, decoder, spec = FILES[name]
  parse_gin([str(GIN_CONFIGS_DIR / name)], [f'build_retinanet.image_size = ({SIDE}, {SIDE})'])
  model = build_retinanet()
  assert _trainable(model.head) == _head_by_hand(WIDTH, spec)
  if decoder == 'nasfcos_fpn':
    assert _trainable(model.decoder) == _pyramid_by_hand(channels, WIDTH)
  else:  # the regular FPN as NAS-FPN cells: the figure docs/nasfcos.md gives
    assert model.count_params() == 32_384_037
  outputs = model.output  # the shapes the layers give, without running them
  for level in range(3, 8):
    side = SIDE // 2**level
    assert outputs['cls_outputs'][str(level)].shape[1:] == [side, side, CLASSES]
    assert outputs['centerness_outputs'][str(level)].shape[1:] == [side, side, 1]


def test_paper_size_is_refused_by_name():
  with pytest.raises(ValueError, match=r'build_retinanet\.image_size.*\[896, 1152\]'):
    build_retinanet(image_size=(800, 1088), detector='fcos', decoder='nasfcos_fpn')


def test_pyramid_takes_the_paper_size_with_ceil_sizes():
  """800x1088 as the released code runs it (padded to 32 only): P6 and P7 are ceil(25 / 2) x
  ceil(34 / 2) = 13 x 17 and 7 x 9, as its 3x3 stride-2 convs with padding 1 give."""
  shapes = {'3': (100, 136, 8), '4': (50, 68, 8), '5': (25, 34, 8)}
  pyramid = NASFCOSFPN(
      {level: [1, *shape] for level, shape in shapes.items()}, num_filters=16)
  sizes = {level: tuple(shape[1:3]) for level, shape in pyramid.output_specs.items()}
  assert sizes == {'3': (100, 136), '4': (50, 68), '5': (25, 34), '6': (13, 17), '7': (7, 9)}
  tf_keras.backend.clear_session()
