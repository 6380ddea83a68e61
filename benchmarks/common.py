"""Shared pieces of the benchmarks: timing, memory, the matmul ceiling, subprocesses.

Each benchmark case runs in a fresh subprocess, so that its compile time and peak memory are
its own, and so that frameworks (Keras's TensorFlow and JAX backends, our JAX code) never
share a process or an accelerator's memory pool.
"""

import argparse
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hhjax import host_malloc  # pylint: disable=g-import-not-at-top,wrong-import-position


def time_steps(step: Callable[[], Any], *, images_per_step: int, warmup_steps: int = 2,
               repeats: int = 7, min_repeat_s: float = 0.5) -> dict[str, Any]:
  """Times a blocking step function: median images/s over repeated timings.

  Args:
    step: runs one step and returns only when its results are computed (block on them).
    images_per_step: images one call processes.
    warmup_steps: untimed calls first (after the first, compiling, call made by the caller).
    repeats: timed repeats; the median is reported.
    min_repeat_s: each repeat runs enough steps to last about this long, so that fast
      accelerators are timed over many steps and slow CPUs over one.

  Returns:
    images_per_s (median), its min and max, step_ms (median), repeats, steps_per_repeat.
  """
  for _ in range(warmup_steps):
    step()
  t0 = time.perf_counter()
  step()
  first = time.perf_counter() - t0
  steps_per_repeat = max(1, math.ceil(min_repeat_s / max(first, 1e-9)))
  rates, step_times = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps_per_repeat):
      step()
    dt = (time.perf_counter() - t0) / steps_per_repeat
    step_times.append(dt)
    rates.append(images_per_step / dt)
  return {
      'images_per_s': statistics.median(rates),
      'images_per_s_min': min(rates),
      'images_per_s_max': max(rates),
      'step_ms': 1e3 * statistics.median(step_times),
      'repeats': repeats,
      'steps_per_repeat': steps_per_repeat,
  }


def host_peak_memory_mb() -> float:
  """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def jax_device_peak_memory_mb() -> float | None:
  """Peak bytes in use on the first JAX device, where the runtime reports it (not on CPU)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**20


def jax_device() -> str:
  import jax
  d = jax.devices()[0]
  return f'{d.platform}:{getattr(d, "device_kind", "")}'.rstrip(':')


def machine() -> dict[str, Any]:
  """What the numbers were measured on."""
  return {'host': platform.node(), 'cpus': os.cpu_count(), 'python': platform.python_version(),
          'glibc_tunables': os.environ.get('GLIBC_TUNABLES')}


def add_run_flags(parser) -> None:
  """The flags every benchmark script shares: batch, image size, repeats, allocator, child."""
  parser.add_argument('--batch_size', type=int, default=20)
  parser.add_argument('--image_size', type=int, default=150)
  parser.add_argument('--repeats', type=int, default=7)
  add_malloc_flag(parser)
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)


def choose(parser, text: str, valid: Sequence[str], what: str) -> list[str]:
  """The comma-separated names in `text`; a parser error names any not in `valid`."""
  chosen = [x for x in text.split(',') if x]
  unknown = sorted(set(chosen) - set(valid))
  if unknown:
    parser.error(f'unknown {what}(s) {unknown}; choose from {list(valid)}.')
  return chosen


def add_malloc_flag(parser) -> None:
  """--malloc_tuning: run every child (ours and Keras alike) with hhjax/host_malloc.py's
  glibc settings, as main.py runs training, or without them."""
  parser.add_argument(
      '--malloc_tuning', default='on', choices=('on', 'off'),
      help="on: every case's process gets main.py's GLIBC_TUNABLES (hhjax/host_malloc.py), "
      'Keras included, so both run under the same allocator settings; off: none added '
      '(glibc defaults unless GLIBC_TUNABLES is set around the script; each record says)')


def malloc_env(setting: str) -> dict[str, str]:
  """Environment entries for a child process under --malloc_tuning=setting."""
  if setting == 'on':
    return {'GLIBC_TUNABLES': host_malloc.merge_tunables(os.environ.get('GLIBC_TUNABLES')),
            host_malloc.MARK_ENV: '1'}
  return {host_malloc.SWITCH_ENV: 'off'}


def matmul_rate(n: int = 4096, repeats: int = 7, precision: str | None = None) -> dict[str, Any]:
  """The float32 matmul rate of the first JAX device: a large jitted [n, n] @ [n, n].

  This is the machine's practical ceiling that the benchmarks compare against. On GPUs the
  default precision may use TF32 tensor cores for float32 inputs; `precision='highest'`
  asks for true float32.
  """
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
  f(a, b).block_until_ready()
  timing = time_steps(lambda: f(a, b).block_until_ready(), images_per_step=1,
                      warmup_steps=1, repeats=repeats, min_repeat_s=0.3)
  flops = 2.0 * n ** 3
  return {
      'n': n,
      'precision': precision or 'default',
      'gflops': flops * timing['images_per_s'] / 1e9,
      'gflops_min': flops * timing['images_per_s_min'] / 1e9,
      'gflops_max': flops * timing['images_per_s_max'] / 1e9,
      'device': jax_device(),
  }


def checkout(root: pathlib.Path, label: str, where: str) -> pathlib.Path:
  """The code a comparison runs as LABEL: `where` if it is a folder, else that commit of this
  repository checked out (once, under root/code_LABEL) with `git worktree`."""
  if pathlib.Path(where).is_dir():
    return pathlib.Path(where).resolve()
  path = pathlib.Path(root) / f'code_{label}'
  if not path.is_dir():
    repo = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run(['git', '-C', str(repo), 'worktree', 'add', '--detach', str(path), where],
                   check=True, capture_output=True)
  return path


def emit(record: dict[str, Any]) -> None:
  """Prints one JSON line and flushes, so a parent process reads it at once."""
  print(json.dumps(record, sort_keys=False), flush=True)


def run_child(argv: Sequence[str], env: dict[str, str] | None = None,
              timeout_s: float | None = None) -> list[dict[str, Any]]:
  """Runs `python argv...` in a fresh process; returns the JSON lines it printed.

  The child's stderr passes through (compilation warnings, errors). A failed child gives a
  record with 'error' instead of stopping the whole benchmark.
  """
  child_env = dict(os.environ)
  child_env.update(env or {})
  cmd = [sys.executable, *argv]
  try:
    proc = subprocess.run(cmd, env=child_env, stdout=subprocess.PIPE, text=True,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return [{'error': f'timed out after {timeout_s} s', 'argv': list(argv)}]
  records = []
  for line in proc.stdout.splitlines():
    line = line.strip()
    if line.startswith('{'):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue   # a log line that happens to start with '{': not a record
  if proc.returncode != 0:
    records.append({'error': f'exit status {proc.returncode}', 'argv': list(argv)})
  return records


def matmul_main() -> None:
  """`python benchmarks/common.py matmul`: prints the matmul rate as a JSON line."""
  import jax
  record = {'bench': 'matmul', 'jax': jax.__version__, **machine()}
  record.update(matmul_rate())
  if jax.default_backend() != 'cpu':
    highest = matmul_rate(precision='highest')
    record['gflops_highest'] = highest['gflops']
  emit(record)


def measure_matmul_in_child(env: dict[str, str] | None = None) -> dict[str, Any]:
  """The matmul rate, measured in its own process (keeps accelerator memory free here)."""
  records = run_child([os.path.abspath(__file__), 'matmul'], env=env)
  return records[0] if records else {'bench': 'matmul', 'error': 'no output'}


if __name__ == '__main__':
  if sys.argv[1:] == ['matmul']:
    matmul_main()
  else:
    sys.exit(f'usage: python {sys.argv[0]} matmul')
