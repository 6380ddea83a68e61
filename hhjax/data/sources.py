"""The three sources as tables of rows: image folders, TFDS datasets and synthetic images.

Image folders (`DIR/<split>/<class>/<image>`, classes sorted by name, as Keras's
`flow_from_directory`) are checked by decoding each file once; the verdicts are kept on disk
while files keep their size and time, so a later run decodes only new or changed files
(bad_files.py); files that are not readable images are reported by path
(config.data.bad_files). A layout that cannot be read as classes raises at once, saying what
was found.

A TFDS dataset prepared as ArrayRecord is read record by record (records.py): the table holds no
examples. One prepared only as TFRecord is held encoded in memory. Either way decoding happens
after the index stream has skipped and sharded (see streams.py).
A dataset not yet prepared in config.data.dir is downloaded, after a
check of a few seconds that the download host can be reached: offline, the error says what to
do at once instead of after minutes of the download's retries.
"""

from collections.abc import Callable, Iterable, Sequence
import dataclasses
import os
import socket
import threading
import urllib.parse
import urllib.request
import zlib

from absl import logging
import numpy as np
import tensorflow as tf

from hhjax import errors
from hhjax.data import bad_files
from hhjax.data import records
from hhjax.data import spec as data_spec


@dataclasses.dataclass(frozen=True)
class Table:
  """One split as a table: the rows that the index stream points into.

  kind: 'path' (keys are file paths), 'bytes' (keys are encoded images), 'records' (keys are
  records.Records, read on demand, each with its label; labels is None), 'decoded' (keys are
  resized float32 images [N, S, S, 3]) or 'fake' (no keys: images are generated from the index).
  """
  kind: str
  keys: np.ndarray | records.Records | None
  labels: np.ndarray | None
  class_names: tuple[str, ...]
  salt: int = 0

  @property
  def size(self) -> int:
    return len(self.keys) if self.labels is None else len(self.labels)


# ----------------------------------------------------------------------------- image folders


# Image folders are listed through tf.io.gfile, so that config.data.dir may be local or a URL
# (gs://...), as tf.io.read_file reads either.


def _visible(names: Iterable[str]) -> list[str]:
  # Dot files (.DS_Store, ._x AppleDouble, .ipynb_checkpoints) are OS or tool metadata. GCS lists
  # folders with a trailing '/'.
  return sorted(n.rstrip('/') for n in names if not n.startswith('.'))


def _folders_in(path: str) -> list[str]:
  return [n for n in _visible(tf.io.gfile.listdir(path))
          if tf.io.gfile.isdir(os.path.join(path, n))]


def _class_folders(split_dir: str) -> list[str]:
  return _folders_in(split_dir)


def _files_under(class_dir: str, listed: '_ListedDirs | None' = None) -> list[str]:
  """Every visible file below class_dir, sorted, recursing like flow_from_directory.

  With `listed`, each real folder is listed once: a link back up (a loop) or to a folder
  listed already (another class's, or the same one twice) is skipped and named.
  """
  found = []
  for dirpath, dirnames, filenames in tf.io.gfile.walk(class_dir):
    dirnames[:] = _visible(dirnames)   # walk descends into what is left here
    if listed is not None:
      dirnames[:] = [d for d in dirnames if listed.first_visit(os.path.join(dirpath, d))]
    found.extend(os.path.join(dirpath, f) for f in _visible(filenames))
  return sorted(found)


class _ListedDirs:
  """The real folders a split's listing has entered, so that symlinks are followed once.

  tf.io.gfile.walk follows folder links; a link to a folder above it would be followed until
  the system refuses the path (~40 levels), listing every image again at each level and under
  the class of the link. Local paths only: object stores (gs://) have no links.
  """

  def __init__(self, split_dir: str, class_dirs: Sequence[str]):
    self._local = '://' not in split_dir
    self._split = os.path.realpath(split_dir) if self._local else split_dir
    self._seen = {os.path.realpath(d) for d in class_dirs} if self._local else set()
    self.skipped: list[str] = []   # 'link -> its real folder'

  def first_visit(self, path: str) -> bool:
    if not self._local:
      return True
    real = os.path.realpath(path)
    # A folder seen before, or one that holds the split (the class folders again).
    if real in self._seen or self._split == real or self._split.startswith(real + os.sep):
      self.skipped.append(f'{path} -> {real}')
      return False
    self._seen.add(real)
    return True

  def warn(self) -> None:
    if self.skipped:
      logging.warning(
          'Skipped %d folder link(s) under %s that lead to a folder listed already or to one '
          'that holds the split (a loop); each folder is read once: %s', len(self.skipped),
          self._split, '; '.join(self.skipped[:5]) + ('; ...' if len(self.skipped) > 5 else ''))


def _split_dir(root: str, split: str) -> str:
  split_dir = os.path.join(root, split)
  if not tf.io.gfile.isdir(split_dir):
    present = _folders_in(root)
    raise errors.DataNotFoundError(
        f'No folder for split {split!r}: {split_dir} does not exist. {root} holds '
        f'{present or "no folders"}. Expected the layout DIR/<split>/<class>/<image>; set '
        f'config.data.train_split / config.data.eval_split to split folder names.')
  return split_dir


def _folder_classes(root: str, split: str) -> list[str]:
  split_dir = _split_dir(root, split)
  classes = _class_folders(split_dir)
  if len(classes) < 2:
    loose = [n for n in _visible(tf.io.gfile.listdir(split_dir)) if n not in classes]
    raise errors.DataError(
        f'{split_dir} must hold one folder per class (at least two); found '
        f'{len(classes)} class folder(s) {classes} and {len(loose)} other file(s). Expected '
        f'the layout DIR/<split>/<class>/<image>.')
  return classes


def _check_root(spec: data_spec.DataSpec) -> str:
  root = spec.dir
  if not root:
    raise errors.ConfigError(
        "config.data.source='folder' needs config.data.dir: the folder that holds "
        '<split>/<class>/<image> (e.g. the horse-or-human folder).')
  if not tf.io.gfile.isdir(root):
    raise errors.DataNotFoundError(f'Image folder {root!r} (config.data.dir) does not exist or '
                                   'is not a folder.')
  return root


def _same_classes(spec: data_spec.DataSpec, split: str, classes: list[str]) -> None:
  """Both splits of the spec must name the same classes, or labels would mean other things."""
  for other in {spec.train_split, spec.eval_split} - {split}:
    other_classes = _folder_classes(spec.dir, other)
    if other_classes != classes:
      raise errors.DataError(
          f'Class folders differ between splits: {split!r} has {classes}, {other!r} has '
          f'{other_classes} (only in {split!r}: {sorted(set(classes) - set(other_classes))}, '
          f'only in {other!r}: {sorted(set(other_classes) - set(classes))}). Labels come from '
          'sorted class folder names, so every split needs the same class folders.')


@dataclasses.dataclass(frozen=True)
class _FolderScan:
  split: str
  split_dir: str
  class_names: tuple[str, ...]
  files: dict[str, list[str]]       # class -> good files
  bad: dict[str, str]                # path -> reason


def _scan_folder_split(spec: data_spec.DataSpec, split: str) -> _FolderScan:
  """Lists and decode-checks one split of an image folder; raises on layout problems."""
  root = _check_root(spec)
  classes = _folder_classes(root, split)
  _same_classes(spec, split, classes)
  split_dir = os.path.join(root, split)
  listed = _ListedDirs(split_dir, [os.path.join(split_dir, c) for c in classes])
  files = {c: _files_under(os.path.join(split_dir, c), listed) for c in classes}
  listed.warn()
  all_files = [f for c in classes for f in files[c]]
  if not all_files:
    raise errors.DataError(f'{split_dir} holds no files: its class folders {classes} are empty.')
  bad = bad_files.check_image_files(all_files, spec.num_parallel_calls, folder=split_dir)
  good = {c: [f for f in files[c] if f not in bad] for c in classes}
  return _FolderScan(split, split_dir, tuple(classes), good, bad)


def _scan_folder(spec: data_spec.DataSpec, splits: Sequence[str]) -> list[_FolderScan]:
  """Scans `splits` and applies config.data.bad_files to all their bad files at once.

  Raises if a class is left without examples, with 'skip' too: its label would never be seen.
  """
  scans = [_scan_folder_split(spec, s) for s in splits]
  bad = {p: r for scan in scans for p, r in scan.bad.items()}
  bad_files.apply_policy(
      bad, spec.bad_files, where=f'file(s) in {spec.dir}',
      advice='Remove or repair them, or run again with --bad_files=skip '
      "(config.data.bad_files='skip') to go on without them.")
  for scan in scans:
    empty = [c for c in scan.class_names if not scan.files[c]]
    if empty:
      raise errors.DataError(
          f'Class folder(s) {empty} in {scan.split_dir} hold no readable images'
          f'{" once bad files are skipped" if bad else ""}; every class needs examples.')
  return scans


def _folder_table(scan: _FolderScan) -> Table:
  paths, labels = [], []
  for label, name in enumerate(scan.class_names):
    paths += scan.files[name]
    labels += [label] * len(scan.files[name])
  return Table('path', np.array(paths, dtype=object), np.array(labels, np.int32),
               scan.class_names)


def _folder_split_table(spec: data_spec.DataSpec, split: str) -> Table:
  return _folder_table(_scan_folder(spec, [split])[0])


def _folder_sizes(spec: data_spec.DataSpec,
                  splits: Sequence[str]) -> tuple[dict[str, int], tuple[str, ...]]:
  scans = _scan_folder(spec, splits)
  return ({s.split: sum(len(f) for f in s.files.values()) for s in scans},
          scans[0].class_names)


# ----------------------------------------------------------------------------- TFDS

# Seconds the network check before a TFDS download waits for the download host.
NETWORK_TIMEOUT_S = 3.0


def _network_problem(url: str, timeout: float = NETWORK_TIMEOUT_S) -> str | None:
  """Why `url`'s host (or the proxy for it) cannot be reached within `timeout`; None if it can.

  One TCP connection, name lookup included, in a thread: a lookup that hangs cannot hold the run
  longer than `timeout`.
  """
  parts = urllib.parse.urlsplit(url)
  host, port = parts.hostname, parts.port or (443 if parts.scheme == 'https' else 80)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    proxy_parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'http://{proxy}')
    host, port = proxy_parts.hostname, proxy_parts.port or 80
  outcome = []

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      outcome.append(None)
    except OSError as e:
      outcome.append(f'{host}:{port} unreachable: {e.strerror or e}')

  thread = threading.Thread(target=connect, name='network-check', daemon=True)
  thread.start()
  thread.join(timeout)
  return outcome[0] if outcome else f'{host}:{port}: no answer within {timeout:g} s'


def _download_urls(builder) -> list[str]:
  try:
    return list(builder.url_infos or ())
  except (OSError, ValueError):   # an unreadable checksums file: nothing known to check
    return []


def _tfds_root(builder) -> str:
  return str(builder.data_dir).rsplit(f'{os.sep}{builder.name}{os.sep}', 1)[0]


def _tfds_offline_advice(builder) -> str:
  name, root = builder.name, _tfds_root(builder)
  return ('train on an image folder: --config.data.source=folder '
          '--config.data.dir=DIR --config.data.eval_split=SPLIT, images in DIR/<split>/<class>/; '
          f'or prepare the dataset where there is network (`tfds build {name} --data_dir=D`) and '
          f'copy D/{name}/ into {root}/ (--config.data.dir sets that folder)')


@dataclasses.dataclass(frozen=True)
class Download:
  """Something a run would download: what, from where, and what to do instead offline."""
  what: str
  url: str
  offline_advice: str


def tfds_download(spec: data_spec.DataSpec) -> Download | None:
  """The TFDS download a run on `spec` would start (a dataset not prepared yet), else None."""
  if spec.source != 'tfds':
    return None
  builder = _tfds_builder(spec)
  urls = _download_urls(builder)
  if builder.is_prepared() or not urls:
    return None
  return Download(f'the TFDS dataset {builder.name!r} (not prepared in {_tfds_root(builder)})',
                  urls[0], _tfds_offline_advice(builder))


def network_problem(url: str) -> str | None:
  """Why `url`'s host cannot be reached now (the check before a download), or None."""
  return _network_problem(url)


def _check_network(builder) -> None:
  """Raises DatasetDownloadError at once when the dataset's download host is out of reach."""
  urls = _download_urls(builder)
  if not urls:
    return
  problem = _network_problem(urls[0])
  if problem is None:
    return
  name = builder.name
  raise errors.DatasetDownloadError(
      f'Cannot download the TFDS dataset {name!r}, which is not prepared in '
      f'{_tfds_root(builder)}: no network ({problem}). Offline, {_tfds_offline_advice(builder)}.')



def _tfds_builder(spec: data_spec.DataSpec):
  # Deferred: only source='tfds' reads TFDS, so folder and fake runs never load it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder(spec.name, data_dir=spec.dir)


def _tfds_table(spec: data_spec.DataSpec, split: str) -> Table:
  # Read afresh on every call (no cache): under tfds.testing.mock_data the same name serves
  # different records.
  # Deferred: only source='tfds' reads TFDS, so folder and fake runs never load it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = spec.name
  builder = _tfds_builder(spec)
  if not builder.is_prepared():
    _check_network(builder)
  try:
    builder.download_and_prepare()
  except Exception as e:  # Network and checksum failures come in many types.
    raise errors.DatasetDownloadError(
        f'Could not download or prepare the TFDS dataset {name!r} in {builder.data_dir}: {e}\n'
        "Without internet, use an image folder instead: config.data.source='folder', "
        'config.data.dir=<folder with <split>/<class>/<image>>.') from e
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise errors.DataError(f'TFDS dataset {name!r} has features {list(features)}; the pipeline '
                           "reads 'image' and 'label'.")
  class_names = tuple(features['label'].names)
  on_demand = records.open_split(builder, split)
  if on_demand is not None:
    return Table('records', on_demand, None, class_names)
  # Keep the records encoded: decoding happens after the index stream has skipped and sharded.
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  images, labels = [], []
  for example in ds.as_numpy_iterator():
    images.append(example['image'])
    labels.append(example['label'])
  if not images:
    raise errors.DataError(f'TFDS split {name}/{split} is empty.')
  logging.info('TFDS %s is prepared as %s, without random access: holding split %r in memory '
               '(%d encoded images, %.0f MB, in every process). Prepared as ArrayRecord '
               "(download_and_prepare(file_format='array_record'), or tfds convert_format) it "
               'would be read record by record.', name, builder.info.file_format, split,
               len(images), sum(len(i) for i in images) / 2**20)
  return Table('bytes', np.array(images, dtype=object), np.array(labels, np.int32),
               class_names)


def _tfds_sizes(spec: data_spec.DataSpec,
                splits: Sequence[str]) -> tuple[dict[str, int], tuple[str, ...]]:
  """From the dataset's metadata when it has them, otherwise from reading the split."""
  builder = _tfds_builder(spec)
  sizes = {}
  for split in splits:
    try:
      sizes[split] = int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
      sizes[split] = 0
    if not sizes[split]:  # No metadata (offline, or under tfds.testing.mock_data).
      sizes[split] = _tfds_table(spec, split).size
  return sizes, tuple(builder.info.features['label'].names)


# ----------------------------------------------------------------------------- synthetic


def _fake_table(spec: data_spec.DataSpec, split: str) -> Table:
  fake = spec.fake
  n = fake.num_train_examples if split == spec.train_split else fake.num_eval_examples
  labels = np.arange(n, dtype=np.int32) % fake.num_classes
  names = tuple(f'class_{i}' for i in range(fake.num_classes))
  return Table('fake', None, labels, names, salt=zlib.crc32(split.encode()) & 0x7fffffff)


def _fake_sizes(spec: data_spec.DataSpec,
                splits: Sequence[str]) -> tuple[dict[str, int], tuple[str, ...]]:
  tables = [_fake_table(spec, s) for s in splits]
  return {s: t.size for s, t in zip(splits, tables)}, tables[0].class_names


# ----------------------------------------------------------------------------- any source


@dataclasses.dataclass(frozen=True)
class _Source:
  """How one config.data.source gives a split's table, and the sizes and class names."""
  table: Callable[[data_spec.DataSpec, str], Table]
  sizes: Callable[[data_spec.DataSpec, Sequence[str]], tuple[dict[str, int], tuple[str, ...]]]


# config.data.source -> its implementation: the only place a source name is dispatched on.
_SOURCES = {
    'tfds': _Source(_tfds_table, _tfds_sizes),
    'folder': _Source(_folder_split_table, _folder_sizes),
    'fake': _Source(_fake_table, _fake_sizes),
}
# The names config_checks accepts (spec.py holds them, so that it need not import TensorFlow)
# are exactly the names implemented here.
if tuple(_SOURCES) != data_spec.SOURCES:
  raise ImportError(f'spec.SOURCES {data_spec.SOURCES} and the sources implemented in '
                    f'{__name__} {tuple(_SOURCES)} differ.')
SOURCES = tuple(_SOURCES)   # the names config.data.source may take


def _source(spec: data_spec.DataSpec) -> _Source:
  try:
    return _SOURCES[spec.source]
  except KeyError:
    raise errors.ConfigError(
        f'config.data.source must be one of {SOURCES}, got {spec.source!r}.') from None


def table(spec: data_spec.DataSpec, split: str) -> Table:
  """The table of `split` from spec.source; an image folder is checked first."""
  return _source(spec).table(spec, split)


def sizes_and_class_names(
    spec: data_spec.DataSpec) -> tuple[dict[str, int], tuple[str, ...]]:
  """{split: number of examples} of the train and eval splits, and the class names.

  For an image folder this checks every file of both splits first (bad files count as absent
  with bad_files='skip', and raise with 'error'). For TFDS, sizes come from the dataset's
  metadata when it has them, otherwise from reading the split.
  """
  return _source(spec).sizes(spec, list(dict.fromkeys([spec.train_split, spec.eval_split])))


def changed_file_error(spec: data_spec.DataSpec,
                       error: BaseException) -> errors.DataError | None:
  """For an image folder's training split: the DataError naming the file(s) behind a decode
  failure in the input pipeline (bad_files.changed_since_checked); None for other errors."""
  if spec.source != 'folder' or not bad_files.is_decode_failure(error):
    return None
  split = spec.train_split
  return bad_files.changed_since_checked(error, list(table(spec, split).keys),
                                         os.path.join(spec.dir, split),
                                         spec.num_parallel_calls)
