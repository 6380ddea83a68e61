"""Keras model files opened as layers with weights: Keras 3's .keras archive and legacy HDF5.

`open_file` tells the two apart by their first bytes and yields a `KerasFile`: the model config
(None in a weights-only HDF5), the layers with weights in Keras's order, and the metadata hhjax
writes on export. What the layers mean is read by `hhjax.weights.keras_model`. A file that
cannot be read is refused with `corrupt`'s message. Only h5py, json and zipfile are needed.
"""

import contextlib
import dataclasses
import json
import pathlib
import re
import tempfile
import zipfile
from collections.abc import Iterator
from typing import Any

import h5py

from hhjax import errors
from hhjax.weights import keras_classifier
from hhjax.weights import keras_h5

FileLayer = keras_h5.FileLayer


@dataclasses.dataclass
class KerasFile:
  """An open Keras file: its model config (if any), its layers with weights, our metadata."""
  path: pathlib.Path
  model_config: dict[str, Any] | None
  layers: list[FileLayer]
  metadata: dict[str, Any]


def corrupt(path: pathlib.Path, what: str) -> errors.KerasWeightsError:
  return errors.KerasWeightsError(
      f'{path} is truncated or corrupt: {what}. Save the model again (model.save) and retry.')


def _snake_case(name: str) -> str:
  """Keras's `naming.to_snake_case`, which names the groups of a .keras weights file."""
  name = re.sub(r'\W+', '', name)
  name = re.sub('(.)([A-Z][a-z]+)', r'\1_\2', name)
  return re.sub('([a-z])([A-Z])', r'\1_\2', name).lower()


def _keras3_layers(path: pathlib.Path, config_layers: list[dict], weights: h5py.File
                   ) -> list[FileLayer]:
  """The layers with weights of a .keras archive, in the config's (Keras's) order.

  Keras 3 stores layer k's variables under layers/<class in snake case>[_n]/vars/0, 1, ...,
  where n counts the earlier layers of the same class: its loader pairs them by position too.
  """
  used: dict[str, int] = {}
  layers = []
  for layer in config_layers:
    key = _snake_case(str(layer.get('class_name')))
    used[key] = used.get(key, -1) + 1
    key = f'layers/{key}_{used[key]}' if used[key] else f'layers/{key}'
    try:
      group = weights.get(f'{key}/vars')
      names = ([f'{key}/vars/{n}' for n in sorted(group.keys(), key=int)]
               if group is not None else [])
      shapes = [tuple(weights[n].shape) for n in names]
    except (OSError, KeyError, ValueError) as e:
      raise corrupt(path, f'the weights of layer "{layer.get("name")}" cannot be read '
                           f'({e})') from None
    if names:
      layers.append(FileLayer(len(layers), str(layer.get('name')), weights, names, shapes))
  return layers


_ARCHIVE_ERRORS = (zipfile.BadZipFile, OSError, KeyError, EOFError, json.JSONDecodeError)


@contextlib.contextmanager
def _open_keras_archive(path: pathlib.Path) -> Iterator[KerasFile]:
  try:
    archive = zipfile.ZipFile(path)
    members = set(archive.namelist())
  except _ARCHIVE_ERRORS as e:
    raise corrupt(path, f'it starts as a zip archive (a .keras file) but cannot be read as '
                         f'one ({e})') from None
  with archive, tempfile.TemporaryDirectory() as tmp:
    if 'config.json' not in members or 'model.weights.h5' not in members:
      raise errors.KerasWeightsError(
          f'{path} is a zip archive but not a Keras .keras file: expected config.json and '
          f'model.weights.h5, found {sorted(members)[:10]}.')
    try:
      model_config = json.loads(archive.read('config.json'))
      member = keras_classifier.METADATA_MEMBER
      metadata = json.loads(archive.read(member)) if member in members else {}
      weights = h5py.File(archive.extract('model.weights.h5', tmp), 'r')
    except _ARCHIVE_ERRORS as e:
      raise corrupt(path, f'its archive cannot be read ({e})') from None
    with weights:
      layers = _keras3_layers(path, config_layers(model_config), weights)
      yield KerasFile(path, model_config, layers, metadata)


@contextlib.contextmanager
def _open_h5(path: pathlib.Path) -> Iterator[KerasFile]:
  with keras_h5.open_h5(path) as f:
    group = keras_h5.open_weights_group(f, path)
    layers = keras_h5.file_layers(group, path)
    model_config = metadata = None
    try:
      if 'model_config' in f.attrs:
        model_config = json.loads(f.attrs['model_config'])
      if keras_classifier.METADATA_ATTRIBUTE in f.attrs:
        metadata = json.loads(f.attrs[keras_classifier.METADATA_ATTRIBUTE])
    except (ValueError, TypeError) as e:
      raise corrupt(path, f'its model config or hhjax metadata is not JSON ({e})') from e
    yield KerasFile(path, model_config, layers, metadata or {})


@contextlib.contextmanager
def open_file(path: pathlib.Path) -> Iterator[KerasFile]:
  """Opens a .keras archive or a legacy HDF5 file, whole-model or weights-only."""
  if not path.is_file():
    raise errors.DataNotFoundError(f'No Keras model file at {path}.')
  with open(path, 'rb') as f:
    head = f.read(4)
  opener = _open_keras_archive if head.startswith(b'PK') else _open_h5
  with opener(path) as keras_file:
    yield keras_file


def config_layers(model_config: Any) -> list[dict[str, Any]]:
  """The layer entries of a Keras model config (tf_keras or Keras 3); [] if it has none."""
  config = model_config.get('config') if isinstance(model_config, dict) else None
  layers = config.get('layers') if isinstance(config, dict) else None
  return [l for l in layers if isinstance(l, dict)] if isinstance(layers, list) else []
