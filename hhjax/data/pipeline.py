"""tf.data input pipeline: TFDS `horses_or_humans`, image folders and synthetic images.

    info = dataset_info(config)                   # sizes, number of classes, class names
    train = create_dataset(config, config.data.train_split, start_step=step)
    for batch in train.as_numpy_iterator(): ...   # {'image': f32 [b,H,W,3], 'label': i32 [b]}

How the stream is built, and why:
  * Every source becomes a small in-memory table (file paths, or TFDS's encoded records, plus
    labels). The train stream is a stream of (global position, table index): epoch e is a
    stateless permutation of the table seeded by (config.seed, e), and global position p is
    example p % N of epoch p // N. Global step s is positions [s*B, (s+1)*B).
  * `start_step` skips positions on this cheap index stream; decoding and augmentation happen
    after the skip, so resuming at step 10,000 decodes nothing it does not yield.
  * Augmentation draws its parameters statelessly from (config.seed, position): the same
    (seed, step) gives the same batch with any number of parallel map threads, in any run.
  * Process i of P decodes slots [i*b, (i+1)*b) of every global batch (b = B / P): the
    processes read disjoint parts of every epoch, and together they yield exactly the batch a
    single process would.
  * Evaluation is one pass in table order, padded to whole batches, with a 'mask'.

Image folders (`DIR/<split>/<class>/<image>`, classes sorted by name, as Keras's
`flow_from_directory`) are checked once per process by decoding every file in a parallel tf.data
pass; files that are not readable images are reported by path (config.data.bad_files).

With config.data.cache_decoded, each split is decoded and resized once and held in memory
(float32, N x S x S x 3: 277 MB for the 1,027 training images at 150 px); every epoch then
costs only augmentation. Off by default, so memory stays small for any dataset.
"""

from collections.abc import Iterable, Sequence
import dataclasses
import hashlib
import math
import os
import re
import zlib
from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from hhjax.data import augment

SOURCES = ('tfds', 'folder', 'fake')
RESIZE_METHODS = ('bilinear', 'nearest')
PREPROCESSING = ('inception', 'rescale')
# What batches carry: normalised float32 images, or uint8 pixels that the model normalises on
# the device (a quarter of the bytes to move; see models.Classifier).
IMAGE_DTYPES = ('float32', 'uint8')
BAD_FILES = ('error', 'skip')

# Salts that keep the random streams of shuffling, augmentation and fake images apart.
_SHUFFLE_SALT = 1
_AUGMENT_SALT = 2
_FAKE_SALT = 3
# How many bad files an error message lists before it counts the rest.
_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a training loop needs to know about the data before reading it.

  Attributes:
    num_examples: split name -> number of examples (train and eval splits of the config).
    num_classes: number of classes.
    class_names: class names, in label order.
  """
  num_examples: dict[str, int]
  num_classes: int
  class_names: tuple[str, ...]


# ----------------------------------------------------------------------------- decoding


def _bmp_header(contents: tf.Tensor) -> tf.Tensor:
  """The first 54 bytes of `contents`, zero-padded so fixed offsets can always be read."""
  return tf.strings.substr(contents, 0, 54) + tf.constant(b'\0' * 54)


def _le_int(header: tf.Tensor, offset: int, size: int) -> tf.Tensor:
  dtype = {2: tf.uint16, 4: tf.int32}[size]
  value = tf.io.decode_raw(tf.strings.substr(header, offset, size), dtype, little_endian=True)[0]
  return tf.cast(value, tf.int32)


def _is_palette_bmp(contents: tf.Tensor) -> tf.Tensor:
  header = _bmp_header(contents)
  return tf.logical_and(tf.equal(tf.strings.substr(header, 0, 2), b'BM'),
                        tf.equal(_le_int(header, 28, 2), 8))


def _decode_palette_bmp(contents: tf.Tensor) -> tf.Tensor:
  """8-bit BMPs: TensorFlow returns palette indices, so look the colours up here."""
  header = _bmp_header(contents)
  dib_size = _le_int(header, 14, 4)
  colors_used = _le_int(header, 46, 4)
  num_colors = tf.where(colors_used > 0, colors_used, 256)
  entry = tf.where(dib_size == 12, 3, 4)  # OS/2 headers store BGR, later ones BGRA.
  table = tf.io.decode_raw(tf.strings.substr(contents, 14 + dib_size, num_colors * entry), tf.uint8)
  palette = tf.reverse(tf.reshape(table, [-1, entry])[:, :3], axis=[1])  # BGR -> RGB
  indices = tf.io.decode_bmp(contents, channels=0)[..., 0]
  tf.debugging.assert_less(tf.cast(indices, tf.int32), tf.shape(palette)[0],
                           message='BMP pixel refers past the end of its colour table')
  return tf.gather(palette, tf.cast(indices, tf.int32))


def decode_image(contents: tf.Tensor) -> tf.Tensor:
  """Encoded PNG, JPEG, BMP, GIF or WebP bytes -> RGB uint8 [H, W, 3].

  Alpha is dropped (not composited), as PIL's convert('RGB') does; grayscale is repeated over
  three channels; palette images are looked up; 16-bit PNGs keep their high byte (within one
  level of v / 257); animated GIFs give their first frame. JPEGs decode exactly as PIL decodes
  them.
  """
  contents = tf.convert_to_tensor(contents, tf.string)
  image = tf.case(
      [(_is_palette_bmp(contents), lambda: _decode_palette_bmp(contents)),
       # The accurate IDCT decodes exactly as PIL, hence as Keras's load_img; the fast default
       # is off by up to ~15 levels.
       (tf.io.is_jpeg(contents),
        lambda: tf.io.decode_jpeg(contents, channels=3, dct_method='INTEGER_ACCURATE'))],
      default=lambda: tf.io.decode_image(contents, channels=3, dtype=tf.uint8,
                                         expand_animations=False),
      exclusive=True)
  return tf.ensure_shape(image, [None, None, 3])


def resize(image: tf.Tensor, size: int, method: str = 'bilinear') -> tf.Tensor:
  """Resizes to size x size; float32 out, values still in [0, 255].

  'nearest' picks the same pixels as PIL's NEAREST, which Keras's flow_from_directory uses.
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f'config.data.resize_method must be one of {RESIZE_METHODS}, got {method!r}.')
  image = tf.image.resize(image, [size, size], method=method)
  return tf.cast(image, tf.float32)


def normalize(image: tf.Tensor, preprocessing: str = 'inception') -> tf.Tensor:
  """[0, 255] pixels -> model inputs: 'inception' x / 127.5 - 1, 'rescale' x / 255.

  Kept apart from the rest so that a pipeline may ship uint8 and normalise on the device.
  """
  image = tf.cast(image, tf.float32)
  if preprocessing == 'inception':
    return image / 127.5 - 1.0
  if preprocessing == 'rescale':
    return image / 255.0
  raise ValueError(
      f'config.data.preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}.')


def to_output(image: tf.Tensor, preprocessing: str, image_dtype: str = 'float32') -> tf.Tensor:
  """[0, 255] pixels -> what a batch carries (config.data.image_dtype).

  'float32' normalises here; 'uint8' rounds to whole grey levels and leaves the normalisation to
  the device. Without augmentation and with 'nearest' resizing the pixels are whole numbers
  already, so 'uint8' changes nothing; otherwise each value moves by at most half a grey level.
  """
  if image_dtype == 'float32':
    return normalize(image, preprocessing)
  if image_dtype == 'uint8':
    return tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0), tf.uint8)
  raise ValueError(
      f'config.data.image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}.')


def denormalize(image: np.ndarray, preprocessing: str = 'inception') -> np.ndarray:
  """The inverse of `normalize`, to [0, 1] for display; uint8 batches are pixels already."""
  if np.asarray(image).dtype == np.uint8:
    return np.asarray(image, np.float32) / 255.0
  image = np.asarray(image, np.float32)
  image = (image + 1.0) / 2.0 if preprocessing == 'inception' else image
  return np.clip(image, 0.0, 1.0)


def preprocess_image(contents: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """Encoded image bytes -> the float32 [S, S, 3] model input of evaluation (no augmentation)."""
  image = resize(decode_image(contents), config.data.image_size, config.data.resize_method)
  return normalize(image, config.data.preprocessing)


# ----------------------------------------------------------------------------- bad files


def _clean_tf_error(message: str) -> str:
  message = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', message)
  message = re.sub(r'\s*\[Op:\w+\].*', '', message, flags=re.S)
  return message.strip().splitlines()[0] if message.strip() else 'unreadable'


def _why_bad(path: str) -> str:
  """A short reason why `path` does not decode (it has already failed once)."""
  try:
    if os.path.getsize(path) == 0:
      return 'empty file (0 bytes)'
    with open(path, 'rb') as f:
      header = f.read(30)
    if header[:2] == b'BM' and len(header) == 30 and header[28] in (1, 2, 4):
      return (f'{header[28]}-bit BMP: TensorFlow decodes BMPs of 8, 24 and 32 bits; convert '
              'it to PNG')
    decode_image(tf.io.read_file(path))
  except (tf.errors.OpError, OSError) as e:
    return _clean_tf_error(getattr(e, 'message', None) or str(e))
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
      st = os.stat(path)
    except OSError as e:  # A dangling link, or a file removed since it was listed.
      _CHECKED[path] = (-1, -1, f'cannot read: {e.strerror}')
      continue
    stats[path] = (st.st_size, st.st_mtime_ns)
  todo = [p for p in stats if _CHECKED.get(p, (None, None))[:2] != stats[p]]
  if todo:
    ds = tf.data.Dataset.from_tensor_slices(np.array(todo, dtype=object))
    ds = ds.map(lambda p: (p, tf.shape(decode_image(tf.io.read_file(p)))),
                num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors().with_options(_options(num_parallel_calls))
    good = {p.decode() for p, _ in ds.as_numpy_iterator()}
    for p in todo:
      _CHECKED[p] = stats[p] + (None if p in good else _why_bad(p),)
  return {p: _CHECKED[p][2] for p in paths if _CHECKED[p][2] is not None}


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _Table:
  """One split as an in-memory table: the rows that the index stream points into.

  kind: 'path' (keys are file paths), 'bytes' (keys are encoded images), 'decoded' (keys are
  resized float32 images [N, S, S, 3]) or 'fake' (no keys: images are generated from the index).
  """
  kind: str
  keys: np.ndarray | None
  labels: np.ndarray
  class_names: tuple[str, ...]
  salt: int = 0

  @property
  def size(self) -> int:
    return len(self.labels)


def _visible(names: Iterable[str]) -> list[str]:
  # Dot files (.DS_Store, ._x AppleDouble, .ipynb_checkpoints) are OS or tool metadata.
  return sorted(n for n in names if not n.startswith('.'))


def _class_folders(split_dir: str) -> list[str]:
  return [n for n in _visible(os.listdir(split_dir)) if os.path.isdir(os.path.join(split_dir, n))]


def _files_under(class_dir: str) -> list[str]:
  """Every visible file below class_dir, sorted, recursing like flow_from_directory."""
  found = []
  for dirpath, dirnames, filenames in os.walk(class_dir):
    dirnames[:] = _visible(dirnames)
    found.extend(os.path.join(dirpath, f) for f in _visible(filenames))
  return sorted(found)


def _split_dir(root: str, split: str) -> str:
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    present = [n for n in _visible(os.listdir(root)) if os.path.isdir(os.path.join(root, n))]
    raise FileNotFoundError(
        f'No folder for split {split!r}: {split_dir} does not exist. {root} holds '
        f'{present or "no folders"}. Expected the layout DIR/<split>/<class>/<image>; set '
        f'config.data.train_split / config.data.eval_split to split folder names.')
  return split_dir


def _folder_classes(root: str, split: str) -> list[str]:
  split_dir = _split_dir(root, split)
  classes = _class_folders(split_dir)
  if len(classes) < 2:
    loose = [n for n in _visible(os.listdir(split_dir)) if n not in classes]
    raise ValueError(
        f'{split_dir} must hold one folder per class (at least two); found '
        f'{len(classes)} class folder(s) {classes} and {len(loose)} other file(s). Expected '
        f'the layout DIR/<split>/<class>/<image>.')
  return classes


@dataclasses.dataclass(frozen=True)
class _FolderScan:
  split: str
  split_dir: str
  class_names: tuple[str, ...]
  files: dict[str, list[str]]       # class -> good files
  bad: dict[str, str]                # path -> reason


def _scan_folder_split(config: ml_collections.ConfigDict, split: str) -> _FolderScan:
  """Lists and decode-checks one split of an image folder; raises on layout problems."""
  root = config.data.dir
  if not root:
    raise ValueError("config.data.source='folder' needs config.data.dir: the folder that holds "
                     '<split>/<class>/<image> (e.g. the horse-or-human folder).')
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Image folder {root!r} (config.data.dir) does not exist or is not '
                            'a folder.')
  classes = _folder_classes(root, split)
  # Both splits of the config must name the same classes, or labels would mean different things.
  for other in {config.data.train_split, config.data.eval_split} - {split}:
    other_classes = _folder_classes(root, other)
    if other_classes != classes:
      raise ValueError(
          f'Class folders differ between splits: {split!r} has {classes}, {other!r} has '
          f'{other_classes} (only in {split!r}: {sorted(set(classes) - set(other_classes))}, '
          f'only in {other!r}: {sorted(set(other_classes) - set(classes))}). Labels come from '
          'sorted class folder names, so every split needs the same class folders.')
  split_dir = os.path.join(root, split)
  files = {c: _files_under(os.path.join(split_dir, c)) for c in classes}
  all_files = [f for c in classes for f in files[c]]
  if not all_files:
    raise ValueError(f'{split_dir} holds no files: its class folders {classes} are empty.')
  bad = check_image_files(all_files, config.data.num_parallel_calls)
  good = {c: [f for f in files[c] if f not in bad] for c in classes}
  return _FolderScan(split, split_dir, tuple(classes), good, bad)


def _apply_bad_file_policy(config: ml_collections.ConfigDict, scans: Sequence[_FolderScan]):
  """config.data.bad_files: 'error' raises with every bad file, 'skip' warns with the count."""
  policy = config.data.bad_files
  if policy not in BAD_FILES:
    raise ValueError(f'config.data.bad_files must be one of {BAD_FILES}, got {policy!r}.')
  bad = {p: r for scan in scans for p, r in scan.bad.items()}
  if bad:
    listed = [f'  {p}: {r}' for p, r in sorted(bad.items())[:_MAX_LISTED]]
    if len(bad) > _MAX_LISTED:
      listed.append(f'  ... and {len(bad) - _MAX_LISTED} more')
    listing = '\n'.join(listed)
    if policy == 'error':
      raise ValueError(
          f'{len(bad)} file(s) in {config.data.dir} are not readable images '
          f'(PNG, JPEG, BMP, GIF, WebP):\n{listing}\nRemove or repair them, or set '
          "config.data.bad_files='skip' to train without them.")
    logging.warning('Skipping %d file(s) that are not readable images '
                    "(config.data.bad_files='skip'):\n%s", len(bad), listing)
  for scan in scans:
    empty = [c for c in scan.class_names if not scan.files[c]]
    if empty:
      raise ValueError(
          f'Class folder(s) {empty} in {scan.split_dir} hold no readable images'
          f'{" once bad files are skipped" if bad else ""}; every class needs examples.')


def _folder_table(scan: _FolderScan) -> _Table:
  paths, labels = [], []
  for label, name in enumerate(scan.class_names):
    paths += scan.files[name]
    labels += [label] * len(scan.files[name])
  return _Table('path', np.array(paths, dtype=object), np.array(labels, np.int32),
                scan.class_names)


def _tfds_builder(config: ml_collections.ConfigDict):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.builder(config.data.name, data_dir=config.data.dir)


def _tfds_table(config: ml_collections.ConfigDict, split: str) -> _Table:
  # Read afresh on every call (no cache): under tfds.testing.mock_data the same name serves
  # different records.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = config.data.name
  builder = tfds.builder(name, data_dir=config.data.dir)
  try:
    builder.download_and_prepare()
  except Exception as e:  # Network and checksum failures come in many types.
    raise RuntimeError(
        f'Could not download or prepare the TFDS dataset {name!r} in {builder.data_dir}: {e}\n'
        "Without internet, use an image folder instead: config.data.source='folder', "
        'config.data.dir=<folder with <split>/<class>/<image>>.') from e
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(f'TFDS dataset {name!r} has features {list(features)}; the pipeline reads '
                     "'image' and 'label'.")
  # Keep the records encoded: decoding happens after the index stream has skipped and sharded.
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  images, labels = [], []
  for example in ds.as_numpy_iterator():
    images.append(example['image'])
    labels.append(example['label'])
  if not images:
    raise ValueError(f'TFDS split {name}/{split} is empty.')
  return _Table('bytes', np.array(images, dtype=object), np.array(labels, np.int32),
                tuple(features['label'].names))


def _fake_table(config: ml_collections.ConfigDict, split: str) -> _Table:
  fake = config.data.fake
  n = fake.num_train_examples if split == config.data.train_split else fake.num_eval_examples
  labels = np.arange(n, dtype=np.int32) % fake.num_classes
  names = tuple(f'class_{i}' for i in range(fake.num_classes))
  return _Table('fake', None, labels, names, salt=zlib.crc32(split.encode()) & 0x7fffffff)


def _check_source(config: ml_collections.ConfigDict) -> None:
  if config.data.source not in SOURCES:
    raise ValueError(f'config.data.source must be one of {SOURCES}, got {config.data.source!r}.')


def _table(config: ml_collections.ConfigDict, split: str) -> _Table:
  _check_source(config)
  if config.data.source == 'folder':
    scan = _scan_folder_split(config, split)
    _apply_bad_file_policy(config, [scan])
    return _folder_table(scan)
  if config.data.source == 'tfds':
    return _tfds_table(config, split)
  return _fake_table(config, split)


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Sizes of the train and eval splits, the number of classes and the class names.

  For an image folder this checks every file of both splits first (bad files count as absent
  with bad_files='skip', and raise with 'error'). For TFDS, sizes come from the dataset's
  metadata when it has them, otherwise from reading the split.
  """
  _check_source(config)
  splits = list(dict.fromkeys([config.data.train_split, config.data.eval_split]))
  if config.data.source == 'folder':
    scans = [_scan_folder_split(config, s) for s in splits]
    _apply_bad_file_policy(config, scans)
    sizes = {s.split: sum(len(f) for f in s.files.values()) for s in scans}
    names = scans[0].class_names
  elif config.data.source == 'tfds':
    builder = _tfds_builder(config)
    sizes = {}
    for split in splits:
      try:
        sizes[split] = int(builder.info.splits[split].num_examples)
      except (KeyError, ValueError, TypeError):
        sizes[split] = 0
      if not sizes[split]:  # No metadata (offline, or under tfds.testing.mock_data).
        sizes[split] = _tfds_table(config, split).size
    names = tuple(builder.info.features['label'].names)
  else:
    tables = [_fake_table(config, s) for s in splits]
    sizes = {s: t.size for s, t in zip(splits, tables)}
    names = tables[0].class_names
  return DatasetInfo(num_examples=sizes, num_classes=len(names), class_names=names)


# ----------------------------------------------------------------------------- streams


def num_threads(config: ml_collections.ConfigDict) -> int | None:
  """tf.data's threads: `config.data.num_parallel_calls`, or a default that leaves XLA room.

  When JAX computes on the CPU, tf.data and XLA share the same cores: tf.data then gets one
  thread per four cores (at least one), which feeds the model several times faster than it
  trains (benchmarks/README.md). With an accelerator, None lets tf.data autotune.
  """
  if config.data.num_parallel_calls:
    return int(config.data.num_parallel_calls)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == 'cpu':
    return max(1, (os.cpu_count() or 1) // 4)
  return None


def _options(num_parallel_calls: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # One thread per element: parallelism comes from the parallel map, not inside ops.
  options.threading.max_intra_op_parallelism = 1
  if num_parallel_calls:
    # A private pool bounds tf.data's threads: it shares the cores with XLA.
    options.threading.private_threadpool_size = num_parallel_calls
  return options


def _stateless_seed(seed: int, salt: int, value: tf.Tensor) -> tf.Tensor:
  base = tf.constant([seed, salt], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, tf.cast(value, tf.int64))


def _epoch_permutation(n: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
  return tf.random.experimental.stateless_shuffle(
      tf.range(n, dtype=tf.int64), seed=_stateless_seed(seed, _SHUFFLE_SALT, epoch))


def train_index_stream(num_examples: int, seed: int, global_batch: int, *, start_step: int = 0,
                       process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """The infinite stream of (global position, table index) that one process decodes.

  Epoch e = p // N visits the table in a permutation seeded by (seed, e). Positions before
  start_step * global_batch are skipped here, where skipping costs nothing.
  """
  n = num_examples
  first = start_step * global_batch
  first_epoch = first // n

  def epoch(e):
    positions = e * n + tf.range(n, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((positions, _epoch_permutation(n, seed, e)))

  ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(first - first_epoch * n)
  if process_count > 1:
    local = global_batch // process_count
    ds = ds.filter(lambda p, i: (p % global_batch) // local == process_index)
  return ds


def eval_index_stream(num_examples: int, global_batch: int, *, process_index: int = 0,
                      process_count: int = 1) -> tf.data.Dataset:
  """One pass of (position, table index, valid), padded to whole global batches."""
  total = math.ceil(num_examples / global_batch) * global_batch
  ds = tf.data.Dataset.range(total)
  if process_count > 1:
    local = global_batch // process_count
    ds = ds.filter(lambda p: (p % global_batch) // local == process_index)
  return ds.map(lambda p: (p, tf.minimum(p, num_examples - 1), p < num_examples))


def _loader(table: _Table, config: ml_collections.ConfigDict):
  """index -> float32 [S, S, 3] image in [0, 255], before augmentation and normalisation."""
  size = config.data.image_size
  if table.kind == 'fake':
    num_classes = max(config.data.fake.num_classes - 1, 1)
    labels = tf.constant(table.labels)

    def load_fake(index):
      noise = tf.random.stateless_uniform(
          [size, size, 3], _stateless_seed(table.salt, _FAKE_SALT, index), maxval=255.0)
      # A brightness that grows with the label makes fake classes learnable.
      level = 127.5 * tf.cast(tf.gather(labels, index), tf.float32) / num_classes
      return tf.floor(noise / 2 + level)
    return load_fake

  if table.kind == 'decoded':
    images = tf.constant(table.keys)
    return lambda index: tf.gather(images, index)
  # A list, not a numpy 'S' array: numpy would strip trailing NUL bytes off encoded images.
  keys = tf.constant(list(table.keys), tf.string)

  def load(index):
    contents = tf.gather(keys, index)
    if table.kind == 'path':
      contents = tf.io.read_file(contents)
    return resize(decode_image(contents), size, config.data.resize_method)
  return load


def _fingerprint(table: _Table) -> str:
  """Identifies a table's contents: its keys (with file sizes and times) and labels."""
  digest = hashlib.sha256(table.kind.encode() + table.labels.tobytes())
  for key in table.keys:
    if table.kind == 'path':
      st = os.stat(key)
      key = f'{key}\0{st.st_size}\0{st.st_mtime_ns}\0'.encode()
    digest.update(key)
  return digest.hexdigest()


# (table fingerprint, image size, resize method) -> decoded table; the last few only.
_DECODED: dict[tuple[str, int, str], _Table] = {}
_MAX_DECODED = 4


def _decoded_table(table: _Table, config: ml_collections.ConfigDict) -> _Table:
  """config.data.cache_decoded: decode and resize every image once, then keep it in memory."""
  key = (_fingerprint(table), config.data.image_size, config.data.resize_method)
  if key not in _DECODED:
    ds = tf.data.Dataset.range(table.size).map(
        _loader(table, config),
        num_parallel_calls=num_threads(config) or tf.data.AUTOTUNE)
    images = np.stack(list(ds.with_options(_options(num_threads(config)))
                           .as_numpy_iterator()))
    logging.info('Holding %d decoded images in memory (%.0f MB).', table.size,
                 images.nbytes / 2**20)
    while len(_DECODED) >= _MAX_DECODED:
      _DECODED.pop(next(iter(_DECODED)))
    _DECODED[key] = _Table('decoded', images, table.labels, table.class_names)
  return _DECODED[key]


def _process_layout(global_batch: int, process_index: int | None,
                    process_count: int | None) -> tuple[int, int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch % process_count:
    raise ValueError(f'The global batch size {global_batch} must divide evenly over '
                     f'{process_count} processes.')
  return global_batch // process_count, process_index, process_count


def create_dataset(config: ml_collections.ConfigDict, split: str, *, start_step: int = 0,
                   training: bool | None = None, process_index: int | None = None,
                   process_count: int | None = None) -> tf.data.Dataset:
  """The batches of one split, for this process.

  Args:
    config: the configuration (config.data, config.batch_size, config.eval_batch_size,
      config.seed).
    split: a split name, e.g. config.data.train_split or config.data.eval_split.
    start_step: for training, the global step the stream starts at (exact resume).
    training: augmented infinite stream (True) or one padded pass (False); by default True
      exactly for config.data.train_split.
    process_index: this process (default jax.process_index()).
    process_count: the number of processes (default jax.process_count()).

  Returns:
    Training: an infinite, per-epoch reshuffled, augmented stream of
    {'image': float32 [b, S, S, 3], 'label': int32 [b]}, b = config.batch_size / processes.
    Otherwise: one pass over the split in a fixed order, every example exactly once, the last
    batch padded; batches add 'mask' (bool [b]), False on padding.
  """
  training = split == config.data.train_split if training is None else training
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  if config.data.augment.enabled:
    augment.check_config(config.data.augment)
  if config.data.preprocessing not in PREPROCESSING:
    raise ValueError(f'config.data.preprocessing must be one of {PREPROCESSING}, got '
                     f'{config.data.preprocessing!r}.')
  if config.data.resize_method not in RESIZE_METHODS:
    raise ValueError(f'config.data.resize_method must be one of {RESIZE_METHODS}, got '
                     f'{config.data.resize_method!r}.')
  table = _table(config, split)
  if config.data.get('cache_decoded', False) and table.kind != 'fake':
    table = _decoded_table(table, config)
  load = _loader(table, config)
  labels = tf.constant(table.labels)
  npc = num_threads(config) or tf.data.AUTOTUNE
  preprocessing = config.data.preprocessing
  image_dtype = config.data.get('image_dtype', 'float32')
  if image_dtype not in IMAGE_DTYPES:
    raise ValueError(f'config.data.image_dtype must be one of {IMAGE_DTYPES}, got '
                     f'{image_dtype!r}.')
  aug = config.data.augment.to_dict()
  seed = int(config.seed)

  if training:
    global_batch = config.batch_size
    batch, index, count = _process_layout(global_batch, process_index, process_count)
    ds = train_index_stream(table.size, seed, global_batch, start_step=start_step,
                            process_index=index, process_count=count)

    @tf.autograph.experimental.do_not_convert  # plain TF ops; AutoGraph only warns here
    def example(position, i):
      image = load(i)
      if aug['enabled']:
        image = augment.random_augment(image, _stateless_seed(seed, _AUGMENT_SALT, position), aug)
      return {'image': to_output(image, preprocessing, image_dtype),
              'label': tf.gather(labels, i)}
  else:
    if start_step:
      raise ValueError('start_step applies to the training stream only.')
    global_batch = config.eval_batch_size or config.batch_size
    batch, index, count = _process_layout(global_batch, process_index, process_count)
    ds = eval_index_stream(table.size, global_batch, process_index=index, process_count=count)
    size = config.data.image_size

    @tf.autograph.experimental.do_not_convert
    def example(position, i, valid):
      del position
      image = tf.cond(valid, lambda: to_output(load(i), preprocessing, image_dtype),
                      lambda: tf.zeros([size, size, 3], tf.dtypes.as_dtype(image_dtype)))
      return {'image': image, 'label': tf.where(valid, tf.gather(labels, i), 0), 'mask': valid}

  ds = ds.map(example, num_parallel_calls=npc, deterministic=True)
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options(num_threads(config)))
