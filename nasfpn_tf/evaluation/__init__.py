"""COCO evaluation: metrics for detections and the COCO results format."""
from nasfpn_tf.evaluation.coco_metrics import (METRIC_NAMES, CocoEvaluator, coco_results,
                                               format_metrics, groundtruth_dataset,
                                               results_to_coco_json)

__all__ = ['METRIC_NAMES', 'CocoEvaluator', 'coco_results', 'format_metrics',
           'groundtruth_dataset', 'results_to_coco_json']
