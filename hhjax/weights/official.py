"""Keras's official ImageNet weights files: where they are, and getting them verified.

Each backbone declares its files (`hhjax.model.backbones`: URL and MD5 as the installed Keras
has them; MobileNetV2's have no MD5 in Keras's source, and are taken as they come).
`fetch_official('imagenet', backbone)` (no top) or `fetch_official('imagenet_top', backbone)`
returns the path of the official .h5 file, verified by its MD5 where it has one: the copy in
`$HHJAX_CACHE_DIR/keras/` (default `~/.cache/hhjax`), else Keras's own copy in
`~/.keras/models/`, else a fresh download into the former. Without network access the error
says where to put a copy fetched elsewhere.
"""

import hashlib
import os
import pathlib
import socket
import urllib.error
import urllib.request

from absl import logging

from hhjax import errors
from hhjax import files
from hhjax.model import backbones


WeightsFile = backbones.WeightsFile
# The names config.model.pretrained takes for official files (each backbone has both).
NAMES = ('imagenet', 'imagenet_top')
# InceptionV3's, the default backbone's.
OFFICIAL_WEIGHTS = backbones.get(backbones.DEFAULT).weights


def official_weights(name: str, backbone: str | None = None) -> WeightsFile:
  """The official file `name` ('imagenet' or 'imagenet_top') of `backbone` (default
  InceptionV3), as the installed Keras's applications source names it."""
  return backbones.get(backbone).weights[name]


CACHE_DIR_ENV = files.CACHE_DIR_ENV
# Seconds to wait for the server. Short: a machine without network access should hear so at
# once, with the way out, rather than hang.
DOWNLOAD_TIMEOUT_S = 10.0
# Indirection so that tests can serve files without a network.
_urlopen = urllib.request.urlopen


def cache_dir() -> pathlib.Path:
  """Where downloads are kept: $HHJAX_CACHE_DIR or ~/.cache/hhjax."""
  return files.cache_dir()


def _md5(path: pathlib.Path) -> str:
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _keras_cache_file(weights: WeightsFile) -> pathlib.Path:
  """Where Keras itself caches the file (reused when present and intact)."""
  keras_home = os.environ.get('KERAS_HOME') or '~/.keras'
  return pathlib.Path(keras_home).expanduser() / 'models' / weights.filename


def fetch_official(name: str, backbone: str | None = None) -> pathlib.Path:
  """The verified official .h5 file `name` ('imagenet' or 'imagenet_top') of `backbone`
  (default InceptionV3), downloaded if needed.

  Looks in $HHJAX_CACHE_DIR/keras/ and Keras's own cache (~/.keras/models/) first.

  Raises:
    WeightsDownloadError: no network, or the file does not have the official MD5.
  """
  weights = official_weights(name, backbone)
  dest = cache_dir() / 'keras' / weights.filename
  if dest.is_file() and weights.md5 is None:   # nothing to check it against
    return dest
  if dest.is_file():
    got = _md5(dest)
    if got != weights.md5:
      raise errors.WeightsDownloadError(
          f'{dest} is not the official file: its MD5 is {got}, expected {weights.md5}. '
          f'Delete it to download it again, or replace it with a copy from {weights.url}.')
    return dest
  keras_copy = _keras_cache_file(weights)
  if keras_copy.is_file() and (weights.md5 is None or _md5(keras_copy) == weights.md5):
    return keras_copy
  return _download(weights, dest)


def download_needed(name: str, backbone: str | None = None) -> WeightsFile | None:
  """The official file `name` when neither cache holds it (a run would download it), else None.

  Only looks: the MD5 is checked when the file is read (`fetch_official`).
  """
  if name not in NAMES:
    return None
  weights = official_weights(name, backbone)
  if (cache_dir() / 'keras' / weights.filename).is_file() or _keras_cache_file(weights).is_file():
    return None
  return weights


def offline_advice(weights: WeightsFile) -> str:
  """What to do without network instead of downloading `weights`."""
  return (f'download {weights.url} elsewhere and put it at '
          f'{cache_dir() / "keras" / weights.filename} (set {CACHE_DIR_ENV} to use another '
          f'folder than {cache_dir()}), or pass a local copy: '
          '--config.model.pretrained=PATH (a Keras .h5 file or a converted folder)')


def _download(weights: WeightsFile, dest: pathlib.Path) -> pathlib.Path:
  dest.parent.mkdir(parents=True, exist_ok=True)
  logging.info('Downloading %s to %s', weights.url, dest)
  # Renamed into place only once verified (the error inside the block leaves nothing), so an
  # interrupted or corrupted download never leaves a file that looks complete.
  with files.atomic_path(dest) as tmp:
    digest = hashlib.md5()
    try:
      with tmp.open('wb') as out, _urlopen(weights.url, timeout=DOWNLOAD_TIMEOUT_S) as r:
        for chunk in iter(lambda: r.read(1 << 20), b''):
          digest.update(chunk)
          out.write(chunk)
    except (urllib.error.URLError, socket.timeout, OSError) as e:
      reason = getattr(e, 'reason', e)
      raise errors.WeightsDownloadError(
          f'Could not download the official weights from {weights.url} '
          f'({reason}). Without network access, {offline_advice(weights)}.') from e
    if weights.md5 is not None and digest.hexdigest() != weights.md5:
      raise errors.WeightsDownloadError(
          f'The file downloaded from {weights.url} has MD5 {digest.hexdigest()}, expected '
          f'{weights.md5}: the download was corrupted or the file changed. Try again.')
  return dest
