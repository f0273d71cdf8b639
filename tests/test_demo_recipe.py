"""experiments/demo_recipe.py: a demo config and variants of it trained over seeds, each AP50
against the demo's aim."""
import json
import pathlib
import sys

import numpy as np
import pytest

import training_helpers

sys.path.insert(0, str(training_helpers.REPO / 'experiments'))
import demo_recipe  # noqa: E402  pylint: disable=wrong-import-position


def test_variants_parse_with_the_file_as_is_first_and_bad_ones_named():
  variants = demo_recipe.parse_variants([
      'clip10: RetinaNetTrainer.clip_gradient_norm = 10.0',
      'lr2e-3_w50 : CosineDecayWithWarmup.base_learning_rate = 0.002; '
      'CosineDecayWithWarmup.warmup_steps = 50;'])
  assert variants == [
      ('as_is', []), ('clip10', ['RetinaNetTrainer.clip_gradient_norm = 10.0']),
      ('lr2e-3_w50', ['CosineDecayWithWarmup.base_learning_rate = 0.002',
                      'CosineDecayWithWarmup.warmup_steps = 50'])]
  for bad in ['no colon', 'name:', ': a = 1', 'a/b: x = 1', 'as_is: x = 1']:
    with pytest.raises(ValueError, match='--variant='):
      demo_recipe.parse_variants([bad])
  with pytest.raises(ValueError, match="'x' is taken"):
    demo_recipe.parse_variants(['x: a = 1', 'x: b = 2'])


def test_the_summary_agrees_with_numpy():
  rows = [{'variant': v, 'seed': s, 'AP': ap, 'AP50': ap50, 'seconds': sec}
          for v, s, ap, ap50, sec in [('as_is', 0, 0.45, 0.62, 100), ('lr', 0, 0.40, 0.55, 90),
                                      ('as_is', 1, 0.43, 0.58, 110), ('lr', 1, 0.47, 0.66, 94),
                                      ('as_is', 2, 0.49, 0.67, 105)]]
  summary = demo_recipe.summarize(rows, aim=0.6)
  assert [s['variant'] for s in summary] == ['as_is', 'lr']
  as_is = summary[0]
  np.testing.assert_allclose(
      [as_is['AP50_mean'], as_is['AP50_sd'], as_is['AP50_min'], as_is['AP_mean'],
       as_is['seconds_mean']],
      [np.mean([0.62, 0.58, 0.67]), np.std([0.62, 0.58, 0.67], ddof=1), 0.58,
       np.mean([0.45, 0.43, 0.49]), 105.0])
  assert as_is['seeds'] == 3 and as_is['share_at_aim'] == pytest.approx(2 / 3)
  assert summary[1]['share_at_aim'] == 0.5
  # Against as_is seed by seed: lr's seeds 0 and 1 (-0.07, +0.08).
  assert as_is['paired_seeds'] == 3 and as_is['AP50_minus_as_is'] == 0.0
  assert as_is['ahead_of_as_is'] == 0
  assert summary[1]['paired_seeds'] == 2 and summary[1]['ahead_of_as_is'] == 1
  assert summary[1]['AP50_minus_as_is'] == pytest.approx(np.mean([0.55 - 0.62, 0.66 - 0.58]))
  alone = demo_recipe.summarize([dict(rows[1], seed=7)], aim=0.6)
  assert alone[0]['paired_seeds'] == 0 and alone[0]['AP50_minus_as_is'] is None
  one = demo_recipe.summarize(rows[:1], aim=0.7)
  assert one[0]['AP50_sd'] == 0.0 and one[0]['share_at_aim'] == 0.0


def test_variants_train_with_their_bindings_and_a_rerun_reuses_them(synthetic_records, tmp_path):
  common = training_helpers.tiny_bindings(synthetic_records, train_steps=2) + [
      'RetinaNetTrainer.mixed_precision = None']
  variants = demo_recipe.parse_variants(['slow: StepDecayWithWarmup.base_learning_rate = 0.003'])
  rows = demo_recipe.run(tmp_path, 'demo.gin', variants, [0], records=synthetic_records,
                         common_bindings=common)
  assert [(r['variant'], r['seed']) for r in rows] == [('as_is', 0), ('slow', 0)]
  for row in rows:
    model_dir = tmp_path / f"{row['variant']}_seed0"
    metrics = json.loads((model_dir / 'eval_metrics.json').read_text())
    assert (row['AP'], row['AP50']) == (metrics['AP'], metrics['AP50']) and metrics['step'] == 2
    assert row['seconds'] > 0
  operative = (tmp_path / 'slow_seed0' / 'operative_config.gin').read_text()
  assert 'StepDecayWithWarmup.base_learning_rate = 0.003' in operative
  assert 'base_learning_rate = 0.003' not in (tmp_path / 'as_is_seed0' /
                                               'operative_config.gin').read_text()
  # A rerun trains nothing: the same rows, the seconds of the call that trained them.
  assert demo_recipe.run(tmp_path, 'demo.gin', variants, [0], records=synthetic_records,
                         common_bindings=common) == rows
  # A variant name reused with other settings names the dir instead of reusing it.
  changed = [variants[0], ('slow', ['StepDecayWithWarmup.base_learning_rate = 0.002'])]
  with pytest.raises(ValueError, match="slow_seed0 holds another demo_recipe run.*bindings"):
    demo_recipe.run(tmp_path, 'demo.gin', changed, [0], records=synthetic_records,
                    common_bindings=common)
  demo_recipe.draw(rows, 0.6, tmp_path / 'demo_recipe.png')
  assert (tmp_path / 'demo_recipe.png').stat().st_size > 0
