"""Files that are not readable images: each decoded once, its verdict kept, one policy.

An image folder (at dataset_info / create_dataset) and the files given to predict are checked
the same way: a file is decoded in a parallel tf.data pass, and one that fails gets a short
reason. A verdict holds while the file keeps its size and modification time: within the process,
and for an image folder across runs too, in a verdict file per folder (check_cache.py), so a
resume decodes only new and changed files. With several processes (jax.distributed), each
decodes only its share of a folder's files to check and the verdicts are exchanged through
jax.distributed's key-value store, so all processes know them all. A check that decodes logs its
progress (count, rate, ETA). config.data.bad_files then decides: 'error' raises with the list,
'skip' warns with it and goes on without them.
"""

import base64
from collections.abc import Mapping, Sequence
import itertools
import json
import time
import zlib

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from hhjax import durations
from hhjax import errors
from hhjax import files
from hhjax import peers
from hhjax.data import check_cache
from hhjax.data import decode
from hhjax.data import spec as data_spec
from hhjax.data import streams

# config.data.bad_files: the policies `apply_policy` knows.
BAD_FILES = data_spec.BAD_FILES

# How many bad files a message lists before it counts the rest.
_MAX_LISTED = 20
_FORMATS = ', '.join(decode.IMAGE_FORMATS)
# Seconds between progress lines of a check that decodes.
PROGRESS_EVERY_S = 10.0


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


# path -> ((size, mtime_ns), reason or None): what this process knows.
_CHECKED: dict[str, check_cache.Verdict] = {}


def _known(path: str, signature: check_cache.Signature) -> bool:
  return path in _CHECKED and _CHECKED[path][0] == signature


def _decode_all(paths: Sequence[str], num_parallel_calls: int | None, what: str
                ) -> dict[str, str | None]:
  """{path: None if it decodes, else why not}, logging the count, rate and ETA as it goes."""
  if not paths:  # a process's share of very few files may be none
    return {}
  start = last = time.perf_counter()
  logging.info('Checking %s: decoding %s file(s) once (verdicts are kept while a file keeps '
               'its size and time).', what, f'{len(paths):,}')
  ds = tf.data.Dataset.from_tensor_slices(np.array(paths, dtype=object))
  ds = ds.map(lambda p: (p, tf.shape(decode.decode_image(tf.io.read_file(p)))),
              num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors().batch(64).with_options(streams.options(num_parallel_calls))
  good = set()
  for batch, _ in ds.as_numpy_iterator():
    good.update(p.decode() for p in batch)
    now = time.perf_counter()
    if now - last >= PROGRESS_EVERY_S:
      last = now
      rate = len(good) / (now - start)
      logging.info('Checking %s: %s of %s files decoded, %.0f files/s, ETA %s', what,
                   f'{len(good):,}', f'{len(paths):,}', rate,
                   durations.format_duration((len(paths) - len(good)) / max(rate, 1e-9)))
  result = {p: None if p in good else _why_bad(p) for p in paths}
  seconds = time.perf_counter() - start
  logging.info('Checked %s: %s file(s) in %.1f s (%.0f files/s), %d unreadable.', what,
               f'{len(paths):,}', seconds, len(paths) / max(seconds, 1e-9),
               len(paths) - len(good))
  return result


# ----------------------------------------------------------------------------- several processes

# How long a process waits for the others' shares: they may take far longer than its own (the
# device collectives' 30 s would fail there), and a process that dies ends the run anyway.
_EXCHANGE_TIMEOUT_MS = 24 * 3600 * 1000
# The n-th shared check of this process: every process makes the same calls, in the same order.
_exchanges = itertools.count()


def _exchange(store, key: str, mine: str) -> list[str]:
  """Every process's value under `key`, in process order; waits for those not there yet."""
  index = jax.process_index()
  store.key_value_set(f'{key}/{index}', mine)
  return [mine if i == index else store.blocking_key_value_get(f'{key}/{i}', _EXCHANGE_TIMEOUT_MS)
          for i in range(jax.process_count())]


def _listing_differences(listings: Sequence[Mapping[str, int]]) -> list[str]:
  """'process i lists N files of B bytes, process 0 M of C' for each process that differs."""
  def seen(s):
    return f"{s['files']:,} files of {s['bytes']:,} bytes"
  first = listings[0]
  return [f'process {i} lists {seen(s)}, process 0 {seen(first)}'
          + (' (other names or sizes)' if seen(s) == seen(first) else '')
          for i, s in enumerate(listings) if i and s != first]


def _agree_on_todo(store, key: str, folder: str, signatures: Mapping[str, tuple[int, ...]],
                   todo: set[str]) -> list[str]:
  """The files that any process has no verdict for, in listing order, the same everywhere.

  First the processes compare their listings (names and sizes): each host reads its own copy of
  the folder the config names, and a copy that differs would feed other files at the same
  steps.
  """
  paths = list(signatures)
  listing = {'files': len(paths), 'bytes': sum(signatures[p][0] for p in paths),
             'names': zlib.crc32('\0'.join(paths).encode()),
             'sizes': zlib.crc32(np.array([signatures[p][0] for p in paths], np.int64).tobytes())}
  mask = np.packbits(np.array([p in todo for p in paths], bool))
  shares = [json.loads(text) for text in _exchange(store, f'{key}/todo', json.dumps(
      {'listing': listing, 'todo': base64.b64encode(mask.tobytes()).decode()}))]
  diffs = _listing_differences([share['listing'] for share in shares])
  if diffs:
    raise errors.DataError(
        f'The {len(shares)} processes of this run list other files in {folder}: '
        f'{"; ".join(diffs)}. Give every host the same copy of the data (the same file names '
        'and sizes) or a folder they share, and wait until a copy is complete before starting.')
  union = np.zeros(len(paths), bool)
  for share in shares:
    bits = np.frombuffer(base64.b64decode(share['todo']), np.uint8)
    union |= np.unpackbits(bits, count=len(paths)).astype(bool)
  return [p for p, m in zip(paths, union) if m]


def _decode_shared(store, key: str, todo: list[str], num_parallel_calls: int | None,
                   folder: str) -> dict[str, str | None]:
  """Each process decodes a contiguous share of `todo`; every process gets every verdict."""
  index, count = jax.process_index(), jax.process_count()
  lo, hi = index * len(todo) // count, (index + 1) * len(todo) // count
  mine = _decode_all(todo[lo:hi], num_parallel_calls,
                     f'{folder} (process {index} of {count}: its share of {len(todo):,})')
  bad = {lo + k: mine[p] for k, p in enumerate(todo[lo:hi]) if mine[p] is not None}
  verdicts = dict.fromkeys(todo)
  for text in _exchange(store, f'{key}/bad', json.dumps(bad)):
    for k, reason in json.loads(text).items():
      verdicts[todo[int(k)]] = reason
  return verdicts


# ----------------------------------------------------------------------------- checking


def check_image_files(paths: Sequence[str], num_parallel_calls: int | None = None, *,
                      folder: str | None = None) -> dict[str, str]:
  """Decodes every file not checked before, in parallel; returns {path: reason} of the bad ones.

  Args:
    paths: the files.
    num_parallel_calls: tf.data threads for decoding (None: autotuned).
    folder: the folder that holds `paths` (an image folder's split): its verdicts are read from
      and written to its verdict file (check_cache.py), and with several processes each
      decodes only its share. Every process must then make the same call (as training does).
      None (files named one by one): verdicts are kept in this process only.
  """
  signatures, bad = {}, {}
  for path in dict.fromkeys(paths):
    try:
      signatures[path] = files.stat(path)   # local files and URLs (gs://) alike
    except OSError as e:  # A dangling link, or a file removed since it was listed.
      bad[path] = f'cannot read: {e.strerror}'
  todo = {p for p, s in signatures.items() if not _known(p, s)}
  if todo and folder is not None:
    for path, verdict in check_cache.load(folder).items():
      if path in todo and verdict[0] == signatures[path]:
        _CHECKED[path] = verdict
    todo = {p for p in todo if not _known(p, signatures[p])}
  # Without jax.distributed's store (several processes launched otherwise), each process
  # checks what it does not know itself: slower, but the verdicts are the same.
  store = peers.key_value_store() if folder is not None and jax.process_count() > 1 else None
  if store is not None:
    key = f'hhjax/image_check/{next(_exchanges)}'
    todo = _agree_on_todo(store, key, folder, signatures, todo)
  else:
    todo = [p for p in signatures if p in todo]
  if todo:
    if store is not None:
      verdicts = _decode_shared(store, key, todo, num_parallel_calls, folder)
    else:
      verdicts = _decode_all(todo, num_parallel_calls, folder or 'image files')
    for path in todo:
      _CHECKED[path] = (signatures[path], verdicts[path])
    if folder is not None:
      check_cache.save(folder, {p: _CHECKED[p] for p in signatures})
  bad.update({p: _CHECKED[p][1] for p in signatures if _CHECKED[p][1] is not None})
  return {p: bad[p] for p in paths if p in bad}


def apply_policy(bad: Mapping[str, str], policy: str, *, where: str, advice: str) -> None:
  """config.data.bad_files for the files in `bad` ({path: reason}); nothing to do if empty.

  Args:
    bad: path -> why it is not a readable image.
    policy: 'error' raises a DataError that lists them; 'skip' logs the list as a warning (the
      caller leaves them out).
    where: what the count in the error is of, e.g. 'file(s) in DIR'.
    advice: the error's last line: what the user can do.
  """
  if policy not in BAD_FILES:
    raise errors.ConfigError(f'config.data.bad_files must be one of {BAD_FILES}, '
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


# ------------------------------------------------------------------ a file changed since its check

# What TensorFlow's decoders say of bytes they cannot read.
_DECODE_FAILURE = ('Invalid PNG data', 'Invalid JPEG data', 'Unknown image file format',
                   'decode', 'Decode', 'Number of channels inherent in the image')


def is_decode_failure(error: BaseException) -> bool:
  """Whether `error` is a tf.data decoder's failure on an image's bytes."""
  return isinstance(error, tf.errors.InvalidArgumentError) and any(
      s in str(error) for s in _DECODE_FAILURE)


def changed_since_checked(error: BaseException, paths: Sequence[str], folder: str,
                          num_parallel_calls: int | None = None) -> errors.DataError | None:
  """The DataError for a decode failure of a file that decoded when it was checked.

  A file rewritten in place with its size and modification time kept keeps its verdict (see
  check_cache.py), so training meets its bytes only in the input pipeline, whose error does not
  name it. This decodes `paths` (the split's files) again, names the ones that fail, and records
  their verdicts, so that the next run reports them as bad files (config.data.bad_files).
  None if `error` is not a decoder's failure.
  """
  if not is_decode_failure(error):
    return None
  verdicts = _decode_all(list(paths), num_parallel_calls, f'{folder} again')
  bad = {p: why for p, why in verdicts.items() if why is not None}
  first = str(error).strip().splitlines()[0][:200]
  if not bad:
    return errors.DataError(
        f'An image of {folder} failed to decode during training ({first}), though every file '
        'decodes now: a file changed while the run read it? Run the same command again.')
  for path in bad:
    try:
      _CHECKED[path] = (files.stat(path), bad[path])
    except OSError:
      _CHECKED.pop(path, None)
  known = {p: _CHECKED[p] for p in paths if p in _CHECKED}
  if jax.process_index() == 0:
    check_cache.save(folder, known)
  shown = '; '.join(f"{p}: {why.rstrip('.')}" for p, why in list(bad.items())[:5])
  return errors.DataError(
      f'{len(bad)} file(s) of {folder} no longer decode, though they did when checked (changed '
      f'in place with their size and modification time kept): {shown}'
      f'{"; ..." if len(bad) > 5 else ""}. Their verdicts are updated: repair or remove them, '
      "or run again with --bad_files=skip (config.data.bad_files='skip') to go on without "
      'them.')
