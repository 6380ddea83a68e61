"""A resume trains on the files the run started on: WORKDIR/data_listing.json.

An image folder's training split decides every batch of a run: the epoch's permutation is over
its files, so a file added or removed moves every later batch. A run resumed after the folder
changed would no longer be the run it claims to continue, without any error. So when a run
starts (no checkpoint yet), process 0 writes the training files it found (each path under the
split folder and its size) to WORKDIR/data_listing.json; a resume lists them again (the same
listing the image check makes, whose verdict cache spares the decoding) and refuses, saying
what changed, unless --allow_data_change is given; it then goes on and the file records the
data as it is now. Synthetic data and TFDS datasets are described by the config, which the
resume compares already.
"""

from collections.abc import Mapping
import json
import os

from absl import logging
from etils import epath
import jax
import ml_collections

from hhjax import errors
from hhjax import files
from hhjax import workdir as workdir_lib

LISTING_FILE = 'data_listing.json'


def training_files(config: ml_collections.ConfigDict) -> dict[str, int] | None:
  """{path under the training split's folder: size} of the files training reads; None unless
  the source is an image folder."""
  if config.data.source != 'folder':
    return None
  from hhjax import entry  # pylint: disable=g-import-not-at-top  # TensorFlow
  from hhjax.data import sources  # pylint: disable=g-import-not-at-top
  split_dir = os.path.join(config.data.dir, config.data.train_split)
  table = sources.table(entry.data(config), config.data.train_split)
  return {os.path.relpath(p, split_dir): files.stat(p)[0] for p in table.keys}


def changes(old: Mapping[str, int], new: Mapping[str, int]) -> list[str]:
  """'N added (a, b, ...)', 'N removed (...)', 'N changed size (...)' for what differs."""
  def some(names):
    names = sorted(names)
    return ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
  added = set(new) - set(old)
  removed = set(old) - set(new)
  resized = {p for p in set(old) & set(new) if old[p] != new[p]}
  return [f'{len(group)} {what} ({some(group)})'
          for group, what in ((added, 'added'), (removed, 'removed'),
                              (resized, 'changed size')) if group]


def _has_checkpoint(workdir: str) -> bool:
  folder = epath.Path(workdir_lib.checkpoint_dir(workdir))
  return folder.exists() and any(p.name.isdigit() for p in folder.iterdir())


def check_training_data(config: ml_collections.ConfigDict, workdir: str,
                        allow_change: bool = False) -> None:
  """Records the training files at a run's start; refuses a resume on other files.

  Raises:
    DataError: the run resumes from a checkpoint and the training files differ from those it
      started on, and `allow_change` is False.
  """
  now = training_files(config)
  if now is None:
    return
  workdir = workdir_lib.absolute(workdir)
  path = epath.Path(workdir) / LISTING_FILE
  is_main = jax.process_index() == 0
  saved = None
  if _has_checkpoint(workdir) and path.exists():
    saved = json.loads(path.read_text())
    found = changes(saved['files'], now)
    if found and not allow_change:
      raise errors.DataError(
          f'The training files in {saved["folder"]} changed since this run started '
          f'({"; ".join(found)}; {len(saved["files"])} then, {len(now)} now): resumed, it would '
          f'train on other batches than the run it continues. Put the files back, train in '
          'another --workdir, or run again with --allow_data_change to go on with the files '
          f'as they are (recorded in {path}).')
    if found:
      logging.warning('The training files changed since this run started (%s); going on with '
                      'them as they are now (--allow_data_change).', '; '.join(found))
    elif saved.get('folder') == os.path.join(config.data.dir, config.data.train_split):
      return   # nothing to write
  if is_main:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, json.dumps({
        'folder': os.path.join(config.data.dir, config.data.train_split), 'files': now}))
