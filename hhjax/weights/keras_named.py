"""Keras weight files of the backbones whose layers Keras names (VGG, ResNet, Xception,
EfficientNet, MobileNetV2), read by layer name.

Any file Keras writes for such a network loads: tf_keras's `save_weights('x.h5')` (the
official ImageNet files' layout), `model.save('x.h5')` (tf_keras or Keras 3) and Keras 3's
`.keras` archive (`hhjax.weights.keras_files` opens them), with or without the top, or of a
network cut at an endpoint. Each of our layers (a module of the backbone, named as Keras names
the layer: `conv2_block1_1_conv`) takes the file's layer of that name, and every array's shape
is checked. The few layers Keras leaves unnamed (Xception's shortcut convolutions: `conv2d`,
`conv2d_1`, ... in a fresh session) are taken in order among the file's auto-named layers of
their class, as Keras's own loader pairs layers. A file with a layer that the network lacks is
refused: it is of another architecture.
"""

import os
import pathlib
import re

import numpy as np

from hhjax import errors
from hhjax.model import backbones
from hhjax.weights import keras_h5

Variables = keras_h5.Variables
FileLayer = keras_h5.FileLayer

Layer = keras_h5.Layer
abstract_variables = keras_h5.backbone_abstract_variables


def layers(backbone: backbones.Backbone, abstract: Variables) -> list[Layer]:
  """Our layers with weights, block by block in network order."""
  found = keras_h5.layer_arrays(abstract)
  # jax sorts dict keys; the blocks' order is the network's (the unnamed layers, one of each
  # kind per block, are paired in it).
  rank = {block: i for i, block in enumerate(backbone.blocks + backbone.top)}
  out = []
  for path, arrays in sorted(found.items(), key=lambda item: rank[item[0][0]]):
    prefix = backbone.unnamed.get(path[-1])
    out.append(keras_h5.layer(path, arrays, None if prefix else path[-1], prefix))
  return out


def auto_named(name: str, prefix: str) -> bool:
  """Whether `name` is one Keras gives a layer of class prefix `prefix` (conv2d, conv2d_3)."""
  return re.fullmatch(rf'{prefix}(_\d+)?', name) is not None


def _misfit(path, backbone, why: str) -> errors.KerasWeightsError:
  return errors.KerasWeightsError(
      f'{path} does not hold Keras {backbone.keras_name} weights: {why}. Is it a file of '
      f'another architecture?')


def final_endpoint(backbone: backbones.Backbone, names: set[str]) -> str:
  """The last endpoint whose block's named layers are all in the file."""
  full = layers(backbone, abstract_variables(backbone))
  last = None
  for endpoint in backbone.endpoints:
    named = [l.keras_name for l in full if l.path[0] == endpoint and l.keras_name]
    if named and all(n in names for n in named):
      last = endpoint
  return last or backbone.endpoints[0]


def named_layers_to(backbone: backbones.Backbone, endpoint: str) -> set[str]:
  """Keras's names of the backbone's named layers with weights up to `endpoint`."""
  return {l.keras_name for l in layers(backbone, abstract_variables(backbone, endpoint))
          if l.keras_name}


def pair(path, backbone: backbones.Backbone, file_layers: list[FileLayer],
         ours: list[Layer]) -> list[tuple[Layer, FileLayer]]:
  """Each of our layers with the file's layer of its name; every shape checked."""
  by_name = {l.name: l for l in file_layers}
  used = set()
  pairs = []
  unnamed: dict[str, list[FileLayer]] = {}
  for prefix in set(backbone.unnamed.values()):
    named = {l.keras_name for l in ours if l.keras_name}
    unnamed[prefix] = [l for l in file_layers
                       if auto_named(l.name, prefix) and l.name not in named]
  for layer in ours:
    if layer.keras_name:
      theirs = by_name.get(layer.keras_name)
      if theirs is None:
        raise _misfit(path, backbone, f'it has no layer {layer.describe()}')
    else:
      queue = unnamed[layer.unnamed_prefix]
      if not queue:
        raise _misfit(path, backbone, f'it has no more auto-named {layer.unnamed_prefix} '
                                      f'layers for {layer.describe()}')
      theirs = queue.pop(0)
    if tuple(theirs.shapes) != layer.shapes:
      raise _misfit(path, backbone, f'its {theirs.describe()} does not fit our '
                                    f'{layer.describe()}')
    used.add(theirs.name)
    pairs.append((layer, theirs))
  extra = [l for l in file_layers if l.name not in used]
  if extra:
    raise _misfit(path, backbone, f'it has {len(extra)} layers the network lacks, from '
                                  f'{extra[0].describe()}')
  return pairs


def read(path, pairs: list[tuple[Layer, FileLayer]]) -> Variables:
  variables = keras_h5.read_pairs(path, pairs)
  if not variables['batch_stats']:
    del variables['batch_stats']
  return variables


def _inbound(layer: dict) -> list[str]:
  """The layer names a config layer reads (tf_keras's [name, i, j, kwargs] or Keras 3's
  keras_history)."""
  names = []

  def walk(node):
    if isinstance(node, dict):
      history = node.get('config', {}).get('keras_history') if node.get(
          'class_name') == '__keras_tensor__' else None
      if history:
        names.append(history[0])
      else:
        for value in node.values():
          walk(value)
    elif isinstance(node, list):
      if len(node) >= 3 and isinstance(node[0], str) and isinstance(node[1], int):
        names.append(node[0])
      else:
        for value in node:
          walk(value)

  walk(layer.get('inbound_nodes', []))
  return names


def fold_rescaling(model_config, variables: Variables) -> Variables:
  """A Keras model whose Normalization layer is followed by a Rescaling (EfficientNet built
  with weights='imagenet' has one, scale 1 / sqrt(stddev) per channel, offset 0) computes
  (x - mean) / sqrt(variance) * scale: the same as a Normalization of variance / scale^2,
  which is what our one Normalization layer takes. `variables` are the backbone's (blocks at
  the top); a model without such a layer is returned as it is."""
  from hhjax.weights import keras_files  # pylint: disable=g-import-not-at-top
  layers = keras_files.config_layers(model_config) if model_config else []
  norms = {l.get('name') for l in layers if l.get('class_name') == 'Normalization'}
  for layer in layers:
    if layer.get('class_name') != 'Rescaling' or not set(_inbound(layer)) & norms:
      continue
    config = layer.get('config') or {}
    scale = np.asarray(config.get('scale', 1.0), np.float32)
    if np.any(np.asarray(config.get('offset', 0.0)) != 0):
      raise errors.KerasWeightsError(
          f'The Rescaling layer {layer.get("name")!r} after the Normalization has an offset; '
          f'hhjax folds only a scale into the Normalization.')
    stats = variables['batch_stats']['stem']['normalization']
    stats['variance'] = (np.asarray(stats['variance'], np.float32) / (scale * scale)).astype(
        np.float32)
  return variables


def load(path: str | os.PathLike, backbone: backbones.Backbone):
  """Reads `backbone`'s weights from a Keras file, by layer name.

  Returns:
    (module, variables): the backbone's Flax module configured as the file is (top and class
    count, or the endpoint the file ends at) and its variables, float32 numpy arrays.
  """
  # keras_files reads hhjax's classifier metadata (keras_classifier, which uses this module).
  from hhjax.weights import keras_files  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path).expanduser()
  with keras_files.open_file(path) as keras_file:
    file_layers = keras_file.layers
    names = {l.name for l in file_layers}
    top = backbone.top[-1] in names
    num_classes = 1000
    if top:
      predictions = [l for l in file_layers if l.name == backbone.top[-1]][0]
      num_classes = predictions.shapes[-1][0]
      final = backbone.endpoints[-1]
    else:
      final = final_endpoint(backbone, names)
    abstract = abstract_variables(backbone, final, top, num_classes)
    pairs = pair(path, backbone, file_layers, layers(backbone, abstract))
    variables = fold_rescaling(keras_file.model_config, read(path, pairs))
  keras_h5.check_variables(variables, abstract, source=str(path))
  return backbone.build(final, include_top=top, num_classes=num_classes), variables
