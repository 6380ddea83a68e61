"""glibc malloc settings that stop XLA:CPU from page-faulting its buffers on every step.

XLA:CPU allocates each step's temporaries (activations, gradients: 150 MB for the warm-up
step, the head's 154 MB kernel gradient among them) and outputs with malloc, once per call.
glibc serves every allocation above 32 MB with a fresh `mmap` and returns it with `munmap`
when freed, so every step touches tens of thousands of new pages and the kernel zeroes each
one: about 38,700 page faults per warm-up step. The same computation on reused memory is much
faster (benchmarks/README.md has the figures: the head's kernel gradient alone takes 56 ms
on fresh pages and 8-11 ms on reused ones).

glibc's tunables fix this without touching the computation:

* `arena_max=1` puts every thread's allocations in the main heap (in a per-thread arena a
  large block still falls back to mmap);
* `mmap_max=0` serves large blocks from that heap instead of fresh mappings;
* `trim_threshold` (very large) keeps freed memory in the process for the next step;
* `hugetlb=1` asks for transparent huge pages, so the pages that are faulted in (the first
  step, growth) come 2 MB at a time.

glibc reads tunables only when a process starts, so `main.py` re-executes itself once with
them set (`reexec_with_tunables`). The cost: the process keeps its peak heap (the host
memory of the largest step) instead of returning it between steps. Set
HHJAX_MALLOC_TUNING=off to run without; a GLIBC_TUNABLES entry of your own wins over ours.
Nothing here changes a number the model computes.
"""

from collections.abc import Mapping, Sequence
import os
import platform
import signal
import sys

TUNABLES: tuple[tuple[str, str], ...] = (
    ('glibc.malloc.arena_max', '1'),
    ('glibc.malloc.mmap_max', '0'),
    ('glibc.malloc.trim_threshold', str(2**40)),
    ('glibc.malloc.hugetlb', '1'),
)
SWITCH_ENV = 'HHJAX_MALLOC_TUNING'   # 'off' (or 0/false/no) disables the re-execution
MARK_ENV = 'HHJAX_MALLOC_TUNED'      # set in the re-executed process
_OFF = ('0', 'off', 'false', 'no')


def merge_tunables(existing: str | None) -> str:
  """GLIBC_TUNABLES with ours added; entries already in `existing` keep their values."""
  entries = [e for e in (existing or '').split(':') if e]
  present = {e.partition('=')[0] for e in entries}
  entries += [f'{name}={value}' for name, value in TUNABLES if name not in present]
  return ':'.join(entries)


def tuned_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """A copy of `environ` (default os.environ) with the tunables set and the mark added."""
  env = dict(os.environ if environ is None else environ)
  env['GLIBC_TUNABLES'] = merge_tunables(env.get('GLIBC_TUNABLES'))
  env[MARK_ENV] = '1'
  return env


def applicable(environ: Mapping[str, str] | None = None, system: str | None = None,
               libc: str | None = None) -> bool:
  """Whether to re-execute: Linux with glibc, not switched off, not already done."""
  env = os.environ if environ is None else environ
  if env.get(SWITCH_ENV, '').strip().lower() in _OFF or env.get(MARK_ENV):
    return False
  system = platform.system() if system is None else system
  libc = platform.libc_ver()[0] if libc is None else libc
  return system == 'Linux' and libc == 'glibc'


def reexec_argv(orig_argv: Sequence[str] | None = None) -> list[str]:
  """The command that started this interpreter, with its own options (-u, -X ...) kept."""
  argv = list(sys.orig_argv if orig_argv is None else orig_argv)
  return [sys.executable, *argv[1:]]


def reexec_with_tunables() -> None:
  """Replaces this process by the same command with the tunables set, when `applicable`.

  Call it first thing in a script's `__main__` block, before anything is computed. If the
  exec fails the process goes on untuned (with a warning), since the settings only change
  speed.
  """
  if not applicable():
    return
  argv = reexec_argv()
  # A SIGTERM during the exec waits, pending, until the new process has its handler and
  # unblocks it (main.py); the signal mask and pending signals survive execve.
  blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
  try:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, tuned_environ())
  except OSError as e:   # the settings are an optimisation: go on without them
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    print(f'hhjax: could not re-execute with GLIBC_TUNABLES ({e}); continuing without.',
          file=sys.stderr)
