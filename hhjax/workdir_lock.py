"""One training run per workdir: a lock file, WORKDIR/train.lock, held while a run trains.

Two runs on one workdir would resume from each other's checkpoints while both train and write
every metrics row twice, so a second training run refuses at once (WorkdirBusyError, naming the
host, pid and start time of the run that holds the workdir). Eval and predict take no lock.

Local workdirs use `fcntl.flock`: the kernel releases the lock when its process ends in any way,
SIGKILL included, so a lock is never stale. The file keeps the owner's host, pid and start time
(emptied on a clean exit); a run that finds it filled but unlocked says it takes over from a run
that ended without releasing it.

Shared storage such as gs:// has no file locks. There the file is a lease, best effort: the
owner rewrites its heartbeat every HEARTBEAT_S seconds, and a lease whose heartbeat is older than
STALE_AFTER_S is taken over (the owner crashed or was killed). Two runs started within
SETTLE_S of each other both write it; each reads it back after SETTLE_S and the one whose write
was overwritten refuses. Clocks of the hosts involved are assumed to agree within a minute.

With several processes (jax.distributed) only process 0 takes the lock; the others follow its
outcome.
"""

from collections.abc import Iterator
import contextlib
import datetime
import errno
import json
import os
import socket
import threading
import time
from typing import Any
import uuid

from absl import logging

from hhjax import errors

LOCK_FILE = 'train.lock'
# Shared storage (gs://): how often the owner renews its lease, and when a lease without renewal
# counts as abandoned. Long enough to survive a stalled write or a slow checkpoint save.
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
SETTLE_S = 2.0
# Local: how long a starting run retries a lock held by someone else before refusing. Covers
# `check_free`'s momentary hold in a run that is just starting beside this one.
_RETRY_S = 1.0


def _is_url(workdir: str) -> bool:
  return '://' in workdir


def _owner_info() -> dict[str, Any]:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}


def _parse(text: str) -> dict[str, Any] | None:
  try:
    info = json.loads(text)
  except ValueError:   # empty (released) or cut short
    return None
  return info if isinstance(info, dict) else None


def _describe(info: dict[str, Any] | None) -> str:
  """'host H, pid P, started T' of a lock's owner."""
  if not info:
    return 'owner not yet recorded'
  return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
          f"started {info.get('started', '?')}")


def _busy(workdir: str, owner: str) -> errors.WorkdirBusyError:
  return errors.WorkdirBusyError(
      f'{workdir} is in use by another training run ({owner}). Wait for it to end or stop it, '
      'or train in another --workdir; eval and predict may run beside it.')


# ----------------------------------------------------------------------------- local: flock


class _LocalLock:
  """flock on WORKDIR/train.lock; the file holds the owner's info while it is held."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      if not _flock(fd, retry_s=_RETRY_S):
        raise _busy(self.workdir, _describe(_read_owner(fd)))
      previous = _parse(_read(fd))
      if previous:
        logging.warning('Taking over %s: the training run that held it (%s) ended without '
                        'releasing it (killed or crashed).', self.path, _describe(previous))
      _write(fd, json.dumps(_owner_info()))
    except BaseException:
      os.close(fd)   # closing releases the flock, if taken
      raise
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)   # empty: released cleanly, nothing to take over
    finally:
      os.close(self._fd)          # releases the flock
      self._fd = None


def _flock(fd: int, retry_s: float) -> bool:
  """Takes an exclusive flock on `fd`; False if another process keeps it for `retry_s`."""
  import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only
  deadline = time.monotonic() + retry_s
  while True:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.05)


def _read(fd: int) -> str:
  return os.pread(fd, 1 << 16, 0).decode('utf-8', 'replace')


def _read_owner(fd: int) -> dict[str, Any] | None:
  # The owner writes its info just after it takes the lock: give it a moment.
  for _ in range(10):
    info = _parse(_read(fd))
    if info:
      return info
    time.sleep(0.05)
  return None


def _write(fd: int, text: str) -> None:
  os.ftruncate(fd, 0)
  os.pwrite(fd, text.encode(), 0)
  os.fsync(fd)


def check_free(workdir: str) -> None:
  """Raises WorkdirBusyError if a training run holds the local `workdir`; takes nothing.

  For main.py, before seconds of imports: a second run then refuses at once. Creates nothing;
  URL workdirs are left to `hold`.
  """
  path = os.path.join(workdir, LOCK_FILE)
  if _is_url(workdir) or not os.path.exists(path):
    return
  try:
    fd = os.open(path, os.O_RDWR)
  except OSError:
    return   # unreadable here: `hold` reports it
  try:
    if not _flock(fd, retry_s=0):
      raise _busy(workdir, _describe(_read_owner(fd)))
  except OSError:
    pass     # a file system without flock: `hold` falls back to the lease
  finally:
    os.close(fd)


# ----------------------------------------------------------------------------- shared: lease


class _Lease:
  """WORKDIR/train.lock as a lease with a heartbeat, for storage without file locks."""

  def __init__(self, workdir: str):
    from etils import epath  # pylint: disable=g-import-not-at-top  # gs:// support loads TF
    self.workdir = workdir
    self.path = epath.Path(workdir) / LOCK_FILE
    self._info = None
    self._stop = threading.Event()
    self._thread = None

  def _read(self) -> dict[str, Any] | None:
    try:
      return _parse(self.path.read_text())
    except FileNotFoundError:
      return None

  def _write(self, info: dict[str, Any]) -> None:
    from hhjax import files  # pylint: disable=g-import-not-at-top
    files.write_atomic(self.path, json.dumps(info))

  def acquire(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    current = self._read()
    if current:
      age = time.time() - float(current.get('heartbeat', 0))
      if age < STALE_AFTER_S:
        raise _busy(self.workdir, f'{_describe(current)}, last heartbeat {age:.0f} s ago; '
                    f'taken over after {STALE_AFTER_S:.0f} s without one')
      logging.warning('Taking over %s: the training run that held it (%s) has not renewed it '
                      'for %.0f s (killed or crashed).', self.path, _describe(current), age)
    self._info = dict(_owner_info(), heartbeat=time.time(), token=uuid.uuid4().hex)
    self._write(self._info)
    time.sleep(SETTLE_S)   # another run starting now may overwrite it: the later write wins
    winner = self._read()
    if not winner or winner.get('token') != self._info['token']:
      self._info = None
      raise _busy(self.workdir, _describe(winner))
    self._thread = threading.Thread(target=self._renew, name='workdir-lock', daemon=True)
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        current = self._read()
        if not current or current.get('token') != self._info['token']:
          logging.error('%s was removed or taken over by another run (%s): two runs may now '
                        'train in %s.', self.path, _describe(current), self.workdir)
          return
        self._info = dict(self._info, heartbeat=time.time())
        self._write(self._info)
      except Exception as e:  # pylint: disable=broad-except  # storage errors vary by backend
        logging.warning('Could not renew %s (%s); will retry.', self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._info is None:
      return
    try:
      current = self._read()
      if current and current.get('token') == self._info['token']:
        self.path.unlink()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not remove %s (%s); the next run takes it over after %.0f s.',
                      self.path, e, STALE_AFTER_S)
    self._info = None


# ----------------------------------------------------------------------------- both


def _acquire(workdir: str, shared: bool | None):
  """The held lock: flock for local paths (a lease where flock is unsupported), a lease for URLs."""
  if shared is None:
    shared = _is_url(workdir)
  lock = _Lease(workdir) if shared else _LocalLock(workdir)
  try:
    lock.acquire()
  except OSError as e:
    if shared or e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      raise
    logging.warning('%s does not support file locks (%s); using a lease with a heartbeat.',
                    workdir, e)
    lock = _Lease(workdir)
    lock.acquire()
  return lock


def _agree(ok: bool) -> bool:
  """With several processes: process 0's outcome, for all of them."""
  # Deferred: main.py checks the lock before JAX loads.
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def hold(workdir: str, is_main: bool = True, shared: bool | None = None,
         several_processes: bool = False) -> Iterator[Any]:
  """Holds the workdir's lock for the block; raises WorkdirBusyError if another run has it.

  Yields the lock (None outside process 0), whose `release()` a process that must end at once
  may call early (hhjax.peers).

  Args:
    workdir: an absolute local path or a URL (gs://...).
    is_main: whether this is process 0, the only one that takes the lock.
    shared: use the lease (True) or flock (False); default: the lease for URLs.
    several_processes: all processes learn process 0's outcome (one collective each), so that
      they refuse together rather than wait for a process 0 that has gone.
  """
  lock = None
  if is_main:
    try:
      lock = _acquire(workdir, shared)
    except BaseException:
      if several_processes:
        _agree(False)
      raise
  if several_processes and not _agree(True):
    raise errors.WorkdirBusyError(
        f'{workdir} is in use by another training run (the log of process 0 says which).')
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
