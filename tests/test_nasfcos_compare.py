"""experiments/nasfcos_compare.py: what it trains with which bindings and seeds, its rows, summary
and plot (training, costs and latency stubbed), bad --search_dirs named, and the real models
its bindings build from fcos_demo.gin."""
import pathlib

import numpy as np
import pytest

from nasfpn_tf import config
from nasfpn_tf.decoders import block_specs as block_specs_lib
from nasfpn_tf.decoders import nasfcos_specs
from nasfpn_tf.decoders.nasfcos_fpn import NASFCOSFPN
from nasfpn_tf.models import factory
from nasfpn_tf.models.fcos_head import FCOSHead
from nasfpn_tf.models.nasfcos_head import NASFCOSHead
from nasfpn_tf.search import runner
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.search.journal import Journal
from nasfpn_tf.search.nasfcos_space import NASFCOSFPNSpace, NASFCOSHeadSpace
from nasfpn_tf.search.space import SearchSpace
from training_helpers import (load_experiment, plotted_lines, read_png, run_synthetic_search,
                              saved_figures)

nasfcos_compare = load_experiment('nasfcos_compare')


@pytest.fixture(scope='module')
def searches(tmp_path_factory):
  """A pyramid search and a head search on its best pyramid (progressive), on the synthetic
  proxy; {space name: search dir}."""
  root = tmp_path_factory.mktemp('searches')
  dirs = {}
  pyramid_space = NASFCOSFPNSpace(read_c2=False)
  for space in (pyramid_space, None):
    if space is None:  # the head on the pyramid search's best, as --fixed_pyramid does
      records = Journal(pathlib.Path(dirs['nasfcos_fpn'], search_dir_lib.TRIALS_FILE)).read()
      best = max(records, key=lambda r: r['reward'])
      space = NASFCOSHeadSpace(pyramid=nasfcos_specs.resolve(best['block_specs']))
    dirs[space.NAME] = run_synthetic_search(root / space.NAME, 'random', 4, space,
                                            seed=1).search_dir
  return dirs


def test_each_architecture_with_its_bindings_and_every_seed_then_rows_summary_and_plot(
    tmp_path, monkeypatch, searches):
  ap_of = {'fcos_fpn': 0.30, 'nasfcos': 0.36, 'searched_pyramid': 0.33, 'searched_head': 0.40}
  trained, timed = [], []

  def train_and_evaluate(model_dir, bindings, seed, gin_file):
    name = model_dir.name.rsplit('_seed', 1)[0]
    trained.append((name, seed, bindings, gin_file))
    return {'AP': ap_of[name] + 0.01 * seed, 'AP50': 0.9, 'step': 1}

  def latencies_ms(model_dirs, runs):
    timed.append(({name: d.name for name, d in model_dirs.items()}, runs))
    return {name: 10.0 * (i + 1) for i, name in enumerate(model_dirs)}

  monkeypatch.setattr(nasfcos_compare.demo_runs, 'synthetic_records',
                      lambda *args: {'train': 't', 'val': 'v'})
  monkeypatch.setattr(nasfcos_compare.demo_runs, 'train_and_evaluate', train_and_evaluate)
  monkeypatch.setattr(nasfcos_compare, 'model_cost', lambda model_dir: {
      'flops': len(model_dir.name), 'params': 2 * len(model_dir.name)})
  monkeypatch.setattr(nasfcos_compare, 'latencies_ms', latencies_ms)
  rows = nasfcos_compare.run(tmp_path, [0, 1],
                             search_dirs=[searches['nasfcos_fpn'], searches['nasfcos_head']],
                             train_steps=7, latency_runs=5)
  names = ['fcos_fpn', 'nasfcos', 'searched_pyramid', 'searched_head']
  # Seeds outermost, every architecture with every seed, each on fcos_demo.gin.
  assert [(name, seed) for name, seed, _, _ in trained] == [(n, s) for s in (0, 1) for n in names]
  assert {gin_file for *_, gin_file in trained} == {'fcos_demo.gin'}
  common = trained[0][2][:-2]  # the records and the train_steps bindings, then the model's
  assert "build_train_dataset.file_pattern = 't'" in common and 'TRAIN_STEPS = 7' in common
  best_gin = {name: (pathlib.Path(searches[space]) / search_dir_lib.BEST_GIN).read_text()
              for space, name in nasfcos_compare.SEARCHED_NAMES.items()}
  expected = {'fcos_fpn': ["build_retinanet.block_specs = 'fpn'",
                           'build_retinanet.num_repeats = 1'],
              'nasfcos': ["build_retinanet.decoder = 'nasfcos_fpn'",
                          "build_retinanet.block_specs = 'nasfcos_fpn'",
                          "build_retinanet.fcos_head_spec = 'nasfcos_head'"],
              'searched_pyramid': [best_gin['searched_pyramid']],
              'searched_head': [best_gin['searched_head']]}
  for name, _, bindings, _ in trained:
    assert bindings == common + expected[name], name
  assert "fcos_head_spec" in best_gin['searched_head']
  assert "fcos_head_spec" not in best_gin['searched_pyramid']
  # Costs and latency of each architecture's first-seed model, the latencies in one call.
  assert timed == [({n: f'{n}_seed0' for n in names}, 5)]
  assert rows[5] == {'name': 'nasfcos', 'seed': 1, 'AP': pytest.approx(0.37), 'AP50': 0.9,
                     'flops': len('nasfcos_seed0'), 'params': 2 * len('nasfcos_seed0'),
                     'latency_ms': 20.0}
  result = nasfcos_compare.summary(rows)['architectures']
  assert list(result) == names
  assert result['searched_head'] == {
      'mean_ap': pytest.approx(0.405), 'spread': pytest.approx(0.01), 'seeds': 2,
      'flops': len('searched_head_seed0'), 'params': 2 * len('searched_head_seed0'),
      'latency_ms': 40.0, 'minus_fcos_fpn_ap': pytest.approx(0.10)}
  assert result['fcos_fpn']['minus_fcos_fpn_ap'] == 0.0
  with saved_figures() as figures:
    nasfcos_compare.draw(rows, str(tmp_path / 'compare.png'))
  assert read_png(tmp_path / 'compare.png').shape == (440, 1408, 3)  # 12.8 x 4 in at 110 dpi
  ap_ax, latency_ax = figures[0].axes
  np.testing.assert_allclose([bar.get_height() for bar in ap_ax.patches],
                             [0.305, 0.365, 0.335, 0.405])
  np.testing.assert_allclose([y for _, y in plotted_lines(ap_ax)],
                             [[0.30, 0.31], [0.36, 0.37], [0.33, 0.34], [0.40, 0.41]])
  np.testing.assert_allclose(plotted_lines(latency_ax),
                             [[[10.0], [0.305]], [[20.0], [0.365]], [[30.0], [0.335]],
                              [[40.0], [0.405]]])


def test_bad_search_dirs_and_architectures_are_named(tmp_path, searches):
  with pytest.raises(ValueError, match=r'--search_dirs: .*nothing holds no search'):
    nasfcos_compare.searched_bindings([str(tmp_path / 'nothing')])
  settings = runner.SearchSettings(search_dir=str(tmp_path / 'nasfpn'), algorithm='random',
                                   num_trials=1, proxy='synthetic', space=SearchSpace())
  runner.check_search_dir(settings)
  with pytest.raises(ValueError, match=r'nasfpn searched --space=nasfpn, not a NAS-FCOS space'):
    nasfcos_compare.searched_bindings([settings.search_dir])
  with pytest.raises(ValueError, match='two searches in --space=nasfcos_head'):
    nasfcos_compare.searched_bindings([searches['nasfcos_head']] * 2)
  empty = runner.SearchSettings(search_dir=str(tmp_path / 'empty'), algorithm='random',
                                num_trials=1, proxy='synthetic',
                                space=NASFCOSFPNSpace(read_c2=False))
  runner.check_search_dir(empty)
  with pytest.raises(ValueError, match=r'empty has no best.gin yet'):
    nasfcos_compare.searched_bindings([empty.search_dir])
  with pytest.raises(ValueError, match=r"--architectures: \['nas_fcos'\] not of"):
    nasfcos_compare.run(tmp_path, [0], architectures=['nasfcos', 'nas_fcos'])


def _built(bindings):
  """The model fcos_demo.gin builds with `bindings`, at 128 px (the parts do not depend on it)."""
  config.parse_gin([nasfcos_compare.GIN_FILE],
                   list(bindings) + ['build_retinanet.image_size = (128, 128)'])
  return factory.build_retinanet()


def test_the_bindings_build_fcos_fpn_and_the_published_nasfcos_and_a_best_gin_binds_its_search(
    searches):
  fpn = _built(nasfcos_compare.ARCHITECTURES['fcos_fpn'])
  assert fpn.detector == 'fcos' and isinstance(fpn.head, FCOSHead)
  assert fpn.decoder.repeat_specs == (block_specs_lib.resolve('fpn', 3, 7),)  # FPN, once
  published = _built(nasfcos_compare.ARCHITECTURES['nasfcos'])
  assert published.detector == 'fcos'
  assert isinstance(published.decoder, NASFCOSFPN) and isinstance(published.head, NASFCOSHead)
  assert published.decoder.block_specs == nasfcos_specs.NASFCOS_FPN
  assert published.head.head_spec == nasfcos_specs.NASFCOS_HEAD
  # A head search's best.gin, as the experiment passes it, binds its head on the pyramid search's
  # best over fcos_demo.gin (parsed, not built: the published model above is the costly build).
  config.parse_gin([nasfcos_compare.GIN_FILE],
                   [nasfcos_compare.searched_bindings([searches['nasfcos_head']])['searched_head']])
  bound = factory.bound_model_arguments()
  head_records = Journal(pathlib.Path(searches['nasfcos_head'], search_dir_lib.TRIALS_FILE)).read()
  pyramid_records = Journal(pathlib.Path(searches['nasfcos_fpn'],
                                         search_dir_lib.TRIALS_FILE)).read()
  assert bound['detector'] == 'fcos' and bound['decoder'] == 'nasfcos_fpn'
  assert nasfcos_specs.resolve_head(bound['fcos_head_spec']) == nasfcos_specs.resolve_head(
      max(head_records, key=lambda r: r['reward'])['block_specs'])
  assert nasfcos_specs.resolve(bound['block_specs']) == nasfcos_specs.resolve(
      max(pyramid_records, key=lambda r: r['reward'])['block_specs'])
  assert bound['num_filters'] == 64 and bound['image_size'] == (256, 256)  # the demo's model
