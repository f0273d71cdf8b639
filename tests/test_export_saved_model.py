"""main --mode=export_saved_model: the SavedModel, reloaded in a fresh process, detects what the
trained Keras model detects through every signature; bad model dirs and images fail clearly."""
import contextlib
import io
import json
import pathlib
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from nasfpn_tf import config
from nasfpn_tf.data import input_pipeline
from nasfpn_tf.data import tfexample
from nasfpn_tf.export import saved_model
from nasfpn_tf.models import geometry
from nasfpn_tf.training import trainer as trainer_lib
from training_helpers import assert_same_detections, keras_detections
from training_helpers import records_and_encoded_images, run_main, serve_in_fresh_process
from training_helpers import spread_scores
from training_helpers import tiny_bindings

MAX_DETECTIONS = 20


def _encode(image: np.ndarray, mode: str, file_format: str) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).convert(mode).save(out, format=file_format)
  return out.getvalue()


@pytest.fixture(scope='module')
def exported(synthetic_records, tmp_path_factory):
  """A tiny model trained 2 steps, exported through main: (model_dir, export_dir, summary,
  the trained Keras model)."""
  root = tmp_path_factory.mktemp('export')
  model_dir = root / 'model'
  # A near-untrained model: keep every candidate so there are detections to compare.
  config.parse_gin([], tiny_bindings(synthetic_records, train_steps=2) + [
      'build_retinanet.pre_nms_score_threshold = 0.0',
      f'build_retinanet.max_detections = {MAX_DETECTIONS}'])
  trainer = trainer_lib.RetinaNetTrainer(str(model_dir), tf.distribute.get_strategy())
  spread_scores(trainer.model)
  with contextlib.redirect_stdout(io.StringIO()):
    trainer.run()
  export_dir = root / 'exports' / '1'
  printed = run_main('--mode=export_saved_model', f'--model_dir={model_dir}',
                     f'--export_dir={export_dir}')
  return model_dir, export_dir, json.loads(printed.splitlines()[-1]), trainer.model


@pytest.fixture(scope='module')
def served(exported, synthetic_records, tmp_path_factory):
  """Every signature's answers from a fresh process, and the Keras model's on the same inputs."""
  _, export_dir, _, model = exported
  root = tmp_path_factory.mktemp('served')
  examples, jpegs = records_and_encoded_images(synthetic_records['val'])
  images = [tfexample.decode_example(record)['image'].numpy() for record in examples]
  assert len({image.shape for image in images}) > 1  # the bytes batch mixes sizes
  gray = _encode(images[0], 'L', 'JPEG')
  rgba = _encode(images[1], 'RGBA', 'PNG')
  encoded = jpegs + [gray, rgba]
  same_size = np.stack([images[0], images[0][:, ::-1]])
  outputs = serve_in_fresh_process(export_dir, [
      ('images', 'serving_default', {'images': same_size}),
      ('other_size', 'serving_default', {'images': images[1][None]}),
      ('encoded', 'serving_encoded_image', {'encoded_image': encoded}),
      ('examples', 'serving_tf_example', {'serialized_example': examples}),
      # A bad image among good ones fails the call, and the next call serves again.
      ('not_an_image', 'serving_encoded_image', {'encoded_image': [encoded[0], b'not an image']}),
      ('truncated', 'serving_encoded_image', {'encoded_image': [encoded[0], encoded[0][:200]]}),
      ('after_errors', 'serving_encoded_image', {'encoded_image': encoded[:1]}),
  ], root, may_fail=('not_an_image', 'truncated'))
  outputs['errors'] = [outputs.pop('not_an_image'), outputs.pop('truncated')]

  size = model.image_size
  detect = tf.function(model.detect, input_signature=[tf.TensorSpec([None] + size + [3])])
  decoded = [tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
             for data in encoded]
  eval_batches = input_pipeline.build_eval_dataset(synthetic_records['val'], 4,
                                                   model.get_config())
  expected_examples = []
  for batch, labels in eval_batches:  # the evaluation pipeline itself
    detections = detect(batch)
    detections['detection_boxes'] = geometry.to_original_image(
        detections['detection_boxes'], labels['image_info'])
    expected_examples.append({key: value.numpy() for key, value in detections.items()})
  expected = {
      'images': keras_detections(detect, size, same_size),
      'other_size': keras_detections(detect, size, images[1][None]),
      'encoded': keras_detections(detect, size, decoded),
      'examples': {key: np.concatenate([e[key] for e in expected_examples])
                   for key in expected_examples[0]},
  }
  return outputs, expected, decoded


def test_export_writes_the_signatures_and_the_label_map(exported, synthetic_records):
  model_dir, export_dir, summary, _ = exported
  assert summary['checkpoint'] == str(model_dir / 'ckpt-2') and summary['step'] == 2
  assert (export_dir / 'saved_model.pb').exists()
  assert not list(export_dir.parent.glob('*.tmp-*'))  # the staging folder was renamed
  label_map = json.loads((export_dir / 'assets' / 'label_map.json').read_text())
  records_map = pathlib.Path(synthetic_records['train'].replace('-*.tfrecord', '-label_map.json'))
  assert summary['label_map'] == str(records_map)
  assert label_map == json.loads(records_map.read_text())


def test_signature_inputs(served):
  outputs, _, _ = served
  assert outputs['inputs'] == {
      'serving_default': {'images': ('uint8', [None, None, None, 3])},
      'serving_encoded_image': {'encoded_image': ('string', [None])},
      'serving_tf_example': {'serialized_example': ('string', [None])},
  }


@pytest.mark.parametrize('call', ['images', 'other_size', 'encoded', 'examples'])
def test_fresh_process_detections_match_the_keras_model(served, call):
  """uint8 batch; another size; bytes of 6 images of 4 sizes incl. grayscale JPEG and RGBA PNG;
  tf.Examples against the evaluation pipeline."""
  outputs, expected, _ = served
  assert_same_detections(outputs[call], expected[call], call)
  assert outputs[call]['detection_boxes'].shape[1:] == (MAX_DETECTIONS, 4)
  assert outputs[call]['detection_classes'].dtype == np.int32
  valid = np.arange(MAX_DETECTIONS) < outputs[call]['num_detections'][:, None]
  assert set(outputs[call]['detection_classes'][valid]) <= set(range(1, 10))


def test_boxes_are_in_original_image_pixels(served):
  outputs, _, decoded = served
  for boxes, image in zip(outputs['encoded']['detection_boxes'], decoded):
    height, width = image.shape[:2]
    assert boxes[:, [0, 2]].max() <= height and boxes[:, [1, 3]].max() <= width
  # Smaller than the 128 px model input: boxes left in its pixels could pass the bounds above.
  assert max(max(image.shape[:2]) for image in decoded) < 128


def test_corrupt_image_is_an_invalid_argument_error(served):
  outputs, _, _ = served
  unknown, truncated = outputs['errors']
  assert 'Unknown image file format' in unknown
  assert 'Invalid JPEG data' in truncated
  np.testing.assert_array_equal(outputs['after_errors']['num_detections'],
                                outputs['encoded']['num_detections'][:1])


def _copy_model_dir(model_dir, destination, checkpoint=True, leave_out=()):
  """A copy of `model_dir`'s files, without its checkpoints unless `checkpoint`, nor the files
  named in `leave_out`."""
  destination.mkdir()
  for path in model_dir.iterdir():
    is_checkpoint = path.name == 'checkpoint' or path.name.startswith('ckpt-')
    if path.is_file() and (checkpoint or not is_checkpoint) and path.name not in leave_out:
      shutil.copy(path, destination / path.name)
  return destination


def test_model_dir_without_checkpoint_fails_clearly(exported, tmp_path):
  model_dir = _copy_model_dir(exported[0], tmp_path / 'model', checkpoint=False)
  with pytest.raises(SystemExit, match=r'no checkpoint \(ckpt-N\) in model dir .*model: train'):
    run_main('--mode=export_saved_model', f'--model_dir={model_dir}',
             f'--export_dir={tmp_path / "export"}')
  assert not (tmp_path / 'export').exists()


def test_model_dir_without_a_config_record_fails_clearly(exported, tmp_path):
  model_dir = _copy_model_dir(exported[0], tmp_path / 'model',
                              leave_out=('operative_config.gin', 'model_config.json'))
  with pytest.raises(SystemExit, match=r'operative_config.gin not found \(nor model_config.json\): '
                                       'the model dir has no record of the config'):
    run_main('--mode=export_saved_model', f'--model_dir={model_dir}',
             f'--export_dir={tmp_path / "export"}')


def test_model_dir_without_model_config_json_exports_from_its_operative_config(
    exported, tmp_path):
  """Model dirs written before model_config.json still export, the same network."""
  model_dir = _copy_model_dir(exported[0], tmp_path / 'model', leave_out=('model_config.json',))
  summary = json.loads(run_main('--mode=export_saved_model', f'--model_dir={model_dir}',
                                f'--export_dir={tmp_path / "export"}').splitlines()[-1])
  assert summary['step'] == 2 and summary['label_map'] == exported[2]['label_map']
  model, _, _ = saved_model.load_model(str(model_dir))
  assert model.get_config() == exported[3].get_config()


def test_model_config_json_alone_rebuilds_the_model(exported, tmp_path):
  model_dir = _copy_model_dir(exported[0], tmp_path / 'model', leave_out=('operative_config.gin',))
  model, checkpoint, step = saved_model.load_model(
      str(model_dir), ['build_retinanet.max_detections = 7'])
  assert checkpoint == str(model_dir / 'ckpt-2') and step == 2
  recorded = json.loads((model_dir / 'model_config.json').read_text())
  assert model.get_config() == dict(recorded, max_detections=7)
  for restored, trained in zip(model.weights, exported[3].weights):
    np.testing.assert_array_equal(restored.numpy(), trained.numpy())


def test_config_that_does_not_match_the_checkpoint_fails_clearly(exported, tmp_path):
  # A record edited after training: model_config.json, or the operative config without it.
  edits = [('model_config.json', (), '"num_filters": 16', '"num_filters": 24'),
           ('operative_config.gin', ('model_config.json',), 'build_retinanet.num_filters = 16',
            'build_retinanet.num_filters = 24')]
  for name, leave_out, old, new in edits:
    model_dir = _copy_model_dir(exported[0], tmp_path / name, leave_out=leave_out)
    record = model_dir / name
    assert old in record.read_text()
    record.write_text(record.read_text().replace(old, new))
    with pytest.raises(SystemExit) as exit_:
      run_main('--mode=export_saved_model', f'--model_dir={model_dir}',
               f'--export_dir={tmp_path / "export"}')
    assert f'checkpoint {model_dir / "ckpt-2"} was trained with another model config' in str(
        exit_.value.code)
  # A binding on top that changes the network is named.
  with pytest.raises(SystemExit) as exit_:
    run_main('--mode=export_saved_model', f'--model_dir={exported[0]}',
             f'--export_dir={tmp_path / "export"}',
             '--gin_bindings=build_retinanet.head_num_filters = 8')
  assert (f'build_retinanet.head_num_filters: 16 in {exported[0] / "model_config.json"}, now 8'
          in str(exit_.value.code))
  assert not (tmp_path / 'export').exists()


def test_export_flags_are_checked(exported, tmp_path):
  model_dir, export_dir, _, _ = exported
  with pytest.raises(SystemExit, match='drop --gin_file'):
    run_main('--mode=export_saved_model', f'--model_dir={model_dir}', '--gin_file=demo.gin',
             f'--export_dir={tmp_path}')
  with pytest.raises(SystemExit, match='needs --export_dir'):
    run_main('--mode=export_saved_model', f'--model_dir={model_dir}')
  with pytest.raises(SystemExit, match='needs --tflite_path'):
    run_main('--mode=export_tflite', f'--model_dir={model_dir}')
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('mine')
  with pytest.raises(SystemExit, match='holds something other than a SavedModel'):
    run_main('--mode=export_saved_model', f'--model_dir={model_dir}', f'--export_dir={foreign}')
  assert [p.name for p in foreign.iterdir()] == ['notes.txt']


def test_a_second_export_replaces_the_first_whole(exported, tmp_path):
  """A rerun (make demo's) exports again into the same folder: the earlier SavedModel is
  swapped for the new one, nothing of it is left, and nothing is left beside it."""
  model_dir, export_dir, first, _ = exported
  assert first['replaced'] is False
  again = tmp_path / 'exports' / '1'
  shutil.copytree(export_dir, again)
  (again / 'stale_marker').write_text('from the first export')
  printed = run_main('--mode=export_saved_model', f'--model_dir={model_dir}',
                     f'--export_dir={again}')
  summary = json.loads(printed.splitlines()[-1])
  assert summary['replaced'] is True and summary['step'] == first['step']
  assert not (again / 'stale_marker').exists()
  assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in export_dir.iterdir())
  assert [p.name for p in again.parent.iterdir()] == ['1']
  loaded = tf.saved_model.load(str(again))
  assert set(loaded.signatures) == set(tf.saved_model.load(str(export_dir)).signatures)
