"""The benchmark's train-step profile: TF profiler op time attributed to the right categories;
its report: the JSON keys and the table cells of a hand-made result."""
import json

import pytest
import tensorflow as tf

from training_helpers import load_experiment

benchmark = load_experiment('benchmark')  # Puts experiments/ on sys.path: its parts, bench/.
from bench import op_profile, report, rows  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.parametrize('op_type,category', [
    ('_MklNativeConv2D', 'conv'), ('_MklNativeFusedConv2D', 'conv'),
    ('_MklNativeConv2DBackpropInput', 'conv'), ('_MklNativeConv2DBackpropFilterWithBias', 'conv'),
    ('Conv2DBackpropFilter', 'conv'), ('DepthwiseConv2dNative', 'rest'),
    ('_MklNativeFusedBatchNormV3', 'norm_relu_pool'), ('_MklNativeFusedBatchNormEx', 'norm_relu_pool'),
    ('_MklNativeFusedBatchNormGradV3', 'norm_relu_pool'), ('ReluGrad', 'norm_relu_pool'),
    ('_MklNativeMaxPoolGrad', 'norm_relu_pool'), ('Cast', 'rest'), ('AddN', 'rest'),
    ('ResourceApplyKerasMomentum', 'rest')])
def test_op_categories(op_type, category):
  assert op_profile.op_category(op_type) == category


def test_profile_attributes_op_time():
  """A convolution, a batch norm and ReLU, and a reduction, traced: the profile finds each in its
  category; a function without convolutions has none. (How long each took is the machine's
  business: only which categories have time is checked; the sums are checked by hand below.)"""
  images = tf.random.stateless_normal([2, 96, 96, 64], seed=[1, 2])
  kernel = tf.random.stateless_normal([3, 3, 64, 64], seed=[3, 4])
  scale, offset = tf.ones([64]), tf.zeros([64])

  @tf.function
  def conv_norm_relu():
    x = tf.nn.conv2d(images, kernel, 1, 'SAME')
    x, _, _ = tf.compat.v1.nn.fused_batch_norm(x, scale, offset, is_training=True)
    return tf.reduce_sum(tf.nn.relu(x))

  @tf.function
  def no_conv():
    return tf.reduce_sum(tf.square(images))

  profile = op_profile.profile_train_steps({'conv_norm_relu': conv_norm_relu, 'no_conv': no_conv},
                                           repeats=3)
  with_conv = profile['conv_norm_relu']
  assert set(with_conv) == set(op_profile.PROFILE_CATEGORIES)
  assert with_conv['conv'] > 0 and with_conv['norm_relu_pool'] > 0 and with_conv['rest'] > 0
  assert profile['no_conv']['conv'] == 0 and profile['no_conv']['norm_relu_pool'] == 0
  assert profile['no_conv']['rest'] > 0


def test_op_time_counts_each_executor_op_once(tmp_path):
  """A hand-made trace: the ops of every tf_Compute thread summed by category, each event once,
  an async op's launch as 'rest'; executor bookkeeping, XLA's own events and other threads'
  events not at all."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  space = xplane_pb2.XSpace()
  plane = space.planes.add(name='/host:CPU')
  names = ['model/conv/Conv2D:_MklNativeConv2D', 'model/bn/FusedBatchNormV3:FusedBatchNormV3',
           'gradients/AddN:AddN', 'ExecutorState::ProcessAsync::Start', 'ExecutorState::Process',
           'fusion.1: %fusion.1 = f32[8] add', 'model/relu/Relu:Relu']
  for i, name in enumerate(names, 1):
    plane.event_metadata[i].id, plane.event_metadata[i].name = i, name
  seconds = {'tf_Compute/0': [(1, 3.0), (2, 0.5), (5, 10.0), (6, 20.0)],
             'tf_Compute/1': [(1, 1.5), (3, 0.25), (4, 0.125), (7, 0.0625)],
             'tf_data_iterator': [(1, 7.0), (3, 7.0)]}
  for line_name, events in seconds.items():
    line = plane.lines.add(name=line_name)
    for metadata_id, duration in events:
      line.events.add(metadata_id=metadata_id, duration_ps=int(duration * 1e12))
  (tmp_path / 'plugins').mkdir()
  (tmp_path / 'plugins' / 'host.xplane.pb').write_bytes(space.SerializeToString())
  by_category = op_profile._op_seconds_by_category(str(tmp_path))  # pylint: disable=protected-access
  assert by_category == pytest.approx(
      {'conv': 3.0 + 1.5, 'norm_relu_pool': 0.5 + 0.0625, 'rest': 0.25 + 0.125}, rel=1e-12)


def _full_result():
  """Everything measured, in bfloat16 with XLA and the profile (made-up numbers)."""
  t = rows.Timing
  inference = rows.Inference(
      e2e={1: {'ours': t(2.7, 0.064), 'theirs': t(42.9, 3.93), 'ours_bf16': t(2.5, 0.055)},
           8: {'ours': t(3.0, 0.418), 'theirs': t(50.0, 42.2), 'ours_bf16': t(2.9, 0.3)}},
      network={'ours': t(1.0, 0.060), 'theirs': t(1.1, 0.061), 'ours_bf16': t(1.0, 0.05),
               'ours_xla': t(9.0, 0.07)},
      postprocess_worst={'ours': 0.004, 'theirs': 0.207})
  step = rows.TrainStep
  profile = {name: {'conv': conv, 'norm_relu_pool': 0.1, 'rest': 0.2} for name, conv in (
      ('ours_fp32', 1.0), ('theirs_fp32', 1.2), ('ours_bf16', 0.5), ('theirs_bf16', 0.6),
      ('ours_fp32_xla', 1.0))}
  training = rows.Training(
      batch=8, precision='bfloat16', loss_after_steps=7, profile=profile,
      steps={'ours_fp32': step(5.0, 1.40, 1.2345), 'theirs_fp32': step(6.0, 1.71, 1.2346),
             'ours_bf16': step(4.0, 0.935, 1.25), 'theirs_bf16': step(5.0, 0.998, 1.26),
             'ours_fp32_xla': step(30.0, 3.2, 1.2345)})
  memory = rows.Memory({'infer': {'ours': 600.0, 'theirs': 2500.0},
                        'train': {'ours': 2100.0, 'theirs': 2500.0}})
  ap = rows.Ap(images=64, model='NAS-FPN R-18 3@64, 256 px trained 600 steps on synthetic shapes',
               ap={'theirs': 0.0863, 'ours': 0.0862, 'ours_bf16': 0.0850},
               ap50={'theirs': 0.2, 'ours': 0.2, 'ours_bf16': 0.19},
               eval_seconds={'theirs': 30.0, 'ours': 2.0, 'ours_bf16': 1.5},
               identical={'ours': 0.5625, 'ours_bf16': 0.25})
  return rows.ConfigResult(
      config='small', label='NAS-FPN R-18 3@64, 256 px', fast_precision='bfloat16',
      params=16012345, network_max_abs_diff=0.0, network_max_abs_diff_bf16=0.0028,
      load_avg_start=1.04, load_avg_end=2.0, inference=inference, training=training,
      memory=memory, ap=ap)


def test_json_keys_of_a_full_result():
  row = json.loads(json.dumps(_full_result().to_json()))
  sides = ('ours', 'theirs', 'ours_bf16')
  variants = ('ours_fp32', 'theirs_fp32', 'ours_bf16', 'theirs_bf16', 'ours_fp32_xla')
  expected = {
      'config', 'label', 'fast_precision', 'params', 'network_max_abs_diff',
      'network_max_abs_diff_bf16', 'load_avg_start', 'load_avg_end',
      *(f'e2e{first}_s_b{b}_{s}' for first in ('', '_first_call') for b in (1, 8) for s in sides),
      *(f'network{first}_s_b1_{s}' for first in ('', '_first_call')
        for s in sides + ('ours_xla',)),
      'e2e_latency_ratio_b1', 'e2e_latency_ratio_b8', 'network_latency_ratio',
      'postprocess_share', 'postprocess_share_theirs', 'postprocess_worst_s_ours',
      'postprocess_worst_s_theirs', 'postprocess_share_worst',
      'train_batch', 'train_loss_after_steps', 'train_loss', 'train_profile_s',
      *(f'train_{m}_{v}' for m in ('step_s', 'images_per_s', 'first_step_s') for v in variants),
      'train_step_ratio_bound_fp32', 'train_step_ratio_bound_bf16', 'train_step_ratio_fp32',
      'train_step_ratio_bf16', 'train_step_ratio', 'train_step_ratio_vs_tfm_fp32',
      'peak_rss_mb_infer_ours', 'peak_rss_mb_infer_theirs', 'peak_rss_mb_train_ours',
      'peak_rss_mb_train_theirs', 'peak_memory_ratio_infer', 'peak_memory_ratio_train',
      'peak_memory_ratio',
      'ap_images', 'ap_model', 'ap_diff', *(f'{m}_{s}' for m in ('ap', 'ap50', 'eval_seconds')
                                            for s in sides),
      'identical_detections_ours', 'identical_detections_ours_bf16'}
  assert set(row) == expected, (set(row) - expected, expected - set(row))
  assert set(row['train_loss']) == set(variants) and set(row['train_profile_s']) == set(variants)
  assert row['e2e_latency_ratio_b1'] == pytest.approx(0.064 / 3.93)
  assert row['train_images_per_s_ours_fp32'] == pytest.approx(8 / 1.40)
  assert row['train_step_ratio'] == pytest.approx(0.935 / 0.998)  # Like with like: bfloat16.
  assert row['train_step_ratio_vs_tfm_fp32'] == pytest.approx(0.935 / 1.71)
  assert row['train_step_ratio_bound_fp32'] == pytest.approx(1.1 / 1.5)
  assert row['postprocess_share'] == pytest.approx(0.004 / 0.064)
  assert row['peak_memory_ratio'] == pytest.approx(0.24)
  assert row['ap_diff'] == pytest.approx(-0.0001)


def test_table_of_a_full_result():
  lines = report.table(_full_result()).splitlines()
  assert lines[1] == '### small: NAS-FPN R-18 3@64, 256 px, 16,012,345 params (load 1.0 -> 2.0)'
  assert lines[2] == ('raw outputs, ours float32 vs TFM float32: max |diff| = 0 '
                      '(ours bfloat16: 0.0028)')
  assert lines[4:6] == ['| measure | ours | TFM | ours / TFM | ours bfloat16 |',
                        '|---|---:|---:|---:|---:|']
  assert lines[6:13] == [
      '| end-to-end latency, batch 1 (float32) | 64 ms | 3.93 s | 0.016 | 55 ms |',
      '| end-to-end latency, batch 8 (float32) | 418 ms | 42.20 s | 0.010 | 300 ms |',
      '| network only, batch 1 (float32) | 60 ms | 61 ms | 0.984 | 50 ms |',
      '| first call (trace + run), batch 1 | 2.70 s | 42.90 s | 0.063 | 2.50 s |',
      '| post-processing alone, all candidates pass, b1 | 4 ms | 207 ms | 0.019 |  |',
      '| train step, batch 8, float32 | 1.40 s | 1.71 s | 0.819 |  |',
      '| train step, batch 8, bfloat16 | 935 ms | 998 ms | 0.937 |  |']
  text = '\n'.join(lines)
  assert ('post-processing share of our end-to-end time: 6.3% (all candidates passing: 6.2%); '
          'TFM: 98.4%') in text
  assert 'ours network with XLA: 70 ms' in text
  assert 'train step, ours bfloat16 / TFM float32 (as its factory builds it): 0.547' in text
  assert ('train step (images/s; loss after the same steps): ours_fp32 1.40 s (5.71/s; 1.2345), '
          'theirs_fp32 1.71 s (4.68/s; 1.2346)') in text
  assert ('| op type | ours_fp32 | theirs_fp32 | ours_bf16 | theirs_bf16 | ours_fp32_xla |'
          in lines)
  assert '| total | 1.300 | 1.500 | 0.800 | 0.900 | 1.300 |' in lines
  assert ('ours / TFM if everything but our convolutions and batch norms took no time: '
          'fp32 0.733, bf16 0.667') in lines
  assert ('peak RSS: infer ours 600 MB / TFM 2500 MB = 0.24, train ours 2100 MB / TFM 2500 MB '
          '= 0.84') in lines
  assert lines[-1] == (
      'COCO AP (64 images; NAS-FPN R-18 3@64, 256 px trained 600 steps on synthetic shapes): '
      'ours 0.0862, TFM 0.0863, diff -0.0001, identical detections on 56% of images; '
      'ours bfloat16 0.0850 (identical detections on 25% of images)')


def test_table_and_json_of_float32_with_sections_skipped():
  """float32: no bfloat16 column or keys; skipped sections leave no rows and no keys."""
  result = rows.ConfigResult(
      config='r50_640', label='NAS-FPN R-50 7@256, 640 px', fast_precision='float32',
      params=60200000, network_max_abs_diff=0.0, network_max_abs_diff_bf16=None,
      load_avg_start=0.5, load_avg_end=0.5,
      inference=rows.Inference(
          e2e={b: {'ours': rows.Timing(3.9, 1.39), 'theirs': rows.Timing(43.1, 5.69)}
               for b in (1, 8)},
          network={'ours': rows.Timing(2.0, 1.39), 'theirs': rows.Timing(2.0, 1.41)},
          postprocess_worst={'ours': 0.009, 'theirs': 0.296}),
      memory=rows.Memory({'infer': {'ours': 1000.0, 'theirs': 2000.0}}))
  lines = report.table(result).splitlines()
  assert lines[2] == 'raw outputs, ours float32 vs TFM float32: max |diff| = 0'
  assert lines[4] == '| measure | ours | TFM | ours / TFM |'
  assert lines[6] == '| end-to-end latency, batch 1 (float32) | 1.39 s | 5.69 s | 0.244 |'
  assert len(lines) == 14 and lines[-1] == 'peak RSS: infer ours 1000 MB / TFM 2000 MB = 0.50'
  row = result.to_json()
  assert not [k for k in row if 'bf16' in k or k.startswith(('train_', 'ap'))]
  assert row['peak_memory_ratio'] == 0.5 and 'peak_memory_ratio_train' not in row
