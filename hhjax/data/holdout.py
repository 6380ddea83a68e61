"""A validation share held out of the training split: stratified, fixed by the seed alone.

    validation_rows, training_rows = holdout.split_rows(labels, fraction=0.1, seed=0)

Each class gives round(fraction x its count) rows (at least one, and never all of them), so
validation keeps the classes' proportions. Which rows is decided by a hash of (seed, row
index), computed with integer arithmetic: no random generator whose stream could change with
a library version, no state, nothing that depends on the process. Every process of a run
computes the same rows from the same table, and a resume computes the rows the run started
with. The two parts are disjoint and together are the whole split, each in table order.
"""

import numpy as np

# Keeps the held-out rows apart from the other uses of the seed (shuffling, augmentation).
_SALT = 0x5EED_0F_4A1D
_MASK = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's output function on uint64 values (wrapping arithmetic)."""
  x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def row_keys(size: int, seed: int) -> np.ndarray:
  """A pseudo-random uint64 per row index, a function of (seed, index) alone."""
  with np.errstate(over='ignore'):
    base = _splitmix64(np.array([(seed ^ _SALT) & _MASK], np.uint64))[0]
    return _splitmix64(np.arange(size, dtype=np.uint64) ^ base)


def counts(class_counts: np.ndarray, fraction: float) -> np.ndarray:
  """Rows of each class held out: round(fraction x count), at least 1, at most count - 1.

  A class of one row keeps it for training.
  """
  class_counts = np.asarray(class_counts, np.int64)
  wanted = np.floor(class_counts * fraction + 0.5).astype(np.int64)
  return np.where(class_counts > 1, np.clip(wanted, 1, class_counts - 1), 0)


def split_rows(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(validation rows, training rows) of a split whose rows have `labels`, both sorted.

  Args:
    labels: the class of every row, in table order.
    fraction: the share of each class to hold out, in (0, 1).
    seed: decides which rows (config.seed).
  """
  if not 0 < fraction < 1:
    raise ValueError(f'fraction must be in (0, 1), got {fraction}.')
  labels = np.asarray(labels)
  keys = row_keys(len(labels), seed)
  held = []
  classes, class_counts = np.unique(labels, return_counts=True)
  for label, n in zip(classes, counts(class_counts, fraction)):
    rows = np.flatnonzero(labels == label)
    # The class's rows in the order of their keys (ties, which cannot occur, by index).
    order = rows[np.lexsort((rows, keys[rows]))]
    held.append(order[:n])
  validation = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  training = np.setdiff1d(np.arange(len(labels)), validation, assume_unique=True)
  return validation.astype(np.int64), training.astype(np.int64)
