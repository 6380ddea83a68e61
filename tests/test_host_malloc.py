"""The glibc malloc settings main.py re-executes itself with (hhjax/host_malloc.py)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from hhjax import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC_LINUX = platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


def test_merge_adds_every_tunable_and_keeps_the_users_own_values():
  merged = host_malloc.merge_tunables('glibc.malloc.arena_max=4:glibc.malloc.tcache_count=0')
  entries = dict(e.split('=') for e in merged.split(':'))
  assert entries['glibc.malloc.arena_max'] == '4'          # the user's value wins
  assert entries['glibc.malloc.tcache_count'] == '0'       # the user's other entries stay
  for name, value in host_malloc.TUNABLES:
    if name != 'glibc.malloc.arena_max':
      assert entries[name] == value
  assert host_malloc.merge_tunables(None) == host_malloc.merge_tunables('')
  assert len(host_malloc.merge_tunables('').split(':')) == len(host_malloc.TUNABLES)


def test_applicable_only_on_glibc_linux_once_and_unless_switched_off():
  linux = dict(system='Linux', libc='glibc')
  assert host_malloc.applicable({}, **linux)
  assert not host_malloc.applicable({host_malloc.MARK_ENV: '1'}, **linux)
  for off in ('off', 'OFF', '0', 'false', 'no'):
    assert not host_malloc.applicable({host_malloc.SWITCH_ENV: off}, **linux)
  assert host_malloc.applicable({host_malloc.SWITCH_ENV: 'on'}, **linux)
  assert not host_malloc.applicable({}, system='Darwin', libc='')
  assert not host_malloc.applicable({}, system='Linux', libc='')   # musl and others


def test_reexec_argv_keeps_interpreter_options_and_uses_this_interpreter():
  argv = host_malloc.reexec_argv(['python3', '-O', '-X', 'dev', 'main.py', '--mode=eval'])
  assert argv == [sys.executable, '-O', '-X', 'dev', 'main.py', '--mode=eval']


def _run(script: str, env_extra: dict[str, str], *python_options: str) -> str:
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', host_malloc.MARK_ENV, host_malloc.SWITCH_ENV)}
  env.update(env_extra)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run([sys.executable, *python_options, '-c', textwrap.dedent(script)],
                        env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


REEXEC = """
    import os, sys
    from hhjax import host_malloc
    print('start', flush=True)
    host_malloc.reexec_with_tunables()
    print('tunables', os.environ.get('GLIBC_TUNABLES'))
    print('optimize', sys.flags.optimize)
"""


@pytest.mark.skipif(not GLIBC_LINUX, reason='the tunables are glibc on Linux only')
def test_reexec_starts_the_process_again_once_with_tunables_and_its_options():
  out = _run(REEXEC, {}, '-O').splitlines()
  assert out.count('start') == 2                     # once before the exec, once after
  assert out[-2] == 'tunables ' + host_malloc.merge_tunables('')
  assert out[-1] == 'optimize 1'                     # -O survived the exec


@pytest.mark.skipif(not GLIBC_LINUX, reason='the tunables are glibc on Linux only')
def test_switched_off_the_process_runs_once_untuned():
  out = _run(REEXEC, {host_malloc.SWITCH_ENV: 'off'}).splitlines()
  assert out == ['start', 'tunables None', 'optimize 0']


FAULTS = """
    import resource
    import jax, jax.numpy as jnp
    from hhjax import host_malloc
    host_malloc.reexec_with_tunables()
    x = jnp.ones((4096, 4096), jnp.float32)        # 64 MiB: above glibc's mmap threshold
    f = jax.jit(lambda x: x * 2.0 + 1.0)
    for _ in range(3):
      f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      f(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not GLIBC_LINUX, reason='the tunables are glibc on Linux only')
def test_tunables_stop_xla_page_faulting_a_large_output_on_every_call():
  untuned = float(_run(FAULTS, {host_malloc.SWITCH_ENV: 'off'}).split()[-1])
  tuned = float(_run(FAULTS, {}).split()[-1])
  pages = 64 * 2**20 / os.sysconf('SC_PAGE_SIZE')
  assert untuned > 0.5 * pages        # glibc maps fresh pages for each call's output
  assert tuned < 0.02 * pages         # reused memory: (almost) no faults
