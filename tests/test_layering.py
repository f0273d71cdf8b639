"""The package's layers: layers <- decoders <- models <- data/training/evaluation <- export, search
<- main/predict/experiments. A lower layer never imports a higher one, and gin names are registered
in config.py alone, not by imports in gin files. The modules the search's driver and the
architecture drawing read load without TensorFlow."""
import ast
import pathlib
import subprocess
import sys

import pytest

from nasfpn_tf.config import GIN_CONFIGS_DIR
from training_helpers import REPO, SUBPROCESS_TIMEOUT

PACKAGE = REPO / 'nasfpn_tf'
HIGHER_THAN_MODELS = ('nasfpn_tf.training', 'nasfpn_tf.export', 'nasfpn_tf.evaluation',
                      'nasfpn_tf.data', 'nasfpn_tf.search', 'experiments')
# Folder -> the modules no file in it may import.
FORBIDDEN = {
    'layers': HIGHER_THAN_MODELS,
    'decoders': HIGHER_THAN_MODELS,
    'models': HIGHER_THAN_MODELS,
    'export': ('nasfpn_tf.training', 'nasfpn_tf.search', 'experiments'),
    'search': ('experiments',),
}


def imported_modules(path: pathlib.Path):
  """Every module `path` imports, at any depth of its code ('from a import b' gives a and a.b)."""
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f'{node.module}.{alias.name}' for alias in node.names)


def _is_within(module: str, package: str) -> bool:
  return module == package or module.startswith(package + '.')


@pytest.mark.parametrize('folder', sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(folder):
  violations = [
      f'{path.relative_to(PACKAGE.parent)} imports {module}'
      for path in sorted((PACKAGE / folder).glob('**/*.py'))
      for module in imported_modules(path)
      if any(_is_within(module, forbidden) for forbidden in FORBIDDEN[folder])]
  assert not violations, '\n'.join(violations)


def test_the_checker_sees_imports():
  found = set(imported_modules(PACKAGE / 'export' / 'saved_model.py'))
  assert {'nasfpn_tf.models.factory', 'nasfpn_tf.checkpointing'} <= found


def test_gin_files_import_nothing():
  """config.register_configurables makes every name known; an import line would hide a name
  that it misses."""
  importing = [path.name for path in sorted(GIN_CONFIGS_DIR.glob('*.gin'))
               if any(line.startswith('import ') for line in path.read_text().splitlines())]
  assert not importing


@pytest.mark.parametrize('module', ['nasfpn_tf.decoders.block_specs', 'nasfpn_tf.search.space',
                                    'nasfpn_tf.search.trials'])
def test_loads_without_tensorflow(module):
  """A fresh Python that imports `module` has imported none of TensorFlow, tf_keras, TFM."""
  code = (f'import sys, {module}; '
          "print(sorted({'tensorflow', 'tf_keras', 'official'} & set(sys.modules)))")
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT, check=True)
  assert result.stdout.strip() == '[]', result.stderr
