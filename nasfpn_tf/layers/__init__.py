"""Keras layers of the NAS-FPN search space."""
from nasfpn_tf.layers.deformable_conv import DeformableConv2D, deform_conv2d
from nasfpn_tf.layers.dropblock import DropBlock, set_dropblock_step
from nasfpn_tf.layers.merging_cell import (MERGING_CELLS, GlobalPoolingCell, MergingCell, SumCell,
                                           global_pooling)
from nasfpn_tf.layers.resample import ResampleToLevel
