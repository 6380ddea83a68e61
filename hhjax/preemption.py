"""Preemption: on SIGTERM, training stops at the next step boundary, the same step everywhere.

Spot and preemptible VMs (Cloud TPU, GCE), SLURM (on preemption, and before the time limit with
`--signal=TERM@SECONDS`) and Kubernetes send SIGTERM some time before they kill a job. The
training loop asks `Notice.stop_now()` after every step; when it answers True, the loop
checkpoints that step and raises errors.Preempted (main.py: one line, exit status 3). The same
command resumes from there, so no step is lost.

One process: a SIGTERM handler of our own sets a flag. Later SIGTERMs, during the save and the
exit too, only set it again, so a second signal cannot cut a checkpoint short.

Several processes (jax.distributed): all must stop at the same step, since saving is a
collective. JAX's preemption sync manager agrees on it: `jax.distributed.initialize` installs a
SIGTERM handler in each process (it too only sets a flag), a notice in any one process reaches
all of them through the coordination service, and
`multihost_utils.reached_preemption_sync_point(n)` then returns True in every process at the
same call, one past the highest call any of them had made. No Python handler is installed then:
it would replace JAX's. The number passed is this run's count of calls, not the training step:
a notice during start-up then stops the run after its first step, whereas with steps it would
name step 1, which a resumed run has passed. Orbax's CheckpointManager calls the same function
with its steps, some from a background thread; hhjax.checkpointing stops it from doing so, since
that would move JAX's count back.
"""

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils


class Notice:
  """Whether a SIGTERM asks training to stop now; a context manager around the training loop."""

  def __init__(self):
    self._several = jax.process_count() > 1
    self._calls = 0
    self._received = False
    self._previous = None

  def __enter__(self) -> 'Notice':
    if self._several:
      try:
        multihost_utils.reached_preemption_sync_point(0)   # the sync manager is there
      except RuntimeError:
        logging.warning('JAX\'s preemption service is off (jax_enable_preemption_service): '
                        'a SIGTERM ends this run without a checkpoint.')
        self._several = None
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None and not self._received:
      signal.signal(signal.SIGTERM, self._previous)
    self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._received = True   # no logging here: the loop says what happened when it stops
    # Ignored from now on, until the process ends: Python puts back the default action (death)
    # for its own handlers as it shuts down, and a repeated SIGTERM must neither cut the save
    # short nor turn exit status 3 into a kill.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

  def stop_now(self) -> bool:
    """Called once after every training step, by every process: True to stop at this step."""
    self._calls += 1
    if self._several:
      return multihost_utils.reached_preemption_sync_point(self._calls)
    return self._received
