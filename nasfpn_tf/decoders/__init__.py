"""Pyramid networks (decoders) from block specs."""
from nasfpn_tf.decoders.block_specs import BlockSpec, SPECS
from nasfpn_tf.decoders.nasfpn import NASFPN
