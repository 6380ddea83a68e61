"""The three sources as tables of rows: image folders, TFDS datasets and synthetic images.

Image folders (`DIR/<split>/<class>/<image>`) are listed and decode-checked in folders.py;
every source's rows are a `Table` (table.py). Each source is one entry of `_SOURCES`, the only
place a source's name is looked up.

A TFDS dataset prepared as ArrayRecord is read record by record (records.py): the table holds no
examples. One prepared only as TFRecord is held encoded in memory. Either way decoding happens
after the index stream has skipped and sharded (see streams.py).
A dataset not yet prepared in config.data.dir is downloaded, after a
check of a few seconds that the download host can be reached: offline, the error says what to
do at once instead of after minutes of the download's retries.
"""

from collections.abc import Callable, Sequence
import dataclasses
import os
import socket
import threading
import urllib.parse
import urllib.request
import zlib

from absl import logging
import numpy as np

from hhjax import errors
from hhjax.data import bad_files
from hhjax.data import folders
from hhjax.data import holdout
from hhjax.data import records
from hhjax.data import spec as data_spec
from hhjax.data import table as table_lib


# The table every source produces (hhjax.data.table), here for the callers of sources.
Table = table_lib.Table


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
          '--config.data.dir=DIR --config.data.validation_split=SPLIT '
          '--config.data.test_split=None, images in DIR/<split>/<class>/; '
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
    'folder': _Source(folders.split_table, folders.sizes),
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


def _with_labels(whole: Table) -> Table:
  if whole.labels is not None:
    return whole
  # Records carry their labels: the held-out share is stratified, so every label is read.
  return dataclasses.replace(whole, labels=whole.keys.labels(),
                             rows=np.arange(len(whole.keys), dtype=np.int64))


def held_out(spec: data_spec.DataSpec) -> tuple[np.ndarray, np.ndarray, Table]:
  """(validation rows, training rows, the whole training split's table) of spec.holds_out:
  rows of the whole table, stratified by class and fixed by spec.seed (holdout.py)."""
  whole = _with_labels(_source(spec).table(spec, spec.train_split))
  validation, training = holdout.split_rows(whole.labels, spec.validation_fraction, spec.seed)
  return validation, training, whole


def table(spec: data_spec.DataSpec, split: str) -> Table:
  """The table of `split` from spec.source; an image folder is checked first.

  With a held-out validation (spec.holds_out), spec.train_split's table lacks the rows that
  spec.validation's holds: the two are disjoint and together are the whole training split.
  """
  if spec.holds_out and split in (spec.train_split, spec.validation):
    validation, training, whole = held_out(spec)
    return whole.part(training if split == spec.train_split else validation)
  return _source(spec).table(spec, split)


def sizes_and_class_names(
    spec: data_spec.DataSpec) -> tuple[dict[str, int], tuple[str, ...]]:
  """{split: number of examples} of spec.splits() (training, validation, test), and the
  class names.

  For an image folder this checks every file of every split first (bad files count as absent
  with bad_files='skip', and raise with 'error'). For TFDS, sizes come from the dataset's
  metadata when it has them, otherwise from reading the split. A held-out validation's size
  and the training split's that lacks it come from the rows held out.
  """
  sizes, names = _source(spec).sizes(spec, spec.named_splits())
  if spec.holds_out:
    validation, training, _ = held_out(spec)
    sizes[spec.train_split], sizes[spec.validation] = len(training), len(validation)
  return {split: sizes[split] for split in spec.splits()}, names


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
