"""keras.callbacks.ReduceLROnPlateau between epochs: its counters and the rate it sets.

The counters are kept in the phase's `Progress` (checkpoint metadata), the rate in the optimizer
state (`keras_optim.set_learning_rate`), so that a resumed run continues exactly.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import numpy as np

# The metrics of an epoch's row it may watch.
METRICS = ('val_loss', 'val_accuracy', 'train_loss', 'train_accuracy')


@dataclasses.dataclass(frozen=True)
class PlateauSpec:
  """config.reduce_lr_on_plateau, `keras.callbacks.ReduceLROnPlateau`'s arguments.

  A false `monitor` means off. The mode is Keras's 'auto': min for a loss, max for an accuracy.
  """
  monitor: str | None = None
  factor: float = 0.1
  patience: int = 10
  min_delta: float = 1e-4
  cooldown: int = 0
  min_lr: float = 0.0


def start() -> dict[str, Any]:
  """The callback's counters at the start of a phase (Keras resets them in on_train_begin)."""
  return {'best': None, 'wait': 0, 'cooldown_counter': 0}


def step(spec: PlateauSpec, counters: Mapping[str, Any], value: float,
                 rate: float) -> tuple[dict[str, Any], float | None]:
  """One epoch end of ReduceLROnPlateau: (new counters, the new rate or None to keep it).

  Keras's on_epoch_end: in cooldown, the cooldown counter goes down and `wait` is reset; an
  improvement (`value + min_delta < best` for a loss, `value - min_delta > best` for an
  accuracy) sets `best`; otherwise, outside cooldown, `wait` grows, and at `patience` the rate
  becomes `max(rate * factor, min_lr)` if it is above min_lr, which starts the cooldown.
  """
  best, wait, cooldown = counters['best'], int(counters['wait']), int(
      counters['cooldown_counter'])
  lower_is_better = spec.monitor.endswith('loss')
  new_rate = None
  if cooldown > 0:
    cooldown -= 1
    wait = 0
  if best is None or (value + spec.min_delta < best if lower_is_better
                      else value - spec.min_delta > best):
    best, wait = float(value), 0
  elif cooldown <= 0:
    wait += 1
    if wait >= spec.patience and rate > np.float32(spec.min_lr):
      new_rate = max(rate * spec.factor, spec.min_lr)
      cooldown, wait = spec.cooldown, 0
  return {'best': best, 'wait': wait, 'cooldown_counter': cooldown}, new_rate

