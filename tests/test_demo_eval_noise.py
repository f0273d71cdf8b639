"""experiments/demo_eval_noise.py: a trained model dir evaluated on its own validation images
(the AP it recorded) and on further images of the same split, journalled once; the summary's
figures against NumPy and scipy."""
import json
import shutil

import numpy as np
import pytest
from scipy import stats

import training_helpers

noise = training_helpers.load_experiment('demo_eval_noise')


def _row(arch, seed, ap_val, ap_extra, name=None):
  return {'model_dir': f'/runs/{name or arch}_seed{seed}', 'architecture': arch, 'seed': seed,
          'ap_val': ap_val, 'ap_extra': ap_extra, 'num_val': 200, 'num_extra': 2000}


def test_names_give_architecture_and_seed_and_a_bad_name_is_named(tmp_path):
  assert noise.architecture_and_seed('/r/searched-27e18497df9b_seed12') == (
      'searched-27e18497df9b', 12)
  with pytest.raises(ValueError, match='--model_dirs: /r/nasfpn is not named'):
    noise.architecture_and_seed('/r/nasfpn')
  with pytest.raises(ValueError, match='--num_val=30 must be a multiple of --eval_batch_size=20'):
    noise.run(str(tmp_path / 'out'), ['/r/nasfpn_seed0'], 30, 10, 256, 20)
  assert not (tmp_path / 'out').exists()  # refused before any work


def test_summary_against_numpy_and_scipy():
  rng = np.random.default_rng(0)
  truth = {'nasfpn': 0.52, 'fpn': 0.44, 'a': 0.50, 'b': 0.47}
  rows = []
  for arch, mean in truth.items():
    for seed in range(3 if arch != 'b' else 1):
      ap = mean + rng.normal(0, 0.02)
      rows.append(_row(arch, seed, ap, ap + rng.normal(0, 0.005)))
  rows.append(_row('nasfpn', 1, 0.0, 0.0, name='nasfpn'))  # a second dir of nasfpn seed 1
  summary = noise.summarize(rows)
  kept = rows[:-1]
  assert summary['duplicates'] == ['/runs/nasfpn_seed1'] and summary['num_models'] == 10
  fpn = [r for r in kept if r['architecture'] == 'fpn']
  assert summary['architectures']['fpn']['sd_extra'] == pytest.approx(
      np.std([r['ap_extra'] for r in fpn], ddof=1))
  assert summary['architectures']['b']['sd_val'] is None
  residuals = [r['ap_val'] - np.mean([q['ap_val'] for q in kept if q['architecture'] == a])
               for a in ('nasfpn', 'fpn', 'a') for r in kept if r['architecture'] == a]
  assert summary['pooled_sd_over_seeds']['val'] == pytest.approx(
      np.sqrt(np.sum(np.square(residuals)) / 6))
  assert summary['sd_of_val_minus_extra'] == pytest.approx(
      np.std([r['ap_val'] - r['ap_extra'] for r in kept], ddof=1))
  means = {p: [np.mean([r[f'ap_{p}'] for r in kept if r['architecture'] == a]) for a in truth]
           for p in ('val', 'extra')}
  assert summary['tau_mean_val_vs_extra'] == pytest.approx(
      stats.kendalltau(means['val'], means['extra'])[0])
  both = ['nasfpn', 'fpn', 'a']
  seed_ap = {(r['architecture'], r['seed']): r['ap_extra'] for r in kept}
  assert summary['num_with_seeds_0_and_1'] == 3
  assert summary['tau_seed0_vs_seed1']['extra'] == pytest.approx(
      stats.kendalltau([seed_ap[a, 0] for a in both], [seed_ap[a, 1] for a in both])[0])


def test_a_recorded_ap_of_other_images_is_refused(tmp_path):
  model_dir = tmp_path / 'nasfpn_seed0'
  model_dir.mkdir()
  (model_dir / 'eval_metrics.json').write_text(json.dumps({'AP': 0.5, 'step': 10}))
  noise.check_recorded({'model_dir': str(model_dir), 'ap_val': 0.5, 'num_val': 200})
  with pytest.raises(ValueError, match=r'nasfpn_seed0: AP 0.40000 on the first 200 images, but'):
    noise.check_recorded({'model_dir': str(model_dir), 'ap_val': 0.4, 'num_val': 200})


def test_a_model_dir_is_evaluated_on_its_own_images_and_more_once(synthetic_records, tmp_path,
                                                                  monkeypatch):
  # The fixture's val split is the synthetic generator's first 4 images at 96 px, seed 0.
  model_dir = tmp_path / 'tiny_seed0'
  trained, _ = training_helpers.train_tiny_model(synthetic_records, model_dir,
                                                 mode='train_and_eval')
  recorded = json.loads((model_dir / 'eval_metrics.json').read_text())
  shutil.copytree(model_dir, tmp_path / 'tiny_seed1')
  dirs = [str(model_dir), str(tmp_path / 'tiny_seed1')]
  out = tmp_path / 'noise'
  summary = noise.run(str(out), dirs, num_val=4, num_extra=6, image_size=96, batch_size=2)
  rows = [json.loads(line) for line in (out / 'rows.jsonl').read_text().splitlines()]
  assert [r['model_dir'] for r in rows] == dirs
  assert rows[0]['ap_val'] == pytest.approx(recorded['AP'], abs=1e-6)
  assert (rows[0]['num_val'], rows[0]['num_extra'], rows[0]['step']) == (4, 6, trained.step)
  assert rows[1]['ap_extra'] == pytest.approx(rows[0]['ap_extra'], abs=1e-6)
  assert summary['architectures']['tiny']['seeds'] == [0, 1]
  assert (out / 'demo_eval_noise.png').stat().st_size > 0
  training_helpers.read_png(out / 'demo_eval_noise.png')
  monkeypatch.setattr(noise, 'evaluate', lambda *a: pytest.fail('evaluated again'))
  assert noise.run(str(out), dirs, num_val=4, num_extra=6, image_size=96,
                   batch_size=2)['num_models'] == 2


def test_the_plot_shows_every_model_and_zooms_on_those_near_the_best(tmp_path):
  rows = [_row('nasfpn', 0, 0.52, 0.53), _row('nasfpn', 1, 0.50, 0.49), _row('fpn', 0, 0.44, 0.45),
          _row('random', 0, 0.08, 0.09)]
  with training_helpers.saved_figures() as figures:
    noise.plot(rows, tmp_path / 'plot.png')
  everything, zoom = figures[0].axes
  points = lambda ax: sorted(tuple(p) for c in ax.collections for p in c.get_offsets())  # noqa
  assert points(everything) == sorted((r['ap_val'], r['ap_extra']) for r in rows)
  assert points(zoom) == [(0.44, 0.45), (0.50, 0.49), (0.52, 0.53)]  # within 0.1 of 0.53
  assert [t.get_text() for t in zoom.get_legend().get_texts()] == ['fpn', 'nasfpn']
  training_helpers.read_png(tmp_path / 'plot.png')


def test_a_gate_reference_is_rewritten_with_the_ap_on_the_extra_images(tmp_path):
  gate = training_helpers.load_experiment('search_proxy_demo_gate')
  key = gate.SPACE.key(gate.SPACE.sample(np.random.default_rng(0)))
  digest = noise.search_retrain.model_dir_name('searched', key, 0).rsplit('_seed', 1)[0]
  reference = tmp_path / 'reference.json'
  reference.write_text(json.dumps({'pyramids': {
      'nasfpn': {'block_specs': 'nasfpn', 'ap': {'0': 0.52, '1': 0.50, '2': 0.51}},
      'mine': {'block_specs': key, 'ap': {'0': 0.47}},
      'gone': {'block_specs': 'fpn', 'ap': {'0': 0.44}}}}))
  rows = [_row('nasfpn', 0, 0.52, 0.53), _row('nasfpn', 1, 0.50, 0.49), _row(digest, 0, 0.47, 0.46)]
  extra, missing = noise.reference_on_extra(str(reference), rows)
  assert missing == ['gone']
  assert extra['pyramids'] == {'nasfpn': {'block_specs': 'nasfpn', 'ap': {'0': 0.53, '1': 0.49}},
                               'mine': {'block_specs': key, 'ap': {'0': 0.46}}}
  (tmp_path / 'extra.json').write_text(json.dumps(extra))
  loaded = gate.load_reference(str(tmp_path / 'extra.json'))  # the gate reads it back
  assert loaded['mine']['ap'] == {0: 0.46} and loaded['nasfpn']['rows'] == 'nasfpn'


def test_the_shipped_extra_reference_holds_the_gate_references_pyramids_and_seeds():
  gate = training_helpers.load_experiment('search_proxy_demo_gate')
  bench = training_helpers.REPO / 'experiments' / 'bench'
  demo = gate.load_reference(str(bench / 'demo_reference_zen4.json'))
  extra = gate.load_reference(str(bench / 'demo_reference_extra_zen5.json'))
  assert list(extra) == list(demo)
  for name, entry in demo.items():
    assert extra[name]['block_specs'] == entry['block_specs']
    assert set(extra[name]['ap']) == set(entry['ap'])
    # Each run's AP on the 2000 further images lies near its AP on the demo's 200 (within 0.02:
    # the evaluation's part of a run's AP has an SD of about 0.004, docs/search.md).
    for seed, ap in entry['ap'].items():
      assert abs(extra[name]['ap'][seed] - ap) < 0.02, (name, seed)
