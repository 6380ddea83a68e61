"""JAX's persistent compilation cache, and the log lines that say what compiling costs.

`use_persistent_cache()` (main.py calls it once, before anything compiles) keeps every
compiled function on disk, so that a resume, an eval or a predict loads the executables an
earlier run compiled instead of compiling them again. Where: $JAX_COMPILATION_CACHE_DIR if it
is set (JAX reads it itself), else `$HHJAX_CACHE_DIR/jax` (default ~/.cache/hhjax/jax).
HHJAX_COMPILATION_CACHE=off runs without it. JAX keeps only what took at least
`jax_persistent_cache_min_compile_time_secs` (1 s) to compile; the cache key covers the
computation, the devices, the XLA flags and the versions of jax and jaxlib, so a change of any
of them compiles afresh.

`first_call_logged(fn, what)` wraps a jitted function so that its first call says
"Compiling WHAT ..." before, and after it how long compiling took and whether the executable
came from the persistent cache; the first such call of a process also says how long after
the launch it finished.
"""

from collections.abc import Callable, Iterator
import contextlib
import dataclasses
import functools
import os
import pathlib
import threading
import time
from typing import Any

from absl import logging

from hhjax import compat
from hhjax import files

SWITCH_ENV = 'HHJAX_COMPILATION_CACHE'   # 'off' (or 0/false/no): no persistent cache
JAX_DIR_ENV = 'JAX_COMPILATION_CACHE_DIR'
_OFF = ('0', 'off', 'false', 'no')
_IMPORTED = time.time()   # the launch time where the process's start time cannot be read


def cache_directory(environ=None) -> pathlib.Path | None:
  """Where the persistent cache lives for this environment; None when it is switched off."""
  env = os.environ if environ is None else environ
  if env.get(SWITCH_ENV, '').strip().lower() in _OFF:
    return None
  if env.get(JAX_DIR_ENV):
    return pathlib.Path(env[JAX_DIR_ENV]).expanduser()
  base = env.get(files.CACHE_DIR_ENV) or '~/.cache/hhjax'
  return pathlib.Path(base).expanduser() / 'jax'


def use_persistent_cache() -> pathlib.Path | None:
  """Turns JAX's persistent compilation cache on (see the module docstring); returns its folder.

  Call it before the first compilation: JAX settles its cache on first use.
  """
  import jax  # pylint: disable=g-import-not-at-top
  directory = cache_directory()
  if directory is None:
    jax.config.update('jax_enable_compilation_cache', False)
    logging.info('Persistent compilation cache off (%s=off): every function compiles afresh.',
                 SWITCH_ENV)
  else:
    jax.config.update('jax_compilation_cache_dir', str(directory))
  return directory


def seconds_since_launch() -> float:
  """Seconds since this process started (its exec by host_malloc keeps the start time)."""
  try:
    with open('/proc/self/stat') as f:
      fields = f.read().rpartition(')')[2].split()
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
    return uptime - int(fields[19]) / os.sysconf('SC_CLK_TCK')   # field 22: starttime
  except (OSError, ValueError, IndexError):
    return time.time() - _IMPORTED


@dataclasses.dataclass
class Compiles:
  """What JAX compiled during a block: seconds, and executables loaded from or kept on disk."""
  seconds: float = 0.0
  compilations: int = 0   # XLA compilations, or their executables read from the cache
  cache_hits: int = 0
  cache_writes: int = 0


class _State:
  listening: Compiles | None = None
  registered = False
  first_logged = False
  lock = threading.Lock()


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  counts = _State.listening
  if counts is None:
    return
  if event == compat.JAX_CACHE_HIT_EVENT:
    counts.cache_hits += 1
  elif event == compat.JAX_CACHE_WRITE_EVENT:
    counts.cache_writes += 1


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del kwargs
  counts = _State.listening
  if counts is not None and event in compat.JAX_COMPILE_DURATION_EVENTS:
    counts.seconds += duration
    counts.compilations += event == compat.JAX_COMPILE_DURATION_EVENTS[-1]


@contextlib.contextmanager
def counting() -> Iterator[Compiles]:
  """Counts JAX's compilations in the block (in any thread), through jax.monitoring."""
  import jax  # pylint: disable=g-import-not-at-top
  with _State.lock:
    if not _State.registered:
      jax.monitoring.register_event_listener(_on_event)
      jax.monitoring.register_event_duration_secs_listener(_on_duration)
      _State.registered = True
  counts = Compiles()
  outer, _State.listening = _State.listening, counts
  try:
    yield counts
  finally:
    _State.listening = outer
    if outer is not None:
      outer.seconds += counts.seconds
      outer.compilations += counts.compilations
      outer.cache_hits += counts.cache_hits
      outer.cache_writes += counts.cache_writes


def describe(counts: Compiles, directory: str | None, enabled: bool) -> str:
  """How the executables of a block came to be, as the middle of a log line."""
  took = f'{counts.seconds:.1f} s'
  if not counts.compilations:
    return 'already compiled in this process'
  if not enabled:
    return f'compiled in {took} (the persistent compilation cache is off)'
  if counts.cache_hits and not counts.cache_writes:
    return f'loaded in {took} from the persistent compilation cache {directory}'
  if counts.cache_hits:
    return f'compiled in {took}, partly from the persistent compilation cache {directory}'
  if counts.cache_writes:
    return (f'compiled in {took} (kept in the persistent compilation cache {directory} for '
            'the next run)')
  return f'compiled in {took}'


def _cache_enabled() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return bool(jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)


def first_call_logged(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
  """`fn` whose first call logs that `what` compiles, then its seconds and where it came from.

  The first call waits for its result, so that the line comes when the step is done.
  """
  called = False

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    nonlocal called
    if called:
      return fn(*args, **kwargs)
    called = True
    import jax  # pylint: disable=g-import-not-at-top
    logging.info('Compiling %s ...', what)
    start = time.perf_counter()
    with counting() as counts:
      out = jax.block_until_ready(fn(*args, **kwargs))
    took = time.perf_counter() - start
    line = (f'{what[0].upper()}{what[1:]}: '
            f'{describe(counts, jax.config.jax_compilation_cache_dir, _cache_enabled())}; '
            f'the first call took {took:.1f} s')
    if not _State.first_logged:
      _State.first_logged = True
      line += f' and ended {seconds_since_launch():.1f} s after launch'
    logging.info('%s.', line)
    return out

  return wrapper
