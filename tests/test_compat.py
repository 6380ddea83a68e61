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


# --- jax.monitoring's compilation events -----------------------------------------------------

def test_jax_still_records_the_compilation_events_hhjax_counts():
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import compiler, dispatch  # pylint: disable=g-import-not-at-top
  compiler_source = inspect.getsource(compiler)
  for event in (compat.JAX_CACHE_HIT_EVENT, compat.JAX_CACHE_WRITE_EVENT):
    assert f"'{event}'" in compiler_source or f"'{event}'" in inspect.getsource(
        sys.modules['jax._src.compilation_cache']), event
  assert (dispatch.JAXPR_TRACE_EVENT, dispatch.JAXPR_TO_MLIR_MODULE_EVENT,
          dispatch.BACKEND_COMPILE_EVENT) == compat.JAX_COMPILE_DURATION_EVENTS
  seen = []
  listener = lambda event, duration, **_: seen.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(7.0)).block_until_ready()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert set(compat.JAX_COMPILE_DURATION_EVENTS) <= set(seen)


# --- TensorFlow's import ----------------------------------------------------------------------

def test_tensorflow_still_preloads_keras_in_the_try_without_keras_preload_relies_on():
  import importlib.util  # pylint: disable=g-import-not-at-top
  source = pathlib.Path(importlib.util.find_spec('tensorflow').origin).read_text()
  block = source[source.index('try:\n  if _tf_uses_legacy_keras:'):][:400]
  for name in compat.KERAS_PRELOADS:
    assert f'importlib.import_module("{name}")' in block, block
  assert 'except (ImportError, AttributeError):\n  pass' in block, block


def test_tensorflow_loads_without_keras_in_the_context_and_keras_loads_after_it():
  script = textwrap.dedent('''
      import sys
      from hhjax import compat
      with compat.without_keras_preload():
        import tensorflow as tf
      assert 'keras' not in sys.modules and 'tf_keras' not in sys.modules, 'keras loaded'
      assert [int(x) for x in tf.data.Dataset.range(3).map(lambda x: 2 * x)] == [0, 2, 4]
      import keras
      assert keras.optimizers.RMSprop.__module__ == 'keras.src.optimizers.rmsprop'
      with compat.without_keras_preload():   # TensorFlow already loaded: nothing to do
        assert sys.modules['keras.src.optimizers'] is not None
      print('ok')
  ''')
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert proc.returncode == 0 and proc.stdout.strip() == 'ok', proc.stderr[-2000:]


# --- the libraries' start-up lines -----------------------------------------------------------

def test_tensorflow_prints_only_the_lines_quiet_native_start_up_drops():
  # What `import tensorflow` and its device listing print on this machine, through the C++
  # code's absl logging: every line is one that is_native_noise knows. Then the same in the
  # context: nothing, while Python's own stderr in it still comes out.
  script = textwrap.dedent('''
      import sys
      mode = sys.argv[1]
      from hhjax import compat
      import contextlib
      with compat.quiet_native_start_up() if mode == 'quiet' else contextlib.nullcontext():
        print('before', file=sys.stderr)
        import tensorflow as tf
        tf.config.set_visible_devices([], 'GPU')
        print('after', file=sys.stderr)
  ''')
  for mode in ('plain', 'quiet'):
    proc = subprocess.run([sys.executable, '-c', script, mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert lines[0] == 'before' and lines[-1] == 'after', proc.stderr
    if mode == 'plain':
      unknown = [line for line in lines[1:-1] if not compat.is_native_noise(line)]
      assert not unknown, f'TensorFlow prints start-up lines compat does not know: {unknown}'
    else:
      assert lines == ['before', 'after'], proc.stderr


def test_is_native_noise_keeps_warnings_and_other_errors():
  for line in ('WARNING: All log messages before absl::InitializeLog() is called are written '
               'to STDERR',
               'I0000 00:00:1796322588.391912   25042 cudart_stub.cc:31] Could not find cuda '
               'drivers on your machine, GPU will not be used.',
               'E0000 00:00:1796322597.526397   25042 cuda_platform.cc:52] failed call to '
               'cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)'):
    assert compat.is_native_noise(line), line
  for line in ('W0000 00:00:1796322597.526397   25042 some.cc:1] out of memory',
               'E0000 00:00:1796322597.526397   25042 some.cc:1] a real failure',
               'F0000 00:00:1796322597.526397   25042 some.cc:1] check failed',
               'Traceback (most recent call last):'):
    assert not compat.is_native_noise(line), line


def _record(path: str, level: int, msg: str, args=()) -> logging.LogRecord:
  return logging.LogRecord('absl', level, path, 1, msg, args, None)


@pytest.mark.parametrize('module, start', [
    ('jax._src.xla_bridge', "Unable to initialize backend '"),
    ('tensorflow.python.checkpoint.functional_saver', 'Sharding callback duration: %s'),
    ('tensorflow_datasets.core.utils.file_utils', 'Variant folder %s has no %s'),
])
def test_the_libraries_still_log_the_lines_quiet_libraries_drops(module, start):
  import importlib  # pylint: disable=g-import-not-at-top
  mod = importlib.import_module(module)
  assert any(fragment in mod.__file__.replace(os.sep, '/')
             for fragment, _, _ in compat._QuietLibraries.DROPPED), mod.__file__
  assert start in inspect.getsource(mod), f'{module} no longer logs {start!r}'


def test_quiet_libraries_drops_those_lines_only(tmp_path):
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from tensorflow.python.checkpoint import functional_saver  # pylint: disable=g-import-not-at-top
  quiet = compat._QuietLibraries()
  assert not quiet.filter(_record(xla_bridge.__file__, logging.INFO,
                                  "Unable to initialize backend 'tpu': no libtpu.so"))
  assert quiet.filter(_record(xla_bridge.__file__, logging.WARNING,
                              "Unable to initialize backend 'cuda': it failed"))
  assert not quiet.filter(_record(functional_saver.__file__, logging.INFO,
                                  'Sharding callback duration: %s microseconds', (12,)))
  assert quiet.filter(_record(__file__, logging.INFO, 'Sharding callback duration: %s', (1,)))


def test_tfds_warns_of_a_missing_variant_folder_and_the_filter_drops_only_that(tmp_path):
  # `is_prepared()` looks for the version folder (hhjax.data.sources calls it offline).
  import absl.logging  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  seen, kept = [], []

  class Collect(logging.Handler):
    def emit(self, record):
      seen.append(record)
      if compat._QuietLibraries().filter(record):
        kept.append(record)

  handler = Collect()
  absl.logging.get_absl_logger().addHandler(handler)
  try:
    assert not tfds.builder('horses_or_humans', data_dir=str(tmp_path / 'empty')).is_prepared()
    version = tmp_path / 'half' / 'horses_or_humans' / '3.0.0'
    version.mkdir(parents=True)   # a folder that is there but lacks its files: still said
    assert not tfds.builder('horses_or_humans', data_dir=str(tmp_path / 'half')).is_prepared()
  finally:
    absl.logging.get_absl_logger().removeHandler(handler)
  said = [r.getMessage() for r in seen if 'Variant folder' in str(r.msg)]
  assert any(str(tmp_path / 'empty') in m for m in said), 'TFDS no longer warns'
  assert any(str(tmp_path / 'half') in m for m in said)
  assert [r.getMessage() for r in kept if 'Variant folder' in str(r.msg)] == [
      m for m in said if str(tmp_path / 'half') in m]


def test_quiet_libraries_installs_its_filter_once(monkeypatch):
  import absl.logging  # pylint: disable=g-import-not-at-top
  targets = (absl.logging.get_absl_handler(), logging.getLogger('absl'))
  for target in targets:
    monkeypatch.setattr(target, 'filters', list(target.filters))
  compat.quiet_libraries()
  compat.quiet_libraries()
  for target in targets:
    assert sum(isinstance(f, compat._QuietLibraries) for f in target.filters) == 1
