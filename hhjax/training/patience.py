"""Keras's `EarlyStopping` callback for a phase: patience, min_delta, baseline, best weights.

    rule = Patience(monitor='val_loss', patience=3, restore_best_weights=True)
    counters = Counters()                      # in the checkpointed Progress
    reason = on_epoch_end(rule, counters, epoch, row, step)   # why the phase stops, or None

A phase is one Keras `fit` (the tutorial compiles and fits once per stage), so each phase's
rule starts with fresh counters, as the callback's `on_train_begin` resets them, and `epoch`
counts the phase's epochs from 0. The decisions are those of `keras.callbacks.EarlyStopping`
(Keras 3) step for step, down to its float32 comparisons:

  * an epoch before `start_from_epoch` is not looked at;
  * `wait` grows by one each epoch; an improvement (better than the best so far by more than
    `min_delta`) records the best and resets `wait`, unless a `baseline` is set and the value
    does not also beat the baseline;
  * otherwise the phase stops once `wait >= patience`, never at its first epoch;
  * `mode='auto'` minimises the losses and maximises the accuracies.

restore_best_weights: Keras keeps a copy of the best epoch's weights and sets them at the end of
`fit`, whether the callback stopped it or its epochs ran out. Here the weights of the best epoch
are the checkpoint written at its end: `Counters.best_step` names it, the run keeps that
checkpoint from deletion while the phase runs (besides the last `keep_checkpoints` and the best
by validation accuracy), and at the phase's end hhjax.train restores `params` and `batch_stats`
from it (not the optimizer state: Keras's model weights do not include it). No second copy of
the weights is held, and a resumed run finds the same checkpoint through the saved counters.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import numpy as np

MODES = ('auto', 'min', 'max')


@dataclasses.dataclass(frozen=True)
class Patience:
  """config.<phase>.early_stopping: `keras.callbacks.EarlyStopping`'s arguments.

  A false `monitor` (None, or '' from the command line) turns the rule off.
  """
  monitor: str | None = None
  min_delta: float = 0.0
  patience: int = 0
  mode: str = 'auto'
  baseline: float | None = None
  restore_best_weights: bool = False
  start_from_epoch: int = 0

  @property
  def on(self) -> bool:
    return bool(self.monitor)


@dataclasses.dataclass
class Counters:
  """The callback's state between epochs, saved with the checkpoint (Progress.patience).

  Attributes:
    wait: epochs since the last improvement (Keras's `wait`).
    best: the best monitored value so far (None before the first epoch looked at).
    best_epoch: the phase's epoch (0-based) that had it.
    best_step: the step whose checkpoint holds the weights to restore (restore_best_weights).
    stopped_epoch: the epoch the rule stopped the phase at (0: it did not).
    restored_from: the step whose weights were restored at the phase's end, if any.
  """
  wait: int = 0
  best: float | None = None
  best_epoch: int = 0
  best_step: int | None = None
  stopped_epoch: int = 0
  restored_from: int | None = None

  @classmethod
  def from_dict(cls, saved: Mapping[str, Any] | None) -> 'Counters':
    return cls(**dict(saved)) if saved else cls()


def direction(rule: Patience) -> str:
  """'min' or 'max': the mode, with 'auto' resolved as Keras resolves it for these metrics."""
  if rule.mode != 'auto':
    return rule.mode
  return 'min' if str(rule.monitor).endswith('loss') else 'max'


def _is_improvement(rule: Patience, value: float, reference: float | None) -> bool:
  """Keras's `MonitorCallback._is_improvement`; its ops compare float32 tensors."""
  if reference is None:
    return True
  if direction(rule) == 'min':
    return bool(np.float32(value + abs(rule.min_delta)) < np.float32(reference))
  return bool(np.float32(value - abs(rule.min_delta)) > np.float32(reference))


def on_epoch_end(rule: Patience, counters: Counters, epoch: int, row: Mapping[str, float],
                 step: int) -> str | None:
  """Updates `counters` with the end of the phase's `epoch` (0-based); why it stops, or None.

  Args:
    rule: the phase's rule (off: nothing happens).
    counters: the phase's counters so far; updated in place.
    epoch: the epoch just ended, counted within the phase from 0.
    row: the epoch's metrics (train_loss, train_accuracy, val_loss, val_accuracy).
    step: the global step at the epoch's end: its checkpoint holds the epoch's weights.
  """
  if not rule.on or epoch < rule.start_from_epoch:
    return None
  current = float(row[rule.monitor])
  if rule.restore_best_weights and counters.best_step is None:
    counters.best_step, counters.best_epoch = step, epoch
  counters.wait += 1
  if _is_improvement(rule, current, counters.best):
    counters.best, counters.best_epoch = current, epoch
    if rule.restore_best_weights:
      counters.best_step = step
    if rule.baseline is None or _is_improvement(rule, current, rule.baseline):
      counters.wait = 0
    return None
  if counters.wait >= rule.patience and epoch > 0:
    counters.stopped_epoch = epoch
    return (f'{rule.monitor} has not improved on {counters.best:.4f} (epoch '
            f'{counters.best_epoch + 1} of the phase) for {counters.wait} epoch(s); patience '
            f'{rule.patience}')
  return None


def step_to_restore(rule: Patience, counters: Counters, step: int) -> int | None:
  """At a phase's end: the step whose weights restore_best_weights sets, or None (none to set,
  or they are the current ones)."""
  if not (rule.on and rule.restore_best_weights) or counters.best_step is None:
    return None
  return None if counters.best_step == step else counters.best_step


def kept_step(rule: Patience, counters: Counters) -> int | None:
  """The checkpoint the phase must keep for restore_best_weights, or None."""
  return counters.best_step if rule.on and rule.restore_best_weights else None
