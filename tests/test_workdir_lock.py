"""The workdir lock in-process: flock for local workdirs, the heartbeat lease for shared storage
(exercised here on a local folder). tests/test_workdir_faults.py runs it through main.py."""

import json
import os
import socket
import time

import pytest

from hhjax import errors
from hhjax import workdir_lock


@pytest.fixture(autouse=True)
def quick(monkeypatch):
  monkeypatch.setattr(workdir_lock, '_RETRY_S', 0.1)
  monkeypatch.setattr(workdir_lock, 'SETTLE_S', 0.05)


def _owner(path):
  return json.loads((path / workdir_lock.LOCK_FILE).read_text())


def test_local_lock_refuses_a_second_holder_naming_the_first(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    owner = _owner(tmp_path)
    assert (owner['host'], owner['pid']) == (socket.gethostname(), os.getpid())
    for attempt in (lambda: workdir_lock.hold(str(tmp_path)).__enter__(),
                    lambda: workdir_lock.check_free(str(tmp_path))):
      with pytest.raises(errors.WorkdirBusyError) as raised:
        attempt()
      assert str(raised.value) == (
          f'{tmp_path} is in use by another training run (host {owner["host"]}, pid '
          f'{os.getpid()}, started {owner["started"]}). Wait for it to end or stop it, or '
          'train in another --workdir; eval and predict may run beside it.')
  assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == ''   # released cleanly
  workdir_lock.check_free(str(tmp_path))
  with workdir_lock.hold(str(tmp_path)):   # free again: taken at once
    assert _owner(tmp_path)['pid'] == os.getpid()


def test_local_lock_left_filled_is_taken_over_with_a_warning(tmp_path, caplog):
  stale = {'host': 'elsewhere', 'pid': 4242, 'started': '2024-01-02T03:04:05+00:00'}
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(stale))
  with caplog.at_level('WARNING', logger='absl'), workdir_lock.hold(str(tmp_path)):
    assert _owner(tmp_path)['pid'] == os.getpid()
  assert ('the training run that held it (host elsewhere, pid 4242, started '
          '2024-01-02T03:04:05+00:00) ended without releasing it') in caplog.text


def test_only_process_zero_takes_the_lock(tmp_path):
  with workdir_lock.hold(str(tmp_path / 'run'), is_main=False):
    assert not (tmp_path / 'run').exists()


def test_lease_refuses_while_its_heartbeat_is_fresh(tmp_path):
  with workdir_lock.hold(str(tmp_path), shared=True):
    with pytest.raises(errors.WorkdirBusyError,
                       match=rf'pid {os.getpid()}, started .*, last heartbeat 0 s ago; taken '
                       'over after 600 s without one'):
      workdir_lock.hold(str(tmp_path), shared=True).__enter__()
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()   # released: removed


def test_lease_without_heartbeat_for_the_stale_age_is_taken_over(tmp_path, caplog):
  stale = {'host': 'worker-3', 'pid': 7, 'started': 'yesterday', 'token': 'x',
           'heartbeat': time.time() - workdir_lock.STALE_AFTER_S - 1}
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(stale))
  with (caplog.at_level('WARNING', logger='absl'),
        workdir_lock.hold(str(tmp_path), shared=True)):
    assert _owner(tmp_path)['pid'] == os.getpid()
  assert 'held it (host worker-3, pid 7, started yesterday) has not renewed it for 601 s' in (
      caplog.text)


def test_lease_heartbeat_is_renewed_while_held(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_S', 0.05)
  with workdir_lock.hold(str(tmp_path), shared=True):
    first = _owner(tmp_path)['heartbeat']
    time.sleep(0.5)
    assert _owner(tmp_path)['heartbeat'] > first


def test_lease_lost_to_a_run_that_wrote_later_refuses(tmp_path, monkeypatch):
  other = {'host': 'worker-1', 'pid': 99, 'started': 'now', 'token': 'theirs',
           'heartbeat': time.time()}
  sleep = time.sleep

  def overwritten_while_settling(seconds):   # the other run's write lands during SETTLE_S
    (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(other))
    sleep(seconds)

  monkeypatch.setattr(workdir_lock.time, 'sleep', overwritten_while_settling)
  with pytest.raises(errors.WorkdirBusyError, match='host worker-1, pid 99, started now'):
    workdir_lock.hold(str(tmp_path), shared=True).__enter__()
  assert _owner(tmp_path)['token'] == 'theirs'
