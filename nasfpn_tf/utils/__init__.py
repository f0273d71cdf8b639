"""Measuring models: parameter and FLOP counts comparable with the paper's Table 1."""
from nasfpn_tf.utils.model_stats import count_flops, count_params, frozen_inference_graph
