"""Keras classifier files read: InceptionV3 cut at a block plus a dense head, and its weights.

The classifier is the Keras tutorial's (`hhjax.weights.keras_classifier` spells it out).
`read_classifier` reads it from the files Keras writes: the whole-model HDF5 of `model.save('x.h5')`
(tf_keras or Keras 3), Keras 3's `.keras` archive, and the weights-only HDF5 of tf_keras's
`save_weights('x.h5')`. The first two carry the model config, from which the cut, the head, the
class count and the image size are read; a weights-only file says none of it, so the config's
`model` section and `data.image_size` describe it. As for the backbone alone
(`hhjax.weights.keras_h5`), layers with weights are paired by position and every shape is
checked; a file that is not such a classifier is refused naming the first layer that does not fit.
The files are opened by `hhjax.weights.keras_files`. Only h5py and json are needed: neither
TensorFlow nor Keras.
"""

import dataclasses
import pathlib
from typing import Any

import numpy as np

from hhjax import errors
from hhjax.model import backbones
from hhjax.weights import keras_classifier
from hhjax.weights import keras_files
from hhjax.weights import keras_h5
from hhjax.weights import keras_named

Variables = keras_h5.Variables
FileLayer = keras_h5.FileLayer
KerasClassifier = keras_classifier.KerasClassifier
KerasFile = keras_files.KerasFile

# Layer classes of the default backbone's keras.applications model (InceptionV3), and of the
# heads hhjax represents.
_BACKBONE_CLASSES = ('InputLayer', 'Conv2D', 'BatchNormalization', 'Activation',
                     'MaxPooling2D', 'AveragePooling2D', 'Concatenate')
_HEAD_CLASSES = ('Flatten', 'GlobalAveragePooling2D', 'Dense', 'Dropout')
_POOLS = {'Flatten': 'flatten', 'GlobalAveragePooling2D': 'gap'}
_HEAD_GRAMMAR = keras_classifier.HEAD_GRAMMAR


def _misfit(layers: list[FileLayer], expected: list[tuple[str, list]]) -> str | None:
  """Where `layers` first stop fitting `expected`, in words; None if they fit."""
  for i, (layer, (path, shapes)) in enumerate(zip(layers, expected)):
    if layer.shapes != shapes:
      return (f'The first layer that does not fit is {layer.describe()}, where the classifier '
              f'expects its {keras_classifier.describe_expected(i, path, shapes)}.')
  if len(layers) < len(expected):
    i = len(layers)
    return ("The file ends before the classifier's "
            f'{keras_classifier.describe_expected(i, *expected[i])}.')
  if len(layers) > len(expected):
    return (f'The file has more layers after the last one the classifier expects, from '
            f'{layers[len(expected)].describe()}.')
  return None


# ------------------------------------------------------------------ the model config


def _inbound_names(layer: dict[str, Any]) -> list[str]:
  """The layers whose outputs `layer` reads, from tf_keras's or Keras 3's config format."""
  names = []

  def walk(node):
    if isinstance(node, dict):
      history = node.get('config', {}).get('keras_history') if node.get(
          'class_name') == '__keras_tensor__' else None
      if history:   # Keras 3: {'class_name': '__keras_tensor__', ... 'keras_history': [n, 0, 0]}
        names.append(history[0])
      else:
        for value in node.values():
          walk(value)
    elif isinstance(node, list):
      if len(node) >= 3 and isinstance(node[0], str) and isinstance(node[1], int):
        names.append(node[0])   # tf_keras: [name, node index, tensor index, kwargs]
      else:
        for value in node:
          walk(value)

  walk(layer.get('inbound_nodes', []))
  return names


def _words(layer: dict[str, Any]) -> str:
  """'layer "dense_1" (Dense(2, softmax))': a config layer as an error message names it."""
  cls, cfg = layer.get('class_name'), layer.get('config') or {}
  detail = {'Dense': lambda: f'({cfg.get("units")}, {cfg.get("activation")})',
            'Dropout': lambda: f'({cfg.get("rate")})'}.get(cls, lambda: '')()
  return f'layer "{layer.get("name")}" ({cls}{detail})'


def _input_size(path: pathlib.Path, layers: list[dict[str, Any]]) -> int | None:
  """The square input size the model was built for; None if it is left open."""
  inputs = [l for l in layers if l.get('class_name') == 'InputLayer']
  cfg = (inputs[0].get('config') or {}) if len(inputs) == 1 else {}
  shape = cfg.get('batch_input_shape') or cfg.get('batch_shape')
  if not shape or len(shape) != 4 or shape[3] != 3:
    raise errors.KerasWeightsError(
        f'{path}: expected one input of RGB images (batch, S, S, 3); found '
        f'{[l.get("name") for l in inputs]} with shape {shape}.')
  height, width = shape[1:3]
  if height is None or width is None:
    return None
  if height != width:
    raise errors.KerasWeightsError(
        f'{path}: the model takes {height}x{width} images; hhjax trains on square images.')
  return int(height)


def _parse_head(path: pathlib.Path, head: list[dict[str, Any]]) -> tuple[str, int, float, int]:
  """(kind, hidden, dropout, outputs) of the head's config layers, or an error naming the one
  that hhjax's head cannot represent."""
  def refuse(layer, why):
    return errors.KerasWeightsError(
        f'{path}: the head cannot be represented: {_words(layer)} {why}. {_HEAD_GRAMMAR}.')

  for before, layer in zip(head, head[1:]):
    if _inbound_names(layer) != [before.get('name')]:
      raise refuse(layer, f'reads {_inbound_names(layer)}, not only the layer before it')
  cfg = [layer.get('config') or {} for layer in head]
  if head[0].get('class_name') not in _POOLS:
    raise refuse(head[0], 'comes right after the backbone')
  if cfg[0].get('keepdims') or cfg[0].get('data_format') not in (None, 'channels_last'):
    raise refuse(head[0], 'keeps dims or is not channels_last')
  i, hidden, dropout = 1, 0, 0.0
  if i < len(head) - 1 and head[i].get('class_name') == 'Dense':
    if cfg[i].get('activation') != 'relu' or not cfg[i].get('use_bias', True):
      raise refuse(head[i], 'is a hidden layer without relu or without a bias')
    hidden, i = int(cfg[i]['units']), i + 1
  if i < len(head) - 1 and head[i].get('class_name') == 'Dropout':
    if cfg[i].get('noise_shape') is not None:
      raise refuse(head[i], 'has a noise_shape')
    dropout, i = float(cfg[i].get('rate', 0.0)), i + 1
  if i != len(head) - 1 or head[i].get('class_name') != 'Dense':
    raise refuse(head[i], 'is where the output Dense layer should be')
  units, activation = int(cfg[i].get('units', 0)), cfg[i].get('activation')
  if not cfg[i].get('use_bias', True) or not (
      (units == 1 and activation == 'sigmoid') or (units >= 3 and activation == 'softmax')):
    raise refuse(head[i], 'is not an output layer hhjax has')
  return _POOLS[head[0]['class_name']], hidden, dropout, units


def _cut(head_input: list[str], backbone: list[FileLayer], declared: backbones.Backbone) -> str:
  """The block the head reads: by name, else by the backbone's layer count.

  When neither tells, the last endpoint: the shape check then names the first layer that
  differs.
  """
  if len(head_input) == 1 and head_input[0] in declared.endpoints:
    return head_input[0]
  for endpoint in declared.endpoints:
    if len(declared.keras_layer_order(endpoint)) == len(backbone):
      return endpoint
  return declared.endpoints[-1]


def _not_a_classifier(path: pathlib.Path, expected: str, layers: list[FileLayer],
                      count: int, misfit: str) -> errors.KerasWeightsError:
  return errors.KerasWeightsError(
      f'{path} is not {expected}: it has {len(layers)} layers with weights, that model '
      f'{count}. {misfit} Is it a model of another architecture?')


# Layer classes of the keras.applications backbones whose layers Keras names.
_NAMED_BACKBONE_CLASSES = _BACKBONE_CLASSES + (
    'ZeroPadding2D', 'Add', 'SeparableConv2D',
    # EfficientNet: its input normalisation, MBConv blocks (squeeze-and-excitation with a
    # GlobalAveragePooling2D, drop-connect with a Dropout, inside the backbone).
    'Rescaling', 'Normalization', 'DepthwiseConv2D', 'Multiply', 'Reshape',
    'GlobalAveragePooling2D', 'Dropout',
    # MobileNetV2: its ReLU(6.) activations.
    'ReLU')


def _named_families() -> str:
  """'VGG16, VGG19, ...': the families whose files name their layers, for messages."""
  return ', '.join(dict.fromkeys(b.keras_name for b in backbones.BACKBONES.values()
                                 if b.keras_names == 'name'))


def _named_family(kf: KerasFile) -> tuple[backbones.Backbone, str] | None:
  """(family, last endpoint) of a backbone whose layers Keras names, from the file's layer
  names; None when no such family's first block is there (InceptionV3 then)."""
  names = {l.name for l in kf.layers}
  for backbone in backbones.BACKBONES.values():
    if backbone.keras_names != 'name':
      continue
    if not keras_named.named_layers_to(backbone, backbone.endpoints[0]) <= names:
      continue
    endpoint = keras_named.final_endpoint(backbone, names)
    named = {n for n in names if not any(keras_named.auto_named(n, p)
                                         for p in backbone.unnamed.values())}
    # Beside the backbone's layers, only the head's (auto-named Dense layers).
    if not keras_named.named_layers_to(backbone, endpoint) >= {
        n for n in named if not keras_named.auto_named(n, 'dense')}:
      continue
    # Of the right widths too (EfficientNetB1 and B2 name their first blocks alike, and
    # MobileNetV2's alphas all their layers).
    shapes = {l.name: tuple(l.shapes) for l in kf.layers}
    ours = keras_named.layers(backbone, keras_named.abstract_variables(backbone, endpoint))
    if all(shapes.get(l.keras_name, l.shapes) == l.shapes for l in ours if l.keras_name):
      return backbone, endpoint
  return None


def _named_cut(kf: KerasFile, layers: list[dict[str, Any]], head_input: list[str],
               backbone: backbones.Backbone, endpoint: str) -> str:
  """The endpoint the head reads: its input by name (Keras's unnamed Add layers by order)."""
  if len(head_input) == 1 and head_input[0] in backbone.endpoints:
    return head_input[0]
  adds = [l.get('name') for l in layers if l.get('class_name') == 'Add']
  if len(head_input) == 1 and head_input[0] in adds:
    index = adds.index(head_input[0])
    if index < len(backbone.unnamed_endpoints):
      return backbone.unnamed_endpoints[index]
  raise errors.KerasWeightsError(
      f'{kf.path}: the head reads {head_input}, not an endpoint of {backbone.keras_name} '
      f'(its backbone ends at {endpoint}); hhjax cuts at {list(backbone.endpoints)}.')


def _spec_from_model_config(kf: KerasFile) -> KerasClassifier:
  """The classifier a whole-model file's config describes (checking the backbone's weights)."""
  path = kf.path
  named = _named_family(kf)
  allowed = _NAMED_BACKBONE_CLASSES if named else _BACKBONE_CLASSES
  kind = kf.model_config.get('class_name') if isinstance(kf.model_config, dict) else None
  if kind not in ('Functional', 'Model'):
    raise errors.KerasWeightsError(
        f'{path} holds a Keras {kind} model; hhjax reads the functional model the Keras tutorial '
        f"builds, keras.Model(base.input, head(base.get_layer('mixed7').output)), with "
        f"the backbone's layers at its top level (not nested as one layer).")
  layers = keras_files.config_layers(kf.model_config)
  if not layers:
    raise keras_files.corrupt(path, 'its model config lists no layers')
  default = backbones.get(None)   # the family whose files pair by position
  for layer in layers:
    if layer.get('class_name') not in allowed + _HEAD_CLASSES:
      raise errors.KerasWeightsError(
          f'{path} is not a classifier hhjax reads: {_words(layer)} is neither a layer of '
          f'{default.keras_name} (its layers name none of {_named_families()}) nor of a head '
          f'hhjax represents. {_HEAD_GRAMMAR}.')
  start = next((i for i, l in enumerate(layers) if l.get('class_name') in _HEAD_CLASSES), None)
  if named:   # the head's pool is the last one (EfficientNet has pools and dropouts inside)
    start = next((i for i in reversed(range(len(layers)))
                  if layers[i].get('class_name') in _POOLS), start)
  if start is None:
    raise errors.KerasWeightsError(
        f'{path} has no classification head (its last layer is {_words(layers[-1])}): a '
        f'backbone alone is read as pretrained weights (config.model.pretrained).')
  head = layers[start:]
  for layer in head:
    if layer.get('class_name') not in _HEAD_CLASSES:
      raise errors.KerasWeightsError(
          f'{path}: the head cannot be represented: {_words(layer)} follows the head\'s '
          f'{_words(head[0])}. {_HEAD_GRAMMAR}.')
  image_size = _input_size(path, layers)
  backbone = kf.layers[:len(kf.layers) - sum(l.get('class_name') == 'Dense' for l in head)]
  if named:
    family, endpoint = named
    cut = _named_cut(kf, layers, _inbound_names(head[0]), family, endpoint)
    spec = KerasClassifier(cut, 'gap', 0, 0.0, 2, None, backbone=family.name)
    keras_named.pair(path, family, backbone, spec.backbone_layers())   # checks every shape
    kind, hidden, dropout, outputs = _parse_head(path, head)
    return KerasClassifier(cut, kind, hidden, dropout, 2 if outputs == 1 else outputs,
                           image_size, backbone=family.name)
  cut = _cut(_inbound_names(head[0]), backbone, default)
  bare = KerasClassifier(cut, 'gap', 0, 0.0, 2, None)   # the head's layers are left out
  order = keras_classifier.expected_layers(bare, default.min_size)[:-1]
  misfit = _misfit(backbone, order)
  if misfit:
    name = default.keras_name
    raise _not_a_classifier(path, f'an {name} classifier ({name} cut at {cut} and a head; its '
                            f'layers name none of {_named_families()})', backbone, len(order),
                            misfit)
  kind, hidden, dropout, outputs = _parse_head(path, head)
  return KerasClassifier(cut, kind, hidden, dropout, 2 if outputs == 1 else outputs, image_size)


def _spec_from_config(kf: KerasFile, described: KerasClassifier | None) -> KerasClassifier:
  """The classifier a weights-only file is taken to be: what the config describes, with the
  number of outputs the file's last layer has."""
  if described is None:
    raise errors.KerasWeightsError(
        f'{kf.path} holds weights only (as save_weights writes), not which model they belong '
        'to: give it with --config (config.model.cut, head, hidden, dropout and '
        'config.data.image_size as the Keras model was built).')
  last = kf.layers[-1].shapes if kf.layers else []
  outputs = last[-1][0] if len(last) == 2 and len(last[-1]) == 1 else 1
  # A 2-unit output is no head of ours: the shape check below names it.
  return dataclasses.replace(described, num_classes=2 if outputs <= 2 else outputs,
                             class_names=None, preprocessing=None)


# --------------------------------------------------------------------------- reading


def _read_head(kf: KerasFile, layers: list[FileLayer], paths: list[str]) -> dict[str, Any]:
  head = {}
  for layer, path in zip(layers, paths):
    try:
      kernel, bias = (np.asarray(layer.group[w], np.float32) for w in layer.weight_names)
    except (OSError, KeyError, ValueError) as e:
      raise keras_files.corrupt(kf.path, f'reading {layer.describe()} failed ({e})') from None
    if not (np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
      raise keras_files.corrupt(kf.path, f'{layer.describe()} holds NaN or infinite values')
    head[path.split('/')[1]] = {'kernel': kernel, 'bias': bias}
  return head


def _read_named(kf: KerasFile, spec: KerasClassifier, size: int) -> Variables:
  """A classifier on a backbone Keras names the layers of: the backbone by name, the head's
  Dense layers (the last ones) by position, every shape checked."""
  heads = spec.head_paths()
  base, top = kf.layers[:len(kf.layers) - len(heads)], kf.layers[len(kf.layers) - len(heads):]
  if len(top) < len(heads):
    raise _not_a_classifier(kf.path, f'the classifier {spec.describe()}', kf.layers,
                            len(heads), 'It has too few layers for the head.')
  abstract = spec.abstract_variables(size)
  for layer, path in zip(top, heads):
    want = [tuple(keras_classifier.leaf(abstract, c, k).shape)
            for c, k in keras_classifier.targets(path)]
    if layer.shapes != want:
      raise _not_a_classifier(
          kf.path, f'the classifier {spec.describe()}', kf.layers, len(kf.layers),
          f'Its {layer.describe()} does not fit the head\'s {path} ({want}).')
  backbone = keras_named.fold_rescaling(kf.model_config, keras_named.read(
      kf.path, keras_named.pair(kf.path, spec.declared, base, spec.backbone_layers())))
  head = _read_head(kf, top, heads)
  variables = {'params': {'backbone': backbone['params'], 'head': head}, 'batch_stats': {}}
  if backbone.get('batch_stats'):
    variables['batch_stats']['backbone'] = backbone['batch_stats']
  return variables


def _read(kf: KerasFile, spec: KerasClassifier) -> Variables:
  order = spec.declared.keras_layer_order(spec.cut)
  ours = keras_h5.ordered_layers(keras_h5.backbone_abstract_variables(spec.declared, spec.cut),
                                 order)
  backbone = keras_h5.read_variables(kf.path, kf.layers[:len(order)], ours)
  head = _read_head(kf, kf.layers[len(order):], spec.layer_paths()[len(order):])
  return {'params': {'backbone': backbone['params'], 'head': head},
          'batch_stats': {'backbone': backbone['batch_stats']}}


def _with_metadata(spec: KerasClassifier, kf: KerasFile) -> KerasClassifier:
  """The class names and preprocessing that hhjax's export stored beside the model."""
  names, preprocessing = kf.metadata.get('class_names'), kf.metadata.get('preprocessing')
  if names is not None and (not isinstance(names, list) or len(names) != spec.num_classes):
    raise keras_files.corrupt(kf.path, f'its hhjax metadata lists the classes {names!r} for a '
                                       f'model with {spec.num_classes}')
  return dataclasses.replace(spec, class_names=tuple(map(str, names)) if names else None,
                             preprocessing=preprocessing)


def read_classifier(path: str | pathlib.Path, described: KerasClassifier | None = None
                    ) -> tuple[KerasClassifier, Variables]:
  """Reads a Keras classifier (InceptionV3 cut at a block, plus the dense head) from a file.

  Args:
    path: a whole-model .h5 (`model.save('x.h5')`, tf_keras or Keras 3), a Keras 3 `.keras`
      file, or a weights-only .h5 (tf_keras `save_weights('x.h5')`).
    described: the classifier the config describes (config.model.cut, head, hidden, dropout
      and config.data.image_size; `hhjax.entry.keras_classifier`): what a weights-only file is
      taken to be, and the image size where a whole-model file leaves it open.

  Returns:
    (what the file says about the model, variables): `{'params': {'backbone', 'head'},
    'batch_stats': {'backbone'}}` as `hhjax.model.classifier.Classifier` has them, float32 numpy.

  Raises:
    DataNotFoundError: no file at `path`.
    KerasWeightsError: not a Keras file, truncated or corrupt, or not such a classifier (the
      message names the first layer that does not fit).
  """
  path = pathlib.Path(path).expanduser()
  with keras_files.open_file(path) as kf:
    if kf.model_config is not None:
      spec, source = _spec_from_model_config(kf), 'its model config'
    else:
      spec, source = _spec_from_config(kf, described), 'the config (a weights-only file)'
    size = spec.image_size or (described.image_size if described else spec.declared.min_size)
    if spec.by_name:
      variables = _read_named(kf, spec, size)
      spec = _with_metadata(spec, kf)
      keras_h5.check_variables(variables, spec.abstract_variables(size), source=str(path))
      return spec, variables
    expected = keras_classifier.expected_layers(spec, size)
    misfit = _misfit(kf.layers, expected)
    if misfit:
      raise _not_a_classifier(path, f'the classifier {source} describes, {spec.describe()}',
                              kf.layers, len(expected), misfit)
    variables = _read(kf, spec)
    spec = _with_metadata(spec, kf)
  keras_h5.check_variables(variables, spec.abstract_variables(size), source=str(path))
  return spec, variables


