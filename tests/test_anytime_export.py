"""An anytime model dir end to end: training logs every exit's loss, evaluation every exit's
metrics; its checkpoints refuse a plain config naming the binding; the SavedModel serves every
exit (fresh process, uint8 tensors and encoded JPEGs); the TFLite file of an early exit runs in
the stock interpreter with builtin ops and the post-processing op only."""
import json
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from nasfpn_tf import checkpointing
from nasfpn_tf import config
from nasfpn_tf.data import tfexample
from nasfpn_tf.export import tflite_postprocess
from nasfpn_tf.export import tflite_runtime
from nasfpn_tf.export.saved_model import load_model
from nasfpn_tf.training import trainer as trainer_lib
from nasfpn_tf.utils import model_stats
from training_helpers import assert_same_detections, keras_detections, pairwise_iou
from training_helpers import read_scalars, records_and_encoded_images, run_main
from training_helpers import serve_in_fresh_process, tiny_bindings, train_tiny_model

ANYTIME = ['build_retinanet.num_repeats = 2', 'build_retinanet.anytime = True',
           # A near-untrained model: keep every candidate so there are detections to compare.
           'build_retinanet.pre_nms_score_threshold = 0.0', 'build_retinanet.max_detections = 20']

@pytest.fixture(scope='module')
def trained(synthetic_records, tmp_path_factory):
  """A 2-exit anytime model trained and evaluated 2 steps: (model_dir, trainer, printed)."""
  model_dir = tmp_path_factory.mktemp('anytime')
  # The head is shared: every exit's scores spread.
  trainer, printed = train_tiny_model(synthetic_records, model_dir, ANYTIME,
                                      mode='train_and_eval')
  return model_dir, trainer, printed


def test_training_logs_each_exit_and_evaluation_scores_each_exit(trained):
  model_dir, _, printed = trained
  assert re.search(r'step 2/2 \| loss [\d.]+ \(cls [\d.]+ box [\d.]+ reg [\d.]+\) \| '
                   r'exits [\d.]+ [\d.]+ \| lr', printed)
  train = read_scalars(model_dir / 'train')
  assert {'loss/exit1_loss', 'loss/exit2_loss', 'loss/total_loss'} <= set(train)
  assert train['loss/exit1_loss'][2] != train['loss/exit2_loss'][2]
  metrics = json.loads((model_dir / 'eval_metrics.json').read_text())
  assert sorted(metrics['exits']) == ['1', '2']
  assert metrics['exits']['2'] == {k: v for k, v in metrics.items() if k not in ('exits', 'step')}
  assert set(metrics['exits']['1']) == set(metrics['exits']['2'])
  evals = read_scalars(model_dir / 'eval')
  assert {'coco/AP', 'coco_exit1/AP', 'coco_exit1/AP50'} <= set(evals)
  assert 'COCO metrics of exit 1 at step 2' in printed


def test_an_anytime_checkpoint_in_a_plain_config_fails_naming_the_binding(trained,
                                                                          synthetic_records):
  model_dir, _, _ = trained
  config.parse_gin([], tiny_bindings(synthetic_records, train_steps=2) + ANYTIME[:1])
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'build_retinanet\.anytime: true in .*model_config\.json, now false'):
    trainer_lib.RetinaNetTrainer(str(model_dir), tf.distribute.get_strategy(), mode='eval')
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r'build_retinanet\.anytime'):
    load_model(str(model_dir), ['build_retinanet.anytime = False'])


def test_every_exit_signature_serves_in_a_fresh_process(trained, synthetic_records, tmp_path):
  model_dir, _, _ = trained
  export_dir = tmp_path / 'export' / '1'
  summary = json.loads(run_main('--mode=export_saved_model', f'--model_dir={model_dir}',
                                f'--export_dir={export_dir}').splitlines()[-1])
  assert summary['signatures']['serving_exit_1'] == 'images'
  assert summary['signatures']['serving_exit_2_encoded_image'] == 'encoded_image'
  examples, jpegs = records_and_encoded_images(synthetic_records['val'])
  decoded = [tfexample.decode_example(record)['image'].numpy() for record in examples]
  images = np.stack([decoded[0], decoded[0][:, ::-1]])
  served = serve_in_fresh_process(export_dir, [
      (name, name, {key: value}) for k in (1, 2)
      for name, key, value in ((f'serving_exit_{k}', 'images', images),
                               (f'serving_exit_{k}_encoded_image', 'encoded_image', jpegs))],
      tmp_path)
  assert {'serving_default', 'serving_encoded_image', 'serving_tf_example', 'serving_exit_1',
          'serving_exit_1_encoded_image', 'serving_exit_2',
          'serving_exit_2_encoded_image'} == set(served['inputs'])
  model = load_model(str(model_dir))[0]
  size = model.image_size
  for k in (1, 2):
    detect = tf.function(lambda x, k=k: model.detect(x, num_repeats=k),
                         input_signature=[tf.TensorSpec([None] + size + [3])])
    assert_same_detections(served[f'serving_exit_{k}'], keras_detections(detect, size, images),
                           f'serving_exit_{k}')
    assert_same_detections(served[f'serving_exit_{k}_encoded_image'],
                           keras_detections(detect, size, decoded), f'exit {k} on JPEGs')
  # The exits detect differently: each is its own network.
  assert not np.allclose(served['serving_exit_1']['detection_scores'],
                         served['serving_exit_2']['detection_scores'])


def _conv_ops(content):
  return sum(op['op_name'] == 'CONV_2D' for op in tflite_runtime.op_details(content))


def test_tflite_exit_file_stops_at_its_exit(trained, synthetic_records, tmp_path):
  model_dir, _, _ = trained
  path = tmp_path / 'exit1.tflite'
  summary = json.loads(run_main('--mode=export_tflite', f'--model_dir={model_dir}',
                                f'--tflite_path={path}', '--tflite_exit=1').splitlines()[-1])
  assert summary['exit'] == 1
  content = path.read_bytes()
  assert tflite_runtime.custom_op_names(content) == [tflite_postprocess.POSTPROCESS_OP]
  assert not [op for op in summary['ops'] if op.startswith('Flex')]
  # As many convolutions as exit 1's graph, fewer than exit 2's.
  model = load_model(str(model_dir))[0]
  graph_convs = {k: sum(op.type == 'Conv2D' for op in model_stats.frozen_inference_graph(
      lambda x, k=k: model.exit_outputs(x, k), model.image_size + [3]).get_operations())
      for k in (1, 2)}
  assert _conv_ops(content) == graph_convs[1] < graph_convs[2]
  # Its best detection on each validation image is exit 1's.
  detector = tflite_runtime.TFLiteDetector(model_path=str(path))
  image = tf.random.stateless_uniform([1] + model.image_size + [3], [5, 6], maxval=255.0)
  expected = {k: v.numpy() for k, v in model.detect(image, num_repeats=1).items()}
  actual = detector(image.numpy())
  assert actual['detection_classes'][0, 0] == expected['detection_classes'][0, 0]
  assert actual['detection_scores'][0, 0] == pytest.approx(
      expected['detection_scores'][0, 0], abs=1e-4)
  assert pairwise_iou(actual['detection_boxes'][0, :1],
                      expected['detection_boxes'][0, :1])[0, 0] > 0.95


def test_bad_tflite_exits_are_named(trained, tmp_path):
  model_dir, _, _ = trained
  with pytest.raises(SystemExit, match=r'num_repeats=3 is not an exit.*build_retinanet\.'
                                       r'num_repeats = 2'):
    run_main('--mode=export_tflite', f'--model_dir={model_dir}',
             f'--tflite_path={tmp_path / "x.tflite"}', '--tflite_exit=3')
  # --mode=export checks the TFLite half's exit before it writes the SavedModel.
  with pytest.raises(SystemExit, match=r'num_repeats=3 is not an exit'):
    run_main('--mode=export', f'--model_dir={model_dir}', f'--export_dir={tmp_path / "both"}',
             f'--tflite_path={tmp_path / "both.tflite"}', '--tflite_exit=3')
  assert not (tmp_path / 'both').exists() and not (tmp_path / 'both.tflite').exists()
  with pytest.raises(SystemExit, match='--tflite_exit is for --mode=export_tflite'):
    run_main('--mode=export_saved_model', f'--model_dir={model_dir}',
             f'--export_dir={tmp_path / "export"}', '--tflite_exit=1')
  # The same checkpoint recorded as a plain model: it has no early exit to export.
  plain_dir = tmp_path / 'plain'
  shutil.copytree(model_dir, plain_dir)
  record = json.loads((plain_dir / 'model_config.json').read_text())
  (plain_dir / 'model_config.json').write_text(json.dumps(dict(record, anytime=False)))
  with pytest.raises(SystemExit, match=r'holds no anytime model \(build_retinanet\.anytime'):
    run_main('--mode=export_tflite', f'--model_dir={plain_dir}',
             f'--tflite_path={tmp_path / "x.tflite"}', '--tflite_exit=1')
