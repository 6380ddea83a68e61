"""Keras weight files of the backbones whose layers Keras names (VGG, ResNet, Xception,
EfficientNet), read by layer name.

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

import dataclasses
import functools
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from hhjax import errors
from hhjax.model import backbones
from hhjax.weights import keras_h5

Variables = keras_h5.Variables
FileLayer = keras_h5.FileLayer

# Our array names for each Keras layer kind, in the order Keras stores its arrays.
_CONV = ('kernel', 'bias')
_SEPARABLE = ('depthwise_kernel', 'pointwise_kernel', 'bias')
_BN = ('scale', 'bias', 'mean', 'var')   # gamma, beta, moving_mean, moving_variance
_NORMALIZATION = ('mean', 'variance', 'count')   # Keras's Normalization layer


@dataclasses.dataclass(frozen=True)
class Layer:
  """One of our layers with weights and where Keras's arrays of it go."""
  path: tuple[str, ...]                                   # module keys under the backbone
  targets: tuple[tuple[str, tuple[str, ...]], ...]        # (collection, key path), Keras order
  shapes: tuple[tuple[int, ...], ...]
  keras_name: str | None                                  # None: Keras leaves it unnamed
  unnamed_prefix: str | None = None                       # e.g. 'conv2d'

  def describe(self) -> str:
    name = self.keras_name or f'an unnamed {self.unnamed_prefix}'
    shapes = ', '.join(str(s) for s in self.shapes)
    return f'"{name}" ({"/".join(self.path)}: {shapes})'


def _get(tree, keys):
  for key in keys:
    tree = tree[key]
  return tree


@functools.lru_cache(maxsize=32)
def abstract_variables(backbone: backbones.Backbone, final_endpoint: str | None = None,
                       include_top: bool = False, num_classes: int = 1000) -> Variables:
  """Shapes of the backbone's variables (a top needs Keras's 224 px for VGG's Flatten).

  Cached: tracing ResNet152 takes seconds, and a load asks for the same shapes again."""
  module = backbone.build(final_endpoint, include_top=include_top, num_classes=num_classes)
  size = 224 if include_top else backbone.min_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), x)


def layers(backbone: backbones.Backbone, abstract: Variables) -> list[Layer]:
  """Our layers with weights, block by block in network order."""
  found: dict[tuple[str, ...], dict[str, tuple[int, ...]]] = {}

  def walk(tree, keys, collection):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, keys + (key,), collection)
      else:
        found.setdefault(keys, {})[key] = (collection, tuple(value.shape))

  walk(abstract['params'], (), 'params')
  walk(abstract.get('batch_stats', {}), (), 'batch_stats')
  # jax sorts dict keys; the blocks' order is the network's (the unnamed layers, one of each
  # kind per block, are paired in it).
  rank = {block: i for i, block in enumerate(backbone.blocks + backbone.top)}
  out = []
  for path, arrays in sorted(found.items(), key=lambda item: rank[item[0][0]]):
    if 'variance' in arrays:
      names = _NORMALIZATION
    elif 'mean' in arrays:
      names = _BN
    elif 'depthwise_kernel' in arrays:
      names = _SEPARABLE
    else:
      names = _CONV
    names = tuple(n for n in names if n in arrays)
    if set(names) != set(arrays):
      raise AssertionError(f'unexpected arrays {sorted(arrays)} at {path}')
    prefix = backbone.unnamed.get(path[-1])
    out.append(Layer(path, tuple((arrays[n][0], path + (n,)) for n in names),
                     tuple(arrays[n][1] for n in names),
                     None if prefix else path[-1], prefix))
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
  variables: Variables = {'params': {}, 'batch_stats': {}}
  for layer, theirs in pairs:
    try:
      arrays = [np.asarray(theirs.group[w], dtype=np.float32) for w in theirs.weight_names]
    except (OSError, KeyError, ValueError) as e:
      raise errors.KerasWeightsError(
          f'{path} is corrupt: reading {theirs.describe()} failed ({e}). Get a fresh copy of '
          f'the file.') from e
    for array, (collection, keys) in zip(arrays, layer.targets):
      if not np.all(np.isfinite(array)):
        raise errors.KerasWeightsError(
            f'{path} is corrupt: {theirs.describe()} holds NaN or infinite values. Get a '
            f'fresh copy of the file.')
      keras_h5._set(variables, collection, keys, array)  # pylint: disable=protected-access
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
