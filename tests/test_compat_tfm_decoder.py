"""Our NAS-FPN as a registered TF Model Garden decoder: TFM's own builders and tasks use it."""
import json

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from official.core import exp_factory
from official.core import task_factory
from official.vision.modeling import factory as tfm_factory

from nasfpn_tf.compat import tfm_decoder
from nasfpn_tf.decoders import NASFPN, block_specs as specs_lib


def tiny_cascade_config(records, block_specs='nasfpn'):
  """TFM's Cascade R-CNN experiment with our pyramid, shrunk: 128 px, ResNet-10, 16 filters, one
  repeat, boxes only (the records have no masks), batch 2, on `records`."""
  config = exp_factory.get_exp_config('cascadercnn_resnet_nasfpn_tf_coco')
  config.runtime.mixed_precision_dtype = 'float32'
  model = config.task.model
  model.num_classes, model.input_size, model.include_mask = 10, [128, 128, 3], False
  model.backbone.resnet.model_id = 10
  tfm_decoder.use_nasfpn_tf_decoder(config, block_specs=block_specs, num_filters=16,
                                    num_repeats=1)
  model.rpn_head.num_filters = 16
  model.detection_head.num_convs, model.detection_head.num_filters = 0, 16
  model.detection_head.fc_dims = 32
  model.roi_generator.pre_nms_top_k, model.roi_generator.num_proposals = 200, 32
  model.roi_sampler.num_sampled_rois = 16
  config.task.init_checkpoint = None
  data = config.task.train_data
  data.input_path, data.global_batch_size, data.dtype = records['train'], 2, 'float32'
  data.shuffle_buffer_size = 8
  data.parser.rpn_batch_size_per_im = 32
  return config


def test_cascade_rcnn_trains_through_tfm_task(synthetic_records):
  config = tiny_cascade_config(synthetic_records)
  task = task_factory.get_task(config.task)
  model = task.build_model()
  assert isinstance(model.decoder, NASFPN)
  assert model.decoder.block_specs == specs_lib.NASFPN
  # Three detection stages: TFM's cascade with the two extra IoU thresholds.
  assert len(model._config_dict['detection_head']) == 3  # pylint: disable=protected-access
  dataset = task.build_inputs(config.task.train_data)
  optimizer = task.create_optimizer(config.trainer.optimizer_config, config.runtime)
  metrics = task.build_metrics(training=True)
  before = {v.name: v.numpy() for v in model.decoder.trainable_variables}
  iterator = iter(dataset)
  for _ in range(3):
    logs = task.train_step(next(iterator), model, optimizer, metrics)
    assert np.isfinite(float(logs['loss'])), logs
  changed = [name for name, v in ((v.name, v) for v in model.decoder.trainable_variables)
             if not np.array_equal(before[name], v.numpy())]
  # Every decoder variable trains (the global-pooling gates and sums reach every conv).
  assert len(changed) == len(before) > 0
  assert int(optimizer.iterations) == 3


# The search writes rows like these (best.gin); TFM configs take them as JSON. A 3-cell P3-P5
# pyramid: P4 gated by P5, then the outputs.
ROWS = [[4, 'global_pooling', [1, 2], False], [3, 'sum', [0, 3], True],
        [4, 'sum', [3, 4], True], [5, 'sum', [2, 5], True]]


@pytest.mark.parametrize('block_specs,levels', [
    ('nasfpn_lite', (3, 6)), ('fpn', (2, 6)), (json.dumps(ROWS), (3, 5))])
def test_tfm_retinanet_builds_every_table(block_specs, levels):
  """('nasfpn', the paper's table, is the cascade test's.)"""
  config = exp_factory.get_exp_config('retinanet_resnet_nasfpn_tf_coco').task.model
  config.min_level, config.max_level = levels
  config.num_classes, config.input_size = 3, [128, 128, 3]
  config.backbone.resnet.model_id = 10
  config.head.num_convs, config.head.num_filters = 1, 8
  tfm_decoder.use_nasfpn_tf_decoder(config, block_specs=block_specs, num_filters=8,
                                    num_repeats=2, use_separable_conv=True)
  model = tfm_factory.build_retinanet(
      tf_keras.layers.InputSpec(shape=[None, 128, 128, 3]), config,
      tf_keras.regularizers.l2(1e-4))
  decoder = model.decoder
  assert isinstance(decoder, NASFPN)
  expected = specs_lib.resolve(json.loads(block_specs) if block_specs.startswith('[')
                               else block_specs, *levels)
  assert decoder.block_specs == expected
  assert decoder.get_config()['num_repeats'] == 2
  assert decoder.get_config()['use_separable_conv']
  assert decoder.get_config()['kernel_regularizer']['config']['l2'] == pytest.approx(1e-4)
  outputs = model(tf.zeros([1, 128, 128, 3]), training=False)
  # TFM's head reads one map per level of the model config, at stride 2^level.
  assert sorted(outputs['cls_outputs'], key=int) == [str(l) for l in range(levels[0],
                                                                            levels[1] + 1)]
  for level, scores in outputs['cls_outputs'].items():
    assert scores.shape[1:3] == (128 >> int(level),) * 2


def test_experiment_configs_take_overrides_as_tfm_train_does():
  """TFM's train.py applies --params_override (YAML) strictly to the registered experiment."""
  config = exp_factory.get_exp_config('maskrcnn_resnet_nasfpn_tf_coco')
  config.override({'task': {'model': {'decoder': {'nasfpn_tf': {
      'block_specs': 'fpn', 'num_filters': 64, 'merge_filters': 128}}}}})
  config.validate()
  decoder = config.task.model.decoder
  assert decoder.type == 'nasfpn_tf'
  assert decoder.get().as_dict() == {'block_specs': 'fpn', 'num_filters': 64, 'num_repeats': 7,
                                     'merge_filters': 128, 'use_separable_conv': False}
  with pytest.raises(KeyError, match='num_filtres'):
    config.override({'task': {'model': {'decoder': {'nasfpn_tf': {'num_filtres': 8}}}}})
  cascade = exp_factory.get_exp_config('cascadercnn_resnet_nasfpn_tf_coco').task.model
  assert cascade.roi_sampler.cascade_iou_thresholds == [0.6, 0.7]
  assert cascade.detection_head.class_agnostic_bbox_pred
  assert (cascade.min_level, cascade.max_level) == (3, 7)


BACKBONE_SPECS = {str(level): tf.TensorShape([None, 128 >> level, 128 >> level, 8])
                  for level in (2, 3, 4, 5)}


@pytest.mark.parametrize('settings,levels,message', [
    (dict(block_specs='nasfpn_large'), (3, 7),
     r"task\.model\.decoder\.nasfpn_tf\.block_specs = 'nasfpn_large'.*known specs"),
    (dict(block_specs='nasfpn'), (2, 6),
     r"nasfpn_tf\.block_specs = 'nasfpn' \(model levels 2\.\.6\).*level 7 is outside"),
    (dict(block_specs='[[4, "sum", [1, 2]]]'), (3, 5), r'nasfpn_tf\.block_specs = .*cell 0'),
    (dict(block_specs='[[4, "sum", [1, 2], true'), (3, 5), r'nasfpn_tf\.block_specs = .*Expect'),
    (dict(num_repeats=0), (3, 7), r'task\.model\.decoder\.nasfpn_tf\.num_repeats = 0'),
    (dict(num_filters=0), (3, 7), r'task\.model\.decoder\.nasfpn_tf\.num_filters = 0'),
    (dict(merge_filters=-8), (3, 7),
     r'task\.model\.decoder\.nasfpn_tf\.merge_filters = -8 must be >= 0 \(0: num_filters\)'),
])
def test_bad_decoder_settings_name_the_config_field(settings, levels, message):
  config = exp_factory.get_exp_config('retinanet_resnet_nasfpn_tf_coco').task.model
  config.min_level, config.max_level = levels
  tfm_decoder.use_nasfpn_tf_decoder(config, **settings)
  with pytest.raises(ValueError, match=message):
    tfm_decoder.build_nasfpn_tf_decoder(BACKBONE_SPECS, config)


def test_use_nasfpn_tf_decoder_rejects_unknown_settings():
  config = exp_factory.get_exp_config('retinanet_resnetfpn_coco')
  with pytest.raises(ValueError, match=r"\['num_filtres'\]: no such task\.model\.decoder"):
    tfm_decoder.use_nasfpn_tf_decoder(config, num_filtres=8)
  assert config.task.model.decoder.type == 'fpn'
  tfm_decoder.use_nasfpn_tf_decoder(config, num_filters=8)
  assert config.task.model.decoder.type == 'nasfpn_tf'
  assert config.task.model.decoder.nasfpn_tf.num_filters == 8
