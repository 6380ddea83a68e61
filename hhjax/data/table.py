"""A split as a table of rows: what every source produces and the index stream points into."""

import dataclasses

import numpy as np

from hhjax.data import records


@dataclasses.dataclass(frozen=True)
class Table:
  """One split as a table: the rows that the index stream points into.

  kind: 'path' (keys are file paths), 'bytes' (keys are encoded images), 'records' (keys are
  records.Records, read on demand, each with its label; labels is None), 'decoded' (keys are
  resized float32 images [N, S, S, 3]) or 'fake' (no keys: images are generated from the index).

  rows: for a part of a table whose rows are not held one by one ('records', 'fake'): the rows
  of the whole table it holds, in order (row i of the part is row rows[i] of the whole, which
  its images are read or generated from); labels are then the part's own. None: every row.
  """
  kind: str
  keys: np.ndarray | records.Records | None
  labels: np.ndarray | None
  class_names: tuple[str, ...]
  salt: int = 0
  rows: np.ndarray | None = None

  @property
  def size(self) -> int:
    if self.rows is not None:
      return len(self.rows)
    return len(self.keys) if self.labels is None else len(self.labels)

  def part(self, rows: np.ndarray) -> 'Table':
    """The table of rows `rows` (sorted indices) of this one; labels must be known."""
    rows = np.asarray(rows, np.int64)
    labels = np.asarray(self.labels)[rows]
    if self.kind in ('path', 'bytes', 'decoded'):
      return Table(self.kind, self.keys[rows], labels, self.class_names, self.salt)
    base = rows if self.rows is None else self.rows[rows]
    return Table(self.kind, self.keys, labels, self.class_names, self.salt, rows=base)
