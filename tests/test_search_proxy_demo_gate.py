"""The demo gate (experiments/search_proxy_demo_gate.py): its reference file, journal, resume,
refusals and rank figures. Trials are stand-ins (an AP given per pyramid and seed); the shipped
reference is checked against the figures docs/search.md gives."""
import json
import math
import re

from matplotlib import image
import numpy as np
import pytest
from scipy import stats

import training_helpers
from nasfpn_tf.search import search_dir as search_dir_lib
from nasfpn_tf.search.journal import Journal

gate = training_helpers.load_experiment('search_proxy_demo_gate')

_RNG = np.random.default_rng(3)
NAMES = ['nasfpn', 'fpn', 'a', 'b', 'c', 'd']
DEMO = {n: list(_RNG.uniform(0.4, 0.55, 1 + i % 3)) for i, n in enumerate(NAMES)}
REWARD = {s: dict(zip(NAMES, _RNG.uniform(0.0, 0.3, len(NAMES)))) for s in (0, 1, 2)}
IDENTITY = {'proxy': 'e2e', 'gin_bindings': ['X.y = 1'], 'work_dir': '/w'}


def _reference_file(tmp_path, demo=DEMO):
  space = gate.SPACE
  pyramids = {}
  for i, name in enumerate(demo):
    specs = name if name in ('nasfpn', 'fpn') else space.key(space.sample(np.random.default_rng(i)))
    pyramids[name] = {'block_specs': specs, 'ap': {str(s): ap for s, ap in enumerate(demo[name])}}
  path = tmp_path / 'reference.json'
  path.write_text(json.dumps({'pyramids': pyramids}))
  return str(path)


def _stand_in(calls, by_rows):
  def trial_fn(rows, seed):
    name = by_rows[json.dumps(rows, default=str)]
    calls.append((name, seed))
    return {'ap': REWARD[seed][name], 'seconds': 10.0 + seed, 'ap50': 0.5, 'flops': 1, 'steps': 3}
  return trial_fn


def _gate(tmp_path, seeds=(0, 1), names=None, identity=IDENTITY, calls=None):
  reference = gate.load_reference(_reference_file(tmp_path), names)
  by_rows = {json.dumps(v['rows'], default=str): n for n, v in reference.items()}
  calls = [] if calls is None else calls
  out = str(tmp_path / 'gate')
  records = gate.run(out, reference, list(seeds), _stand_in(calls, by_rows), identity,
                     say=lambda m: None)
  return reference, records, calls, out


def test_reference_reads_keys_and_names_and_names_what_is_wrong(tmp_path):
  reference = gate.load_reference(_reference_file(tmp_path))
  assert list(reference) == NAMES
  assert reference['nasfpn']['rows'] == 'nasfpn'
  assert gate.SPACE.key(reference['a']['rows']) == reference['a']['block_specs']
  assert reference['fpn']['ap'] == {s: pytest.approx(v) for s, v in enumerate(DEMO['fpn'])}
  assert list(gate.load_reference(_reference_file(tmp_path), ['c', 'a'])) == ['c', 'a']
  with pytest.raises(ValueError, match=r"--pyramids: \['zz'\]"):
    gate.load_reference(_reference_file(tmp_path), ['a', 'zz'])
  bad = json.loads((tmp_path / 'reference.json').read_text())
  bad['pyramids']['b']['block_specs'] = '4:sum:9,9'
  (tmp_path / 'bad.json').write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"bad.json: pyramid 'b'"):
    gate.load_reference(str(tmp_path / 'bad.json'))
  bad['pyramids']['b'] = {'block_specs': 'fpn', 'ap': {}}
  (tmp_path / 'bad.json').write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"pyramid 'b' has no demo AP"):
    gate.load_reference(str(tmp_path / 'bad.json'))
  (tmp_path / 'bad.json').write_text('[1]')
  with pytest.raises(ValueError, match='bad.json: not a JSON object'):
    gate.load_reference(str(tmp_path / 'bad.json'))


def test_every_trial_is_journalled_once_and_a_rerun_adds_only_new_seeds(tmp_path):
  reference, records, calls, out = _gate(tmp_path)
  assert sorted(calls) == sorted((n, s) for n in NAMES for s in (0, 1))
  assert len(Journal(f'{out}/{search_dir_lib.TRIALS_FILE}').read()) == 12
  assert {(r['pyramid'], r['seed']): r['ap'] for r in records} == {
      (n, s): REWARD[s][n] for n in NAMES for s in (0, 1)}
  _, again, calls, _ = _gate(tmp_path)
  assert calls == [] and len(again) == 12
  _, more, calls, _ = _gate(tmp_path, seeds=(0, 1, 2))
  assert sorted(calls) == sorted((n, 2) for n in NAMES) and len(more) == 18
  _, fewer, calls, _ = _gate(tmp_path, seeds=(1,), names=['a', 'b'])
  assert calls == [] and {(r['pyramid'], r['seed']) for r in fewer} == {('a', 1), ('b', 1)}


def test_a_dir_of_another_proxy_or_spelling_is_refused(tmp_path):
  _gate(tmp_path, seeds=(0,))
  other = dict(IDENTITY, gin_bindings=['X.y = 2'])
  with pytest.raises(ValueError, match='gin_bindings'):
    _gate(tmp_path, identity=other)
  journal = Journal(f'{tmp_path}/gate/{search_dir_lib.TRIALS_FILE}')
  lines = journal.read()
  lines[0]['block_specs'] = 'fpn' if lines[0]['block_specs'] != 'fpn' else 'nasfpn'
  (tmp_path / 'gate' / search_dir_lib.TRIALS_FILE).write_text(
      ''.join(json.dumps(r) + '\n' for r in lines))
  with pytest.raises(ValueError, match=f"pyramid '{lines[0]['pyramid']}' was trained as"):
    _gate(tmp_path, seeds=(0,))


def test_summary_figures_against_scipy(tmp_path):
  reference, records, _, out = _gate(tmp_path)
  summary = gate.summarize(records, reference, [0, 1])
  mean = [np.mean([REWARD[0][n], REWARD[1][n]]) for n in NAMES]
  demo_mean = [np.mean(DEMO[n]) for n in NAMES]
  assert summary['tau_seeds'] == pytest.approx(
      stats.kendalltau([REWARD[0][n] for n in NAMES], [REWARD[1][n] for n in NAMES]).statistic)
  assert summary['tau_demo_mean'] == pytest.approx(stats.kendalltau(mean, demo_mean).statistic)
  assert summary['tau_demo_median'] == pytest.approx(
      stats.kendalltau(mean, [np.median(DEMO[n]) for n in NAMES]).statistic)
  top = sorted(NAMES, key=lambda n: -np.mean(DEMO[n]))[:3]
  assert summary['better_half'] == top
  assert summary['tau_better_half'] == pytest.approx(stats.kendalltau(
      [mean[NAMES.index(n)] for n in top], [demo_mean[NAMES.index(n)] for n in top]).statistic)
  assert summary['seconds_per_trial'] == pytest.approx(10.5)
  both = [n for n in NAMES if len(DEMO[n]) > 1]
  assert summary['demo_seed0_and_seed1'] == both and len(both) > 2
  assert summary['tau_demo_seed0_vs_seed1'] == pytest.approx(
      stats.kendalltau([DEMO[n][0] for n in both], [DEMO[n][1] for n in both]).statistic)
  table = gate.markdown_table(summary, [0, 1])
  first = table.splitlines()[2]
  assert first.startswith(f'| {top[0]} | {np.mean(DEMO[top[0]]):.3f} ({len(DEMO[top[0]])}) |')
  assert re.search(r'tau_seeds -?\d\.\d\d', table)
  gate.plot(summary, [0, 1], 'test', str(tmp_path / 'g.png'))
  assert (tmp_path / 'g.png').stat().st_size > 10_000
  # A pyramid far below the rest: a second panel zooms on those near the best, twice as wide.
  summary['rows'][-1]['demo_mean_ap'] = 0.05
  gate.plot(summary, [0, 1], 'test', str(tmp_path / 'g2.png'))
  width = {name: image.imread(tmp_path / name).shape[1] for name in ('g.png', 'g2.png')}
  assert width['g2.png'] == 2 * width['g.png']
  one = gate.summarize([r for r in records if r['seed'] == 0], reference, [0])
  assert one['tau_seeds'] is None and not math.isnan(one['tau_demo_mean'])


def test_shipped_reference_is_what_docs_search_md_reports():
  """The reference's means are the demo APs of docs/search.md's end-to-end proxy table."""
  reference = gate.load_reference(gate.DEFAULT_REFERENCE)
  docs = (training_helpers.REPO / 'docs' / 'search.md').read_text()
  assert set(reference) >= {'nasfpn', 'fpn', 'sample69', 'sample67', 'searched1'}
  for name in ('nasfpn', 'fpn'):
    assert reference[name]['rows'] == name
  for name, spelling in (('nasfpn', 'NAS-FPN'), ('fpn', 'FPN'), ('sample67', 'sample 67'),
                         ('searched1', r'searched 1 \(session 21\)')):
    aps = list(reference[name]['ap'].values())
    found = re.search(rf'\| {spelling} \| \**(0\.\d+)\** \((\d+)', docs)
    assert found, f'{name}: no row of {spelling!r} in docs/search.md'
    # The docs round the mean of the unrounded APs, the reference holds the rounded ones.
    assert (float(found.group(1)), int(found.group(2))) == (
        pytest.approx(np.mean(aps), abs=0.0011), len(aps))
