"""The full locks in requirements/ stay true to constraints.txt, the pins a human edits.

`make` installs a lock as is, so a pin changed in constraints.txt without `make lock` would
otherwise go unnoticed until an install. No network: this reads the files only, and needs no
package beyond pytest (Bazel's hub has only the pinned ones).
"""
import itertools
import operator
import re

import pytest

from training_helpers import REPO

_COMPARE = {'<': operator.lt, '<=': operator.le, '>': operator.gt, '>=': operator.ge,
            '==': operator.eq, '!=': operator.ne}


def _version(text):
  return tuple(int(part) for part in text.split('.'))


def _holds(clause, version):
  """Whether `version` ('3.11') meets one comparison such as '>=3.10' or '< "3.11"'."""
  match = re.fullmatch(r'\s*(<=|>=|==|!=|<|>)\s*"?([\d.]+)"?\s*', clause)
  assert match, f'not a simple version comparison: {clause!r}'
  op, bound = match.groups()
  width = len(_version(bound))
  return _COMPARE[op](_version(version)[:width], _version(bound))


def _name(name):
  """The normalized distribution name, extras dropped ('ray[tune]' -> 'ray')."""
  return re.sub(r'[-_.]+', '-', re.sub(r'\[.*\]', '', name)).lower()


def _supported_versions():
  """PYTHON_VERSIONS of the Makefile: the versions `make` accepts, one lock each."""
  line = re.search(r'^PYTHON_VERSIONS := (.+)$', (REPO / 'Makefile').read_text(), flags=re.M)
  return line.group(1).split()


def _lock(version):
  """{name: version} of requirements/lock-py<version>.txt."""
  pins = {}
  for line in (REPO / 'requirements' / f'lock-py{version}.txt').read_text().splitlines():
    if line.strip() and not line.lstrip().startswith('#'):
      name, pinned = line.split('==')
      pins[_name(name)] = pinned.strip()
  return pins


def _constraints(version):
  """{name: version} of the constraints.txt pins whose python_version marker holds for `version`."""
  pins = {}
  for line in (REPO / 'constraints.txt').read_text().splitlines():
    line = line.split('#')[0].strip()
    if not line:
      continue
    pin, _, marker = line.partition(';')
    if marker:
      clause = re.fullmatch(r'\s*python_version\s*(.+)', marker)
      assert clause, f'constraints.txt markers compare python_version only: {line}'
      if not _holds(clause.group(1), version):
        continue
    name, pinned = pin.split('==')
    pins[_name(name)] = pinned.strip()
  return pins


def test_supported_versions_are_what_setup_py_accepts():
  python_requires = re.search(r"python_requires='([^']+)'", (REPO / 'setup.py').read_text())
  accepted = [f'3.{minor}' for minor in range(40)
              if all(_holds(clause, f'3.{minor}') for clause in python_requires.group(1).split(','))]
  assert accepted == _supported_versions() == ['3.10', '3.11', '3.12', '3.13']


def test_one_lock_per_supported_version():
  locks = sorted(p.name for p in (REPO / 'requirements').glob('lock-py*.txt'))
  assert locks == sorted(f'lock-py{version}.txt' for version in _supported_versions())


@pytest.mark.parametrize('version', _supported_versions())
def test_lock_holds_every_pin(version):
  lock = _lock(version)
  differ = {name: (pinned, lock.get(name)) for name, pinned in _constraints(version).items()
            if lock.get(name) != pinned}
  assert not differ, (f'lock-py{version}.txt differs from constraints.txt '
                      f'(name: (pin, lock)): {differ}; run `make lock`')


@pytest.mark.parametrize('version', _supported_versions())
def test_lock_was_resolved_for_its_version(version):
  """The header that records the command regenerating the lock names the lock's own version."""
  lines = (REPO / 'requirements' / f'lock-py{version}.txt').read_text().splitlines()
  header = ' '.join(itertools.takewhile(lambda line: line.startswith('#'), lines))
  assert f'--python-version {version} ' in header
