"""hhjax.compilation: where the persistent compilation cache lives, and the compile log lines."""

import pathlib

from absl import logging
import jax
import jax.numpy as jnp

from hhjax import compilation


def test_the_cache_lives_under_hhjax_cache_dir_unless_jax_is_told_or_it_is_off():
  assert compilation.cache_directory({'HHJAX_CACHE_DIR': '/c'}) == pathlib.Path('/c/jax')
  assert compilation.cache_directory({}) == pathlib.Path('~/.cache/hhjax/jax').expanduser()
  # JAX's own variable wins (the tests set it, to share one cache over every main.py).
  assert compilation.cache_directory(
      {'HHJAX_CACHE_DIR': '/c', 'JAX_COMPILATION_CACHE_DIR': '/j'}) == pathlib.Path('/j')
  for off in ('off', 'OFF', '0', 'false', 'no'):
    assert compilation.cache_directory({'HHJAX_COMPILATION_CACHE': off,
                                        'JAX_COMPILATION_CACHE_DIR': '/j'}) is None


def test_describe_says_where_the_executables_came_from():
  hit = compilation.Compiles(seconds=0.9, compilations=1, cache_hits=1)
  assert compilation.describe(hit, '/c', True) == (
      'loaded in 0.9 s from the persistent compilation cache /c')
  written = compilation.Compiles(seconds=8.0, compilations=1, cache_writes=1)
  assert 'compiled in 8.0 s (kept in the persistent compilation cache /c' in (
      compilation.describe(written, '/c', True))
  assert compilation.describe(written, None, False) == (
      'compiled in 8.0 s (the persistent compilation cache is off)')
  assert compilation.describe(compilation.Compiles(), '/c', True) == (
      'already compiled in this process')


def test_the_first_call_logs_its_compilation_and_later_calls_pass_through(monkeypatch):
  lines = []
  monkeypatch.setattr(logging, 'info', lambda fmt, *args: lines.append(fmt % args))
  step = compilation.first_call_logged(jax.jit(lambda x: jnp.tanh(x) * 2), 'the test step')
  for _ in range(3):
    out = step(jnp.arange(5.0))
  assert out.shape == (5,)
  assert len(lines) == 2, lines
  assert lines[0] == 'Compiling the test step ...'
  assert lines[1].startswith('The test step: compiled in ')
  assert 'the first call took ' in lines[1]
