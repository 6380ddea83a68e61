"""Workarounds for the quirks of the pinned libraries: all that hhjax knows of their insides.

Each workaround names the version it was written for: jax 0.10.2 and orbax-checkpoint 0.12.8
(requirements.txt), tensorstore 0.1.86 (installed with orbax). tests/test_compat.py fails when
a library changes under one of them: a private module or attribute gone, a method no longer
called, a message or an error text worded otherwise. Upgrading a pin means running it first.

- JAX's private modules (`jax._src`), imported here only: the coordination service's key-value
  store (hhjax.peers) and whether this is a Cloud TPU VM (hhjax.sharding).
- Orbax's CheckpointManager without its preemption sync point (`checkpoint_manager`).
- TensorStore's errors read as text: `storage_error`, `one_line` (hhjax.checkpointing).
- Orbax's logging quieted: `quiet_orbax`.
- The events jax.monitoring records as JAX compiles (hhjax.compilation): `JAX_*_EVENT*`.
- TensorFlow's import without the Keras it loads for nothing hhjax uses:
  `without_keras_preload`.
- The libraries' start-up lines that are not about the run: `quiet_native_start_up` (the C++
  lines TensorFlow prints as it loads), `quiet_libraries` (JAX's backend search, TFDS's
  'Variant folder' warning, TensorFlow's 'Sharding callback duration').

Only the standard library and absl are imported at module level: main.py imports hhjax.peers,
and so this module, before JAX loads; JAX and orbax are imported inside the functions.
"""

from collections.abc import Iterator
import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
import traceback

from absl import logging as absl_logging


# --- JAX (written for jax 0.10.2) -----------------------------------------------------------

def distributed_state():
  """jax.distributed's state: `client` (the key-value store), `process_id`, `num_processes`.

  jax 0.10.2 exposes the coordination service's client only as
  `jax._src.distributed.global_state.client` (None before `jax.distributed.initialize`).
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state


def on_cloud_tpu_vm() -> bool:
  """Whether `import jax` found TPU chips and libtpu on a Cloud TPU VM.

  jax 0.10.2 keeps that flag as `jax._src.cloud_tpu_init.running_in_cloud_tpu_vm` only.
  """
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


# --- orbax's CheckpointManager (written for orbax-checkpoint 0.12.8) ------------------------

@functools.cache
def _manager_class() -> type:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  class _Manager(ocp.CheckpointManager):
    """Orbax's CheckpointManager without its calls to JAX's preemption sync point.

    The training loop makes those calls itself, one per step (hhjax.preemption); orbax 0.12.8
    adds its own with each saved step (`save`, `should_save`, through `reached_preemption`),
    some from its background thread, and JAX's count would go back.
    """

    def reached_preemption(self, step: int) -> bool:
      del step
      return False

  return _Manager


def checkpoint_manager(directory, **kwargs):
  """An orbax `CheckpointManager(directory, **kwargs)` that leaves preemption to hhjax."""
  return _manager_class()(directory, **kwargs)


# --- TensorStore's errors as text (written for tensorstore 0.1.86) ---------------------------
# TensorStore raises a bare ValueError whose text carries the status code, the OS error number
# and the spec as suffixes: "CODE: message [os_error_code='28'] [tensorstore_spec='...']".

_SUFFIXES = re.compile(r"\[(?:tensorstore_spec|source locations|os_error_code)=")
_SPEC_SUFFIX = re.compile(r' \[(?:tensorstore_spec|source locations)=')
# TensorStore's status codes of a write that the storage refused, as opposed to a bug.
_STORAGE_STATUS = re.compile(
    r'^(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS):')


def _causes(error: BaseException) -> Iterator[BaseException]:
  """`error`, then what caused it, down to the root."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def _from_orbax(error: BaseException | None) -> bool:
  """Whether `error` was raised in orbax's code or by TensorStore under it."""
  for cause in _causes(error):
    if any('/orbax/' in f.filename for f in traceback.extract_tb(cause.__traceback__)):
      return True
    if _SUFFIXES.search(str(cause)):
      return True   # TensorStore's errors carry no Python frames, only these suffixes
  return False


def one_line(error: BaseException) -> str:
  """The root cause of an orbax or TensorStore error as one short line.

  Orbax wraps TensorStore's message (which names the array and the file) in its own, whose
  text is a repr of a spec over many lines.
  """
  root = list(_causes(error))[-1]
  text = (str(root).strip().splitlines() or [type(root).__name__])[0]
  text = _SPEC_SUFFIX.split(text)[0]
  return text if len(text) <= 400 else text[:400] + '...'


def storage_error(error: BaseException) -> str | None:
  """'No space left on device (errno 28): PATH' when `error` comes from the storage, else None."""
  for cause in _causes(error):
    if isinstance(cause, OSError) and cause.errno:
      where = f': {cause.filename}' if cause.filename else ''
      return f'{cause.strerror} (errno {cause.errno}){where}'
    text = str(cause)
    code = re.search(r"os_error_code='(\d+)'", text)
    if code:
      path = re.search(r'local file "([^"]+)"', text)
      where = f': {path.group(1)}' if path else ''
      return f'{os.strerror(int(code.group(1)))} (errno {code.group(1)}){where}'
    if _STORAGE_STATUS.match(text):
      return one_line(cause)
  return None


# --- orbax's logging (written for orbax-checkpoint 0.12.8, which logs through absl) ----------

# The storage errors of this process's background saves, as orbax 0.12.8 logs them (and does
# not raise them where several processes save together).
_background_failures: list[str] = []


def background_save_failures() -> list[str]:
  """The storage errors orbax's background saves of this process logged, oldest first."""
  return list(_background_failures)


class _QuietOrbax(logging.Filter):
  """Drops orbax's routine lines and the tracebacks of failures `Checkpoints` reports itself.

  Routine: the per-save INFO lines and the warnings about expected situations. Failures: a
  read or write that failed, which `Checkpoints` turns into one line.
  """

  # Prefixes of orbax 0.12.8's own messages (record.msg, before formatting).
  _EXPECTED = ('Requested `tracked_metric`', 'CheckpointManagerOptions.read_only=True',
               'Given directory is read only',
               # A damaged checkpoint: reported in one line by `Checkpoints` when it is used.
               'Metadata file does not exist', 'Failed to json parse Metadata file')

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == 'asyncio' and record.exc_info and _from_orbax(record.exc_info[1]):
      # 'Task (or Future) exception was never retrieved': the other arrays of a read or write
      # that failed (the failure itself is reported once, by `Checkpoints`).
      return False
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < logging.WARNING:
      return False
    cause = storage_error(record.exc_info[1]) if record.exc_info else None
    if cause is not None:
      # A failed write: `Checkpoints` reports it, in one line, as it stops the run. With several
      # processes, orbax's background save thread only logs it, then waits in a barrier the
      # other processes never reach: it is noted here for `Checkpoints` to act on.
      if cause not in _background_failures:
        _background_failures.append(cause)
      return False
    return not str(record.msg).startswith(self._EXPECTED)


class _QuietClosedLoops:
  """Drops the unraisable tracebacks that the other arrays of a failed save or restore leave.

  When one array of a save or restore fails, orbax stops waiting and closes its event loop;
  the other arrays' reads or writes finish later, and Python prints each late callback as an
  unraisable 'Event loop is closed' traceback. The reads left suspended are closed when they are
  collected, and orbax's read coroutine (`_read_array_index_and_device_put` in orbax 0.12.8)
  turns that close into an exception of its own, which Python prints too. The failure itself is
  reported once, by `Checkpoints`.
  """

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    error = unraisable.exc_value
    frames = traceback.extract_tb(unraisable.exc_traceback)
    if (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed' and
        any(f.name == 'call_soon_threadsafe' for f in frames)):
      return
    code = getattr(unraisable.object, 'cr_code', None)   # a coroutine being collected
    if code is not None and '/orbax/' in code.co_filename:
      return
    self.previous(unraisable)


def quiet_orbax() -> None:
  """Keeps the training log readable: orbax logs a dozen lines per checkpoint."""
  # The asyncio logger itself too: a task of a failed read collected at exit, after the
  # handlers are gone, is printed by logging's last-resort handler, which no handler filter sees.
  for target in (absl_logging.get_absl_handler(), logging.getLogger('absl'),
                 logging.getLogger('asyncio')):
    if not any(isinstance(f, _QuietOrbax) for f in target.filters):
      target.addFilter(_QuietOrbax())
  if not isinstance(sys.unraisablehook, _QuietClosedLoops):
    sys.unraisablehook = _QuietClosedLoops(sys.unraisablehook)


# --- jax.monitoring's compilation events (written for jax 0.10.2) ---------------------------
# Recorded by jax._src.compiler and jax._src.dispatch; the names are not part of the API.

JAX_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'       # an executable read from disk
JAX_CACHE_WRITE_EVENT = '/jax/compilation_cache/cache_misses'   # recorded as one is written
JAX_COMPILE_DURATION_EVENTS = (   # tracing, lowering, XLA (or the cache read): one compilation
    '/jax/core/compile/jaxpr_trace_duration',
    '/jax/core/compile/jaxpr_to_mlir_module_duration',
    '/jax/core/compile/backend_compile_duration',
)


# --- TensorFlow's import (written for tensorflow 2.21) ---------------------------------------

# What `import tensorflow` imports eagerly "so that any function/method that needs to happen at
# load time will trigger, eg registration of optimizers in the SavedModel registry", inside a
# try that passes over an ImportError: with it, the whole of Keras (seconds here).
KERAS_PRELOADS = ('keras.src.optimizers', 'tf_keras.src.optimizers')


@contextlib.contextmanager
def without_keras_preload() -> Iterator[None]:
  """`import tensorflow` in the block skips the Keras import it does for Keras's own
  optimizers' SavedModel registrations (tf.data and tf.summary, all hhjax uses of TensorFlow,
  need no Keras): the module is marked absent for the block, which TensorFlow passes over.
  A later `import keras` (export, import_keras) loads it as usual. Nothing changes when
  TensorFlow is already loaded."""
  marked = [] if 'tensorflow' in sys.modules else [
      name for name in KERAS_PRELOADS if name not in sys.modules]
  for name in marked:
    sys.modules[name] = None   # importing it raises ModuleNotFoundError, parents untouched
  try:
    yield
  finally:
    for name in marked:
      if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]


# --- the libraries' start-up lines (tensorflow 2.21, jax 0.10.2, tensorflow-datasets 4.9.10) --

# TensorFlow's C++ code logs through absl before anything calls absl::InitializeLog, so
# TF_CPP_MIN_LOG_LEVEL does not reach these lines, and two of its shared libraries carry the
# CUDA stubs, so they come twice. hhjax hides the GPUs from TensorFlow (it feeds the input
# pipeline on the host), so a failed cuInit says nothing about the run.
_NATIVE_NOISE = (
    re.compile(r'WARNING: All log messages before absl::InitializeLog\(\) is called are '
               r'written to STDERR'),
    re.compile(r'I\d{4} \S+ +\d+ \S+\] '),   # any INFO line of the C++ code
    re.compile(r'E\d{4} \S+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit'),
)


def is_native_noise(line: str) -> bool:
  """Whether `line` is one of the C++ start-up lines `quiet_native_start_up` drops."""
  return any(p.match(line) for p in _NATIVE_NOISE)


@contextlib.contextmanager
def quiet_native_start_up() -> Iterator[None]:
  """Holds back what the process writes to file descriptor 2 in the block, then writes it
  without the lines of `is_native_noise` (for `import tensorflow` and its device listing).

  Python's own output in the block comes after it, in its order. A process that dies in the
  block loses what it wrote there: `--verbosity=1` (main.py) runs without this.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      text = held.read().decode(errors='replace')
      kept = [line for line in text.splitlines(keepends=True) if not is_native_noise(line)]
      if kept:
        sys.stderr.write(''.join(kept))
        sys.stderr.flush()


def _variant_folder_missing(record: logging.LogRecord) -> bool:
  folder = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ''
  return '://' not in folder and not os.path.isdir(folder)


class _QuietLibraries(logging.Filter):
  """Drops the libraries' lines that say nothing about the run (see `quiet_libraries`).

  Each entry: (a fragment of the logging file's path, the message's start before formatting,
  whether a record that matches both is dropped).
  """

  DROPPED = (
      # jax 0.10.2, xla_bridge.backends(): each platform it tried and did not find (INFO),
      # e.g. "Unable to initialize backend 'tpu': ... libtpu.so ..." on every CPU machine.
      ('/jax/_src/xla_bridge.py', 'Unable to initialize backend ',
       lambda r: r.levelno < logging.WARNING),
      # tensorflow-datasets 4.9.10, file_utils.is_valid_variant_dir(): every `tfds.builder`
      # of a dataset not prepared yet warns about the version folder it has not created.
      ('/tensorflow_datasets/core/utils/file_utils.py', 'Variant folder %s has no %s',
       _variant_folder_missing),
      # tensorflow 2.21, functional_saver (a SavedModel's variables): one timing per save.
      ('/tensorflow/python/checkpoint/functional_saver.py', 'Sharding callback duration',
       lambda r: r.levelno < logging.WARNING),
  )

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, '/')
    for fragment, start, drop in self.DROPPED:
      if fragment in path and str(record.msg).startswith(start) and drop(record):
        return False
    return True


def quiet_libraries() -> None:
  """Drops the log lines of `_QuietLibraries.DROPPED` (main.py, unless --verbosity >= 1)."""
  for target in (absl_logging.get_absl_handler(), logging.getLogger('absl')):
    if not any(isinstance(f, _QuietLibraries) for f in target.filters):
      target.addFilter(_QuietLibraries())
