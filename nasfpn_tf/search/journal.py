"""What a search keeps on disk, written so that kill -9 at any moment loses nothing.

- `Journal`: `trials.jsonl`, one line per finished sample, appended with one write and an fsync.
  A kill during the write can leave only a torn last line: reading skips it (it was never
  acknowledged), and the search cuts it off when it opens the journal again (`recover`), so the
  next append starts on a clean line.
- `ResultStore`: one small JSON file per trained architecture key, written atomically by the
  worker that trained it, before it reports back. A sample whose key is there is never trained
  again, even if the search was killed between the training and its journal line.
"""
import hashlib
import json
import os
import pathlib
from typing import Any, Dict, List, Optional, Tuple

from nasfpn_tf.utils.files import atomic_write


class Journal:
  """An append-only JSON-lines file of finished samples."""

  def __init__(self, path):
    self.path = pathlib.Path(path)

  def read(self) -> List[Dict[str, Any]]:
    """The complete lines, in order, without a torn last line. Safe while another process
    appends."""
    return self._complete_lines()[0]

  def recover(self) -> List[Dict[str, Any]]:
    """`read`, and cuts a torn last line off the file; only for the one process that appends."""
    records, good_bytes = self._complete_lines()
    if self.path.exists() and good_bytes < self.path.stat().st_size:
      with open(self.path, 'r+b') as f:
        f.truncate(good_bytes)
    return records

  def _complete_lines(self) -> Tuple[List[Dict[str, Any]], int]:
    """(records of the complete lines, their length in bytes)."""
    if not self.path.exists():
      return [], 0
    data = self.path.read_bytes()
    records, good_bytes = [], 0
    for line in data.splitlines(keepends=True):
      if not line.endswith(b'\n'):
        break
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        if good_bytes + len(line) < len(data):
          raise ValueError(f'{self.path}: line {len(records) + 1} is not JSON ({e}); only the '
                           'last line can be torn by a kill, so this file was edited.') from e
        break
      good_bytes += len(line)
    return records, good_bytes

  def append(self, record: Dict[str, Any]) -> None:
    line = (json.dumps(record, sort_keys=True) + '\n').encode()
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      os.write(fd, line)
      os.fsync(fd)
    finally:
      os.close(fd)


class ResultStore:
  """{architecture key: trial result}, a file each, shared by the driver and the workers."""

  def __init__(self, directory):
    self.directory = pathlib.Path(directory)

  def _path(self, key: str) -> pathlib.Path:
    return self.directory / (hashlib.sha1(key.encode()).hexdigest()[:20] + '.json')

  def get(self, key: str) -> Optional[Dict[str, Any]]:
    path = self._path(key)
    if not path.exists():
      return None
    record = json.loads(path.read_text())
    return record['result'] if record['key'] == key else None

  def put(self, key: str, result: Dict[str, Any]) -> None:
    self.directory.mkdir(parents=True, exist_ok=True)
    atomic_write(self._path(key), json.dumps({'key': key, 'result': result}, sort_keys=True))
