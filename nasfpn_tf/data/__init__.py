"""Detection data: dataset writers and readers sharing one tf.Example layout (TFM's keys)."""
from nasfpn_tf.data.tfexample import decode_example, encode_example
