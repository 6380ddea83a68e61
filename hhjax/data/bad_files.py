"""Files that are not readable images: found once per process, reported by path, one policy.

An image folder (at dataset_info / create_dataset) and the files given to predict are checked
the same way: every file is decoded once in a parallel tf.data pass, and those that fail get a
short reason. config.data.bad_files then decides: 'error' raises with the list, 'skip' warns with
it and goes on without them.
"""

from collections.abc import Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

from hhjax import config_checks
from hhjax import errors
from hhjax import files
from hhjax.data import decode
from hhjax.data import streams

# How many bad files a message lists before it counts the rest.
_MAX_LISTED = 20
_FORMATS = ', '.join(decode.IMAGE_FORMATS)


def _why_bad(path: str) -> str:
  """A short reason why `path` does not decode (it has already failed once)."""
  try:
    if tf.io.gfile.stat(path).length == 0:
      return 'empty file (0 bytes)'
    with tf.io.gfile.GFile(path, 'rb') as f:   # local files and URLs (gs://) alike
      header = f.read(30)
    if header[:2] == b'BM' and len(header) == 30 and header[28] in (1, 2, 4):
      return (f'{header[28]}-bit BMP: TensorFlow decodes BMPs of 8, 24 and 32 bits; convert '
              'it to PNG')
    decode.decode_image(tf.io.read_file(path))
  except (tf.errors.OpError, OSError) as e:
    return decode.error_reason(e)
  return 'failed to decode in tf.data but not on a second try'


# path -> (size, mtime_ns, reason or None): a folder is decoded once per process.
_CHECKED: dict[str, tuple[int, int, str | None]] = {}


def check_image_files(paths: Sequence[str],
                      num_parallel_calls: int | None = None) -> dict[str, str]:
  """Decodes every file once, in parallel; returns {path: reason} for those that fail.

  Results are remembered per process for files whose size and modification time are unchanged.
  """
  stats = {}
  for path in paths:
    try:
      stats[path] = files.stat(path)   # local files and URLs (gs://) alike
    except OSError as e:  # A dangling link, or a file removed since it was listed.
      _CHECKED[path] = (-1, -1, f'cannot read: {e.strerror}')
  todo = [p for p in stats if _CHECKED.get(p, (None, None))[:2] != stats[p]]
  if todo:
    ds = tf.data.Dataset.from_tensor_slices(np.array(todo, dtype=object))
    ds = ds.map(lambda p: (p, tf.shape(decode.decode_image(tf.io.read_file(p)))),
                num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors().with_options(streams.options(num_parallel_calls))
    good = {p.decode() for p, _ in ds.as_numpy_iterator()}
    for p in todo:
      _CHECKED[p] = stats[p] + (None if p in good else _why_bad(p),)
  return {p: _CHECKED[p][2] for p in paths if _CHECKED[p][2] is not None}


def apply_policy(bad: Mapping[str, str], policy: str, *, where: str, advice: str) -> None:
  """config.data.bad_files for the files in `bad` ({path: reason}); nothing to do if empty.

  Args:
    bad: path -> why it is not a readable image.
    policy: 'error' raises a DataError that lists them; 'skip' logs the list as a warning (the
      caller leaves them out).
    where: what the count in the error is of, e.g. 'file(s) in DIR'.
    advice: the error's last line: what the user can do.
  """
  if policy not in config_checks.BAD_FILES:
    raise errors.ConfigError(f'config.data.bad_files must be one of {config_checks.BAD_FILES}, '
                             f'got {policy!r}.')
  if not bad:
    return
  listed = [f'  {p}: {r}' for p, r in sorted(bad.items())[:_MAX_LISTED]]
  if len(bad) > _MAX_LISTED:
    listed.append(f'  ... and {len(bad) - _MAX_LISTED} more')
  listing = '\n'.join(listed)
  if policy == 'error':
    raise errors.DataError(f'{len(bad)} {where} are not readable images ({_FORMATS}):\n'
                           f'{listing}\n{advice}')
  logging.warning('Skipping %d file(s) that are not readable images '
                  "(config.data.bad_files='skip'):\n%s", len(bad), listing)


def readable_files(files: Sequence[str], policy: str,
                   num_parallel_calls: int | None = None) -> list[str]:
  """`files` without the unreadable ones under policy 'skip'; under 'error' any is an error.

  For files named one by one (predict's --images): raises DataNotFoundError when 'skip' leaves
  none.
  """
  bad = check_image_files(files, num_parallel_calls)
  apply_policy(bad, policy, where=f'of the {len(files)} files given to --images',
               advice='Remove them from --images, or run again with --bad_files=skip '
               "(config.data.bad_files='skip') to classify the others.")
  good = [f for f in files if f not in bad]
  if bad and not good:
    raise errors.DataNotFoundError('None of the files given to --images is a readable image.')
  return good
