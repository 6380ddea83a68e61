"""Index streams: which table row each position of a run reads, decided before any decoding.

Every source becomes a table of rows (file paths plus labels, or TFDS records read on demand
or held encoded); the streams here say which row each position of a run reads, and why that
design:
  * The train stream is a stream of (global position, table index): epoch e is a stateless
    permutation of the table seeded by (config.seed, e), and global position p is example
    p % N of epoch p // N. Global step s is positions [s*B, (s+1)*B).
  * `start_step` skips positions on this cheap index stream; reading, decoding and augmentation
    happen after the skip, so resuming at step 10,000 reads nothing it does not yield.
  * Augmentation draws its parameters statelessly from (config.seed, position): the same
    (seed, step) gives the same batch with any number of parallel map threads, in any run.
  * Process i of P decodes slots [i*b, (i+1)*b) of every global batch (b = B / P): the
    processes read disjoint parts of every epoch, and together they yield exactly the batch a
    single process would.
  * Evaluation is one pass in table order, padded to whole batches, with a 'mask'.
"""

import math
import os

import jax
import tensorflow as tf

from hhjax import errors

# Salts that keep the random streams of shuffling, augmentation and fake images apart.
SHUFFLE_SALT = 1
AUGMENT_SALT = 2
FAKE_SALT = 3
CROP_SALT = 4
ERASE_SALT = 5


def num_threads(num_parallel_calls: int | None) -> int | None:
  """tf.data's threads: `num_parallel_calls` if set, or a default that leaves XLA room.

  When JAX computes on the CPU, tf.data and XLA share the same cores: tf.data then gets one
  thread per four cores (at least one), which feeds the model several times faster than it
  trains (benchmarks/README.md). With an accelerator, None lets tf.data autotune.
  `num_parallel_calls` is config.data.num_parallel_calls.
  """
  if num_parallel_calls:
    return int(num_parallel_calls)
  if jax.default_backend() == 'cpu':
    return max(1, (os.cpu_count() or 1) // 4)
  return None


def options(num_parallel_calls: int | None) -> tf.data.Options:
  """Deterministic tf.data options; with a thread count, a private pool of that size."""
  result = tf.data.Options()
  result.deterministic = True
  # One thread per element: parallelism comes from the parallel map, not inside ops.
  result.threading.max_intra_op_parallelism = 1
  if num_parallel_calls:
    # A private pool bounds tf.data's threads: it shares the cores with XLA.
    result.threading.private_threadpool_size = num_parallel_calls
  return result


def stateless_seed(seed: int, salt: int, value: tf.Tensor) -> tf.Tensor:
  """The seed of a stateless random op for `value` (an epoch, position or index)."""
  base = tf.constant([seed, salt], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, tf.cast(value, tf.int64))


def _epoch_permutation(n: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
  return tf.random.experimental.stateless_shuffle(
      tf.range(n, dtype=tf.int64), seed=stateless_seed(seed, SHUFFLE_SALT, epoch))


def process_layout(global_batch: int, process_index: int | None,
                   process_count: int | None) -> tuple[int, int, int]:
  """(per-process batch, process index, process count); None means JAX's own value."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch % process_count:
    raise errors.ConfigError(f'The global batch size {global_batch} must divide evenly over '
                             f'{process_count} processes.')
  return global_batch // process_count, process_index, process_count


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
