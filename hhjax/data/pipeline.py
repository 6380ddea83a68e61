"""tf.data input pipeline: TFDS `horses_or_humans`, image folders and synthetic images.

    data = data_spec.DataSpec.from_config(config)  # what the pipeline reads (spec.py)
    info = dataset_info(data)                     # sizes, number of classes, class names
    counts = class_counts(data, data.train_split) # examples per class (class weights)
    train = create_dataset(data, data.train_split, start_step=step)
    for batch in train.as_numpy_iterator(): ...   # {'image': f32 [b,H,W,3], 'label': i32 [b]}

How the stream is built, and why:
  * Every source becomes a table (sources.py): file paths plus labels, TFDS records read on
    demand (ArrayRecord; records.py) or held encoded in memory (TFRecord). An image folder is
    decode-checked first, each file once while it keeps its size and time (bad_files.py).
  * A stateless index stream (streams.py) says which row every global position reads: epoch e
    is a permutation seeded by (config.seed, e), `start_step` skips positions before anything
    is decoded, and each process takes its own slots of every global batch.
  * Only then is a row decoded and resized (decode.py), augmented with parameters drawn from
    (config.seed, position) (augment.py), normalised and batched: the same (seed, step) gives
    the same batch with any number of threads or processes, in any run.
  * With config.data.augment.on='device' the training examples carry uint8 pixels and what was
    drawn for them (augment.draws) instead; the train step augments
    (hhjax.training.device_augment). config.data.crop and config.data.random_erasing add a
    random-resized crop before the warp and an erased box after it, on either path.
  * Evaluation is one pass in table order, padded to whole batches, with a 'mask' (and the
    centre crop of config.data.crop.eval_fraction, when set).

With config.data.cache_decoded, each split is decoded and resized once and held in memory
(float32, N x S x S x 3: 277 MB for the 1,027 training images at 150 px); every epoch then
costs only augmentation. Off by default, so memory stays small for any dataset.
"""

import dataclasses
import hashlib

from absl import logging
import numpy as np
import tensorflow as tf

from hhjax import files
from hhjax.data import augment
from hhjax.data import decode
from hhjax.data import sources
from hhjax.data import spec as data_spec
from hhjax.data import streams


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a training loop needs to know about the data before reading it.

  Attributes:
    num_examples: split name -> number of examples (spec.splits(): training, validation and,
      when there is one, test).
    num_classes: number of classes.
    class_names: class names, in label order.
  """
  num_examples: dict[str, int]
  num_classes: int
  class_names: tuple[str, ...]


def dataset_info(spec: data_spec.DataSpec) -> DatasetInfo:
  """Sizes of the training, validation and test splits, the number of classes and the class
  names.

  For an image folder this checks every file of every split first (bad files count as absent
  with bad_files='skip', and raise with 'error'). For TFDS, sizes come from the dataset's
  metadata when it has them, otherwise from reading the split.
  """
  sizes, names = sources.sizes_and_class_names(spec)
  return DatasetInfo(num_examples=sizes, num_classes=len(names), class_names=names)


def class_counts(spec: data_spec.DataSpec, split: str) -> tuple[int, ...]:
  """The number of examples of each class in `split`, in label order.

  Read from the split's whole table (every label, whichever process asks), so every process
  and every resumed run of the same data gets the same counts.
  """
  table = sources.table(spec, split)
  labels = table.labels if table.labels is not None else table.keys.labels()
  return tuple(int(c) for c in np.bincount(np.asarray(labels, np.int64),
                                           minlength=len(table.class_names)))


# ----------------------------------------------------------------------------- loading rows


def _fake_loader(table: sources.Table, size: int, num_classes: int):
  top_label = max(num_classes - 1, 1)
  labels = tf.constant(table.labels)
  whole_row = _whole_row(table)

  def load_fake(index):
    noise = tf.random.stateless_uniform(
        [size, size, 3],
        streams.stateless_seed(table.salt, streams.FAKE_SALT, whole_row(index)),
        maxval=255.0)
    # A brightness that grows with the label makes fake classes learnable.
    label = tf.gather(labels, index)
    level = 127.5 * tf.cast(label, tf.float32) / top_label
    return tf.floor(noise / 2 + level), label
  return load_fake


def _whole_row(table: sources.Table):
  """index in `table` -> the row of the whole table it is (a held-out part's rows)."""
  if table.rows is None:
    return lambda index: index
  rows = tf.constant(table.rows, tf.int64)
  return lambda index: tf.gather(rows, tf.cast(index, tf.int64))


def _loader(table: sources.Table, spec: data_spec.DataSpec):
  """index -> (float32 [S, S, 3] image in [0, 255], int32 label), before augmentation.

  A record carries its own label; the other tables hold theirs.
  """
  if table.kind == 'fake':
    return _fake_loader(table, spec.image_size, spec.fake.num_classes)
  if table.kind == 'decoded':
    images, labels = tf.constant(table.keys), tf.constant(table.labels)
    return lambda index: (tf.gather(images, index), tf.gather(labels, index))

  def resized(contents):
    return decode.resize(decode.decode_image(contents), spec.image_size, spec.resize_method)
  if table.kind == 'records':
    whole_row = _whole_row(table)

    def load_record(index):
      contents, label = table.keys.read(whole_row(index))
      return resized(contents), label
    return load_record
  # A list, not a numpy 'S' array: numpy would strip trailing NUL bytes off encoded images.
  keys, labels = tf.constant(list(table.keys), tf.string), tf.constant(table.labels)

  def load(index):
    contents = tf.gather(keys, index)
    if table.kind == 'path':
      contents = tf.io.read_file(contents)
    return resized(contents), tf.gather(labels, index)
  return load


def _fingerprint(table: sources.Table) -> str:
  """Identifies a table's contents: its keys (with file sizes and times) and labels."""
  if table.kind == 'records':
    digest = hashlib.sha256(f'records\0{table.keys.origin}\0{table.size}'.encode())
    if table.rows is not None:
      digest.update(table.rows.tobytes())
    return digest.hexdigest()
  digest = hashlib.sha256(table.kind.encode() + table.labels.tobytes())
  for key in table.keys:
    if table.kind == 'path':
      size, mtime = files.stat(key)
      key = f'{key}\0{size}\0{mtime}\0'.encode()
    digest.update(key)
  return digest.hexdigest()


# (table fingerprint, image size, resize method) -> decoded table; the last few only.
_DECODED: dict[tuple[str, int, str], sources.Table] = {}
_MAX_DECODED = 4


def _decoded_table(table: sources.Table, spec: data_spec.DataSpec) -> sources.Table:
  """spec.cache_decoded: decode and resize every image once, then keep it in memory."""
  key = (_fingerprint(table), spec.image_size, spec.resize_method)
  if key not in _DECODED:
    threads = streams.num_threads(spec.num_parallel_calls)
    ds = tf.data.Dataset.range(table.size).map(_loader(table, spec),
                                               num_parallel_calls=threads or tf.data.AUTOTUNE)
    rows = list(ds.with_options(streams.options(threads)).as_numpy_iterator())
    images = np.stack([image for image, _ in rows])
    labels = np.array([label for _, label in rows], np.int32)
    del rows
    logging.info('Holding %d decoded images in memory (%.0f MB).', table.size,
                 images.nbytes / 2**20)
    while len(_DECODED) >= _MAX_DECODED:
      _DECODED.pop(next(iter(_DECODED)))
    _DECODED[key] = sources.Table('decoded', images, labels, table.class_names)
  return _DECODED[key]


# ----------------------------------------------------------------------------- batches


def _train_examples(table: sources.Table, spec: data_spec.DataSpec, load, *,
                    start_step: int, process_index: int | None,
                    process_count: int | None) -> tuple[int, tf.data.Dataset]:
  """(per-process batch size, this process's augmented examples from `start_step` on)."""
  batch, index, count = streams.process_layout(spec.batch_size, process_index, process_count)
  seed = spec.seed
  ds = streams.train_index_stream(table.size, seed, spec.batch_size, start_step=start_step,
                                  process_index=index, process_count=count)
  aug, preprocessing, image_dtype = spec.augment, spec.preprocessing, spec.image_dtype
  size = spec.image_size

  @tf.autograph.experimental.do_not_convert  # plain TF ops; AutoGraph only warns here
  def example(position, i):
    image, label = load(i)
    if spec.augments_on_device:
      # Pixels and what was drawn; hhjax.training.device_augment applies it in the step.
      draws = augment.draws(spec, position, size, size)
      return {'image': decode.to_output(image, preprocessing, 'uint8'), 'label': label,
              **draws}
    if aug.enabled and not (spec.crop.random_resized_crop or spec.random_erasing.enabled):
      image = augment.random_augment(
          image, streams.stateless_seed(seed, streams.AUGMENT_SALT, position), aug)
    elif spec.augments:   # with the crop or the erasing
      image = augment.host_augment(image, spec, position)
    return {'image': decode.to_output(image, preprocessing, image_dtype), 'label': label}
  return batch, _map(ds, example, spec.num_parallel_calls)


def _eval_examples(table: sources.Table, spec: data_spec.DataSpec, load, *,
                   process_index: int | None,
                   process_count: int | None) -> tuple[int, tf.data.Dataset]:
  """(per-process batch size, this process's share of one padded pass, with a 'mask')."""
  global_batch = spec.eval_batch_size
  batch, index, count = streams.process_layout(global_batch, process_index, process_count)
  ds = streams.eval_index_stream(table.size, global_batch, process_index=index,
                                 process_count=count)
  size, preprocessing, image_dtype = spec.image_size, spec.preprocessing, spec.image_dtype

  @tf.autograph.experimental.do_not_convert
  def loaded(i):
    image, label = load(i)
    image = augment.centre_crop(image, spec.crop.eval_fraction)
    return decode.to_output(image, preprocessing, image_dtype), label

  def padding():
    return tf.zeros([size, size, 3], tf.dtypes.as_dtype(image_dtype)), tf.constant(0, tf.int32)

  def example(position, i, valid):
    del position
    # Padding reads nothing: a record read or a file opened for it would be wasted.
    image, label = tf.cond(valid, lambda: loaded(i), padding)
    return {'image': image, 'label': label, 'mask': valid}
  return batch, _map(ds, example, spec.num_parallel_calls)


def _map(ds: tf.data.Dataset, fn, num_parallel_calls: int | None) -> tf.data.Dataset:
  # deterministic=True: every example keeps its position, whatever the thread count.
  return ds.map(fn, num_parallel_calls=streams.num_threads(num_parallel_calls) or tf.data.AUTOTUNE,
                deterministic=True)


def create_dataset(spec: data_spec.DataSpec, split: str, *, start_step: int = 0,
                   training: bool | None = None, process_index: int | None = None,
                   process_count: int | None = None) -> tf.data.Dataset:
  """The batches of one split, for this process.

  Args:
    spec: what to read and how (DataSpec.from_config(config)).
    split: a split name, e.g. spec.train_split, spec.validation or spec.test_split.
    start_step: for training, the global step the stream starts at (exact resume).
    training: augmented infinite stream (True) or one padded pass (False); by default True
      exactly for spec.train_split.
    process_index: this process (default jax.process_index()).
    process_count: the number of processes (default jax.process_count()).

  Returns:
    Training: an infinite, per-epoch reshuffled, augmented stream of
    {'image': float32 [b, S, S, 3], 'label': int32 [b]}, b = spec.batch_size / processes;
    with spec.augments_on_device, 'image' is uint8 and augment.draws's keys come along.
    Otherwise: one pass over the split in a fixed order, every example exactly once, the last
    batch padded; batches add 'mask' (bool [b]), False on padding.
  """
  training = split == spec.train_split if training is None else training
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  if start_step and not training:
    raise ValueError('start_step applies to the training stream only.')
  table = sources.table(spec, split)
  if spec.cache_decoded and table.kind != 'fake':
    table = _decoded_table(table, spec)
  load = _loader(table, spec)
  if training:
    batch, ds = _train_examples(table, spec, load, start_step=start_step,
                                process_index=process_index, process_count=process_count)
  else:
    batch, ds = _eval_examples(table, spec, load, process_index=process_index,
                               process_count=process_count)
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(streams.options(streams.num_threads(spec.num_parallel_calls)))


def eval_pixels(table: sources.Table, spec: data_spec.DataSpec,
                indices: list[int]) -> np.ndarray:
  """Rows `indices` of `table` as the eval pass sees them: uint8 [k, S, S, 3], not normalised.

  For pictures of a few examples (hhjax.pictures): they are decoded again, one by one.
  """
  load = _loader(table, spec)
  images = [augment.centre_crop(load(tf.constant(i, tf.int64))[0],
                                spec.crop.eval_fraction).numpy() for i in indices]
  size = spec.image_size
  return np.clip(np.round(np.reshape(images, (len(indices), size, size, 3))), 0,
                 255).astype(np.uint8)
