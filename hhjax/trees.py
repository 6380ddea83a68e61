"""Comparing two trees of arrays by path: what is missing, unexpected, or of another shape.

One report for every place that checks a tree against what a model expects: Keras weights
against InceptionV3, pretrained weights against the classifier's backbone, a checkpoint against
the state the config builds.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np


def _key_name(entry) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _is_array(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def leaf_specs(tree: Any, sep: str = '/', *, dtypes: bool = False) -> dict[str, Any]:
  """Maps the `sep`-joined path of each array leaf to its shape (and dtype, if asked).

  Leaves are anything with `shape` and `dtype`: arrays, `jax.ShapeDtypeStruct`s, orbax's
  array metadata. Other leaves are left out.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array)[0]
  out = {}
  for path, leaf in leaves:
    if not _is_array(leaf):
      continue
    shape = tuple(int(d) for d in leaf.shape)
    out[sep.join(_key_name(k) for k in path)] = (
        (shape, str(np.dtype(leaf.dtype))) if dtypes else shape)
  return out


def describe_differences(
    got: Mapping[str, Any], want: Mapping[str, Any], *, got_name: str, want_name: str,
    limit: int = 8, what: str = 'arrays',
    show: Callable[[str], str] | None = None) -> str | None:
  """A readable list of differences between two `leaf_specs` maps, or None if they agree.

  Args:
    got: what was found (a file, a checkpoint), path -> spec.
    want: what is expected (the model, the config), path -> spec.
    got_name: how the text calls `got` ('the checkpoint', 'the weights').
    want_name: how the text calls `want` ('the config', 'the model').
    limit: paths listed per kind of difference before the rest is counted.
    what: the noun for the leaves ('arrays', 'params').
    show: formats a path of the 'wrong' kind; by default 'path: got spec vs wanted spec'.
  """
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
  show = show or (lambda k: f'{k}: {got[k]} vs {want[k]}')
  lines = []
  for title, keys, fmt in (
      (f'in {want_name} but not in {got_name}', missing, str),
      (f'in {got_name} but not in {want_name}', unexpected, str),
      (f'of another shape ({got_name} vs {want_name})', wrong, show)):
    if keys:
      lines.append(f'{len(keys)} {what} {title}:')
      lines += [f'  {fmt(k)}' for k in keys[:limit]]
      if len(keys) > limit:
        lines.append(f'  ... and {len(keys) - limit} more')
  return '\n'.join(lines) if lines else None
