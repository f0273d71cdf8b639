"""Model gin files: every one parses, the cheap ones build with the right outputs; errors name
the file or binding at fault."""

import gin
import pytest
import tensorflow as tf

from nasfpn_tf.config import GIN_CONFIGS_DIR
from nasfpn_tf.models import build_retinanet
# The parse that knows every name: gin_configs/ holds the search's proxy configs too.
from nasfpn_tf.search.configurables import parse_gin

MODEL_FILES = sorted(p.name for p in GIN_CONFIGS_DIR.glob('*.gin')
                     if 'build_retinanet.' in p.read_text())
CHEAP = {  # file: (image size, levels)
    'demo.gin': (256, range(3, 8)),
    'nasfpn_lite_mnv2_3x48_320.gin': (320, range(3, 7)),
    'nasfpn_lite_mnv2_7x64_320.gin': (320, range(3, 7)),
    'fpnlite_mnv2_64_320.gin': (320, range(3, 7)),
}


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  gin.clear_config()


def test_every_table1_file_is_there():
  assert set(CHEAP) | {
      'nasfpn_r50_7x256_640.gin', 'nasfpn_r50_7x256_1024.gin', 'nasfpn_r50_7x256_1280.gin',
      'nasfpn_r50_7x384_1280_dropblock.gin', 'fpn_r50_256_640.gin', 'nasfpn_mnv2_640.gin',
      'fpn_r101_256_640.gin', 'fpn_r50_256_1024.gin', 'fpn_r101_256_1024.gin',
      'fpn_amoebanet_256_1280.gin', 'nasfpn_amoebanet_7x384_1280.gin',
      'nasfpn_amoebanet_7x384_1280_dropblock.gin',
      'search_proxy_r10_3x256_512.gin'} <= set(MODEL_FILES)


@pytest.mark.parametrize('name', MODEL_FILES)
def test_parses(name):
  path = GIN_CONFIGS_DIR / name
  parse_gin([str(path)])
  if 'build_retinanet.image_size' in path.read_text():  # a whole model, not a fragment
    size = gin.query_parameter('build_retinanet.image_size')
    assert all(s % 2**gin.query_parameter('build_retinanet.max_level') == 0 for s in size)


@pytest.mark.parametrize('name', sorted(CHEAP))
def test_cheap_models_build_and_run(name):
  size, levels = CHEAP[name]
  parse_gin([str(GIN_CONFIGS_DIR / name)])
  model = build_retinanet()
  num_classes = model.get_config()['num_classes']
  outputs = model(tf.zeros([1, size, size, 3]), training=False)
  assert sorted(outputs['cls_outputs'], key=int) == [str(l) for l in levels]
  for level in levels:
    side = size // 2**level
    assert outputs['cls_outputs'][str(level)].shape == [1, side, side, 9 * num_classes]
    assert outputs['box_outputs'][str(level)].shape == [1, side, side, 9 * 4]


def test_nasfpn_r50_7x256_640_has_tfm_param_count():
  """Table 1's first row: 60.3M in the paper, 60,178,967 in TF Model Garden."""
  parse_gin([str(GIN_CONFIGS_DIR / 'nasfpn_r50_7x256_640.gin')])
  assert build_retinanet().count_params() == 60_178_967


def test_bindings_override_files():
  parse_gin([str(GIN_CONFIGS_DIR / 'demo.gin')], ['build_retinanet.num_repeats = 1'])
  assert gin.query_parameter('build_retinanet.num_repeats') == 1
  assert gin.query_parameter('build_retinanet.backbone') == 'resnet10'


def test_misspelled_binding_is_named():
  with pytest.raises(ValueError, match="gin binding 'build_retinanet.num_filtres = 32'"):
    parse_gin([str(GIN_CONFIGS_DIR / 'demo.gin')], ['build_retinanet.num_filtres = 32'])


def test_bad_file_is_named(tmp_path):
  bad = tmp_path / 'bad.gin'
  bad.write_text('import nasfpn_tf.models.factory\nbuild_retinanet.num_repeat = 3\n')
  with pytest.raises(ValueError, match=f"gin file '{bad}'.*num_repeat"):
    parse_gin([str(bad)])


def test_missing_file_is_named_and_short_names_resolve():
  with pytest.raises(ValueError, match="gin file 'nope.gin' not found"):
    parse_gin(['nope.gin'])
  parse_gin(['demo.gin'])
  assert gin.query_parameter('build_retinanet.num_classes') == 10
