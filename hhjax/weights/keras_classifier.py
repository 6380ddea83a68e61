"""The Keras classifier as Keras lays it out: what it is, its layers' order, built in Keras.

The tutorial's classifier, which `hhjax.model.classifier.Classifier` computes (on InceptionV3
here; `KerasClassifier.backbone` names the keras.applications model of any declared backbone):

    base = keras.applications.InceptionV3(include_top=False, input_shape=(S, S, 3), ...)
    x = layers.Flatten()(base.get_layer('mixed7').output)   # or GlobalAveragePooling2D()
    x = layers.Dense(1024, activation='relu')(x)             # optional
    x = layers.Dropout(0.2)(x)                               # optional
    x = layers.Dense(1, activation='sigmoid')(x)             # or Dense(k, 'softmax'), k >= 3
    model = keras.Model(base.input, x)

`KerasClassifier` says which one (cut, head, class count, image size); `layer_paths` pairs its
Keras layers with weights, in `model.layers` order, with our parameter paths (InceptionV3's
backbone by position, `Backbone.keras_layer_order`; the other families' by
name, `keras_layer_paths`); `build_keras_classifier` builds it in Keras 3
or tf_keras holding our variables. `hhjax.weights.keras_model` reads such models from files.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hhjax.model import backbones
from hhjax.model import classifier
from hhjax.weights import keras_h5
from hhjax.weights import keras_named

Variables = keras_h5.Variables

# What hhjax's export stores beside the model (class names, preprocessing): a member of the
# .keras archive and an attribute of the .h5 root. Keras's loaders ignore both.
METADATA_MEMBER = 'hhjax.json'
METADATA_ATTRIBUTE = 'hhjax'

# The heads `hhjax.model.classifier.Head` computes, in Keras's words.
HEAD_GRAMMAR = ("hhjax's head is Flatten or GlobalAveragePooling2D -> an optional "
                "Dense(n, relu) -> an optional Dropout -> Dense(1, sigmoid) for two classes or "
                "Dense(k, softmax) for k >= 3 classes, each with a bias")
# Keras's names for each kind of layer's arrays, in the order Keras stores them.
KERAS_WEIGHTS = {'conv': ('kernel',), 'bn': ('beta', 'moving_mean', 'moving_variance'),
                 'dense': ('kernel', 'bias')}


@dataclasses.dataclass(frozen=True)
class KerasClassifier:
  """What a Keras classifier file says about its model (or what the config says for it)."""
  cut: str
  head: str                  # 'flatten' or 'gap'
  hidden: int                # 0: no hidden Dense layer
  dropout: float
  num_classes: int           # 2: one sigmoid unit; more: a softmax
  image_size: int | None     # None where the file leaves the input size open
  class_names: tuple[str, ...] | None = None   # only in files hhjax exported
  preprocessing: str | None = None             # idem
  backbone: str = backbones.DEFAULT            # config.model.backbone

  @property
  def declared(self) -> backbones.Backbone:
    return backbones.get(self.backbone)

  @property
  def by_name(self) -> bool:
    """Whether Keras names the backbone's layers (read and written by name, not position)."""
    return self.declared.keras_names == 'name'

  def backbone_layers(self) -> list[keras_named.Layer]:
    """The backbone's layers with weights up to the cut, for the families Keras names."""
    return keras_named.layers(self.declared,
                              keras_named.abstract_variables(self.declared, self.cut))

  def head_paths(self) -> list[str]:
    return (['head/hidden'] if self.hidden else []) + ['head/output']

  def describe(self) -> str:
    """'InceptionV3 cut at mixed7 -> Flatten -> Dense(1024, relu) -> ...', for messages."""
    parts = [f'{self.declared.keras_name} cut at {self.cut}',
             'Flatten' if self.head == 'flatten' else 'GlobalAveragePooling2D']
    parts += [f'Dense({self.hidden}, relu)'] if self.hidden else []
    parts += [f'Dropout({self.dropout:g})'] if self.dropout else []
    outputs = classifier.num_outputs(self.num_classes)
    parts.append(f'Dense({outputs}, {"sigmoid" if outputs == 1 else "softmax"})')
    size = f' at {self.image_size}x{self.image_size}' if self.image_size else ''
    return ' -> '.join(parts) + size

  def layer_paths(self) -> list[str]:
    """Our module paths of the layers with weights, in Keras's order (what a file lists).

    InceptionV3 only: the other families' layers are paired by name (`keras_layer_paths`)."""
    if self.by_name:
      raise ValueError(f'{self.declared.keras_name} layers are paired by name, not position.')
    backbone = [f'backbone/{p}' for p in self.declared.keras_layer_order(self.cut)]
    return backbone + self.head_paths()

  def flax_model(self) -> classifier.Classifier:
    """Our model (logits; no speed rewrites) for these variables."""
    return classifier.Classifier(cut=self.cut, num_classes=self.num_classes, head=self.head,
                                 hidden=self.hidden, dropout=self.dropout,
                                 backbone=self.backbone)

  def abstract_variables(self, image_size: int) -> Variables:
    """Shapes of the classifier's variables at `image_size` (the flatten head depends on it)."""
    return _abstract_variables(self.flax_model(), image_size)


@functools.lru_cache(maxsize=16)
def _abstract_variables(model: classifier.Classifier, image_size: int) -> Variables:
  # Tracing InceptionV3 takes about a second; a read asks for the same shapes several times.
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)


def kind(path: str) -> str:
  """'conv', 'bn' or 'dense': the kind of layer at one of `layer_paths`."""
  return 'dense' if path.startswith('head/') else path.rsplit('/', 1)[-1]


def targets(path: str) -> list[tuple[str, tuple[str, ...]]]:
  """(collection, key path) in the classifier's variables for each array of a Keras layer."""
  keys = tuple(path.split('/'))
  return {'conv': [('params', keys + ('kernel',))],
          'bn': [('params', keys + ('bias',)), ('batch_stats', keys + ('mean',)),
                 ('batch_stats', keys + ('var',))],
          'dense': [('params', keys + ('kernel',)), ('params', keys + ('bias',))]}[kind(path)]


def leaf(tree: Variables, collection: str, keys: tuple[str, ...]):
  """The array at `keys` in `tree[collection]`."""
  node = tree[collection]
  for key in keys:
    node = node[key]
  return node


def expected_layers(spec: KerasClassifier,
                    image_size: int) -> list[tuple[str, list[tuple[int, ...]]]]:
  """(path, shapes of its Keras arrays) for each layer with weights of the classifier."""
  abstract = spec.abstract_variables(image_size)
  return [(p, [tuple(leaf(abstract, c, k).shape) for c, k in targets(p)])
          for p in spec.layer_paths()]


def describe_expected(index: int, path: str, shapes: list[tuple[int, ...]]) -> str:
  """'layer #i, path (kernel (3, 3, 3, 32))': what the classifier expects at position i."""
  weights = ', '.join(f'{n} {s}' for n, s in zip(KERAS_WEIGHTS[kind(path)], shapes))
  return f'layer #{index}, {path} ({weights})'


def metadata(spec: KerasClassifier) -> dict[str, Any]:
  """What hhjax's export stores beside a Keras model, for `read_classifier` to find again."""
  return {'class_names': list(spec.class_names or ()), 'preprocessing': spec.preprocessing,
          'image_size': spec.image_size}


def keras_layers_with_weights(model) -> list[Any]:
  """A Keras model's layers with weights, in `model.layers` order (what its files list)."""
  return [layer for layer in model.layers if layer.weights]


@dataclasses.dataclass(frozen=True)
class KerasLayerPath:
  """A Keras layer with weights, our variables for its arrays (Keras's order), and its block."""
  layer: Any
  targets: tuple[tuple[str, tuple[str, ...]], ...]
  block: str            # 'head' or the backbone block holding it
  is_batch_norm: bool


def keras_layer_paths(model, spec: KerasClassifier) -> list[KerasLayerPath]:
  """Each layer with weights of a Keras classifier of `spec` and where its arrays go.

  InceptionV3's are paired by position; the other families' backbone layers by name (Keras's
  unnamed ones in order), the head's Dense layers, the last ones, by position."""
  layers = keras_layers_with_weights(model)
  head = spec.head_paths()
  if not spec.by_name:
    paths = spec.layer_paths()
    if len(layers) != len(paths):
      raise ValueError(f'The Keras model has {len(layers)} layers with weights, '
                       f'{spec.describe()} {len(paths)}.')
    return [KerasLayerPath(l, tuple(targets(p)), p.split('/')[1] if p.startswith('backbone/')
                           else 'head', kind(p) == 'bn') for l, p in zip(layers, paths)]
  base, top = layers[:len(layers) - len(head)], layers[len(layers) - len(head):]
  as_file = [keras_h5.FileLayer(i, l.name, None, [w.name for w in l.weights],
                                [tuple(w.shape) for w in l.weights]) for i, l in enumerate(base)]
  pairs = keras_named.pair('the Keras model', spec.declared, as_file, spec.backbone_layers())
  by_name = {l.name: l for l in base}
  out = [KerasLayerPath(by_name[theirs.name],
                        tuple((c, ('backbone',) + k) for c, k in ours.targets), ours.path[0],
                        any(c == 'batch_stats' for c, _ in ours.targets))
         for ours, theirs in pairs]
  return out + [KerasLayerPath(l, tuple(targets(p)), 'head', False) for l, p in zip(top, head)]


def set_keras_weights(model, spec: KerasClassifier, variables: Variables) -> None:
  """Copies `variables` into a Keras classifier built as `build_keras_classifier` builds it."""
  for entry in keras_layer_paths(model, spec):
    entry.layer.set_weights([np.asarray(leaf(variables, c, k), np.float32)
                             for c, k in entry.targets])
    if hasattr(entry.layer, 'finalize_state'):
      # A Normalization layer (EfficientNet's) computes with a copy of its arrays that only
      # finalize_state refreshes: without it the model would compute with the old ones.
      entry.layer.finalize_state()


def keras_endpoint(base, backbone: backbones.Backbone, endpoint: str):
  """The Keras layer that outputs `endpoint` in a keras.applications model `base`.

  Endpoints Keras leaves unnamed (Xception's additions, `backbone.unnamed_endpoints`) are its
  Add layers, in order."""
  if endpoint in backbone.unnamed_endpoints:
    adds = [l for l in base.layers if type(l).__name__ == 'Add']
    return adds[backbone.unnamed_endpoints.index(endpoint)]
  return base.get_layer(endpoint)


def build_keras_classifier(keras_module, spec: KerasClassifier,
                           variables: Variables | None = None):
  """The tutorial's model in Keras (`keras` 3 or `tf_keras`), holding `variables` if given.

  keras.applications.<the backbone> (no weights) cut at spec.cut, then the head, as the Keras
  tutorial builds it; the result has the same layers, in the same order, as a model the
  tutorial trained, so Keras's loaders and `fit` treat both alike.
  """
  if spec.image_size is None:
    raise ValueError('build_keras_classifier needs spec.image_size.')
  layers = keras_module.layers
  base = spec.declared.keras_application(
      keras_module, include_top=False, weights=None,
      input_shape=(spec.image_size, spec.image_size, 3))
  pool = layers.Flatten() if spec.head == 'flatten' else layers.GlobalAveragePooling2D()
  x = pool(keras_endpoint(base, spec.declared, spec.cut).output)
  if spec.hidden:
    x = layers.Dense(spec.hidden, activation='relu')(x)
  if spec.dropout:
    x = layers.Dropout(spec.dropout)(x)
  outputs = classifier.num_outputs(spec.num_classes)
  x = layers.Dense(outputs, activation='sigmoid' if outputs == 1 else 'softmax')(x)
  model = keras_module.Model(base.input, x)
  if variables is not None:
    set_keras_weights(model, spec, variables)
  return model
