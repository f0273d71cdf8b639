"""Writing files and folders so that readers never see half of one: the one atomic write.

Everything is written under a temporary sibling name (`<path>.tmp-<pid>`) and renamed into
place, through `tf.io.gfile` so that the paths may be on GCS as well as local. This module
imports nothing of nasfpn_tf: any layer may use it. `atomic_write` of a local path does not load
TensorFlow (a search worker that trains nothing should not pay for it).
"""
import contextlib
import os
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def staging_path(path: PathLike) -> str:
  """The temporary sibling `path` is written under before its rename."""
  return f"{os.fspath(path).rstrip('/')}.tmp-{os.getpid()}"


def atomic_write(path: PathLike, content: Union[str, bytes]) -> None:
  """Writes `content` (text, or bytes) to `path`, creating missing folders, through a temporary
  file and a rename: a reader (a trainer's evaluator, an app, TF Serving) never picks up half a
  file."""
  path = os.fspath(path)
  tmp = staging_path(path)
  mode = 'wb' if isinstance(content, bytes) else 'w'
  directory = os.path.dirname(path)
  if '://' not in path:
    if directory:
      os.makedirs(directory, exist_ok=True)
    with open(tmp, mode) as f:
      f.write(content)
    os.replace(tmp, path)
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(directory)
  with tf.io.gfile.GFile(tmp, mode) as f:
    f.write(content)
  tf.io.gfile.rename(tmp, path, overwrite=True)


@contextlib.contextmanager
def atomic_directory(path: str, replace: bool = False) -> Iterator[str]:
  """Yields a staging folder to fill; on success it is renamed to `path`, so a watcher of the
  parent folder never sees `path` half written. `path` must be absent or empty, or, with
  `replace`, it is swapped out: renamed aside (`<path>.replaced-<pid>`), the staging folder
  renamed in, then the old one removed, so `path` holds the old folder or the new one whole at
  every moment but the instant between the two renames. On an error the staging folder is
  removed and `path` is left as it was."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  staging = staging_path(path)
  aside = f"{path.rstrip('/')}.replaced-{os.getpid()}"
  try:
    yield staging
    if tf.io.gfile.exists(path):
      if tf.io.gfile.listdir(path) and not replace:
        raise ValueError(f'{path} is not empty: it cannot be replaced.')
      tf.io.gfile.rename(path, aside, overwrite=True)
    tf.io.gfile.rename(staging, path)
    if tf.io.gfile.exists(aside):
      tf.io.gfile.rmtree(aside)
  finally:
    if tf.io.gfile.exists(staging):
      tf.io.gfile.rmtree(staging)
