"""experiments/anytime.py and stacking.py: their plots from rows, and the specs they accept.
(Both scripts train several demo-scale models even with tiny flags, longer than the suite's
budget for a smoke test: they are run end to end by hand, see the README.)"""
import pytest

from training_helpers import load_experiment

anytime = load_experiment('anytime')
stacking = load_experiment('stacking')


def test_anytime_plot(tmp_path):
  rows = [{'exit': k, 'flops': 1e9 * k, 'latency_ms': 10.0 * k, 'AP': 0.1 * k, 'AP50': 0.2 * k,
           'separate_AP': 0.12 * k} for k in (1, 2, 3)]
  anytime.draw(rows, str(tmp_path / 'anytime.png'))
  assert (tmp_path / 'anytime.png').read_bytes()[:4] == b'\x89PNG'


def test_stacking_plot(tmp_path):
  rows = [{'spec': spec, 'repeats': r, 'seed': seed, 'AP': 0.1 * r + 0.01 * seed, 'AP50': 0.5,
           'flops': 1e9 * r} for spec in ('nasfpn', 'fpn') for r in (1, 2, 3) for seed in (0, 1)]
  stacking.draw(rows, str(tmp_path / 'stacking.png'))
  assert (tmp_path / 'stacking.png').read_bytes()[:4] == b'\x89PNG'


def test_stacking_names_an_unknown_spec(tmp_path):
  with pytest.raises(ValueError, match=r"--specs \['fpm'\]: not in the block-spec table"):
    stacking.run(tmp_path, ['nasfpn', 'fpm'], [1], [0])
