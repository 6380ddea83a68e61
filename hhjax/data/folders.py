"""Image folders (`DIR/<split>/<class>/<image>`) as tables of file paths.

Classes are the split's folder names, sorted, as Keras's `flow_from_directory` reads them. Every
file is checked by decoding it once; the verdicts are kept on disk while files keep their size
and time (bad_files.py), and files that are not readable images are reported by path
(config.data.bad_files). Each real folder is listed once: links that loop or repeat a folder are
skipped by name. A layout that cannot be read as classes raises at once, saying what was found.
"""

from collections.abc import Iterable, Sequence
import dataclasses
import os

from absl import logging
import numpy as np
import tensorflow as tf

from hhjax import errors
from hhjax.data import bad_files
from hhjax.data import spec as data_spec
from hhjax.data.table import Table


# Image folders are listed through tf.io.gfile, so that config.data.dir may be local or a URL
# (gs://...), as tf.io.read_file reads either.


def _visible(names: Iterable[str]) -> list[str]:
  # Dot files (.DS_Store, ._x AppleDouble, .ipynb_checkpoints) are OS or tool metadata. GCS lists
  # folders with a trailing '/'.
  return sorted(n.rstrip('/') for n in names if not n.startswith('.'))


def _folders_in(path: str) -> list[str]:
  return [n for n in _visible(tf.io.gfile.listdir(path))
          if tf.io.gfile.isdir(os.path.join(path, n))]


def _class_folders(split_dir: str) -> list[str]:
  return _folders_in(split_dir)


def _files_under(class_dir: str, listed: '_ListedDirs | None' = None) -> list[str]:
  """Every visible file below class_dir, sorted, recursing like flow_from_directory.

  With `listed`, each real folder is listed once: a link back up (a loop) or to a folder
  listed already (another class's, or the same one twice) is skipped and named.
  """
  found = []
  for dirpath, dirnames, filenames in tf.io.gfile.walk(class_dir):
    dirnames[:] = _visible(dirnames)   # walk descends into what is left here
    if listed is not None:
      dirnames[:] = [d for d in dirnames if listed.first_visit(os.path.join(dirpath, d))]
    found.extend(os.path.join(dirpath, f) for f in _visible(filenames))
  return sorted(found)


class _ListedDirs:
  """The real folders a split's listing has entered, so that symlinks are followed once.

  tf.io.gfile.walk follows folder links; a link to a folder above it would be followed until
  the system refuses the path (~40 levels), listing every image again at each level and under
  the class of the link. Local paths only: object stores (gs://) have no links.
  """

  def __init__(self, split_dir: str, class_dirs: Sequence[str]):
    self._local = '://' not in split_dir
    self._split = os.path.realpath(split_dir) if self._local else split_dir
    self._seen = {os.path.realpath(d) for d in class_dirs} if self._local else set()
    self.skipped: list[str] = []   # 'link -> its real folder'

  def first_visit(self, path: str) -> bool:
    if not self._local:
      return True
    real = os.path.realpath(path)
    # A folder seen before, or one that holds the split (the class folders again).
    if real in self._seen or self._split == real or self._split.startswith(real + os.sep):
      self.skipped.append(f'{path} -> {real}')
      return False
    self._seen.add(real)
    return True

  def warn(self) -> None:
    if self.skipped:
      logging.warning(
          'Skipped %d folder link(s) under %s that lead to a folder listed already or to one '
          'that holds the split (a loop); each folder is read once: %s', len(self.skipped),
          self._split, '; '.join(self.skipped[:5]) + ('; ...' if len(self.skipped) > 5 else ''))


def _split_dir(root: str, split: str) -> str:
  split_dir = os.path.join(root, split)
  if not tf.io.gfile.isdir(split_dir):
    present = _folders_in(root)
    raise errors.DataNotFoundError(
        f'No folder for split {split!r}: {split_dir} does not exist. {root} holds '
        f'{present or "no folders"}. Expected the layout DIR/<split>/<class>/<image>; set '
        f'config.data.train_split / config.data.validation_split / config.data.test_split to '
        f'split folder names (test_split=None: no test split).')
  return split_dir


def _folder_classes(root: str, split: str) -> list[str]:
  split_dir = _split_dir(root, split)
  classes = _class_folders(split_dir)
  if len(classes) < 2:
    loose = [n for n in _visible(tf.io.gfile.listdir(split_dir)) if n not in classes]
    raise errors.DataError(
        f'{split_dir} must hold one folder per class (at least two); found '
        f'{len(classes)} class folder(s) {classes} and {len(loose)} other file(s). Expected '
        f'the layout DIR/<split>/<class>/<image>.')
  return classes


def _check_root(spec: data_spec.DataSpec) -> str:
  root = spec.dir
  if not root:
    raise errors.ConfigError(
        "config.data.source='folder' needs config.data.dir: the folder that holds "
        '<split>/<class>/<image> (e.g. the horse-or-human folder).')
  if not tf.io.gfile.isdir(root):
    raise errors.DataNotFoundError(f'Image folder {root!r} (config.data.dir) does not exist or '
                                   'is not a folder.')
  return root


def _same_classes(spec: data_spec.DataSpec, split: str, classes: list[str]) -> None:
  """Both splits of the spec must name the same classes, or labels would mean other things."""
  for other in [s for s in spec.named_splits() if s != split]:
    other_classes = _folder_classes(spec.dir, other)
    if other_classes != classes:
      raise errors.DataError(
          f'Class folders differ between splits: {split!r} has {classes}, {other!r} has '
          f'{other_classes} (only in {split!r}: {sorted(set(classes) - set(other_classes))}, '
          f'only in {other!r}: {sorted(set(other_classes) - set(classes))}). Labels come from '
          'sorted class folder names, so every split needs the same class folders.')


@dataclasses.dataclass(frozen=True)
class _FolderScan:
  split: str
  split_dir: str
  class_names: tuple[str, ...]
  files: dict[str, list[str]]       # class -> good files
  bad: dict[str, str]                # path -> reason


def _scan_folder_split(spec: data_spec.DataSpec, split: str) -> _FolderScan:
  """Lists and decode-checks one split of an image folder; raises on layout problems."""
  root = _check_root(spec)
  classes = _folder_classes(root, split)
  _same_classes(spec, split, classes)
  split_dir = os.path.join(root, split)
  listed = _ListedDirs(split_dir, [os.path.join(split_dir, c) for c in classes])
  files = {c: _files_under(os.path.join(split_dir, c), listed) for c in classes}
  listed.warn()
  all_files = [f for c in classes for f in files[c]]
  if not all_files:
    raise errors.DataError(f'{split_dir} holds no files: its class folders {classes} are empty.')
  bad = bad_files.check_image_files(all_files, spec.num_parallel_calls, folder=split_dir)
  good = {c: [f for f in files[c] if f not in bad] for c in classes}
  return _FolderScan(split, split_dir, tuple(classes), good, bad)


def _scan_folder(spec: data_spec.DataSpec, splits: Sequence[str]) -> list[_FolderScan]:
  """Scans `splits` and applies config.data.bad_files to all their bad files at once.

  Raises if a class is left without examples, with 'skip' too: its label would never be seen.
  """
  scans = [_scan_folder_split(spec, s) for s in splits]
  bad = {p: r for scan in scans for p, r in scan.bad.items()}
  bad_files.apply_policy(
      bad, spec.bad_files, where=f'file(s) in {spec.dir}',
      advice='Remove or repair them, or run again with --bad_files=skip '
      "(config.data.bad_files='skip') to go on without them.")
  for scan in scans:
    empty = [c for c in scan.class_names if not scan.files[c]]
    if empty:
      raise errors.DataError(
          f'Class folder(s) {empty} in {scan.split_dir} hold no readable images'
          f'{" once bad files are skipped" if bad else ""}; every class needs examples.')
  return scans


def _folder_table(scan: _FolderScan) -> Table:
  paths, labels = [], []
  for label, name in enumerate(scan.class_names):
    paths += scan.files[name]
    labels += [label] * len(scan.files[name])
  return Table('path', np.array(paths, dtype=object), np.array(labels, np.int32),
               scan.class_names)


def split_table(spec: data_spec.DataSpec, split: str) -> Table:
  return _folder_table(_scan_folder(spec, [split])[0])


def sizes(spec: data_spec.DataSpec,
                  splits: Sequence[str]) -> tuple[dict[str, int], tuple[str, ...]]:
  scans = _scan_folder(spec, splits)
  return ({s.split: sum(len(f) for f in s.files.values()) for s in scans},
          scans[0].class_names)
