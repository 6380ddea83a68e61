"""Keras's legacy .h5 files read with h5py alone (no TensorFlow or Keras at run time), and the
backbones whose files pair layers by position loaded from them.

Two layouts:

* the weights-only file, with the attribute `layer_names` at its root: what
  `model.save_weights('x.h5')` writes, and what the official ImageNet files are;
* the whole-model file, with the group `model_weights`: what `model.save('x.h5')` writes.

Shared by every Keras file reader: the file's layers with weights (`file_layers`), our layers
with weights and where each Keras array goes (`Layer`, `layer`), and the reading of a paired
file layer into our variables (`read_pairs`), every array checked.

A backbone whose Keras layers are auto-numbered (`Backbone.keras_names == 'position'`) is
paired **by position**, as Keras's own loader pairs them: the file's layers with weights, in
the file's order, against the declaration's `keras_layer_order` (Keras's `model.layers` order,
sorted by depth in the graph, not by creation). Names are not trusted (files written by Keras
2.0 call the first convolution `conv2d_1`, newer Keras calls it `conv2d`); every shape is
checked instead. `hhjax.weights.keras_named` pairs the others by name.

Official weights are fetched by `hhjax.weights.official`; `hhjax.weights.pretrained` loads any
source (a name, an .h5 file, a converted folder) and converts files for offline machines.
"""

import dataclasses
import functools
import os
import pathlib
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from hhjax import errors
from hhjax import trees
from hhjax.model import backbones
from hhjax.weights import official

Variables = dict[str, Any]

# ------------------------------------------------------------------------------------------
# Our layers with weights.

# Our array names, in the order Keras stores a layer's arrays (Conv2D kernel, bias;
# SeparableConv2D depthwise_kernel, pointwise_kernel, bias; BatchNormalization gamma, beta,
# moving_mean, moving_variance; Dense kernel, bias): a layer has a subsequence of them.
_KERAS_ORDER = ('depthwise_kernel', 'pointwise_kernel', 'kernel', 'scale', 'bias', 'mean', 'var')
# Keras's names of our arrays where they differ (BatchNormalization's; bias is beta there).
_KERAS_NAMES = {'scale': 'gamma', 'mean': 'moving_mean', 'var': 'moving_variance'}
# Keras's Normalization layer (inside EfficientNet): its arrays under Keras's own names.
_NORMALIZATION_ORDER = ('mean', 'variance', 'count')


@dataclasses.dataclass(frozen=True)
class Layer:
  """One of our layers with weights and where Keras's arrays of it go."""
  path: tuple[str, ...]                                   # module keys under the backbone
  targets: tuple[tuple[str, tuple[str, ...]], ...]        # (collection, key path), Keras order
  shapes: tuple[tuple[int, ...], ...]
  keras_name: str | None = None                           # None: Keras leaves it unnamed
  unnamed_prefix: str | None = None                       # e.g. 'conv2d'

  @property
  def is_batch_norm(self) -> bool:
    return any(c == 'batch_stats' for c, _ in self.targets)

  def keras_weight_names(self) -> list[str]:
    """Keras's names of the arrays, in order: ['beta', 'moving_mean', 'moving_variance']."""
    names = [k[-1] for _, k in self.targets]
    if 'variance' in names:   # a Normalization layer's, named as Keras names them
      return names
    return [('beta' if self.is_batch_norm else 'bias') if n == 'bias' else
            _KERAS_NAMES.get(n, n) for n in names]

  def describe(self) -> str:
    name = self.keras_name or f'an unnamed {self.unnamed_prefix}'
    shapes = ', '.join(str(s) for s in self.shapes)
    return f'"{name}" ({"/".join(self.path)}: {shapes})'

  def describe_keras(self, index: int) -> str:
    """'layer #i, stem/conv_1a_3x3/conv (kernel (3, 3, 3, 32))': what position i expects."""
    weights = ', '.join(f'{n} {s}' for n, s in zip(self.keras_weight_names(), self.shapes))
    return f'layer #{index}, {"/".join(self.path)} ({weights})'


def layer(path: tuple[str, ...], arrays: dict[str, tuple[str, tuple[int, ...]]],
          keras_name: str | None = None, unnamed_prefix: str | None = None) -> Layer:
  """Our layer at `path` whose arrays are {name: (collection, shape)}."""
  names = [n for n in (_NORMALIZATION_ORDER if 'variance' in arrays else _KERAS_ORDER)
           if n in arrays]
  if set(names) != set(arrays):
    raise AssertionError(f'unexpected arrays {sorted(arrays)} at {path}')
  return Layer(path, tuple((arrays[n][0], path + (n,)) for n in names),
               tuple(arrays[n][1] for n in names), keras_name, unnamed_prefix)


def layer_arrays(abstract: Variables) -> dict[tuple[str, ...], dict[str, tuple[str, tuple]]]:
  """{module path: {array name: (collection, shape)}} of every layer with weights."""
  found: dict[tuple[str, ...], dict[str, tuple[str, tuple[int, ...]]]] = {}

  def walk(tree, keys, collection):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, keys + (key,), collection)
      else:
        found.setdefault(keys, {})[key] = (collection, tuple(value.shape))

  walk(abstract['params'], (), 'params')
  walk(abstract.get('batch_stats', {}), (), 'batch_stats')
  return found


def ordered_layers(abstract: Variables, order: list[str]) -> list[Layer]:
  """Our layers at the '/'-joined module paths `order` (a `keras_layer_order`), in order."""
  arrays = layer_arrays(abstract)
  return [layer(tuple(p.split('/')), arrays[tuple(p.split('/'))]) for p in order]


@functools.lru_cache(maxsize=32)
def backbone_abstract_variables(backbone: backbones.Backbone, final_endpoint: str | None = None,
                                include_top: bool = False,
                                num_classes: int = 1000) -> Variables:
  """Shapes of the backbone's variables (a top needs Keras's 224 px for VGG's Flatten).

  Cached: tracing ResNet152 takes seconds, and a load asks for the same shapes again."""
  module = backbone.build(final_endpoint, include_top=include_top, num_classes=num_classes)
  size = 224 if include_top else backbone.min_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), x)


def abstract_variables(model) -> Variables:
  """Shapes and dtypes of `model`'s (any declared backbone's) variables, computing nothing."""
  return backbone_abstract_variables(backbones.of_module(model), model.final_endpoint,
                                     model.include_top, model.num_classes)


def keras_layer_order(final_endpoint: str | None = None, include_top: bool = False,
                      backbone: str | None = None) -> list[str]:
  """Module paths of our layers with weights, in Keras's file order, for a backbone whose
  files pair by position (default: the default backbone); see `Backbone.keras_layer_order`.

  E.g. ['stem/conv_1a_3x3/conv', 'stem/conv_1a_3x3/bn', ..., 'predictions']: entry k
  receives the k-th layer with weights of a Keras file. A network cut at an endpoint has a
  prefix of the full order.
  """
  return backbones.get(backbone).keras_layer_order(final_endpoint, include_top)


def _set(tree: Variables, collection: str, keys: tuple[str, ...], value) -> None:
  node = tree.setdefault(collection, {})
  for key in keys[:-1]:
    node = node.setdefault(key, {})
  node[keys[-1]] = value


# ------------------------------------------------------------------------------------------
# Reading an HDF5 file.


def _attribute_list(group: h5py.Group, name: str) -> list[str]:
  """A list-valued attribute, as Keras writes it (split into name0, name1, ... when long)."""
  if name in group.attrs:
    values = list(group.attrs[name])
  else:
    values, chunk = [], 0
    while f'{name}{chunk}' in group.attrs:
      values.extend(group.attrs[f'{name}{chunk}'])
      chunk += 1
  return [v.decode('utf8') if hasattr(v, 'decode') else str(v) for v in values]


@dataclasses.dataclass
class FileLayer:
  """A layer with weights in a Keras file."""
  index: int            # position among the file's layers with weights
  name: str
  group: h5py.Group
  weight_names: list[str]
  shapes: list[tuple[int, ...]]

  def describe(self) -> str:
    weights = ', '.join(f'{w} {s}' for w, s in zip(self.weight_names, self.shapes))
    return f'layer #{self.index} "{self.name}" ({weights})'


def describe(self) -> str:
    weights = ', '.join(f'{w} {s}' for w, s in zip(self.weight_names, self.shapes))
    return f'layer #{self.index} "{self.name}" ({weights})'


def open_weights_group(f: h5py.File, path: pathlib.Path) -> h5py.Group:
  """The group that holds `layer_names`: the root, or `model_weights` in a whole-model file."""
  if _has_attribute(f, 'layer_names'):
    return f
  if 'model_weights' in f and _has_attribute(f['model_weights'], 'layer_names'):
    return f['model_weights']
  found = f'groups {sorted(f.keys())[:10]} and attributes {sorted(f.attrs.keys())[:10]}'
  hint = ''
  if 'layers' in f or 'vars' in f:
    hint = (" It looks like Keras 3's '.weights.h5' format, which names layers instead of "
            "ordering them: save the model with model.save('x.h5') (or tf_keras's "
            "save_weights('x.h5')) to get the legacy layout.")
  raise errors.KerasWeightsError(
      f'{path} holds no Keras legacy weights: expected the attribute "layer_names" at the root '
      f'(a weights-only file, as save_weights writes) or a group "model_weights" (a whole-model '
      f'file, as model.save writes); found {found}.{hint}')


def _has_attribute(group: h5py.Group, name: str) -> bool:
  return name in group.attrs or f'{name}0' in group.attrs


def file_layers(group: h5py.Group, path: pathlib.Path) -> list[FileLayer]:
  """The file's layers that have weights, in the file's order (shapes only, no data read)."""
  try:
    names = _attribute_list(group, 'layer_names')
  except (OSError, KeyError, ValueError) as e:
    raise errors.KerasWeightsError(
        f'{path} is corrupt: its list of layers cannot be read ({e}). Get a fresh copy of the '
        f'file.') from e
  layers = []
  for i, name in enumerate(names):
    try:
      layer_group = group[name]
      weight_names = _attribute_list(layer_group, 'weight_names')
      shapes = [tuple(layer_group[w].shape) for w in weight_names]
    except (OSError, KeyError, ValueError) as e:
      raise errors.KerasWeightsError(
          f'{path} is corrupt: layer "{name}" (entry {i} of its layer_names, after '
          f'{len(layers)} layers with weights) cannot be read ({e}). Get a fresh copy of the '
          f'file.') from e
    if weight_names:
      layers.append(FileLayer(len(layers), name, layer_group, weight_names, shapes))
  return layers


def read_pairs(path, pairs: list[tuple[Layer, FileLayer]]) -> Variables:
  """Our variables from each file layer's arrays, read into the paired layer of ours.

  Every array must be finite, a BatchNormalization's moving variance non-negative (else the
  arrays are not in the order the pairing assumes)."""
  variables: Variables = {'params': {}, 'batch_stats': {}}
  for ours, theirs in pairs:
    try:
      arrays = [np.asarray(theirs.group[w], dtype=np.float32) for w in theirs.weight_names]
    except (OSError, KeyError, ValueError) as e:
      raise errors.KerasWeightsError(
          f'{path} is corrupt: reading {theirs.describe()} failed ({e}). Get a fresh copy of '
          f'the file.') from e
    for array, (collection, keys) in zip(arrays, ours.targets):
      if not np.all(np.isfinite(array)):
        raise errors.KerasWeightsError(
            f'{path} is corrupt: {theirs.describe()} holds NaN or infinite values. Get a fresh '
            f'copy of the file.')
      if keys[-1] == 'var' and np.any(array < 0):
        raise errors.KerasWeightsError(
            f'{path}: {theirs.describe()} has a negative moving variance, so its arrays are '
            f'not [{", ".join(ours.keras_weight_names())}] as a BatchNormalization stores '
            f'them. Is it a file of another architecture?')
      _set(variables, collection, keys, array)
  return variables


def read_variables(path: pathlib.Path, layers: list[FileLayer],
                   ours: list[Layer]) -> Variables:
  """The file's layers read, by position, into `ours` (e.g. `ordered_layers`)."""
  return read_pairs(path, list(zip(ours, layers)))


def _configuration_for_file(backbone: backbones.Backbone, layers: list[FileLayer]
                            ) -> tuple[str, bool, int]:
  """(final endpoint, include_top, num_classes) the file's layer count and last layer point
  to."""
  last = layers[-1] if layers else None
  if last and len(last.shapes) == 2 and len(last.shapes[0]) == 2 and len(last.shapes[1]) == 1:
    # A Dense layer at the end: the classification top.
    return backbone.endpoints[-1], True, last.shapes[1][0]
  for endpoint in backbone.endpoints:
    if len(backbone.keras_layer_order(endpoint)) == len(layers):
      return endpoint, False, 1000
  return backbone.endpoints[-1], False, 1000


def _count_summary(backbone: backbones.Backbone) -> str:
  notop = len(backbone.keras_layer_order())
  top = len(backbone.keras_layer_order(include_top=True))
  example = backbone.endpoints[len(backbone.endpoints) * 2 // 3]
  return (f'{backbone.keras_name} has {notop} layers with weights without its top, {top} with '
          f'it (fewer for a network cut at an endpoint: '
          f'{len(backbone.keras_layer_order(example))} up to {example})')


def _check_layers(path: pathlib.Path, backbone: backbones.Backbone, layers: list[FileLayer],
                  ours: list[Layer]) -> None:
  """Raises KerasWeightsError naming the first layer of the file that does not fit."""
  mismatches = [i for i, (theirs, layer_) in enumerate(zip(layers, ours))
                if tuple(theirs.shapes) != layer_.shapes]
  if not mismatches and len(layers) == len(ours):
    return
  name = backbone.keras_name
  problem = (f'{path} does not hold Keras {name} weights: {_count_summary(backbone)}; '
             f'the file has {len(layers)}.')
  if mismatches:
    i = mismatches[0]
    problem += (f' The first layer that does not fit is {layers[i].describe()}, where '
                f'{name} expects its {ours[i].describe_keras(i)}'
                f' ({len(mismatches)} layers differ in all).')
  elif len(layers) < len(ours):
    i = len(layers)
    problem += f" The file ends before {name}'s {ours[i].describe_keras(i)}."
  else:
    problem += (f' It has more layers after the last one {name} expects, from '
                f'{layers[len(ours)].describe()}.')
  raise errors.KerasWeightsError(problem + ' Is it a file of another architecture?')


def open_h5(path: pathlib.Path) -> h5py.File:
  """Opens a Keras HDF5 file for reading; a missing, non-HDF5 or truncated file is explained."""
  if not path.is_file():
    raise errors.DataNotFoundError(f'No Keras weights file at {path}.')
  if not h5py.is_hdf5(path):
    with open(path, 'rb') as f:
      head = f.read(16)
    raise errors.KerasWeightsError(
        f'{path} is not an HDF5 file (it starts with {head!r}). Expected a Keras .h5 file, as '
        f"written by model.save_weights('x.h5') or model.save('x.h5'), e.g. "
        f'{official.OFFICIAL_WEIGHTS["imagenet"].filename}.')
  try:
    return h5py.File(path, 'r')
  except OSError as e:
    official_size = official.OFFICIAL_WEIGHTS['imagenet'].size
    raise errors.KerasWeightsError(
        f'{path} ({path.stat().st_size:,} bytes) is an HDF5 file that cannot be opened: {e}. '
        f'It is probably truncated or corrupt (an interrupted download?): get a fresh copy '
        f'(the official notop file is {official_size:,} bytes).') from e


def load_h5(path: str | os.PathLike, backbone: str | None = None):
  """Reads the weights of a backbone whose Keras files pair layers by position (default: the
  default backbone) from a legacy HDF5 file.

  Args:
    path: a weights-only file (`save_weights('x.h5')`, the official ImageNet files) or a
      whole-model file (`model.save('x.h5')`), with or without the top, or of a Keras model
      cut at one of the endpoints.
    backbone: config.model.backbone.

  Returns:
    (model, variables): the backbone's module configured as the file is (`include_top`,
    `num_classes`, `final_endpoint`) and its variables `{'params': ..., 'batch_stats': ...}`,
    nested dicts of float32 numpy arrays.

  Raises:
    DataNotFoundError: no file at `path`.
    KerasWeightsError: not an HDF5 file, truncated or corrupt, or not the backbone's weights.
  """
  declared = backbones.get(backbone)
  path = pathlib.Path(path).expanduser()
  with open_h5(path) as f:
    group = open_weights_group(f, path)
    layers = file_layers(group, path)
    final, top, num_classes = _configuration_for_file(declared, layers)
    abstract = backbone_abstract_variables(declared, final, top, num_classes)
    ours = ordered_layers(abstract, declared.keras_layer_order(final, top))
    _check_layers(path, declared, layers, ours)
    variables = read_variables(path, layers, ours)
  check_variables(variables, abstract, source=str(path))
  return declared.build(final, include_top=top, num_classes=num_classes), variables


def check_variables(variables: Variables, abstract: Variables, source: str) -> None:
  """Every variable of the model present with its shape, and nothing else.

  The last guard before variables are handed out or written: whatever produced them (a file's
  layers paired by position, an orbax restore), they must be exactly the model's.
  """
  report = trees.describe_differences(
      trees.leaf_specs(variables), trees.leaf_specs(abstract),
      got_name='the variables', want_name='the model')
  if report:
    raise errors.KerasWeightsError(f'{source}: the variables do not fit the model:\n{report}')


def cut(model, variables: Variables, final_endpoint: str):
  """The network (any declared backbone) up to `final_endpoint` (no top) and its share of
  `variables`."""
  backbone = backbones.of_module(model)
  endpoints = backbone.endpoints
  if final_endpoint not in endpoints:
    raise ValueError(f'final_endpoint must be one of {endpoints}, got {final_endpoint!r}.')
  if endpoints.index(final_endpoint) > endpoints.index(model.final_endpoint):
    raise errors.KerasWeightsError(
        f'Cannot cut at {final_endpoint}: these weights end at {model.final_endpoint}.')
  keep = set(backbone.blocks_to(final_endpoint))
  variables = {collection: {k: v for k, v in tree.items() if k in keep}
               for collection, tree in variables.items()}
  return backbone.build(final_endpoint), variables
