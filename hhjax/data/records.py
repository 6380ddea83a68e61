"""TFDS splits read record by record: random access to a dataset prepared as ArrayRecord.

A TFDS dataset prepared with `file_format='array_record'` (or converted to it with
`tfds convert_format`) is read through `builder.as_data_source`: a split's table is its length
alone, and a record is read only when the index stream reaches it. Start-up time and memory
then do not grow with the split, a resume reads nothing it skips, and with several processes
each reads only the records of its own share. The data source is Python, so a record's bytes
come through `tf.numpy_function`; parsing and decoding stay in TensorFlow ops, in the parallel
map. A dataset prepared only as TFRecord has no random access: sources.py then holds the split
encoded in memory and says so.
"""

from collections.abc import Sequence
import dataclasses

import numpy as np
import tensorflow as tf

# How TFDS serialises the two features the pipeline reads (tf.train.Example): an Image is its
# encoded bytes, a ClassLabel an int64.
_FEATURES = {'image': tf.io.FixedLenFeature([], tf.string),
             'label': tf.io.FixedLenFeature([], tf.int64)}


@dataclasses.dataclass(frozen=True, eq=False)
class Records:
  """One split's serialised examples, read on demand.

  Attributes:
    source: index -> the serialised record (TFDS's data source, raw bytes).
    origin: where the records are (data dir, dataset, split), to tell tables apart.
  """
  source: Sequence[bytes]
  origin: str

  def __len__(self) -> int:
    return len(self.source)

  def _get(self, index: np.ndarray) -> np.ndarray:
    # An object array keeps bytes whole (numpy's 'S' would strip trailing NUL bytes).
    return np.array(self.source[int(index)], dtype=object)

  def labels(self) -> np.ndarray:
    """Every record's label, in order (reads the whole split once)."""
    spec = {'label': _FEATURES['label']}
    out = []
    for start in range(0, len(self), 1024):
      raw = [self.source[i] for i in range(start, min(start + 1024, len(self)))]
      out.append(tf.io.parse_example(tf.constant(raw, tf.string), spec)['label'].numpy())
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)

  def read(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(encoded image bytes, int32 label) of the record at `index`, in TensorFlow ops."""
    serialized = tf.numpy_function(self._get, [index], tf.string, stateful=False)
    example = tf.io.parse_single_example(tf.ensure_shape(serialized, []), _FEATURES)
    return example['image'], tf.cast(example['label'], tf.int32)


def open_split(builder, split: str) -> Records | None:
  """`split` of a prepared TFDS dataset as Records; None when it has no ArrayRecord files."""
  from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  array_record = file_adapters.FileFormat.ARRAY_RECORD
  try:
    formats = set(builder.info.available_file_formats())
  except (AttributeError, TypeError, ValueError):
    formats = {builder.info.file_format}
  if array_record not in formats:
    return None
  source = builder.as_data_source(split, file_format=array_record,
                                  deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return Records(source, f'{builder.data_dir}:{split}')
