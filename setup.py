"""nasfpn_tf: NAS-FPN and RetinaNet in TensorFlow 2 / Keras 2 (tf_keras)."""
import pathlib
import re

import setuptools

_HERE = pathlib.Path(__file__).parent
_RUNTIME = ('tensorflow', 'tf-keras', 'tf-models-official', 'pycocotools', 'gin-config',
            'absl-py', 'numpy', 'matplotlib', 'pillow', 'ray[tune]')
_TEST = ('pytest', 'pytest-xdist')


def _pins(names):
  """Requirements for `names`, versions (and markers) taken from constraints.txt."""
  pins = []
  for line in (_HERE / 'constraints.txt').read_text().splitlines():
    line = line.split('#')[0].strip()
    name = re.split(r'[=<>;! ]', line, maxsplit=1)[0]
    if name in names:
      pins.append(line)
  return pins


setuptools.setup(
    name='nasfpn_tf',
    version='0.1.0',
    description='NAS-FPN (Ghiasi, Lin, Le, CVPR 2019) and RetinaNet in TensorFlow 2 / Keras 2.',
    long_description=(_HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['nasfpn_tf', 'nasfpn_tf.*']),
    python_requires='>=3.10,<3.14',
    install_requires=_pins(_RUNTIME),
    extras_require={'test': _pins(_TEST)},
    license='Apache-2.0',
)
