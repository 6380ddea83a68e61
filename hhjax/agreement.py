"""The processes of one run check at start that they run the same command, config and code.

Every process of a jax.distributed run must compute its part of the same run: a host launched
with another learning rate, another data folder or another checkout of the code would train
(or fail) on its own terms while the collectives still fit, and the run would end with
parameters no config describes, or with one process failing while the others wait. So, right
after jax.distributed starts and before any data is read, each process publishes what it is
about to run (the mode, the resolved config, a hash of the code) in the coordination service's
key-value store, reads everyone's, and compares each with process 0's. Every process reads the
same values, so every process finds the same differences and stops with the same one-line
error (exit status 2); hhjax.peers keeps the others from ending with 4 meanwhile.
"""

from collections.abc import Mapping, Sequence
import hashlib
import json
import pathlib
from typing import Any

import jax
import ml_collections

from hhjax import errors
from hhjax import peers
from hhjax import workdir as workdir_lib

_KEY = 'hhjax/agreement/'
# The first process may start minutes before the last (a slow host, a busy file system); one
# that never comes is found by hhjax.peers.
_WAIT_MS = 24 * 3600 * 1000
_ROOT = pathlib.Path(__file__).resolve().parents[1]


def code_version(root: pathlib.Path = _ROOT) -> str:
  """A hash of the code that decides what a run computes: main.py, hhjax/ and configs/."""
  digest = hashlib.sha256()
  paths = [root / 'main.py', *sorted((root / 'hhjax').rglob('*.py')),
           *sorted((root / 'configs').glob('*.py'))]
  for path in paths:
    if path.is_file():
      digest.update(path.relative_to(root).as_posix().encode() + b'\0')
      digest.update(path.read_bytes() + b'\0')
  return digest.hexdigest()[:12]


def description(mode: str, config: ml_collections.ConfigDict,
                options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """What this process is about to run, as plain JSON values."""
  return {'mode': mode, 'options': dict(options or {}), 'code': code_version(),
          'config': workdir_lib.flat_fields(workdir_lib.config_dict(config))}


def differences(descriptions: Sequence[Mapping[str, Any]]) -> list[str]:
  """'process i: what differs from process 0' for each process that differs."""
  first, out = descriptions[0], []
  for index, other in enumerate(descriptions[1:], 1):
    diffs = []
    if other['code'] != first['code']:
      diffs.append(f"code version {first['code']} on process 0, {other['code']} on process "
                   f'{index} (another checkout or edited files)')
    for name in ('mode', 'options'):
      if other[name] != first[name]:
        diffs.append(f'{name} {first[name]!r} on process 0, {other[name]!r} on process {index}')
    a, b = first['config'], other['config']
    diffs += [f'config.{k}: {a.get(k)!r} on process 0, {b.get(k)!r} on process {index}'
              for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
      out.append(', '.join(diffs))
  return out


def check_processes_agree(mode: str, config: ml_collections.ConfigDict,
                          options: Mapping[str, Any] | None = None) -> None:
  """Raises ConfigError in every process if any process runs another mode, config or code.

  Nothing to do for a run of one process.
  """
  store = peers.key_value_store()
  if store is None or jax.process_count() == 1:
    return
  index = jax.process_index()
  mine = json.dumps(description(mode, config, options), sort_keys=True)
  store.key_value_set(f'{_KEY}{index}', mine)
  values = [mine if i == index else store.blocking_key_value_get(f'{_KEY}{i}', _WAIT_MS)
            for i in range(jax.process_count())]
  diffs = differences([json.loads(v) for v in values])
  if diffs:
    shown = '; '.join(diffs)
    if len(shown) > 1500:
      shown = shown[:1500] + ' ...'
    raise errors.ConfigError(
        f'The {jax.process_count()} processes of this run were not started alike: {shown}. '
        'Start every process with the same command, config overrides and code (the same '
        'commit on every host).')
