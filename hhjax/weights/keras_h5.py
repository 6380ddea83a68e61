"""Keras's InceptionV3 .h5 files read into `hhjax.model.inception.InceptionV3` variables.

Reads Keras's legacy HDF5 files with h5py alone (no TensorFlow or Keras at run time):

* the weights-only file, with the attribute `layer_names` at its root: what
  `model.save_weights('x.h5')` writes, and what the official ImageNet files are;
* the whole-model file, with the group `model_weights`: what `model.save('x.h5')` writes.

Layers are paired **by position**, as Keras's own loader pairs them: the file's layers with
weights, in the file's order, against the model's layers with weights in Keras's `model.layers`
order. That order is sorted by depth in the graph, not by creation, so inside a mixed block the
branches interleave; `keras_layer_order()` spells it out for this module's parameter paths.
Names are not trusted (the official files, written by Keras 2.0, call the first convolution
`conv2d_1`, newer Keras calls it `conv2d`); every shape is checked instead.

Official weights are fetched by `hhjax.weights.official`; `hhjax.weights.pretrained` loads any
source (a name, an .h5 file, a converted folder) and converts files for offline machines.
"""

import dataclasses
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
from hhjax.model import inception
from hhjax.model.inception import ENDPOINTS, InceptionV3
from hhjax.weights import official

Variables = dict[str, Any]

# ------------------------------------------------------------------------------------------
# Keras's file order.
#
# The layers with weights inside each kind of block, in the order Keras's `model.layers` (and
# so every Keras HDF5 file) lists them: sorted by depth in the graph. `conv` is the Conv2D of a
# conv2d_bn unit, `bn` its BatchNormalization. tests/test_parity_keras.py checks this table
# against tf_keras's and Keras 3's models.

_STEM_ORDER = (
    'conv_1a_3x3/conv', 'conv_1a_3x3/bn', 'conv_2a_3x3/conv', 'conv_2a_3x3/bn',
    'conv_2b_3x3/conv', 'conv_2b_3x3/bn', 'conv_3b_1x1/conv', 'conv_3b_1x1/bn',
    'conv_4a_3x3/conv', 'conv_4a_3x3/bn')
_A_ORDER = (  # mixed0-mixed2
    'branch3x3dbl_1/conv', 'branch3x3dbl_1/bn', 'branch5x5_1/conv', 'branch3x3dbl_2/conv',
    'branch5x5_1/bn', 'branch3x3dbl_2/bn', 'branch1x1/conv', 'branch5x5_2/conv',
    'branch3x3dbl_3/conv', 'branch_pool/conv', 'branch1x1/bn', 'branch5x5_2/bn',
    'branch3x3dbl_3/bn', 'branch_pool/bn')
_B_ORDER = (  # mixed3
    'branch3x3dbl_1/conv', 'branch3x3dbl_1/bn', 'branch3x3dbl_2/conv', 'branch3x3dbl_2/bn',
    'branch3x3/conv', 'branch3x3dbl_3/conv', 'branch3x3/bn', 'branch3x3dbl_3/bn')
_C_ORDER = (  # mixed4-mixed7
    'branch7x7dbl_1/conv', 'branch7x7dbl_1/bn', 'branch7x7dbl_2/conv', 'branch7x7dbl_2/bn',
    'branch7x7_1/conv', 'branch7x7dbl_3/conv', 'branch7x7_1/bn', 'branch7x7dbl_3/bn',
    'branch7x7_2/conv', 'branch7x7dbl_4/conv', 'branch7x7_2/bn', 'branch7x7dbl_4/bn',
    'branch1x1/conv', 'branch7x7_3/conv', 'branch7x7dbl_5/conv', 'branch_pool/conv',
    'branch1x1/bn', 'branch7x7_3/bn', 'branch7x7dbl_5/bn', 'branch_pool/bn')
_D_ORDER = (  # mixed8
    'branch7x7x3_1/conv', 'branch7x7x3_1/bn', 'branch7x7x3_2/conv', 'branch7x7x3_2/bn',
    'branch3x3_1/conv', 'branch7x7x3_3/conv', 'branch3x3_1/bn', 'branch7x7x3_3/bn',
    'branch3x3_2/conv', 'branch7x7x3_4/conv', 'branch3x3_2/bn', 'branch7x7x3_4/bn')
_E_ORDER = (  # mixed9, mixed10
    'branch3x3dbl_1/conv', 'branch3x3dbl_1/bn', 'branch3x3_1/conv', 'branch3x3dbl_2/conv',
    'branch3x3_1/bn', 'branch3x3dbl_2/bn', 'branch3x3_2a/conv', 'branch3x3_2b/conv',
    'branch3x3dbl_3a/conv', 'branch3x3dbl_3b/conv', 'branch1x1/conv', 'branch3x3_2a/bn',
    'branch3x3_2b/bn', 'branch3x3dbl_3a/bn', 'branch3x3dbl_3b/bn', 'branch_pool/conv',
    'branch1x1/bn', 'branch_pool/bn')
_BLOCK_ORDER = {'stem': _STEM_ORDER, 'mixed0': _A_ORDER, 'mixed1': _A_ORDER, 'mixed2': _A_ORDER,
                'mixed3': _B_ORDER, 'mixed4': _C_ORDER, 'mixed5': _C_ORDER, 'mixed6': _C_ORDER,
                'mixed7': _C_ORDER, 'mixed8': _D_ORDER, 'mixed9': _E_ORDER, 'mixed10': _E_ORDER}


def keras_layer_order(final_endpoint: str = 'mixed10', include_top: bool = False) -> list[str]:
  """Module paths of our layers with weights, in Keras's file order.

  E.g. ['stem/conv_1a_3x3/conv', 'stem/conv_1a_3x3/bn', ..., 'mixed10/branch_pool/bn',
  'predictions']: entry k receives the k-th layer with weights of a Keras file. A network cut
  at an endpoint (a Keras model built up to `mixed7`, say) has a prefix of the full order.
  """
  if final_endpoint not in ENDPOINTS:
    raise ValueError(f'final_endpoint must be one of {ENDPOINTS}, got {final_endpoint!r}.')
  blocks = ('stem',) + ENDPOINTS[:ENDPOINTS.index(final_endpoint) + 1]
  order = [f'{block}/{layer}' for block in blocks for layer in _BLOCK_ORDER[block]]
  if include_top:
    order.append('predictions')
  return order


# ------------------------------------------------------------------------------------------
# Reading an HDF5 file.


# Keras's names for the arrays of each kind of layer, in the order Keras stores them.
_KERAS_WEIGHTS = {
    'conv': ('kernel',),
    'bn': ('beta', 'moving_mean', 'moving_variance'),
    'predictions': ('kernel', 'bias'),
}


def _targets(path: str) -> list[tuple[str, tuple[str, ...]]]:
  """(collection, key path) in our variables for each array of the Keras layer at `path`."""
  keys = tuple(path.split('/'))
  kind = keys[-1]
  if kind == 'conv':
    return [('params', keys + ('kernel',))]
  if kind == 'bn':
    return [('params', keys + ('bias',)), ('batch_stats', keys + ('mean',)),
            ('batch_stats', keys + ('var',))]
  if kind == 'predictions':
    return [('params', keys + ('kernel',)), ('params', keys + ('bias',))]
  raise AssertionError(f'unknown layer kind in {path!r}')


def _kind(path: str) -> str:
  return path.rsplit('/', 1)[-1]


def abstract_variables(model) -> Variables:
  """Shapes and dtypes of `model`'s (any declared backbone's) variables, computing nothing."""
  size = backbones.of_module(model).min_size
  if model.include_top and not isinstance(model, InceptionV3):
    size = 224   # VGG's top flattens Keras's 7x7 grid.
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def _get(tree: Variables, collection: str, keys: tuple[str, ...]):
  node = tree[collection]
  for key in keys:
    node = node[key]
  return node


def _set(tree: Variables, collection: str, keys: tuple[str, ...], value) -> None:
  node = tree.setdefault(collection, {})
  for key in keys[:-1]:
    node = node.setdefault(key, {})
  node[keys[-1]] = value


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


def _describe_expected(index: int, path: str, shapes: list[tuple[int, ...]]) -> str:
  names = _KERAS_WEIGHTS[_kind(path)]
  weights = ', '.join(f'{n} {s}' for n, s in zip(names, shapes))
  return f'layer #{index}, {path} ({weights})'


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


def _expected_shapes(order: list[str], abstract: Variables) -> list[list[tuple[int, ...]]]:
  return [[tuple(_get(abstract, c, k).shape) for c, k in _targets(p)] for p in order]


def _model_for_file(layers: list[FileLayer]) -> InceptionV3:
  """The InceptionV3 configuration the file's layer count and last layer point to."""
  last = layers[-1] if layers else None
  if last and len(last.shapes) == 2 and len(last.shapes[0]) == 2 and len(last.shapes[1]) == 1:
    # A Dense layer at the end: the classification top.
    return InceptionV3(include_top=True, num_classes=last.shapes[1][0])
  for endpoint in ENDPOINTS:
    if len(keras_layer_order(endpoint)) == len(layers):
      return InceptionV3(final_endpoint=endpoint)
  return InceptionV3()


def _count_summary() -> str:
  notop = len(keras_layer_order())
  return (f'InceptionV3 has {notop} layers with weights without its top, {notop + 1} with it '
          f'(fewer for a network cut at an endpoint: '
          f'{len(keras_layer_order("mixed7"))} up to mixed7)')


def _check_layers(path: pathlib.Path, layers: list[FileLayer], order: list[str],
                  expected: list[list[tuple[int, ...]]]) -> None:
  """Raises KerasWeightsError naming the first layer of the file that does not fit."""
  mismatches = [i for i, (layer, shapes) in enumerate(zip(layers, expected))
                if layer.shapes != shapes]
  if not mismatches and len(layers) == len(order):
    return
  problem = (f'{path} does not hold Keras InceptionV3 weights: {_count_summary()}; '
             f'the file has {len(layers)}.')
  if mismatches:
    i = mismatches[0]
    problem += (f' The first layer that does not fit is {layers[i].describe()}, where '
                f'InceptionV3 expects its {_describe_expected(i, order[i], expected[i])}'
                f' ({len(mismatches)} layers differ in all).')
  elif len(layers) < len(order):
    i = len(layers)
    expected_layer = _describe_expected(i, order[i], expected[i])
    problem += f" The file ends before InceptionV3's {expected_layer}."
  else:
    problem += (f' It has more layers after the last one InceptionV3 expects, from '
                f'{layers[len(order)].describe()}.')
  raise errors.KerasWeightsError(problem + ' Is it a file of another architecture?')


def read_variables(path: pathlib.Path, layers: list[FileLayer],
                    order: list[str]) -> Variables:
  variables: Variables = {'params': {}, 'batch_stats': {}}
  for layer, target in zip(layers, order):
    try:
      arrays = [np.asarray(layer.group[w], dtype=np.float32) for w in layer.weight_names]
    except (OSError, KeyError, ValueError) as e:
      raise errors.KerasWeightsError(
          f'{path} is corrupt: reading {layer.describe()} failed ({e}). Get a fresh copy of '
          f'the file.') from e
    for array, (collection, keys) in zip(arrays, _targets(target)):
      if not np.all(np.isfinite(array)):
        raise errors.KerasWeightsError(
            f'{path} is corrupt: {layer.describe()} holds NaN or infinite values. Get a fresh '
            f'copy of the file.')
      _set(variables, collection, keys, array)
    if _kind(target) == 'bn' and np.any(arrays[2] < 0):
      raise errors.KerasWeightsError(
          f'{path}: {layer.describe()} has a negative moving variance, so its arrays are not '
          f'[beta, moving_mean, moving_variance] as a BatchNormalization(scale=False) stores '
          f'them. Is it a file of another architecture?')
  return variables


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


def load_h5(path: str | os.PathLike) -> tuple[InceptionV3, Variables]:
  """Reads Keras InceptionV3 weights from a legacy HDF5 file.

  Args:
    path: a weights-only file (`save_weights('x.h5')`, the official ImageNet files) or a
      whole-model file (`model.save('x.h5')`), with or without the top, or of a Keras model
      cut at one of the endpoints.

  Returns:
    (model, variables): an `InceptionV3` configured as the file is (`include_top`,
    `num_classes`, `final_endpoint`) and its variables `{'params': ..., 'batch_stats': ...}`,
    nested dicts of float32 numpy arrays.

  Raises:
    DataNotFoundError: no file at `path`.
    KerasWeightsError: not an HDF5 file, truncated or corrupt, or not InceptionV3's weights.
  """
  path = pathlib.Path(path).expanduser()
  with open_h5(path) as f:
    group = open_weights_group(f, path)
    layers = file_layers(group, path)
    model = _model_for_file(layers)
    order = keras_layer_order(model.final_endpoint, model.include_top)
    abstract = abstract_variables(model)
    _check_layers(path, layers, order, _expected_shapes(order, abstract))
    variables = read_variables(path, layers, order)
  check_variables(variables, abstract, source=str(path))
  return model, variables


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
