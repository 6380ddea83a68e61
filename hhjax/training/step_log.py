"""The training log's progress lines: loss, accuracy, learning rate, images/s and ETA every few
steps.

Every `every` steps and at epoch ends, a progress row goes to TensorBoard (hhjax.metrics
`write_progress`): the step and the numbers that follow from the training state alone, so
that a resumed run writes the same rows again, to the bit: {'step', 'loss', 'accuracy',
'learning_rate'}, the loss and accuracy being the means over the epoch's steps so far (those
of the line). Throughput and ETA, which depend on the machine, stay in the line. The first
step after a start or a resume gets its row but no line (there is no rate yet), so that the
rows do not depend on where a run was resumed.
"""

from collections.abc import Callable, Mapping
from typing import Any
import time

from absl import logging
import jax

from hhjax import durations
from hhjax.training import keras_optim
from hhjax.training import phases as phases_lib

PyTree = Any


def metrics_from_state(state: PyTree) -> tuple[float, float, int]:
  """(mean loss, accuracy, examples) of the steps since the state's metrics were zeroed."""
  m = jax.device_get(state['metrics'])
  count = int(m['count'])
  if not count:
    return float('nan'), float('nan'), 0
  return float(m['loss_sum']) / count, float(m['correct']) / count, count


def learning_rate(state: PyTree, phase: phases_lib.Phase) -> float:
  """The rate of the state's last step (the phase's constant when the optimizer holds none)."""
  rate = keras_optim.current_learning_rate(state['opt_state'])
  return phase.learning_rate if rate is None else rate


class StepLog:
  """Progress lines every `every` steps (config.log_every_steps) and at epoch ends.

  The step that compiles is left out of the rates. `check(state)` runs before each line (the
  training run's test for a NaN loss); `on_row(row)` gets the progress rows.
  """

  def __init__(self, *, every: int, batch_size: int, total_steps: int, steps_per_epoch: int,
               phase: phases_lib.Phase, progress: phases_lib.Progress,
               check: Callable[[PyTree], None],
               on_row: Callable[[Mapping[str, float]], None] | None = None):
    self._every, self._batch, self._total = every, batch_size, total_steps
    self._steps_per_epoch, self._phase, self._progress = steps_per_epoch, phase, progress
    self._check = check
    self._on_row = on_row
    self._t, self._step, self._compiled = time.perf_counter(), None, False

  def restart(self, step: int) -> None:
    """Measures from now on (after an evaluation or a save)."""
    self._t, self._step = time.perf_counter(), step

  def after_step(self, step: int, state: PyTree, epoch_end: bool) -> None:
    if not self._compiled:   # exclude compilation from the throughput figures
      jax.block_until_ready(state['step'])
      self._compiled = True
      self.restart(step)
    if step % self._every and not epoch_end:
      return
    self._check(state)
    now = time.perf_counter()
    if step <= self._step and self._on_row is None:
      return
    loss, acc, _ = metrics_from_state(state)
    if self._on_row is not None:   # also where no line is (the first step: no rate yet)
      self._on_row(self.row(step, state, loss, acc))
    if step <= self._step:
      return
    rate = (step - self._step) * self._batch / max(now - self._t, 1e-9)
    eta = (self._total - step) * self._batch / rate
    epoch, in_epoch = divmod(step - self._progress.phase_start_step, self._steps_per_epoch)
    logging.info('%s epoch %d/%d step %d/%d  loss %.4f  accuracy %.4f  lr %.4g  %.1f img/s  '
                 'ETA %s', self._phase.name, epoch + (1 if in_epoch else 0), self._phase.epochs,
                 step, self._total, loss, acc, learning_rate(state, self._phase), rate,
                 durations.format_duration(eta))
    self.restart(step)

  def row(self, step: int, state: PyTree, loss: float, accuracy: float) -> dict[str, float]:
    """A progress row (see the module docstring): the learning rate is the state's last
    step's, as the line's."""
    return {'step': step, 'loss': loss, 'accuracy': accuracy,
            'learning_rate': learning_rate(state, self._phase)}
