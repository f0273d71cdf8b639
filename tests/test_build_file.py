"""BUILD must stay in step with the tree: every module, experiment and test file has its target."""
import pathlib
import re

from training_helpers import REPO



def _build_text():
  return (REPO / 'BUILD').read_text()


def _targets(kind):
  """{name: [srcs]} of every `kind(...)` rule in BUILD."""
  targets = {}
  for body in re.findall(kind + r'\((.*?)\n\)', _build_text(), flags=re.S):
    name = re.search(r'name\s*=\s*"([^"]+)"', body).group(1)
    srcs = re.search(r'srcs\s*=\s*\[(.*?)\]', body, flags=re.S).group(1)
    targets[name] = re.findall(r'"([^"]+)"', srcs)
  return targets


def _tree(pattern):
  return sorted(str(p.relative_to(REPO)) for p in REPO.glob(pattern) if '__pycache__' not in p.parts)


def test_library_lists_every_module():
  listed = set(_targets('py_library')['nasfpn_tf'])
  present = set(_tree('nasfpn_tf/**/*.py'))
  assert not present - listed, f'modules missing from BUILD py_library: {sorted(present - listed)}'
  assert not listed - present, f'BUILD lists modules that do not exist: {sorted(listed - present)}'


def test_one_py_test_per_test_file():
  tests = _targets('py_test')
  present = {pathlib.Path(p).stem: p for p in _tree('tests/test_*.py')}
  assert set(tests) == set(present), (
      f'missing py_test: {sorted(set(present) - set(tests))}; '
      f'py_test without a file: {sorted(set(tests) - set(present))}')
  for name, srcs in tests.items():
    assert present[name] in srcs, f'py_test {name} does not build {present[name]}'


def test_one_py_binary_per_experiment():
  binaries = _targets('py_binary')
  present = {pathlib.Path(p).stem: p for p in _tree('experiments/*.py')}
  assert set(binaries) >= set(present), f'missing py_binary: {sorted(set(present) - set(binaries))}'
  for name, path in present.items():
    assert path in binaries[name], f'py_binary {name} does not build {path}'
