"""The one rule that says which epoch is the best: for --checkpoint=best, retention and compare.

    best.choose(rows, metrics_of=lambda row: row)    # the best of epochs, checkpoints or rows

The best has the highest validation accuracy (METRIC); of equals, the latest. That is the order
orbax keeps and returns checkpoints in (a stable ascending sort by `rank`, then the last: see
hhjax.checkpointing, which hands it `rank`), and hhjax.compare picks its best epoch with the
same `choose`, so the epoch it names is the checkpoint --checkpoint=best restores. Entries
without metrics (checkpoints written inside an epoch) take no part.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar('T')

# What ranks epochs: validation accuracy, never a test metric.
METRIC = 'val_accuracy'


def rank(metrics: Mapping[str, Any]) -> float:
  """The value that ranks an epoch's metrics (higher is better)."""
  return float(metrics[METRIC])


def choose(items: Sequence[T], metrics_of: Callable[[T], Mapping[str, Any] | None]) -> T | None:
  """The best of `items` (in step order): highest `rank`, of equals the last; None if none has
  metrics."""
  ranked = [item for item in items if metrics_of(item) is not None]
  if not ranked:
    return None
  return sorted(ranked, key=lambda item: rank(metrics_of(item)))[-1]
