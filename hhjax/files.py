"""Writing files so that a reader never sees half of one; a file's size and time on any storage.

Every file a run writes for later (config.json, metrics.jsonl, eval.json, downloads, caches)
goes through `write_atomic` or `atomic_path`: the data is written under a temporary name in the
same folder, then renamed over the destination. A process killed mid-write leaves the old file
(or none), never a truncated one; and the whole file is rewritten rather than appended, which
object stores such as gs:// require. Paths go through `etils.epath`, so gs:// works too.
`cache_dir()` is the one per-user folder for downloads and caches.
"""

from collections.abc import Iterator
import contextlib
import errno
import io
import os
from typing import Any
import pathlib
import uuid

from etils import epath

# Where downloads and per-user caches live (Keras's weights, image-check verdicts).
CACHE_DIR_ENV = 'HHJAX_CACHE_DIR'


def cache_dir() -> pathlib.Path:
  """Where downloads and caches are kept: $HHJAX_CACHE_DIR or ~/.cache/hhjax."""
  return pathlib.Path(os.environ.get(CACHE_DIR_ENV) or '~/.cache/hhjax').expanduser()


def _temporary(path: epath.Path) -> epath.Path:
  # Unique per writer: several processes may write the same path at once (a per-host cache).
  return path.parent / f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'


def write_atomic(path: str | os.PathLike, data: str | bytes) -> epath.Path:
  """Writes `data` (text or bytes) to `path` through a temporary file and a rename."""
  path = epath.Path(path)
  tmp = _temporary(path)
  try:
    if isinstance(data, bytes):
      tmp.write_bytes(data)
    else:
      tmp.write_text(data)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def write_png(path: str | os.PathLike, figure: Any, dpi: int = 100) -> epath.Path:
  """Renders a matplotlib `Figure` as PNG and writes it with `write_atomic`."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=dpi)
  return write_atomic(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[epath.Path]:
  """Yields a temporary path to write; renames it to `path` if the block succeeds.

  For writers that stream (a download) or that take a file name (numpy, h5py). On an error
  the temporary file is removed and `path` is left as it was.
  """
  path = epath.Path(path)
  tmp = _temporary(path)
  try:
    yield tmp
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def is_url(path: str | os.PathLike) -> bool:
  """Whether `path` names storage other than the local file system (gs://, ram://, ...)."""
  return '://' in os.fspath(path)


def stat(path: str | os.PathLike) -> tuple[int, int]:
  """(size in bytes, modification time in ns) of a local file or of a URL that TensorFlow reads.

  Raises OSError (FileNotFoundError when there is nothing at `path`), as `os.stat` does.
  """
  if not is_url(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # seconds to load; URLs only
  try:
    st = tf.io.gfile.stat(os.fspath(path))
  except tf.errors.NotFoundError:
    raise FileNotFoundError(errno.ENOENT, 'No such file or directory', os.fspath(path)) from None
  except tf.errors.OpError as e:
    raise OSError(errno.EIO, e.message, os.fspath(path)) from None
  return st.length, st.mtime_nsec
