"""Canaries for hhjax.compat: each fails when a pinned library changes under a workaround.

A failure here names what hhjax relies on that the installed jax, orbax-checkpoint or
tensorstore no longer provides; fix hhjax/compat.py (and its version notes) before upgrading.
"""

import asyncio
import inspect
import logging
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

from hhjax import compat

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- JAX -------------------------------------------------------------------------------------

def test_jax_still_keeps_the_distributed_state_where_compat_reads_it():
  state = compat.distributed_state()
  for name in ('client', 'process_id', 'num_processes'):
    assert hasattr(state, name), f'jax._src.distributed.global_state has no {name!r}'
  assert state.client is None   # this process never called jax.distributed.initialize


def test_the_key_value_store_answers_as_peers_and_the_image_check_call_it(env):
  """One process of a real jax.distributed run: the store's methods that hhjax calls."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  code = textwrap.dedent(f"""
      import jax
      from hhjax import compat, peers
      assert peers.key_value_store() is None
      jax.distributed.initialize('127.0.0.1:{port}', num_processes=1, process_id=0)
      state = compat.distributed_state()
      assert (state.process_id, state.num_processes) == (0, 1), state
      store = peers.key_value_store()
      assert store is state.client and store is not None
      store.key_value_set('hhjax/canary/0', '1', allow_overwrite=True)   # hhjax.peers
      store.key_value_set('hhjax/canary/0', '2', allow_overwrite=True)
      assert dict(store.key_value_dir_get('hhjax/canary/')) == {{'hhjax/canary/0': '2'}}
      assert store.blocking_key_value_get('hhjax/canary/0', 1000) == '2'   # the image check
      jax.distributed.shutdown()
      print('ok')
      """)
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-3000:]


def test_jax_still_has_the_cloud_tpu_vm_flag():
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  # compat reads it with getattr(..., False): gone, it would say 'not a TPU VM' silently.
  assert isinstance(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', None), bool)
  assert compat.on_cloud_tpu_vm() is False   # these tests run on CPU


# --- orbax's CheckpointManager ---------------------------------------------------------------

def test_orbax_reaches_the_preemption_sync_point_only_through_the_method_compat_overrides():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = compat._manager_class()
  assert issubclass(manager, ocp.CheckpointManager)
  assert 'reached_preemption' in vars(ocp.CheckpointManager), 'the method is gone'
  assert (list(inspect.signature(manager.reached_preemption).parameters) ==
          list(inspect.signature(ocp.CheckpointManager.reached_preemption).parameters))
  source = inspect.getsource(ocp.CheckpointManager)
  own = inspect.getsource(ocp.CheckpointManager.reached_preemption)
  assert 'self.reached_preemption(step)' in source, 'orbax no longer calls the method'
  # No other call to JAX's sync point, which the override would not catch.
  assert 'reached_preemption(' not in source.replace(own, '').replace(
      'self.reached_preemption(', '').replace('reached_preemption=', '')


def test_the_manager_saves_and_restores_without_the_preemption_sync_point(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with compat.checkpoint_manager(
      tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
      item_handlers={'state': ocp.StandardCheckpointHandler()}) as manager:
    assert manager.reached_preemption(1) is False
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({'w': np.ones(3)})))
    restored = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  np.testing.assert_array_equal(restored['state']['w'], np.ones(3))


# --- TensorStore's error texts ---------------------------------------------------------------

def _tensorstore_error(spec: dict, **kwargs) -> ValueError:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as caught:
    ts.open(spec, **kwargs).result()
  return caught.value


def test_tensorstore_still_writes_the_os_error_and_the_file_in_its_text(tmp_path):
  (tmp_path / 'f').write_text('')   # a file where a folder should be: ENOTDIR
  error = _tensorstore_error({'driver': 'zarr', 'kvstore': {'driver': 'file',
                                                             'path': f'{tmp_path}/f/a/'}},
                             create=True, dtype='int32', shape=[4])
  assert "[os_error_code='20']" in str(error) and '[tensorstore_spec=' in str(error), error
  assert compat.storage_error(error) == (f'{os.strerror(20)} (errno 20): '
                                         f'{tmp_path}/f/a/.zarray')
  assert compat._from_orbax(error)


def test_tensorstore_still_puts_its_spec_after_the_message_where_one_line_cuts_it(tmp_path):
  error = _tensorstore_error({'driver': 'zarr', 'kvstore': {'driver': 'file',
                                                             'path': f'{tmp_path}/missing/'}},
                             open=True)
  assert str(error).startswith('NOT_FOUND: ') and '[tensorstore_spec=' in str(error), error
  assert compat.one_line(error) == (f'NOT_FOUND: Error opening "zarr" driver: Metadata at '
                                    f'local file "{tmp_path}/missing/.zarray" does not exist')
  assert compat.storage_error(error) is None   # a missing file is damage, not full storage
  assert compat._from_orbax(error)


# --- orbax's logging -------------------------------------------------------------------------

def _orbax_source() -> str:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(ocp.__file__).parent
  return '\n'.join(p.read_text() for p in sorted(root.rglob('*.py')))


def test_orbax_lives_under_an_orbax_folder_and_logs_through_absl():
  import absl.logging  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint import checkpoint_manager  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.handlers import composite_checkpoint_handler  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.metadata import checkpoint  # pylint: disable=g-import-not-at-top
  assert '/orbax/' in ocp.__file__   # the filters tell orbax's records and frames by it
  for module in (checkpoint_manager, composite_checkpoint_handler, checkpoint):
    assert module.logging is absl.logging, module.__name__
  # The loggers quiet_orbax filters: absl's (orbax's records) and asyncio's (its tasks').
  assert absl.logging.get_absl_logger().name == 'absl'
  assert asyncio.log.logger.name == 'asyncio'


@pytest.mark.parametrize('prefix', compat._QuietOrbax._EXPECTED)
def test_orbax_still_logs_the_warnings_the_filter_drops(prefix):
  assert f"'{prefix}" in _orbax_source(), f'orbax no longer writes {prefix!r}'


def test_orbax_still_has_the_read_coroutine_whose_collection_the_hook_drops():
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top
  read = serialization._read_array_index_and_device_put
  assert inspect.iscoroutinefunction(read)
  assert '/orbax/' in read.__code__.co_filename   # what the hook tells it by (cr_code)


def test_a_closed_event_loop_still_refuses_late_callbacks_as_the_hook_expects():
  import traceback  # pylint: disable=g-import-not-at-top
  loop = asyncio.new_event_loop()
  loop.close()
  with pytest.raises(RuntimeError, match='^Event loop is closed$') as caught:
    loop.call_soon_threadsafe(print)
  assert any(f.name == 'call_soon_threadsafe' for f in traceback.extract_tb(caught.tb))


def test_quiet_orbax_installs_its_filters_and_hook_once(monkeypatch):
  import absl.logging  # pylint: disable=g-import-not-at-top
  targets = (absl.logging.get_absl_handler(), logging.getLogger('absl'),
             logging.getLogger('asyncio'))
  for target in targets:
    monkeypatch.setattr(target, 'filters', list(target.filters))
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)
  compat.quiet_orbax()
  compat.quiet_orbax()
  for target in targets:
    assert sum(isinstance(f, compat._QuietOrbax) for f in target.filters) == 1
  assert isinstance(sys.unraisablehook, compat._QuietClosedLoops)
  assert not isinstance(sys.unraisablehook.previous, compat._QuietClosedLoops)
