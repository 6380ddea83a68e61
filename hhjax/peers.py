"""A multi-process run that loses a process: the others stop within a bounded time, in one line.

A process killed, crashed or gone with its host leaves the others waiting in the next
collective. On CPU the Gloo collective fails at once (the peer's sockets close), but then the
exit waits for orbax's threads and JAX's shutdown barrier; on TPU and GPU the collective itself
waits. Either way JAX ends such a wait only after its heartbeat timeout, by aborting the process
with a C++ stack trace.

So each process of a jax.distributed run watches the others (`start`, called by
hhjax.sharding): a daemon thread bumps this process's counter in the coordination service's
key-value store every `timeout / 10` seconds and reads everyone's; another checks every second
that each peer's counter moved within the last `timeout` seconds and that the store answered
within it. If not, or if the main thread's collective fails (`is_peer_failure`), the process
prints one line, `error: ...` (which process, how to resume), runs the `cleanup` callbacks (the
workdir lock) and ends at once with errors.EXIT_PEER_LOST, without waiting for collectives or
the shutdown barrier. JAX's own heartbeat timeout is set to twice ours, as a backstop.

A process that ends marks itself done (`finish`), or failed: the others then stop at once and
point to its log, rather than wait `timeout` seconds. One that is done waits, still watching,
until every other is done too (process 0 writes the run's results while the others have
nothing left to do): JAX's shutdown barrier at exit, which gives up after its own timeout by
aborting every process, is then met by all at once. A failed one ends without JAX's shutdown
barrier (`end_failed`), where it would wait for the others until JAX's timeout.

`timeout` is HHJAX_PEER_TIMEOUT_S (default 60 s). A lost process is found within about
`timeout + timeout / 10` seconds; a slow one (a long compile, a checkpoint written to gs://)
is not mistaken for a lost one, since the threads beat independently of the work.

`key_value_store` is that store, for the other exchanges between processes (the image check's).
"""

from collections.abc import Callable, Iterator
import contextlib
import os
import sys
import threading
import time

from absl import logging

from hhjax import compat
from hhjax import errors

TIMEOUT_ENV = 'HHJAX_PEER_TIMEOUT_S'
DEFAULT_TIMEOUT_S = 60.0
_KEY = 'hhjax/peers/'
_DONE, _FAILED = 'done', 'failed'
# Seconds the cleanup callbacks get before the process ends anyway.
_CLEANUP_S = 10.0

_watch = None
_started = False   # this process watched others: it is one of several
_cleanups: list[Callable[[], None]] = []


def timeout_s() -> float:
  """Seconds without a heartbeat after which a peer counts as lost (HHJAX_PEER_TIMEOUT_S)."""
  value = os.environ.get(TIMEOUT_ENV, '')
  try:
    seconds = float(value) if value else DEFAULT_TIMEOUT_S
  except ValueError:
    seconds = -1.0
  if seconds <= 0:
    raise errors.ConfigError(f'{TIMEOUT_ENV}={value!r}: expected a number of seconds > 0.')
  return seconds


def key_value_store():
  """jax.distributed's key-value store (the coordination service), or None without it."""
  import jax  # pylint: disable=g-import-not-at-top  # main.py imports this module before JAX
  return compat.distributed_state().client if jax.distributed.is_initialized() else None


def _resume_advice() -> str:
  return ('once every host is up again, run the same command on every host: training resumes '
          'from the last checkpoint.')


def _exit_lost(message: str) -> None:
  """Prints `error: message`, runs the cleanups (bounded) and ends the process: exit status 4."""
  logging.flush()
  print(f'error: {message} This process stops too (exit status {errors.EXIT_PEER_LOST}); '
        f'{_resume_advice()}', file=sys.stderr, flush=True)
  _mark_failed_bounded()
  if _cleanups:
    done = threading.Thread(target=lambda: [f() for f in reversed(_cleanups)], daemon=True)
    done.start()
    done.join(_CLEANUP_S)
  sys.stderr.flush()
  os._exit(errors.EXIT_PEER_LOST)   # pylint: disable=protected-access  # no atexit: it would wait


def _mark_failed_bounded(seconds: float = 1.0) -> None:
  """Marks this process failed in the store, for process 0's `end_failed` wait; bounded, since
  the store may be gone."""
  state = compat.distributed_state()
  if state.client is None:
    return
  def mark():
    with contextlib.suppress(Exception):
      state.client.key_value_set(f'{_KEY}{state.process_id}', _FAILED, allow_overwrite=True)
  thread = threading.Thread(target=mark, daemon=True)
  thread.start()
  thread.join(seconds)


def _grace_s(timeout: float) -> float:
  """Seconds a process waits, once a peer has marked itself failed, for its own main thread to
  end with an error of its own (one every process meets alike: a config that differs, a NaN
  loss), so that every process ends with that error's status rather than 4."""
  return min(5.0, timeout / 2)


def _wait_for_peers_to_end(timeout: float) -> None:
  """Process 0 runs the coordination service: ending first would abort the others inside JAX
  (a C++ check failure) before they report their own error. It waits until every peer has
  marked itself done or failed, at most `timeout` seconds (a silent one counts as lost)."""
  state = compat.distributed_state()
  if state.client is None or state.process_id != 0:
    return
  deadline = time.monotonic() + timeout
  peers = [f'{_KEY}{p}' for p in range(1, state.num_processes)]
  while time.monotonic() < deadline:
    try:
      values = dict(state.client.key_value_dir_get(_KEY))
    except Exception:  # pylint: disable=broad-except  # the store's errors vary
      return
    if all(values.get(k) in (_DONE, _FAILED) for k in peers):
      return
    time.sleep(0.05)


class _Watch:
  """The two daemon threads of `start`."""

  def __init__(self, index: int, count: int, timeout: float):
    self._state = compat.distributed_state()
    self._index, self._count, self._timeout = index, count, timeout
    self._interval = max(0.2, timeout / 10)
    now = time.monotonic()
    self._answered = now                 # the store's last answer
    self._seen = {p: (None, now) for p in range(count) if p != index}   # value, when it changed
    self._stop = threading.Event()
    self._beats = 0
    self._done = False                   # this process has ended its work (`finish(True)`)
    self._all_done = threading.Event()   # ... and, as the beat thread last read, every other
    self._threads = [threading.Thread(target=target, name=name, daemon=True)
                     for target, name in ((self._beat, 'peers-beat'), (self._check, 'peers-check'))]
    for thread in self._threads:
      thread.start()

  def _beat(self) -> None:
    while not self._stop.is_set():
      done = self._done
      try:
        # This thread alone writes this process's key: a counter, then 'done' for good.
        self._beats += 1
        self._state.client.key_value_set(f'{_KEY}{self._index}',
                                         _DONE if done else str(self._beats),
                                         allow_overwrite=True)
        values = dict(self._state.client.key_value_dir_get(_KEY))
      except Exception as e:  # pylint: disable=broad-except  # the store's errors vary
        if self._stop.is_set():
          return
        if done and self._others_done():
          self._all_done.set()   # the coordinator's process ended after every other had
          return
        _exit_lost(f'The coordination service (run by process 0) stopped answering '
                   f'({str(e).splitlines()[0][:200]}): process 0 was probably lost.')
        return
      now = time.monotonic()
      self._answered = now
      for peer, (value, since) in list(self._seen.items()):
        new = values.get(f'{_KEY}{peer}')
        if new == _FAILED and not self._stop.wait(_grace_s(self._timeout)):
          _exit_lost(f'Process {peer} of {self._count} stopped with an error: its log says '
                     'why.')
        if new != value:
          self._seen[peer] = (new, now)
      if done and self._others_done():
        self._all_done.set()
      # While this process waits for the others to end, it reads them often: its exit waits.
      self._stop.wait(0.05 if done else self._interval)

  def _others_done(self) -> bool:
    return all(value == _DONE for value, _ in self._seen.values())

  def _check(self) -> None:
    while not self._stop.wait(1.0):
      now = time.monotonic()
      if now - self._answered > self._timeout:
        _exit_lost(f'The coordination service (run by process 0) has not answered for '
                   f'{self._timeout:.0f} s: process 0 was probably lost.')
      for peer, (value, since) in self._seen.items():
        if value != _DONE and now - since > self._timeout:
          _exit_lost(f'Process {peer} of {self._count} has sent no heartbeat for '
                     f'{self._timeout:.0f} s: it was lost (killed, crashed, or its host '
                     'went away).')

  def finish(self, ok: bool) -> None:
    if ok:
      # Wait, still watching, until every other process has ended its work too (process 0
      # writes the run's results alone): JAX's shutdown barrier at exit, entered early, would
      # give up after its own timeout by aborting every process (a C++ check failure). A peer
      # lost or failed meanwhile ends this process as during training: the watch threads go on.
      self._done = True
      self._all_done.wait()
      self._stop.set()
      return
    self._stop.set()
    # A heartbeat in flight would overwrite the mark below with a counter.
    self._threads[0].join(self._timeout)
    # The store may be gone already (the coordinator's process ended): nothing left to tell.
    with contextlib.suppress(Exception):
      self._state.client.key_value_set(f'{_KEY}{self._index}', _DONE if ok else _FAILED,
                                       allow_overwrite=True)


def start() -> None:
  """Starts watching the other processes (after jax.distributed.initialize)."""
  global _watch, _started
  state = compat.distributed_state()
  if _watch is None and state.client is not None and state.num_processes > 1:
    _watch = _Watch(state.process_id, state.num_processes, timeout_s())
    _started = True


def finish(ok: bool) -> None:
  """Stops watching; tells the others this process ended normally (`ok`) or with an error."""
  global _watch
  if _watch is not None:
    _watch.finish(ok)
    _watch = None


@contextlib.contextmanager
def cleanup(callback: Callable[[], None] | None) -> Iterator[None]:
  """Runs `callback` (e.g. releasing the workdir lock) if a lost peer ends the process inside."""
  if callback is None:
    yield
    return
  _cleanups.append(callback)
  try:
    yield
  finally:
    _cleanups.remove(callback)


_COLLECTIVE_FAILURES = ('Gloo', 'Connection reset by peer', 'Connection closed by peer',
                        'heartbeat', 'coordination service', 'UNAVAILABLE')


def is_peer_failure(error: BaseException) -> bool:
  """Whether `error` is a collective or coordination call that failed because a peer went away."""
  if _watch is None or type(error).__name__ not in ('JaxRuntimeError', 'XlaRuntimeError',
                                                      'ValueError', 'RuntimeError'):
    return False
  text = str(error)
  return any(s in text for s in _COLLECTIVE_FAILURES)


def exit_peer_failure(error: BaseException) -> None:
  """Ends the process as `_exit_lost` does, for a collective that failed in the main thread."""
  _exit_lost(f'A collective operation with the other processes failed '
             f'({str(error).splitlines()[0][:200]}): another process of this run was lost.')


def end_failed(status: int) -> None:
  """Ends a process of several that stopped with an error (already reported), with `status`.

  Without JAX's shutdown barrier: the other processes, told by `finish(False)`, stop at once
  instead of meeting it there. One process alone returns and exits as usual.
  """
  if _started:
    _wait_for_peers_to_end(timeout_s())
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)   # pylint: disable=protected-access
