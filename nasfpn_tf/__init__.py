"""NAS-FPN (Ghiasi, Lin, Le, CVPR 2019) and RetinaNet in TensorFlow 2 / Keras 2 (tf_keras)."""
__version__ = '0.1.0'
