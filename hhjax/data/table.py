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
  """
  kind: str
  keys: np.ndarray | records.Records | None
  labels: np.ndarray | None
  class_names: tuple[str, ...]
  salt: int = 0

  @property
  def size(self) -> int:
    return len(self.keys) if self.labels is None else len(self.labels)
