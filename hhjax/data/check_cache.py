"""Image-check verdicts kept on disk between runs: one file per image folder.

A verdict (the file decodes, or the reason it does not) holds while the file keeps its size and
modification time (in ns), so a later run decodes only the files that are new or changed. The
verdicts of a folder live in the per-user cache, `$HHJAX_CACHE_DIR/image_checks/` (default
`~/.cache/hhjax/image_checks/`), in a JSON file named after the folder's real path: never in the
data folder, which may be read-only or shared. The file is rewritten whole through
`files.write_atomic`, so concurrent runs and processes never read half of one. It names the
TensorFlow version that decoded; another version, an unreadable file or another format means
checking again. Deleting the folder `image_checks` is always safe.
"""

import hashlib
import json
import os
import pathlib

from absl import logging
import tensorflow as tf

from hhjax import files

Signature = tuple[int, int]  # (size in bytes, modification time in ns)
Verdict = tuple[Signature, str | None]  # a reason when the file does not decode
_FORMAT = 1
_warned: set[str] = set()


def _decoder() -> str:
  return f'tensorflow {tf.__version__}'


def _real(folder: str) -> str:
  """The folder's real path; a URL (gs://) as it is."""
  return folder if files.is_url(folder) else os.path.realpath(folder)


def path_for(folder: str) -> pathlib.Path:
  """The verdict file of `folder` (which need not exist)."""
  real = _real(folder)
  name = hashlib.sha256(real.encode()).hexdigest()[:20]
  return files.cache_dir() / 'image_checks' / f'{name}.json'


def load(folder: str) -> dict[str, Verdict]:
  """{path: ((size, mtime_ns), reason or None)} stored for `folder`; {} when none is usable."""
  path = path_for(folder)
  try:
    stored = json.loads(path.read_text())
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    logging.warning('Ignoring the image-check verdicts in %s (%s): checking again.', path, e)
    return {}
  if (not isinstance(stored, dict) or stored.get('format') != _FORMAT
      or stored.get('decoder') != _decoder()
      or stored.get('folder') != _real(folder)):
    return {}
  return {os.path.join(folder, name): ((size, mtime), reason)
          for name, (size, mtime, reason) in stored['files'].items()}


def save(folder: str, verdicts: dict[str, Verdict]) -> None:
  """Replaces the stored verdicts of `folder`; a cache that cannot be written only warns."""
  path = path_for(folder)
  entries = {os.path.relpath(p, folder): [size, mtime, reason]
             for p, ((size, mtime), reason) in verdicts.items()}
  text = json.dumps({'format': _FORMAT, 'decoder': _decoder(),
                     'folder': _real(folder), 'files': entries},
                    separators=(',', ':'))
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, text)
  except OSError as e:
    if str(path) not in _warned:
      _warned.add(str(path))
      logging.warning('Cannot keep image-check verdicts in %s (%s): later runs will check '
                      '%s again. Set %s to a writable folder to keep them.', path, e, folder,
                      files.CACHE_DIR_ENV)
