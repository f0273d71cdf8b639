"""Writing files and folders so that readers never see half of one: the one atomic write.

Everything is written under a temporary sibling name (`<path>.tmp-<pid>`) and renamed into
place, through `tf.io.gfile` so that the paths may be on GCS as well as local. This module
imports nothing of nasfpn_tf: any layer may use it.
"""
import contextlib
import os
from typing import Iterator, Union

import tensorflow as tf


def staging_path(path: str) -> str:
  """The temporary sibling `path` is written under before its rename."""
  return f"{path.rstrip('/')}.tmp-{os.getpid()}"


def atomic_write(path: str, content: Union[str, bytes]) -> None:
  """Writes `content` (text, or bytes) to `path`, creating missing folders, through a temporary
  file and a rename: a reader (a trainer's evaluator, an app, TF Serving) never picks up half a
  file."""
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)
  tmp = staging_path(path)
  with tf.io.gfile.GFile(tmp, 'wb' if isinstance(content, bytes) else 'w') as f:
    f.write(content)
  tf.io.gfile.rename(tmp, path, overwrite=True)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
  """Yields a staging folder to fill; on success it is renamed to `path` (which must be absent
  or empty), so a watcher of the parent folder never sees `path` half written. On an error the
  staging folder is removed and `path` is left as it was."""
  staging = staging_path(path)
  try:
    yield staging
    if tf.io.gfile.exists(path):
      if tf.io.gfile.listdir(path):
        raise ValueError(f'{path} is not empty: it cannot be replaced.')
      tf.io.gfile.rmtree(path)
    tf.io.gfile.rename(staging, path)
  finally:
    if tf.io.gfile.exists(staging):
      tf.io.gfile.rmtree(staging)
